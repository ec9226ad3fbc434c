"""One interface to the Slurm controller for the prolog, the epilog and ``hpcsif stage``.

:func:`get_client` picks the implementation (config ``slurm.pyslurm``: ``auto``, true, false):

* :class:`PySlurmClient` — pyslurm's object API (``pyslurm.Job``, pyslurm >= 22.5.2), used only
  when pyslurm imports and its version names the same Slurm ``major.minor`` as the running
  Slurm (pyslurm's ``X.Y.Z`` is built for Slurm ``X.Y``; a mismatched build talks a different
  RPC protocol);
* :class:`CLIClient` — Slurm's own commands (``scontrol``), always available.

Both return the same :meth:`SlurmClient.job_info` dictionary:
``job_id, user, uid, nodes (list), comment, admin_comment, work_dir, state, batch_host, batch``
(optional strings are None when Slurm has no value).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hpcsif.errors import JobNotFoundError, SlurmError
from hpcsif.slurm.hostlist import expand

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds per Slurm command; the prolog's own timeout bounds the total


class SlurmClient(ABC):
    """Queries and updates of one job; ``job_id`` is Slurm's id as a string (``"42"``)."""

    @abstractmethod
    def job_info(self, job_id: str) -> dict[str, Any]:
        """The job's owner, nodes, comments, working directory, state and batch host."""

    @abstractmethod
    def batch_script(self, job_id: str) -> str | None:
        """The job's batch script, or None for a job without one (``srun``/``salloc``)."""

    def set_comment(self, job_id: str, text: str) -> None:
        """Replace the job's comment (what ``--comment`` set); one line."""
        self._set_text(job_id, "comment", _one_line(job_id, "comment", text))

    def set_admin_comment(self, job_id: str, text: str) -> None:
        """Replace the job's admin comment (needs an operator or root); one line."""
        self._set_text(job_id, "admin_comment", _one_line(job_id, "admin comment", text))

    @abstractmethod
    def _set_text(self, job_id: str, field: str, text: str) -> None:
        """Set ``comment`` or ``admin_comment``."""

    @abstractmethod
    def hold(self, job_id: str) -> None:
        """Hold a pending job so it is not scheduled until released."""

    @abstractmethod
    def requeue(self, job_id: str, hold: bool = False) -> None:
        """Requeue a batch job (and hold it when ``hold``)."""

    def node_names_of(self, job_id: str) -> list[str]:
        """The job's allocated node names (empty while it is pending)."""
        return self.job_info(job_id)["nodes"]


def _job_dict(
    job_id: str,
    *,
    user: str | None,
    uid: int | None,
    nodes: str | None,
    comment: str | None,
    admin_comment: str | None,
    work_dir: str | None,
    state: str | Sequence[str] | None,
    batch_host: str | None,
    batch: bool,
) -> dict[str, Any]:
    """The shared shape of :meth:`SlurmClient.job_info` (empty strings become None)."""
    if isinstance(state, (list, tuple)):  # newer Slurm lists base state and flags
        state = state[0] if state else None
    return {
        "job_id": job_id,
        "user": user or None,
        "uid": uid,
        "nodes": expand(nodes) if nodes else [],
        "comment": comment or None,
        "admin_comment": admin_comment or None,
        "work_dir": work_dir or None,
        "state": state or None,
        "batch_host": batch_host or None,
        "batch": bool(batch),
    }


class CLIClient(SlurmClient):
    """Slurm's commands. ``env`` replaces the process environment (e.g. to set ``SLURM_CONF``)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.env = dict(env) if env is not None else None
        self.timeout = timeout

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(
                list(args), capture_output=True, text=True, env=self.env, timeout=self.timeout
            )
        except FileNotFoundError:
            raise SlurmError(f"{args[0]} not found: install the Debian package 'slurm-client'") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(args)}: no answer in {self.timeout:g} s") from None
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)}: {_first_line(proc.stderr) or f'exit {proc.returncode}'}")
        return proc

    def job_info(self, job_id: str) -> dict[str, Any]:
        """From ``scontrol show job JOB``: one job's record, not the whole queue.

        (``squeue --json`` would do, but Slurm 22.05 ignores ``--jobs`` with ``--json`` and
        sends every job in the queue, from every node's prolog.)
        """
        try:
            proc = self._run("scontrol", "show", "job", job_id)
        except SlurmError as e:
            if "Invalid job id" in str(e):
                raise JobNotFoundError(f"job {job_id} not found by scontrol") from None
            raise
        for job in parse_show_job(proc.stdout):
            if _matches(job, job_id):
                user = _USER.fullmatch(job.get("UserId", ""))
                return _job_dict(
                    job_id,
                    user=user and user.group(1),
                    uid=user and int(user.group(2)),
                    nodes=job.get("NodeList"),
                    comment=job.get("Comment"),
                    admin_comment=job.get("AdminComment"),
                    work_dir=job.get("WorkDir"),
                    state=job.get("JobState"),
                    batch_host=job.get("BatchHost"),
                    batch=job.get("BatchFlag") == "1",
                )
        raise JobNotFoundError(f"job {job_id} not found by scontrol")

    def batch_script(self, job_id: str) -> str | None:
        """``scontrol write batch_script JOB -``; 22.05 exits 0 on failure, so read stderr."""
        proc = self._run("scontrol", "write", "batch_script", job_id, "-")
        err = _first_line(proc.stderr)
        if "script not specified" in err:  # not a batch job
            return None
        if err and not proc.stdout:
            raise SlurmError(f"batch script of job {job_id}: {err}")
        return proc.stdout

    def _set_text(self, job_id: str, field: str, text: str) -> None:
        """``scontrol update JobId=… Comment=…`` (or ``AdminComment=``)."""
        name = {"comment": "Comment", "admin_comment": "AdminComment"}[field]
        self._run("scontrol", "update", f"JobId={job_id}", f"{name}={text}")

    def hold(self, job_id: str) -> None:
        """``scontrol hold``."""
        self._run("scontrol", "hold", job_id)

    def requeue(self, job_id: str, hold: bool = False) -> None:
        """``scontrol requeue`` or ``scontrol requeuehold``."""
        self._run("scontrol", "requeuehold" if hold else "requeue", job_id)


# fields scontrol prints alone on their line: the value is the rest of it, spaces and all
_WHOLE_LINE = frozenset(
    {"Command", "WorkDir", "AdminComment", "SystemComment", "Comment", "StdErr", "StdIn", "StdOut"}
)
_FIELD = re.compile(r"([^\s=]+)=(\S*)")
_USER = re.compile(r"(.*)\((\d+)\)")


def parse_show_job(text: str) -> list[dict[str, str]]:
    """The records of ``scontrol show job`` output, as field name -> value.

    A record starts with ``JobId=`` at the start of a line. The user's ``Comment`` comes after
    every field read here, and a record is read no further than its first line: a comment
    holding newlines and ``Key=value`` text cannot forge a field (a multi-line comment is
    cut to its first line). ``(null)`` and empty values are left out.
    """
    records: list[dict[str, str]] = []
    done = True  # until the first record
    for line in text.splitlines():
        if line.startswith("JobId="):
            records.append({})
            done = False
        if done or not line.strip():
            continue
        body = line.lstrip(" ")
        key, _, rest = body.partition("=")
        if key in _WHOLE_LINE:
            pairs = [(key, rest[:-1] if rest.endswith(" ") else rest)]  # scontrol pads with one space
            done = key == "Comment"
        else:
            pairs = _FIELD.findall(body)
        for name, value in pairs:
            if value and value != "(null)":
                records[-1].setdefault(name, value)
    return records


def _matches(job: Mapping[str, str], job_id: str) -> bool:
    """Whether a record is ``job_id`` (``42``, or an array task ``42_3``)."""
    if job.get("JobId") == job_id:
        return True
    return f"{job.get('ArrayJobId')}_{job.get('ArrayTaskId')}" == job_id


def _one_line(job_id: str, what: str, text: str) -> str:
    if "\n" in text or "\r" in text:
        raise SlurmError(f"job {job_id}: the {what} must be one line")
    return text


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class PySlurmClient(SlurmClient):
    """pyslurm's ``Job`` API; only when :func:`pyslurm_matches` says so."""

    def __init__(self) -> None:
        import pyslurm

        self._pyslurm = pyslurm

    def _call(self, job_id: str, what: str, fn: Callable[[int], Any]) -> Any:
        if not job_id.isdigit():
            raise SlurmError(f"job id {job_id!r}: pyslurm takes numeric job ids")
        try:
            return fn(int(job_id))
        except self._pyslurm.RPCError as e:
            kind = JobNotFoundError if "invalid job id" in str(e).lower() else SlurmError
            raise kind(f"job {job_id}: {what} failed: {e}") from None

    def job_info(self, job_id: str) -> dict[str, Any]:
        """From ``pyslurm.Job.load``."""
        job = self._call(job_id, "loading", self._pyslurm.Job.load)
        return _job_dict(
            job_id,
            user=job.user_name,
            uid=job.user_id,
            nodes=job.allocated_nodes,
            comment=job.comment,
            admin_comment=job.admin_comment,
            work_dir=job.working_directory,
            state=job.state,
            batch_host=job.batch_host,
            batch=job.is_batch_job,
        )

    def batch_script(self, job_id: str) -> str | None:
        """``Job.get_batch_script``; None for a job that has none."""
        job = self._call(job_id, "loading", self._pyslurm.Job.load)
        if not job.is_batch_job:
            return None
        return self._call(job_id, "reading the batch script", lambda i: job.get_batch_script())

    def _set_text(self, job_id: str, field: str, text: str) -> None:
        """``Job.modify`` with ``comment=`` or ``admin_comment=``."""
        desc = self._pyslurm.JobSubmitDescription(**{field: text})
        self._call(job_id, f"setting the {field}", lambda i: self._pyslurm.Job(i).modify(desc))

    def hold(self, job_id: str) -> None:
        """``Job.hold``."""
        self._call(job_id, "hold", lambda i: self._pyslurm.Job(i).hold())

    def requeue(self, job_id: str, hold: bool = False) -> None:
        """``Job.requeue``."""
        self._call(job_id, "requeue", lambda i: self._pyslurm.Job(i).requeue(hold=hold))


_VERSION = re.compile(r"(\d+)\.(\d+)")


@functools.cache
def slurm_version(slurm_conf: str | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of the running Slurm (``scontrol --version``), None when unknown.

    scontrol needs a configuration even for ``--version`` (without one it looks for DNS SRV
    records): ``slurm_conf`` overrides ``SLURM_CONF`` for that.
    """
    env = {**os.environ, "SLURM_CONF": slurm_conf} if slurm_conf else None
    try:
        out = subprocess.run(
            ["scontrol", "--version"], capture_output=True, text=True, timeout=10, env=env
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def pyslurm_matches(slurm_conf: str | None = None) -> tuple[bool, str]:
    """Whether pyslurm can be used here, and why not (``slurm_conf`` as for :func:`slurm_version`).

    The version is read from the installed distribution's metadata first: importing pyslurm
    initialises libslurm, which exits the process when it finds no Slurm configuration.
    """
    from importlib import util

    # a path lookup: far cheaper than loading importlib.metadata, in every prolog of a node
    # without pyslurm
    if util.find_spec("pyslurm") is None:
        return False, "pyslurm is not installed"
    from importlib import metadata

    try:
        version = metadata.version("pyslurm")
    except metadata.PackageNotFoundError:
        return False, "pyslurm is not installed"
    m = _VERSION.match(version)
    running = slurm_version(slurm_conf)
    if m is None or running is None or (int(m.group(1)), int(m.group(2))) != running:
        shown = ".".join(map(str, running)) if running else "unknown"
        return False, f"pyslurm {version} is not built for the running Slurm {shown}"
    try:
        import pyslurm
    except ImportError as e:
        return False, f"pyslurm {version} does not import ({e})"
    if not hasattr(pyslurm, "Job"):
        return False, f"pyslurm {version} lacks the Job API (pyslurm 22.5.2 and later have it)"
    return True, f"pyslurm {version}"


def get_client(env: Mapping[str, str] | None = None) -> SlurmClient:
    """The client config ``slurm.pyslurm`` asks for (``auto``: pyslurm when it matches, else CLI).

    ``env`` is the environment for the Slurm commands (pyslurm reads this process's own); when
    given, the CLI client is used unless pyslurm is required.
    """
    from hpcsif.config import get_config

    want = str(get_config().get("slurm.pyslurm", "auto")).strip().lower()
    if want in ("false", "no", "0", "off"):
        return CLIClient(env)
    ok, why = pyslurm_matches((env or {}).get("SLURM_CONF"))
    if want in ("true", "yes", "1", "on"):
        if not ok:
            raise SlurmError(f"slurm.pyslurm is true but {why}")
        return PySlurmClient()
    if want != "auto":
        raise SlurmError(f"slurm.pyslurm must be auto, true or false, not {want!r}")
    if ok and env is None:
        log.debug("Slurm client: %s", why)
        return PySlurmClient()
    log.debug("Slurm client: commands (%s)", why)
    return CLIClient(env)


# states after which a job uses nothing on its nodes any more
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)


def job_finished(job_id: str, client: SlurmClient | None = None) -> bool:
    """True when the job has ended (or Slurm has forgotten it); SlurmError if Slurm cannot say."""
    try:
        info = (client or get_client()).job_info(job_id)
    except JobNotFoundError:
        return True
    return str(info.get("state") or "").upper() in ENDED_STATES
