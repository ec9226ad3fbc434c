"""The Slurm prolog and epilog: stage a job's images on this node before it starts, and let go after.

The prolog (as root, once per node with ``PrologFlags=Alloc``):

1. finds the job's requests (:mod:`hpcsif.slurm.requests`);
2. pins every registry tag to one digest per job: resolved at submit (SPANK), else taken from
   the job's admin comment where the first node recorded it, else resolved here and recorded;
3. stages each pinned reference into the node's **system cache** (``cache.system_dir``) through
   the cache coordinator (exactly once per node; from the shared tier when configured), and
   takes a lease ``job-<id>`` on it so eviction leaves it alone while the job runs. Relative
   paths name files in the job's working directory; a local archive or layout is staged only
   if the job's user may read it (the system cache is readable by every user);
4. writes the node's job record (:mod:`hpcsif.slurm.jobrecord`) and applies the failure policy
   (:mod:`hpcsif.slurm.policy`) to whatever failed.

The epilog releases the job's leases, removes its record and evicts by the cache quota.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hpcsif.cache.layout import CacheRoot
from hpcsif.config import Config, get_config, set_config
from hpcsif.errors import CacheError, HpcsifError, SlurmError
from hpcsif.slurm.jobrecord import AdminComment, ImageOutcome, JobRecord, load_record, remove_record
from hpcsif.slurm.requests import METHODS, ImageRequest, discover

log = logging.getLogger(__name__)


class JobClient(Protocol):
    """The part of :class:`hpcsif.slurm.client.SlurmClient` the prolog uses."""

    def job_info(self, job_id: str) -> dict[str, Any]: ...
    def batch_script(self, job_id: str) -> str | None: ...
    def set_admin_comment(self, job_id: str, text: str) -> None: ...
    def requeue(self, job_id: str, hold: bool = False) -> None: ...


@dataclass(frozen=True)
class JobContext:
    """Who the prolog works for, from slurmd's environment."""

    job_id: str
    user: str | None
    uid: int | None
    env: Mapping[str, str]

    @property
    def node(self) -> str | None:
        """This node's Slurm name (``SLURMD_NODENAME``)."""
        return self.env.get("SLURMD_NODENAME") or None

    @property
    def workdir(self) -> str | None:
        """The job's working directory (``SLURM_JOB_WORK_DIR``), where relative paths point."""
        return self.env.get("SLURM_JOB_WORK_DIR") or None

    @property
    def restarts(self) -> int:
        """How often the job was requeued before this run (``SLURM_JOB_RESTART_COUNT``)."""
        count = self.env.get("SLURM_JOB_RESTART_COUNT", "")
        return int(count) if count.isdigit() else 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobContext:
        """Read ``SLURM_JOB_ID``, ``SLURM_JOB_USER``, ``SLURM_JOB_UID`` (and keep SPANK_*)."""
        env = dict(os.environ if env is None else env)
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise SlurmError("SLURM_JOB_ID is not set: run this as Slurm's Prolog/Epilog")
        uid = env.get("SLURM_JOB_UID")
        return cls(job_id, env.get("SLURM_JOB_USER"), int(uid) if uid and uid.isdigit() else None, env)


@dataclass
class PrologReport:
    """What one prolog run did."""

    job_id: str
    requests: list[ImageRequest] = field(default_factory=list)
    outcomes: list[ImageOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ImageOutcome]:
        """The requests that could not be staged."""
        return [o for o in self.outcomes if not o.ok]


def system_dir(cfg: Config | None = None) -> Path:
    """The node's system cache (``cache.system_dir``)."""
    path = (cfg or get_config()).get("cache.system_dir")
    if not path:
        raise SlurmError("cache.system_dir is empty: the prolog needs a system cache")
    return Path(path).absolute()


@contextlib.contextmanager
def system_cache_config() -> Any:
    """Make the system cache the writable cache root of this process (the prolog runs as root)."""
    old = get_config()
    root = system_dir(old)
    cfg = Config(copy.deepcopy(old.data), [*old.sources, "prolog"])
    cfg.override("cache.dir", str(root))
    cfg.override("cache.system_dir", "")
    set_config(cfg)
    old_umask = os.umask(0o022)  # published files must be readable by the job user
    try:
        try:
            if os.geteuid() != 0 and not os.access(root if root.exists() else root.parent, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            CacheRoot(root).ensure()
            os.chmod(root, 0o755)
        except PermissionError as exc:
            hint = "" if os.geteuid() == 0 else " (root's: run as root, or stage into your own cache)"
            raise CacheError(f"cannot write the system cache {root}: {exc.strerror}{hint}") from None
        yield root
    finally:
        os.umask(old_umask)
        set_config(old)


# --- one digest per job ------------------------------------------------------------------------


def resolve_digest(ref_text: str) -> str:
    """Ask the image's source for the digest a tag points to now."""
    from hpcsif.convert import ConvertOptions
    from hpcsif.refs import parse
    from hpcsif.sources import get_source

    ref = parse(ref_text)
    return get_source(ref, platform=ConvertOptions().platform).resolve(ref)


def pin_reference(
    req: ImageRequest,
    job_id: str,
    client: JobClient,
    *,
    node: str | None = None,
    resolve: Callable[[str], str] = resolve_digest,
    wait: float = 30.0,
) -> str:
    """The reference every node of the job stages: registry tags pinned to one digest.

    File references (archives, layouts) name their content already and are returned as they
    are; so are references with a digest, and tags the SPANK plugin pinned at submission.
    Otherwise one node resolves the tag and records ``hpcsif-pin REF DIGEST`` in the job's admin
    comment, and the others read it there: the job's batch host, while the other nodes
    (``node``, this one) wait up to ``wait`` seconds for its pin. Without a batch host (an
    ``srun`` allocation), or when its pin does not come, a node resolves and records itself,
    re-reading afterwards so that concurrent writers still settle on the last recorded digest.
    """
    from hpcsif.refs import parse

    ref = parse(req.ref)
    if not ref.is_registry or ref.digest:
        return req.ref
    if req.digest:
        return str(ref.with_digest(req.digest))
    info = client.job_info(job_id)
    batch_host = info.get("batch_host")
    follower = bool(node and batch_host and node != batch_host)
    deadline = time.monotonic() + (wait if follower else 0)
    while True:
        pinned = AdminComment.parse(info["admin_comment"]).pins.get(req.ref)
        if pinned:
            log.info("job %s: %s is pinned to %s for this job", job_id, req.ref, pinned)
            return str(ref.with_digest(pinned))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
        info = client.job_info(job_id)
    if follower:
        log.warning("job %s: no pin for %s from %s; resolving it here", job_id, req.ref, batch_host)
    digest = resolve(req.ref)
    log.info("job %s: resolved %s to %s", job_id, req.ref, digest)
    comment = AdminComment.parse(_admin_comment(client, job_id))
    comment.pins.setdefault(req.ref, digest)
    client.set_admin_comment(job_id, comment.format())
    recorded = AdminComment.parse(_admin_comment(client, job_id)).pins.get(req.ref, digest)
    if recorded != digest:
        log.info("job %s: another node pinned %s to %s first", job_id, req.ref, recorded)
    return str(ref.with_digest(recorded))


def _admin_comment(client: JobClient, job_id: str) -> str | None:
    return client.job_info(job_id)["admin_comment"]


def _comment(client: JobClient, ctx: JobContext) -> str | None:
    """The job's comment: slurmd hands it to the prolog (``SLURM_JOB_COMMENT``, as Slurm 22.05 does),
    so only a job without one, or a Slurm that does not, costs a slurmctld query."""
    if "SLURM_JOB_COMMENT" in ctx.env:
        return ctx.env["SLURM_JOB_COMMENT"]
    return client.job_info(ctx.job_id)["comment"]


# --- staging -----------------------------------------------------------------------------------


def _local_input(ref_text: str) -> str | None:
    """The host file or directory that staging ``ref_text`` copies into the system cache (an
    archive, an OCI layout, a file:// URL), or None (registries, SIFs and sandboxes used in place)."""
    from hpcsif.refs import FILE_TRANSPORTS, parse

    ref = parse(ref_text)
    if ref.transport in FILE_TRANSPORTS:
        return ref.path
    if ref.transport == "fsspec" and ref.path and ref.path.startswith("file://"):
        return ref.path[len("file://") :]
    return None


def check_user_may_read(ref_text: str, ctx: JobContext) -> None:
    """Refuse a local input the job's user cannot read: the prolog reads it as root, and what
    it stages is readable by every user. The check runs ``test -r`` as that user."""
    import pwd
    import subprocess

    path = _local_input(ref_text)
    if path is None or ctx.uid is None or ctx.uid == os.geteuid():
        return
    try:
        account = pwd.getpwuid(ctx.uid)
        gid = int(ctx.env.get("SLURM_JOB_GID") or account.pw_gid)
        groups = os.getgrouplist(account.pw_name, gid)
    except (KeyError, ValueError) as exc:
        raise SlurmError(f"cannot look up the job's user {ctx.uid}: {exc}") from None
    # a file readable; a directory (an OCI layout) searchable, with its index.json readable
    test = 'test -r "$1" && { test ! -d "$1" || { test -x "$1" && '
    test += '{ test ! -e "$1/index.json" || test -r "$1/index.json"; }; }; }'
    proc = subprocess.run(
        ["/bin/sh", "-c", test, "sh", path],
        user=ctx.uid,
        group=gid,
        extra_groups=groups,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        who = ctx.user or account.pw_name
        raise SlurmError(
            f"{path}: not readable by the job's user {who} (staged only what the job could read)"
        )


def _enter_workdir(ctx: JobContext, stack: contextlib.ExitStack) -> None:
    """Relative image paths of the job name files in its working directory: go there (back when
    ``stack`` closes); a directory root cannot enter (root-squashed NFS) is only logged."""
    if not ctx.workdir:
        return
    try:
        stack.enter_context(contextlib.chdir(ctx.workdir))
    except OSError as exc:
        log.warning("job %s: cannot enter %s (%s): relative image paths fail", ctx.job_id, ctx.workdir, exc)


def stage_for_job(ref: str, job_id: str, root: Path) -> tuple[Path, str]:
    """Stage ``ref`` into the system cache at ``root`` and lease it for ``job_id``.

    Returns the SIF path and its cache key. Call inside :func:`system_cache_config`.
    """
    from hpcsif.cache.api import ensure_image
    from hpcsif.cache.leases import acquire_lease

    cache = CacheRoot(root)
    for _attempt in range(3):
        path = ensure_image(ref, cache_first=False)
        key = path.parent.name
        lease = acquire_lease(cache, key, holder=f"job:{job_id}", ref=ref)
        # eviction may have removed the entry between staging and leasing: stage again
        if path.is_file():
            return path, key
        lease.release()
    raise SlurmError(f"{ref} was evicted from {root} three times while staging it")


def _stage_all(
    requests: list[ImageRequest],
    ctx: JobContext,
    client: JobClient,
    root: Path,
    outcomes: list[ImageOutcome],
    cancelled: threading.Event,
) -> None:
    """Stage each request in turn, appending its outcome as soon as it is known."""
    for req in requests:
        if cancelled.is_set():  # the deadline passed: leave the rest to the timeout record
            return
        outcome = ImageOutcome(ref=req.ref)
        started = time.monotonic()
        try:
            outcome.pinned = pin_reference(req, ctx.job_id, client, node=ctx.node)
            check_user_may_read(outcome.pinned, ctx)
            path, key = stage_for_job(outcome.pinned, ctx.job_id, root)
            outcome.path, outcome.key = str(path), key
            log.info("job %s: %s staged as %s", ctx.job_id, req.ref, path)
        except HpcsifError as exc:
            outcome.error = str(exc)
        except Exception as exc:  # an unexpected bug still must not drain the node
            log.exception("job %s: staging %s crashed", ctx.job_id, req.ref)
            outcome.error = f"internal error: {type(exc).__name__}: {exc}"
        outcome.seconds = round(time.monotonic() - started, 3)
        outcomes.append(outcome)


def run_prolog(ctx: JobContext, client: JobClient, *, timeout: float | None = None) -> PrologReport:
    """Stage everything ``ctx``'s job asks for; failures are recorded, never raised.

    Staging runs in a worker thread bounded by ``timeout`` (default ``slurm.prolog_timeout``);
    requests not finished by then are recorded as timed out, and the caller should exit (the
    process exit ends the worker).
    """
    from hpcsif.slurm.policy import apply_failure_policy

    started = time.monotonic()
    timeout = float(get_config().get("slurm.prolog_timeout")) if timeout is None else timeout
    requests = discover(
        ctx.env,
        batch_script=lambda: client.batch_script(ctx.job_id),
        comment=lambda: _comment(client, ctx),
        # directive costs a slurmctld query per node and job (comment only without SLURM_JOB_COMMENT)
        methods=get_config().get("slurm.discovery", METHODS),
    )
    report = PrologReport(ctx.job_id, requests)
    if not requests:
        log.debug("job %s requests no images", ctx.job_id)
        return report
    with system_cache_config() as root, contextlib.ExitStack() as workdir:
        _enter_workdir(ctx, workdir)
        results: list[ImageOutcome] = []
        cancelled = threading.Event()
        worker = threading.Thread(
            target=_stage_all,
            args=(requests, ctx, client, root, results, cancelled),
            name=f"stage-{ctx.job_id}",
            daemon=True,
        )
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            cancelled.set()
            log.error("job %s: staging did not finish within %.0f s", ctx.job_id, timeout)
            results = list(results)  # what finished in time; the rest timed out
            done = {o.ref for o in results}
            results += [
                ImageOutcome(ref=r.ref, error=f"staging timed out after {timeout:.0f} s")
                for r in requests
                if r.ref not in done
            ]
        report.outcomes = list(results)
        JobRecord(ctx.job_id, {o.ref: o for o in report.outcomes}).save(root)
    if ctx.restarts and len(report.failed) < len(report.outcomes):
        _drop_stale_errors(ctx, [o.ref for o in report.outcomes if o.ok], client)
    if report.failed:
        apply_failure_policy(ctx.job_id, report.failed, client, run=ctx.restarts)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _drop_stale_errors(ctx: JobContext, staged: list[str], client: JobClient) -> None:
    """A requeued job's images staged this time: their errors from an earlier run leave the
    admin comment (``scontrol show job`` would show a failure that is fixed)."""
    try:
        comment = AdminComment.parse(_admin_comment(client, ctx.job_id))
        if comment.drop_stale_errors(staged, ctx.restarts):
            client.set_admin_comment(ctx.job_id, comment.format())
    except (HpcsifError, OSError) as exc:
        log.warning("job %s: cannot clear the earlier run's errors: %s", ctx.job_id, exc)


@dataclass
class EpilogReport:
    """What one epilog run did."""

    job_id: str
    released: list[str] = field(default_factory=list)  # cache keys whose lease was dropped
    evicted: int = 0


def release_job_leases(root: CacheRoot, job_id: str) -> list[str]:
    """Remove every lease ``job-<id>`` in ``root``; returns the keys they were on."""
    from hpcsif.cache.leases import Lease

    released = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted((root.path / "leases").glob(f"*/job-{job_id}.json")):
            Lease(path, {}).release()
            released.append(path.parent.name)
    return released


def run_epilog(ctx: JobContext) -> EpilogReport:
    """Release the job's leases on this node, drop its record and evict by quota."""
    from hpcsif.cache.eviction import collect_garbage

    report = EpilogReport(ctx.job_id)
    root_path = system_dir()
    if not (root_path / "sif").is_dir():
        return report  # this node never staged anything
    with system_cache_config() as root_path:
        root = CacheRoot(root_path)
        report.released = release_job_leases(root, ctx.job_id)
        remove_record(root_path, ctx.job_id)
        try:
            report.evicted = len(collect_garbage(root).evicted)
        except HpcsifError as exc:
            log.warning("job %s: eviction after the job failed: %s", ctx.job_id, exc)
    return report


def job_record(job_id: str) -> JobRecord | None:
    """This node's record of ``job_id`` (what the prolog staged or failed to)."""
    return load_record(system_dir(), job_id)
