"""Inflating a large layer in a child process, beside the tar parsing.

Decompressing and hashing a layer costs about as much CPU as parsing and re-emitting its
tar stream, and inside one process the two barely overlap: ISA-L's inflate holds the GIL,
and even zlib's and hashlib's, which release it, wait for it after every chunk behind the
busy parsing thread. So a large compressed layer is inflated by a child Python process
that runs :class:`~hpcsif.image.decode.LayerDecoder` on an inherited file descriptor and
writes the decompressed bytes to a pipe. The child verifies the digests itself and
reports the outcome as one line on its stderr. It shares the blob's open file description
with the parent, whose progress reports read how far it got from the offset.

The child starts with ``-I -S`` (no ``site``) and is handed the parent's import path, so it
imports the same ``hpcsif``, ``isal`` and ``zstandard``; it loads neither :mod:`typing` nor
:mod:`json` and starts in about 12 ms.
"""

from __future__ import annotations

import os
import sys

from hpcsif.errors import IntegrityError, LayerError
from hpcsif.image.decode import LayerDecoder, Window

#: compressed layers smaller than this are inflated in a thread: a process is not worth it
MIN_BYTES = 1 << 20
_PIPE_BYTES = 1 << 20
# argv: the six window fields (see worker), then the import path
_BOOT = (
    "import sys; sys.path[:0] = sys.argv[7:]; from hpcsif.image.inflate import worker; worker(*sys.argv[1:7])"
)
_ERRORS = {"IntegrityError": IntegrityError, "LayerError": LayerError}


def worthwhile(size: int) -> bool:
    """True if a compressed layer of ``size`` bytes is better inflated in a child process."""
    # with one usable core the child would only add a pipe copy
    return size >= MIN_BYTES and len(os.sched_getaffinity(0)) > 1


def _import_path() -> list[str]:
    """The directory that holds ``hpcsif``, then the parent's import path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    return [root, *(p for p in sys.path if p and os.path.isdir(p))]


class InflateProcess:
    """The decompressed bytes of a window of the open blob ``fd``, from a child process.

    ``get()`` returns the next chunk and b"" at the end, after the child's verification
    succeeded; it raises the child's :class:`IntegrityError` (or :class:`LayerError`).
    The caller keeps ``fd`` and closes it after :meth:`close`.
    """

    def __init__(self, fd: int, window: Window) -> None:
        # the parent's side only, where these are loaded already: the child must start fast
        import contextlib
        import fcntl
        import subprocess

        self.label = window.label
        self._fd = fd
        self._offset = window.offset
        size = "" if window.size is None else str(window.size)
        args = [str(fd), str(window.offset), size, window.label, window.digest or "", window.diff_id or ""]
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, *args, *_import_path()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
        )
        assert self._proc.stdout is not None
        self._out = self._proc.stdout.fileno()
        with contextlib.suppress(OSError):  # a bigger pipe: fewer, larger reads
            fcntl.fcntl(self._out, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self._done = False

    @property
    def bytes_in(self) -> int:
        """Compressed bytes the child has read so far."""
        try:
            return max(os.lseek(self._fd, 0, os.SEEK_CUR) - self._offset, 0)
        except OSError:
            return 0

    def get(self) -> bytes:
        """The next chunk of decompressed bytes (b"" at the end)."""
        if self._done:
            return b""
        data = os.read(self._out, _PIPE_BYTES)
        if not data:
            self._finish()
        return data

    def _finish(self) -> None:
        self._done = True
        assert self._proc.stderr is not None
        report = self._proc.stderr.read().decode(errors="replace").strip()
        rc = self._proc.wait()
        last = report.splitlines()[-1] if report else "no report"
        kind, _, message = last.partition("\t")
        if kind in _ERRORS and message:  # the child's verdict: "IntegrityError<TAB>message"
            raise _ERRORS[kind](message)
        if rc != 0 or last != "ok":
            tail = last
            raise IntegrityError(
                f"layer {self.label}: the decompressing process failed (exit status {rc}): {tail}"
            )

    def close(self) -> None:
        """Stop the child if it still runs (the reader stopped early) and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()


def worker(fd: str, offset: str, size: str, label: str, digest: str, diff_id: str) -> None:
    """The child's side: inflate, verify, write the bytes to stdout and one report line to stderr.

    The report is ``ok``, or the error's class name and message separated by a tab.
    """
    import signal

    from hpcsif.errors import HpcsifError

    # the parent decides: on Ctrl-C or SIGTERM to the process group it unwinds and kills us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    window = Window(label, digest or None, diff_id or None, int(offset), int(size) if size else None)
    decoder = LayerDecoder(os.fdopen(int(fd), "rb", buffering=0), window)
    try:
        while chunk := decoder.produce():
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view) :]
        report = "ok"
    except BrokenPipeError:  # the parent stopped reading: nothing to report
        return
    except HpcsifError as e:
        report = f"{type(e).__name__}\t{' '.join(str(e).split())}"
    os.write(2, report.encode(errors="replace") + b"\n")
