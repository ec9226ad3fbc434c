"""What the prolog records about a job, and how the job's own ``hpcsif exec`` reads it.

Two places:

* the node's **job record**, ``<cache.system_dir>/jobs/<job id>.json``, written by the prolog
  as root (mode 0644, so the job user can read it and not change it): for each requested
  reference, the digest-pinned reference that was staged, or the error that stopped it;
* the job's **admin comment** in Slurm, shared by every node of the job: ``hpcsif-pin REF
  DIGEST`` segments (a tag resolves to one digest per job, whichever node resolves it first)
  and ``hpcsif-error REF: MESSAGE`` segments (``hpcsif-error REF (restart N): MESSAGE`` when a
  requeued job's prolog failed again), separated by `` | `` from anything else there.

:func:`job_image` is what ``hpcsif exec`` calls inside a job: it turns a requested reference
into the pinned one the prolog staged, or raises the prolog's error at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcsif.errors import CacheError, StagingError

JOBS_DIR = "jobs"
SEPARATOR = " | "
PIN = "hpcsif-pin "
ERROR = "hpcsif-error "
_RUN = re.compile(r"(\S+) \(restart (\d+)\)")


def jobs_dir(system_dir: str | os.PathLike[str]) -> Path:
    """Where the per-job records of a system cache live."""
    return Path(system_dir) / JOBS_DIR


def record_path(system_dir: str | os.PathLike[str], job_id: str) -> Path:
    """The record of job ``job_id`` in the system cache at ``system_dir``."""
    if not str(job_id).replace("_", "").isalnum():
        raise CacheError(f"invalid job id {job_id!r}")
    return jobs_dir(system_dir) / f"{job_id}.json"


@dataclass
class ImageOutcome:
    """What became of one requested image on this node."""

    ref: str
    pinned: str | None = None  # the reference that was staged (tags pinned to a digest)
    path: str | None = None
    key: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True if the image is staged."""
        return self.error is None


@dataclass
class JobRecord:
    """The node-local record of one job."""

    job_id: str
    images: dict[str, ImageOutcome] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        """Serialised form."""
        data = {
            "job": self.job_id,
            "created": self.created,
            "images": {ref: vars(o) for ref, o in self.images.items()},
        }
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        """Parse what :meth:`to_json` wrote."""
        data: dict[str, Any] = json.loads(text)
        images = {ref: ImageOutcome(**o) for ref, o in data.get("images", {}).items()}
        return cls(str(data["job"]), images, float(data.get("created", 0)))

    def save(self, system_dir: str | os.PathLike[str]) -> Path:
        """Write the record atomically (0644) into the system cache."""
        from hpcsif.image.store import atomic_write_bytes

        path = record_path(system_dir, self.job_id)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_json(), mode=0o644)
        return path


def load_record(system_dir: str | os.PathLike[str], job_id: str) -> JobRecord | None:
    """The record of ``job_id`` on this node, or None."""
    try:
        return JobRecord.from_json(record_path(system_dir, job_id).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"job record of {job_id} is unreadable: {exc}") from None


def remove_record(system_dir: str | os.PathLike[str], job_id: str) -> None:
    """Drop the record of a finished job (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        record_path(system_dir, job_id).unlink()


def job_image(ref: str, env: dict[str, str] | None = None) -> str:
    """The reference ``hpcsif exec`` should run inside a Slurm job.

    Outside a job, or for a reference the prolog did not stage, ``ref`` is returned as is.
    For a staged one, the digest-pinned reference (so every rank runs the same image even if
    the tag moved). If the prolog failed to stage it, :class:`StagingError` carries its error.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return ref
    from hpcsif.config import get_config

    system_dir = get_config().get("cache.system_dir")
    try:
        record = load_record(system_dir, job_id) if system_dir else None
    except CacheError:
        return ref
    outcome = record.images.get(ref) if record else None
    if outcome is None:
        return ref
    if outcome.error:
        raise StagingError(f"the prolog of job {job_id} could not stage {ref}: {outcome.error}")
    return outcome.pinned or ref


# --- the admin comment, shared by the job's nodes ---------------------------------------------


@dataclass
class AdminComment:
    """The job's admin comment split into our segments and everybody else's."""

    pins: dict[str, str] = field(default_factory=dict)  # requested ref -> digest
    errors: dict[str, str] = field(default_factory=dict)  # requested ref -> message
    other: list[str] = field(default_factory=list)
    # requested ref -> the job's restart count when its error was recorded (absent: 0)
    error_runs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> AdminComment:
        """Split ``text`` into pins, errors and foreign segments."""
        out = cls()
        for seg in (s.strip() for s in (text or "").split(SEPARATOR.strip())):
            if seg.startswith(PIN) and len(seg[len(PIN) :].split()) == 2:
                ref, digest = seg[len(PIN) :].split()
                out.pins[ref] = digest
            elif seg.startswith(ERROR) and ": " in seg:
                ref, message = seg[len(ERROR) :].split(": ", 1)
                if run := _RUN.fullmatch(ref):
                    ref = run.group(1)
                    out.error_runs[ref] = int(run.group(2))
                out.errors[ref] = message
            elif seg:
                out.other.append(seg)
        return out

    def format(self) -> str:
        """The admin comment text (foreign segments first, unchanged)."""
        ours = [f"{PIN}{r} {d}" for r, d in self.pins.items()]
        for ref, message in self.errors.items():
            run = self.error_runs.get(ref, 0)
            named = f"{ref} (restart {run})" if run else ref
            ours.append(f"{ERROR}{named}: {' '.join(message.replace('|', '/').split())}")
        return SEPARATOR.join([*self.other, *ours])

    def drop_stale_errors(self, refs: Iterable[str], run: int) -> bool:
        """Forget the errors of ``refs`` recorded before restart ``run`` of the job (they were
        staged this time); True if any went. Errors of this run, from other nodes, stay."""
        stale = [r for r in refs if r in self.errors and self.error_runs.get(r, 0) < run]
        for ref in stale:
            del self.errors[ref]
            self.error_runs.pop(ref, None)
        return bool(stale)
