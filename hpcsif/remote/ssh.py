"""SSH fan-out with paramiko: run one command on many nodes, copy files over SFTP.

* :func:`fan_out` runs a command on every node, at most ``parallel`` at once, each bounded by
  ``timeout`` seconds (connect, authenticate, run), and returns one :class:`NodeResult` per node
  in the order given — a node that cannot be reached is a failed row, never an exception.
* :func:`sftp_copy` copies one file to (or from) a node atomically: it is written under a
  temporary name in the destination directory, flushed to disk, then renamed into place.
* :func:`copy_to_nodes` does that for many nodes in parallel.

Host keys come from ``~/.ssh/known_hosts`` (or the ``known_hosts`` file given) and from
``/etc/ssh/ssh_known_hosts``, read as OpenSSH reads them: hashed names, ``*``/``?`` patterns and
``!`` negations (``node* ssh-ed25519 …`` for nodes sharing one host key), ``[host]:port`` names,
``@revoked`` keys refused; ``@cert-authority`` lines (host certificates, which paramiko cannot
check) and lines that do not parse are skipped, the latter with a warning. An unknown host is
refused unless ``auto_add`` is set, and even then each accepted key is logged with its
fingerprint. Keys are never written back to a known_hosts file.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import posixpath
import re
import select
import shlex
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import paramiko

from hpcsif.errors import RemoteError

log = logging.getLogger(__name__)

TAIL_BYTES = 4096  # output kept per node and stream: enough for the summary table and errors
#: read besides the user's known_hosts, as OpenSSH's GlobalKnownHostsFile
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


@dataclass(frozen=True)
class NodeResult:
    """What happened on one node."""

    node: str
    ok: bool
    exit_code: int | None  # None when the command never ran or did not finish
    stdout: str  # the last TAIL_BYTES of standard output
    stderr: str  # the last TAIL_BYTES of standard error
    error: str | None  # why it failed, one line; None when ok
    seconds: float


@dataclass(frozen=True)
class _KnownHost:
    """One line of a known_hosts file."""

    patterns: tuple[str, ...]
    key: paramiko.PKey
    revoked: bool


@dataclass(frozen=True)
class SshOptions:
    """How to reach the nodes."""

    port: int = 22
    user: str | None = None
    key_filename: str | None = None
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    auto_add: bool = False
    timeout: float = 600.0  # per node: connect + authenticate + command
    known: tuple[_KnownHost, ...] = ()  # the lines of the known_hosts files, read once


class _RevokedHostKey(paramiko.SSHException):
    """The node presented a key marked ``@revoked`` in known_hosts."""


class _UnknownHostKey(paramiko.MissingHostKeyPolicy):
    """What to do with a host key no known_hosts line names: refuse it (a revoked one always),
    or with ``auto_add`` accept it for this connection only, and say so."""

    def __init__(self, auto_add: bool, revoked: set[bytes]) -> None:
        self.auto_add, self.revoked = auto_add, revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if key.asbytes() in self.revoked:
            raise _RevokedHostKey(hostname)
        if not self.auto_add:
            raise paramiko.SSHException(f"Server {hostname!r} not found in known_hosts")
        log.warning("accepting unknown host key for %s: %s %s", hostname, key.get_name(), key.fingerprint)
        client.get_host_keys().add(hostname, key.get_name(), key)


def _known_hosts_files(opts: SshOptions) -> tuple[str, ...]:
    """The user's file (or the one given), then the system-wide one, as OpenSSH reads them."""
    return (opts.known_hosts or os.path.expanduser("~/.ssh/known_hosts"), SYSTEM_KNOWN_HOSTS)


@lru_cache(maxsize=8)
def _read_known_hosts(path: str, mtime_ns: int) -> tuple[_KnownHost, ...]:
    """The usable lines of one known_hosts file (cached per file version: one read per fan-out)."""
    entries = []
    with open(path, errors="replace") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            marker = None
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                if marker != "@revoked":
                    log.debug("%s:%d: %s entries are not supported; skipped", path, number, marker)
                    continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
            except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError) as exc:
                entry, why = None, exc
            else:
                why = "unknown key type" if entry is None or entry.key is None else None
            if why is not None:
                log.warning("%s:%d: unreadable known_hosts line skipped (%s)", path, number, why)
                continue
            entries.append(_KnownHost(tuple(entry.hostnames), entry.key, marker == "@revoked"))
    return tuple(entries)


def _pattern_matches(name: str, pattern: str) -> bool:
    """OpenSSH's host pattern match: ``*`` and ``?`` wildcards, case-insensitive; hashed names."""
    if pattern.startswith("|1|"):
        return paramiko.util.constant_time_bytes_eq(paramiko.HostKeys.hash_host(name, pattern), pattern)
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def _host_matches(name: str, patterns: Iterable[str]) -> bool:
    """A line applies to ``name`` when one pattern matches it and no ``!pattern`` does."""
    matched = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _pattern_matches(name, pattern[1:]):
                return False
        elif _pattern_matches(name, pattern):
            matched = True
    return matched


def _lookup_name(node: str, port: int) -> str:
    """The name known_hosts files list ``node`` under: ``[node]:port`` off port 22."""
    return node if port == 22 else f"[{node}]:{port}"


def _known_hosts(files: Sequence[str]) -> tuple[_KnownHost, ...]:
    """The lines of every known_hosts file there is, in order (a missing file is none)."""
    entries: list[_KnownHost] = []
    for path in files:
        try:
            entries += _read_known_hosts(path, os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror or exc)
    return tuple(entries)


def _known_keys(node: str, opts: SshOptions) -> tuple[list[paramiko.PKey], set[bytes]]:
    """The host keys known for ``node``, and those revoked for it."""
    name = _lookup_name(node, opts.port)
    keys: list[paramiko.PKey] = []
    revoked: set[bytes] = set()
    for entry in opts.known:
        if not _host_matches(name, entry.patterns):
            continue
        if entry.revoked:
            revoked.add(entry.key.asbytes())
        else:
            keys.append(entry.key)
    return [k for k in keys if k.asbytes() not in revoked], revoked


def _connect(node: str, opts: SshOptions, deadline: float) -> paramiko.SSHClient:
    """An authenticated client for ``node``; raises paramiko/socket errors."""
    client = paramiko.SSHClient()
    keys, revoked = _known_keys(node, opts)
    # the keys that apply, under the exact name paramiko looks up (it knows no patterns); in
    # memory only, so that paramiko never rewrites a file
    lookup = _lookup_name(node, opts.port)
    for key in reversed(keys):  # (paramiko compares one key per type: the first one listed)
        client.get_host_keys().add(lookup, key.get_name(), key)
    client.set_missing_host_key_policy(_UnknownHostKey(opts.auto_add, revoked))
    left = _remaining(deadline)
    try:
        client.connect(
            node,
            port=opts.port,
            username=opts.user,
            key_filename=opts.key_filename,
            allow_agent=opts.key_filename is None,
            look_for_keys=opts.key_filename is None,
            timeout=left,
            banner_timeout=left,
            auth_timeout=left,
            channel_timeout=left,
        )
    except BaseException:
        client.close()
        raise
    return client


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _describe(exc: BaseException, node: str, opts: SshOptions) -> str:
    """One line for a connection or command failure."""
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"host key of {node} does not match known_hosts (possible impostor)"
    user = opts.user or getpass.getuser()
    if isinstance(exc, paramiko.PasswordRequiredException):
        if opts.key_filename:
            return f"private key {opts.key_filename} needs its passphrase: ssh-add it and leave out -i"
        return "a private key in ~/.ssh needs its passphrase: add it to ssh-agent (ssh-add)"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed as {user}"
    if isinstance(exc, paramiko.SSHException) and "No authentication methods" in str(exc):
        return f"no key to log in as {user}: no ssh-agent and no ~/.ssh/id_* key (give -i KEYFILE)"
    if isinstance(exc, _RevokedHostKey):
        return f"host key of {node} is marked @revoked in known_hosts (refused)"
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        files = " or ".join(_known_hosts_files(opts))
        return (
            f"host key of {_lookup_name(node, opts.port)} is not in {files} (refused; add it with "
            f"ssh-keyscan{'' if opts.port == 22 else f' -p {opts.port}'} {node}, or set "
            "remote.auto_add_host_keys = true)"
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out after {opts.timeout:g} s"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"cannot connect to {node} port {opts.port}: connection refused"
    if isinstance(exc, OSError):
        return f"cannot connect to {node} port {opts.port}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _tail(buf: bytearray, data: bytes) -> None:
    buf += data
    if len(buf) > TAIL_BYTES:
        del buf[: len(buf) - TAIL_BYTES]


def _run_one(node: str, command: str, opts: SshOptions) -> NodeResult:
    start = time.monotonic()
    deadline = start + opts.timeout
    out, err = bytearray(), bytearray()
    exit_code: int | None = None
    error: str | None = None
    try:
        client = _connect(node, opts, deadline)
        try:
            chan = client.get_transport().open_session(timeout=_remaining(deadline))
            chan.exec_command(command)
            # read until the remote's EOF: the exit status may arrive before the last output
            while True:
                while chan.recv_ready():
                    _tail(out, chan.recv(65536))
                while chan.recv_stderr_ready():
                    _tail(err, chan.recv_stderr(65536))
                if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                select.select([chan], [], [], min(0.5, _remaining(deadline)))
            if not chan.status_event.wait(_remaining(deadline)):
                raise TimeoutError("timed out")
            exit_code = chan.recv_exit_status()
            if exit_code != 0:
                last = err.decode(errors="replace").strip().splitlines()
                error = f"exit status {exit_code}" + (f": {last[-1]}" if last else "")
        finally:
            client.close()
    except Exception as e:  # a node's failure is its row, not the caller's exception
        error = _describe(e, node, opts)
        log.debug("%s: %s", node, error, exc_info=True)
    return NodeResult(
        node=node,
        ok=error is None,
        exit_code=exit_code,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        error=error,
        seconds=time.monotonic() - start,
    )


def _parallel(nodes: Sequence[str], work: Callable[[str], NodeResult], parallel: int) -> list[NodeResult]:
    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(nodes))), thread_name_prefix="ssh") as pool:
        return list(pool.map(work, nodes))


def fan_out(
    nodes: Sequence[str],
    command: Sequence[str] | str,
    *,
    port: int = 22,
    user: str | None = None,
    key_filename: str | os.PathLike | None = None,
    known_hosts: str | os.PathLike | None = None,
    auto_add: bool = False,
    parallel: int = 8,
    timeout: float = 600.0,
) -> list[NodeResult]:
    """Run ``command`` (an argument list, quoted for the remote shell, or a shell string) on
    every node; one result per node, in order. ``ok`` means the command exited 0.
    """
    text = command if isinstance(command, str) else shlex.join(command)
    opts = _options(port, user, key_filename, known_hosts, auto_add, timeout)
    return _parallel(nodes, lambda node: _run_one(node, text, opts), parallel)


def _options(
    port: int,
    user: str | None,
    key_filename: str | os.PathLike | None,
    known_hosts: str | os.PathLike | None,
    auto_add: bool,
    timeout: float,
) -> SshOptions:
    if timeout <= 0:
        raise RemoteError(f"SSH timeout must be positive, not {timeout}")
    if known_hosts and not os.path.exists(known_hosts):
        raise RemoteError(f"known_hosts file {os.fspath(known_hosts)} does not exist")
    if key_filename and not os.path.isfile(key_filename):
        raise RemoteError(f"identity file {os.fspath(key_filename)} does not exist")
    opts = SshOptions(
        port=port,
        user=user,
        key_filename=os.fspath(key_filename) if key_filename else None,
        known_hosts=os.fspath(known_hosts) if known_hosts else None,
        auto_add=auto_add,
        timeout=timeout,
    )
    return replace(opts, known=_known_hosts(_known_hosts_files(opts)))


def sftp_copy(
    node: str,
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    download: bool = False,
    port: int = 22,
    user: str | None = None,
    key_filename: str | os.PathLike | None = None,
    known_hosts: str | os.PathLike | None = None,
    auto_add: bool = False,
    timeout: float = 600.0,
) -> None:
    """Copy local ``src`` to ``dest`` on ``node`` (or, with ``download``, ``src`` on the node to
    local ``dest``), atomically, keeping the file mode. Raises :class:`RemoteError`.
    """
    opts = _options(port, user, key_filename, known_hosts, auto_add, timeout)
    result = _copy_one(node, os.fspath(src), os.fspath(dest), download, opts)
    if not result.ok:
        raise RemoteError(f"copying {'from' if download else 'to'} {node}: {result.error}")


def copy_to_nodes(
    nodes: Sequence[str],
    src: str | os.PathLike,
    dest: str,
    *,
    port: int = 22,
    user: str | None = None,
    key_filename: str | os.PathLike | None = None,
    known_hosts: str | os.PathLike | None = None,
    auto_add: bool = False,
    parallel: int = 8,
    timeout: float = 600.0,
) -> list[NodeResult]:
    """:func:`sftp_copy` of local ``src`` to ``dest`` on every node; one result per node."""
    opts = _options(port, user, key_filename, known_hosts, auto_add, timeout)
    local = os.fspath(src)
    return _parallel(nodes, lambda node: _copy_one(node, local, dest, False, opts), parallel)


def _copy_one(node: str, src: str, dest: str, download: bool, opts: SshOptions) -> NodeResult:
    start = time.monotonic()
    deadline = start + opts.timeout
    error = None
    try:
        client = _connect(node, opts, deadline)
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(_remaining(deadline))
            if download:
                _download(sftp, src, Path(dest))
            else:
                _upload(client, sftp, src, dest, deadline)
        finally:
            client.close()
    except RemoteError as e:
        error = str(e)
    except (FileNotFoundError, PermissionError) as e:  # local or remote file
        error = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    except Exception as e:
        error = _describe(e, node, opts)
    if error:
        log.debug("%s: %s", node, error)
    return NodeResult(node, error is None, None, "", "", error, time.monotonic() - start)


@contextlib.contextmanager
def _on_node(path: str) -> Iterator[None]:
    """Name the remote ``path`` in SFTP errors (paramiko's IOError names no file)."""
    try:
        yield
    except OSError as e:
        raise RemoteError(f"{path}: {e.strerror or e}") from None


def _upload(
    client: paramiko.SSHClient, sftp: paramiko.SFTPClient, src: str, dest: str, deadline: float
) -> None:
    mode = os.stat(src).st_mode & 0o7777
    folder, name = posixpath.split(dest)
    tmp = posixpath.join(folder or ".", f".{name}.{uuid.uuid4().hex}.tmp")
    with _on_node(folder or "."):
        sftp.stat(folder or ".")  # name a missing directory rather than the temp file
    try:
        with _on_node(tmp):
            sftp.put(src, tmp, confirm=True)
            sftp.chmod(tmp, mode)
        # paramiko's SFTP has no fsync: flush the data with the remote sync(1) before the rename
        chan = client.get_transport().open_session(timeout=_remaining(deadline))
        chan.settimeout(_remaining(deadline))
        chan.exec_command(shlex.join(["sync", "--", tmp]))
        if chan.recv_exit_status() != 0:
            raise RemoteError(f"{tmp}: sync failed on the node")
        with _on_node(dest):
            sftp.posix_rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError, paramiko.SSHException):
            sftp.remove(tmp)
        raise


def _download(sftp: paramiko.SFTPClient, src: str, dest: Path) -> None:
    with _on_node(src):
        mode = sftp.stat(src).st_mode
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            with _on_node(src):
                sftp.getfo(src, f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
