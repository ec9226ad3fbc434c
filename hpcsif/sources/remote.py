"""Remote files: ``http(s)://`` with requests, every other scheme through fsspec.

A download goes to a temporary file beside the destination, is fsynced and renamed into
place, so a broken transfer never leaves a partial file under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hpcsif.errors import NetworkError, NotFoundError, SourceError
from hpcsif.fsutil import atomic_output
from hpcsif.image.digest import CHUNK
from hpcsif.refs import redact_url

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def umasked(mode: int) -> int:
    """``mode`` less the process's umask: the mode Apptainer's ``pull`` gives its output (0777 & ~umask).

    The umask is read from /proc, since setting it to read it back would race with threads
    creating files meanwhile.
    """
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return mode & ~mask


def _copy(src: IO[bytes], out: IO[bytes], total: int, progress: Progress | None) -> int:
    done = 0
    while block := src.read(CHUNK):
        out.write(block)
        done += len(block)
        if progress:
            progress("download", done, total or done)
    return done


def _http(url: str, out: IO[bytes], progress: Progress | None, retries: int, timeout: float) -> int:
    import requests

    from hpcsif.sources.distribution import (
        RETRY_STATUS,
        hopeless,
        new_session,
        plain_http,
        reason,
        retry_after,
    )

    session = new_session()
    answered = False
    for attempt in range(retries + 1):
        out.seek(0)
        out.truncate()
        try:
            with session.get(url, stream=True, timeout=timeout) as resp:
                answered = True
                if resp.status_code == 404:
                    raise NotFoundError(f"{redact_url(url)}: not found (HTTP 404)")
                if resp.status_code in RETRY_STATUS and attempt < retries:
                    delay = retry_after(resp) or 0.5 * 2**attempt
                    log.warning("%s: HTTP %d; retrying in %.1f s", redact_url(url), resp.status_code, delay)
                    time.sleep(delay)
                    continue
                if resp.status_code >= 400:
                    raise SourceError(f"{redact_url(url)}: HTTP {resp.status_code} {resp.reason}")
                total = int(resp.headers.get("Content-Length") or 0)
                resp.raw.decode_content = True
                return _copy(resp.raw, out, total, progress)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt >= retries or hopeless(exc, answered=answered):
                hint = " (use an http:// URL for a server without TLS)" if plain_http(exc) else ""
                raise NetworkError(f"{redact_url(url)}: download failed: {reason(exc)}{hint}") from None
            log.warning("%s: %s; retrying", redact_url(url), type(exc).__name__)
    raise NetworkError(f"{redact_url(url)}: download failed after {retries + 1} tries")


def _known_hosts_policy():  # -> paramiko.MissingHostKeyPolicy
    """Accept an SSH host only if ``~/.ssh/known_hosts`` or the system list names its key.

    fsspec's default would trust any key on first contact; ``remote.auto_add_host_keys``
    in the config restores that for sites that want it.
    """
    import paramiko

    from hpcsif.config import get_config

    if get_config().get("remote.auto_add_host_keys"):
        return paramiko.AutoAddPolicy()

    class KnownHostsOnly(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            known = paramiko.HostKeys()
            for path in (Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts")):
                if path.is_file():
                    known.load(str(path))
            if not known.check(hostname, key):
                raise paramiko.SSHException(
                    f"host key of {hostname} is not in ~/.ssh/known_hosts (connect once with ssh to add it)"
                )

    return KnownHostsOnly()


def _fsspec(url: str, out: IO[bytes], progress: Progress | None) -> int:
    try:
        import fsspec
    except ImportError:
        raise SourceError(f"{redact_url(url)}: fsspec is not installed (pip install fsspec)") from None
    scheme = url.split("://", 1)[0].lower()
    options = {"host_key_policy": _known_hosts_policy()} if scheme in ("sftp", "ssh") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        total = int(fs.size(path) or 0)
        with fs.open(path, "rb") as src:
            return _copy(src, out, total, progress)
    except FileNotFoundError:
        raise NotFoundError(f"{redact_url(url)}: no such file") from None
    except ImportError as exc:
        raise SourceError(f"{redact_url(url)}: the fsspec backend needs a missing package ({exc})") from None
    except OSError as exc:
        raise NetworkError(f"{redact_url(url)}: {str(exc).replace(url, redact_url(url))}") from None
    except Exception as exc:  # paramiko's SSH and authentication errors are not OSErrors
        if scheme in ("sftp", "ssh"):
            raise NetworkError(f"{redact_url(url)}: {str(exc).replace(url, redact_url(url))}") from None
        raise


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Copy the file at ``url`` to ``dest`` atomically (mode 0777 & ~umask, as Apptainer); returns it."""
    dest = Path(dest)
    log.info("Downloading %s to %s", redact_url(url), dest)
    with atomic_output(dest, umasked(0o777)) as out:
        if url.split("://", 1)[0].lower() in ("http", "https"):
            size = _http(url, out, progress, retries, timeout)
        else:
            size = _fsspec(url, out, progress)
    log.info("Downloaded %d bytes", size)
    return dest


def is_sif(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with a SIF header (launch line, then the magic)."""
    from hpcsif.sif.format import LAUNCH_LEN, MAGIC

    with open(path, "rb") as f:
        return f.read(LAUNCH_LEN + len(MAGIC))[LAUNCH_LEN:] == MAGIC


def fingerprint(url: str, *, timeout: float = 60.0) -> str:
    """A digest naming what the http(s) file at *url* holds now, from one HEAD request.

    It covers the URL and the server's validators (ETag, Last-Modified) and length, so a
    changed file gets a new name; a server that sends no validator leaves the URL and length.
    """
    import requests

    from hpcsif.sources.distribution import new_session, reason

    session = new_session()
    try:
        resp = session.head(url, allow_redirects=True, timeout=timeout)
        if resp.status_code in (405, 501):  # no HEAD here: the headers of a GET, body unread
            with session.get(url, stream=True, timeout=timeout) as got:
                resp = got
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise NetworkError(f"cannot reach {redact_url(url)}: {reason(exc)}") from None
    if resp.status_code == 404:
        raise NotFoundError(f"{redact_url(url)}: not found (HTTP 404)")
    if resp.status_code >= 400:
        raise SourceError(f"{redact_url(url)}: HTTP {resp.status_code} {resp.reason}")
    fields = [url, *(resp.headers.get(h, "") for h in ("ETag", "Last-Modified", "Content-Length"))]
    return "sha256:" + hashlib.sha256("\n".join(fields).encode()).hexdigest()


def download_sif(url: str, dest: str | os.PathLike[str], **options: object) -> Path:
    """:func:`download` of a file that must be a SIF image (nothing is left at *dest* otherwise)."""
    download(url, dest, **options)  # type: ignore[arg-type]
    if not is_sif(dest):
        os.unlink(dest)
        raise SourceError(f"{redact_url(url)}: not a SIF image")
    return Path(dest)
