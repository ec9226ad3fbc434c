"""bwrap as the payload's parent: signals, the terminal, the exit status.

The launcher (the Python engine here, the native front for replayed plans) stays the parent of
``bwrap``: it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the payload and returns
the payload's exit status (128+N when killed by signal N). If it is SIGKILLed itself,
``--die-with-parent`` ends the container.
"""

from __future__ import annotations

import contextlib
import os
import signal

from hpcsif.errors import EngineError

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: tty-generated signals reach an interactive shell directly; forwarding them would double them
_TTY_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


class Signals:
    """Catches the forwarded signals for the whole launch and passes them on to the payload.

    Signals that arrive before the payload runs are kept and delivered once it does (or, when
    the launch has not started bwrap yet, end the launch with 128+N after cleaning up).
    """

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.pending: list[int] = []
        self.child = 0
        self.pidns = False
        self.forwarded = False  # a signal went to the payload (it may have died before starting)
        self._old = {s: signal.signal(s, self._handle) for s in FORWARDED}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.interactive and signum in _TTY_SIGNALS:
            return  # the terminal already sent it to the shell's process group
        if self.child:
            self.forwarded = True
            _signal_payload(self.child, signum, self.pidns, group=not self.interactive)
        else:
            self.pending.append(signum)

    def started(self, child: int, pidns: bool) -> None:
        """The payload runs as *child*: deliver what arrived meanwhile."""
        self.child, self.pidns = child, pidns
        for signum in self.pending:
            self.forwarded = True
            _signal_payload(child, signum, pidns, group=not self.interactive)

    def restore(self) -> None:
        """Put back the previous handlers (idempotent)."""
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}


def run_bwrap(
    bwrap: str,
    argv: list[str],
    env: dict[str, str],
    fds: list[int],
    signals: Signals,
    *,
    pidns: bool,
    handshake: bool = True,
) -> int:
    """Start bwrap, forward signals to the payload, wait; returns its exit status.

    With ``handshake`` the in-container launcher reports the end of bwrap's set-up; a payload
    started directly (no shell in the image) cannot, and then bwrap's child pid stands for it.
    """
    if signals.pending:
        for fd in fds:
            os.close(fd)
        return 128 + signals.pending[0]  # stopped before the container started
    info_r, info_w = os.pipe()
    # the launcher writes one byte here once it runs: EOF instead means bwrap's set-up failed
    ready_r, ready_w = os.pipe()
    argv = [argv[0], "--info-fd", str(info_w), *argv[1:]]
    if handshake:
        env = {**env, "__HPCSIF_READY": str(ready_w)}
        fds = [ready_w, *fds]
    else:
        os.close(ready_w)
    for fd in [info_w, *fds]:
        os.set_inheritable(fd, True)
    if signals.interactive:
        _become_subreaper()
    # (a background job must not take the terminal from the shell when it ends)
    foreground = signals.interactive and _in_foreground()
    try:
        try:
            # non-interactive: bwrap gets its own process group, so a terminal's Ctrl-C reaches only
            # us (and we forward it) rather than killing bwrap's monitor process
            spawn_opts = {} if signals.interactive else {"setpgroup": 0}
            pid = os.posix_spawn(bwrap, argv, env, **spawn_opts)
        except OSError as exc:
            os.close(info_r)
            os.close(ready_r)
            raise EngineError(f"cannot start {bwrap}: {exc.strerror}") from None
        finally:
            for fd in [info_w, *fds]:
                os.close(fd)
        child = _child_pid(_read_all(info_r))
        if child:
            signals.started(child, pidns)
        with os.fdopen(ready_r, "rb", buffering=0) as ready:
            started = ready.read(1) == b"x" if handshake else bool(child)
        _, status = os.waitpid(pid, 0)
        if signals.interactive and child and os.WIFSIGNALED(status):
            # on a terminal bwrap's monitor is in the payload's process group, and a Ctrl-C or
            # Ctrl-\ there ends it too; the payload goes on (no --die-with-parent), ours now
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(child, 0)
    finally:
        if foreground:
            _reclaim_terminal()
    code = os.waitstatus_to_exitcode(status)
    if not started and not signals.forwarded:
        raise EngineError(
            "bwrap could not set up the container (see its message above; if it is about namespaces, "
            "this host does not allow unprivileged user namespaces: use --engine apptainer)"
        )
    return 128 - code if code < 0 else code


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _child_pid(info: bytes) -> int:
    """The ``child-pid`` of bwrap's ``--info-fd`` JSON (0 when bwrap failed before writing it)."""
    import re  # already loaded by argparse; json would be a fresh import on every launch

    m = re.search(rb'"child-pid"\s*:\s*(\d+)', info)
    return int(m.group(1)) if m else 0


def _signal_payload(child: int, signum: int, pidns: bool, group: bool) -> None:
    """Send *signum* to the payload: bwrap's child, or its children when bwrap runs a PID-1 reaper.

    With *group* (the payload leads its own session, ``--new-session``) the whole process group
    gets it, as a terminal would deliver Ctrl-C: a shell's foreground child sees it too.
    """
    targets = [child]
    if pidns:
        try:
            with open(f"/proc/{child}/task/{child}/children") as f:
                targets = [int(p) for p in f.read().split()] or [child]
        except OSError:
            pass
    for pid in targets:
        if group:
            try:
                os.killpg(pid, signum)
                continue
            except ProcessLookupError:
                pass  # not a group leader (yet): signal the process itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def on_terminal() -> bool:
    """True when the container starts on a terminal: it is then its controlling terminal, with
    the container in its foreground process group, as Apptainer's (bash's job control, /dev/tty)."""
    return os.isatty(0)


def _become_subreaper() -> None:
    """Adopt the payload should bwrap's monitor die before it (see :func:`run_bwrap`)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _in_foreground() -> bool:
    """True when our process group is the terminal's foreground (not a background job)."""
    try:
        return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _reclaim_terminal() -> None:
    """Make our process group the terminal's foreground again after an interactive shell."""
    try:
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(0, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, old)
    except OSError:
        pass
