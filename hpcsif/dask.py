"""Dask workers inside container images, through dask-jobqueue.

``SIFSLURMCluster`` is a :class:`dask_jobqueue.SLURMCluster` whose workers run inside an image::

    cluster = SIFSLURMCluster(image="docker://team/analysis:2.0", cores=1, memory="2GB",
                              binds=["/scratch"], walltime="00:10:00")
    cluster.scale(jobs=2)

Nothing of dask-jobqueue is rewritten; two of its public hooks are used:

* ``python``: dask-jobqueue starts a worker as ``<python> -m distributed.cli.dask_worker …``.
  The job class hands it ``hpcsif exec [-B …] [--nv] [--mpi NAME] IMAGE python3``, so the worker
  (and the nanny's worker processes) run inside the image. The worker's local directory, ``$TMPDIR``
  and the directories of TLS files are bound; ``$HOME``, the working directory and ``/tmp`` are
  bound by hpcsif by default, and the host network is shared, so the scheduler is reachable.
* ``job_script_prologue``: ``hpcsif stage IMAGE`` runs first, so a job converts or copies the
  image (once per node, through the cache) before the worker starts, and a broken reference
  fails the job at a clear line. On Slurm the header also carries ``#HPCSIF --image=IMAGE``,
  which the hpcsif prolog reads to stage the image before the job starts; then the
  ``hpcsif stage`` line is a cache hit.

Before the cluster starts, :func:`check_image` runs the image's Python on the submit host
(through the local cache) and raises :class:`~hpcsif.errors.DaskImageError` when it lacks
``distributed`` or has a version the client cannot talk to.

:func:`sif_cluster_class` builds the same for any dask-jobqueue cluster whose job script is
rendered from ``job_script_prologue`` and the worker command: SLURM (with the prolog directive),
PBS, Moab, SGE, LSF, OAR and HTCondor are provided below. SLURM runs against a real cluster in
the tests; the others are tested by rendering their job scripts.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import dask
from dask_jobqueue import (
    HTCondorCluster,
    JobQueueCluster,
    LSFCluster,
    MoabCluster,
    OARCluster,
    PBSCluster,
    SGECluster,
    SLURMCluster,
)

from hpcsif.errors import DaskImageError

log = logging.getLogger(__name__)

__all__ = [
    "SIFClusterMixin",
    "SIFHTCondorCluster",
    "SIFJobMixin",
    "SIFLSFCluster",
    "SIFMoabCluster",
    "SIFOARCluster",
    "SIFPBSCluster",
    "SIFSGECluster",
    "SIFSLURMCluster",
    "check_image",
    "image_versions",
    "sif_cluster_class",
]

DEFAULT_PYTHON = "python3"
_PROBE_TAG = "HPCSIF-DASK-PROBE "
# Runs with the image's interpreter: any Python 3, with or without distributed.
_PROBE = f"""
import json, sys
out = {{}}
try:
    from distributed.versions import get_package_info, required_packages
    out.update(get_package_info(required_packages))
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
out["python"] = "%d.%d.%d" % sys.version_info[:3]
print({_PROBE_TAG!r} + json.dumps(out))
"""


def _word(text: str) -> str:
    """One shell word; ``$VAR`` and a leading ``~/`` stay expandable in the job's shell."""
    if text.startswith("~/"):
        return "~/" + _word(text[2:])
    if "$" not in text:
        return shlex.quote(text)
    return '"' + "".join("\\" + c if c in '"\\`' else c for c in text) + '"'


def _release(version: str | None) -> tuple[str, ...]:
    """``major.minor`` of a version (a calendar release for distributed: ``2026.8``)."""
    return tuple((version or "").split(".")[:2])


def image_versions(
    image: str, *, python: str = DEFAULT_PYTHON, timeout: float | None = 600
) -> dict[str, str | None]:
    """Python's and ``distributed``'s package versions inside ``image``, run here through the cache.

    Returns ``{"python": "3.11.7", "distributed": …, "dask": …, …}`` (the packages distributed
    itself compares between client and workers), with ``"error"`` set when ``distributed`` does
    not import. Raises :class:`DaskImageError` when ``python`` cannot run in the image at all.
    """
    # ``python`` is a command as the job script's shell would split it ("python3 -X importtime")
    cmd = [sys.executable, "-m", "hpcsif.cli.main", "exec", image, *shlex.split(python), "-c", _PROBE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DaskImageError(f"{image}: checking its Python took longer than {timeout} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith(_PROBE_TAG):
            return json.loads(line[len(_PROBE_TAG) :])
    detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    raise DaskImageError(f"{image}: cannot run {python!r} in the image to start Dask workers ({detail})")


def check_image(
    image: str, *, python: str = DEFAULT_PYTHON, timeout: float | None = 600
) -> dict[str, str | None]:
    """Raise :class:`DaskImageError` unless ``image`` can run workers for this client; its versions.

    The image needs ``distributed`` importable by ``python``, with the client's release
    (major.minor: distributed's calendar releases change the wire protocol) and the client's
    Python major.minor (functions travel as cloudpickle bytecode). Other differences among the
    packages distributed compares (dask, msgpack, cloudpickle, tornado, toolz, patch levels) are
    logged as warnings, as distributed itself warns about them.
    """
    from distributed.versions import get_package_info, required_packages

    mine = get_package_info(required_packages)
    mine["python"] = "{}.{}.{}".format(*sys.version_info[:3])
    theirs = image_versions(image, python=python, timeout=timeout)
    if "error" in theirs:
        raise DaskImageError(
            f"{image}: distributed is missing from the image's Python {theirs['python']} "
            f"({theirs['error']}); the client runs distributed {mine['distributed']}"
        )
    for pkg, why in (("python", "function bytecode"), ("distributed", "the worker protocol")):
        if _release(theirs.get(pkg)) != _release(mine[pkg]):
            raise DaskImageError(
                f"{image}: {pkg} {theirs.get(pkg)} in the image does not match {pkg} {mine[pkg]} "
                f"of the client (major.minor must match for {why})"
            )
    differ = {p: (mine.get(p), theirs.get(p)) for p in mine if mine.get(p) != theirs.get(p)}
    if differ:
        shown = ", ".join(f"{p} {c} (client) vs {i} (image)" for p, (c, i) in sorted(differ.items()))
        log.warning("%s: package versions differ from the client's: %s", image, shown)
    return theirs


class SIFJobMixin:
    """Put before a dask-jobqueue ``Job`` class: its worker runs inside ``image`` via ``hpcsif exec``.

    ``image``: any reference ``hpcsif exec`` takes (``docker://…``, ``oras://…``, a ``.sif`` path).
    ``binds``: ``-B`` specs (``src[:dst[:ro|rw]]``; ``$VARS`` expand in the job's shell).
    ``nv``/``mpi``: ``--nv`` and ``--mpi NAME`` for ``hpcsif exec``. ``exec_args``: further flags.
    ``stage``: stage the image at the start of the job (and, on Slurm, ask the prolog to).
    ``hpcsif``: the hpcsif command on the compute nodes. ``python``: the interpreter *inside the
    image* (dask's ``jobqueue.*.python`` setting names a host path, so it is not used).
    """

    #: add the ``#HPCSIF --image=…`` directive the hpcsif Slurm prolog reads
    sif_directive: ClassVar[bool] = False

    def __init__(
        self,
        *args: Any,
        image: str,
        binds: Sequence[str] = (),
        nv: bool = False,
        mpi: str | None = None,
        exec_args: Sequence[str] = (),
        stage: bool = True,
        hpcsif: str = "hpcsif",
        python: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("env_extra") is not None:
            raise ValueError("env_extra is deprecated in dask-jobqueue: use job_script_prologue")
        config_name = kwargs.get("config_name") or self.default_config_name()  # type: ignore[attr-defined]

        def setting(name: str, key: str) -> Any:
            value = kwargs.get(name)
            return dask.config.get(f"jobqueue.{config_name}.{key}", None) if value is None else value

        local_directory = setting("local_directory", "local-directory")
        prologue: list[str] = []
        if stage:
            prologue.append(f"{hpcsif} stage {_word(image)}")
        flags: list[str] = []
        if local_directory and local_directory.startswith(("/", "$", "~/")):
            # a bind source must exist; the worker would create it only inside the container.
            # (a relative one lies in the working directory, which hpcsif binds by default)
            prologue.append(f"mkdir -p {_word(local_directory)}")
            flags += ["-B", _word(local_directory)]
        for path in _tls_dirs(kwargs.get("security")):
            flags += ["-B", _word(path)]
        flags += [w for spec in binds for w in ("-B", _word(spec))]
        flags.append('${TMPDIR:+-B "$TMPDIR"}')  # node-local scratch that schedulers point TMPDIR at
        if nv:
            flags.append("--nv")
        if mpi:
            flags += ["--mpi", _word(mpi)]
        flags += [_word(a) for a in exec_args]
        kwargs["python"] = " ".join([hpcsif, "exec", *flags, _word(image), python or DEFAULT_PYTHON])
        kwargs["job_script_prologue"] = prologue + list(
            setting("job_script_prologue", "job-script-prologue") or []
        )
        super().__init__(*args, **kwargs)
        if stage and self.sif_directive:
            directive = f"#HPCSIF --image={shlex.quote(image)}" + (" --nv" if nv else "")
            directive += f" --mpi {shlex.quote(mpi)}" if mpi else ""
            self.job_header = "\n".join(filter(None, [self.job_header, directive]))
        self.image = image


def _tls_dirs(security: Any) -> list[str]:
    """Directories of the TLS files a worker reads (jobqueue writes in-memory keys to files)."""
    if security is None:
        return []
    files = security.get_tls_config_for_role("worker").values()
    dirs = {os.path.dirname(os.path.abspath(f)) for f in files if isinstance(f, str) and "\n" not in f}
    return sorted(dirs)


class SIFClusterMixin:
    """Put before a ``JobQueueCluster`` class: checks the image before anything is submitted.

    ``check_image=False`` skips :func:`check_image` (e.g. when the submit host cannot run
    containers); ``check_timeout`` bounds it (it may convert the image first).
    """

    def __init__(
        self, *args: Any, check_image: bool = True, check_timeout: float | None = 600, **kwargs: Any
    ) -> None:
        if "image" not in kwargs:
            raise TypeError(f"{type(self).__name__} needs image=… (the image the workers run in)")
        if check_image:
            _check(kwargs["image"], python=kwargs.get("python") or DEFAULT_PYTHON, timeout=check_timeout)
        self._next_worker_number = 0
        super().__init__(*args, **kwargs)

    def _new_worker_name(self, worker_number: int) -> str:
        """Worker names are never reused after a scale-down.

        distributed closes a worker that is not connected when ``lost-worker-timeout`` has
        passed since a worker *of the same name* left; with dask's reuse of names, a job
        submitted right after a scale-down (and slower to start, as in a container) was
        cancelled that way.
        """
        number = max(worker_number, self._next_worker_number)
        self._next_worker_number = number + 1
        return super()._new_worker_name(number)  # type: ignore[misc]


_check = check_image  # the mixin's keyword argument shadows the function's name


def sif_cluster_class(base: type[JobQueueCluster], *, directive: bool = False) -> type[JobQueueCluster]:
    """``base`` (a dask-jobqueue cluster class) with its workers inside an image.

    ``directive``: also write ``#HPCSIF --image=…`` into the job header (for the hpcsif Slurm
    prolog; meaningful only where our prolog reads the batch script, i.e. Slurm).
    """
    job_base = base.job_cls  # type: ignore[attr-defined]
    job = type(f"SIF{job_base.__name__}", (SIFJobMixin, job_base), {"sif_directive": directive})
    job.__module__ = __name__
    cluster = type(
        f"SIF{base.__name__}",
        (SIFClusterMixin, base),
        {"job_cls": job, "__doc__": f"A {base.__name__} whose workers run inside an image (hpcsif exec)."},
    )
    cluster.__module__ = __name__
    return cluster


SIFSLURMCluster = sif_cluster_class(SLURMCluster, directive=True)
SIFPBSCluster = sif_cluster_class(PBSCluster)
SIFMoabCluster = sif_cluster_class(MoabCluster)
SIFSGECluster = sif_cluster_class(SGECluster)
SIFLSFCluster = sif_cluster_class(LSFCluster)
SIFOARCluster = sif_cluster_class(OARCluster)
SIFHTCondorCluster = sif_cluster_class(HTCondorCluster)
