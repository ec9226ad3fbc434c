"""Leases: who is using a cached image right now, so eviction leaves it alone.

A lease is a small JSON file under ``leases/<key>/``: ``pid-<host>-<pid>-<nonce>.json`` for a
process (dropped when it exits, reaped when the pid is dead on this host) or
``job-<id>.json`` for a Slurm job (reaped once Slurm reports the job finished).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import CacheRoot, hostname
from hpcsif.cache.locking import holder_record, process_alive
from hpcsif.errors import CacheError
from hpcsif.image.store import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """A held lease; :meth:`release` removes it."""

    path: Path
    record: dict[str, Any]

    def release(self) -> None:
        """Remove the lease file (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only succeeds once the last lease is gone

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(root: CacheRoot, key: str, *, holder: str | None = None, ref: str = "") -> Lease:
    """Record a lease on ``key``: this process (default) or ``holder="job:ID"`` for a Slurm job."""
    record = holder_record(ref or key)
    if holder is None:
        name = f"pid-{record['host']}-{record['pid']}-{secrets.token_hex(4)}.json"
    elif holder.startswith("job:") and holder[4:].replace("_", "").isalnum():
        record["job"] = holder[4:]
        name = f"job-{holder[4:]}.json"
    else:
        raise CacheError(f"invalid lease holder {holder!r}: expected job:ID (or none for this process)")
    directory = root.lease_dir(key)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        atomic_write_bytes(path, json.dumps(record).encode())
    except OSError as exc:
        raise CacheError(f"cannot record a lease in {directory}: {exc.strerror}") from None
    return Lease(path, record)


def _job_finished(job_id: str) -> bool:
    """True only when Slurm says the job is over; unknown means keep the lease."""
    from hpcsif.slurm.client import job_finished

    try:
        return job_finished(job_id)
    except Exception as exc:  # a Slurm outage must not make us drop leases
        log.debug("cannot ask Slurm about job %s: %s", job_id, exc)
        return False


def _is_dead(record: dict[str, Any]) -> bool:
    if "job" in record:
        return _job_finished(str(record["job"]))
    pid = record.get("pid")
    if record.get("host") != hostname() or not isinstance(pid, int):
        return False  # another node's process: we cannot tell
    return not process_alive(pid, record.get("start"))


def active_leases(root: CacheRoot, key: str, *, reap: bool = True) -> list[dict[str, Any]]:
    """The live leases on ``key``; dead ones are removed on the way when ``reap`` is set."""
    directory = root.lease_dir(key)
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return []
    live = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            record = {}
        if reap and root.writable and _is_dead(record):
            log.info("reaping the lease of %s on %s", path.stem, key)
            Lease(path, record).release()
            continue
        live.append(record)
    return live


def describe_lease(record: dict[str, Any]) -> str:
    """``job 123`` or ``pid 45@node1`` for listings."""
    if "job" in record:
        return f"job {record['job']}"
    return f"pid {record.get('pid', '?')}@{record.get('host', '?')}"
