"""MPI profiles (``conf/mpi/*.toml``) and a Sarus-style MPI/PMIx ABI check.

A profile names host paths to bind (MPI install, PMIx, UCX, libfabric), host environment
prefixes to pass even with ``--cleanenv`` (``SLURM_``, ``PMIX_``, ``PMI_``, ``OMPI_`` …), devices
(``/dev/shm``, ``/dev/infiniband``), ``LD_LIBRARY_PATH`` additions and fixed variables. The
``hybrid`` model runs the container's own MPI, wired up by the host's ``srun --mpi=pmix|pmi2``;
the ``bind`` model binds the host MPI over the container's.

Which profile a launch uses is decided by :func:`hpcsif.engine.base.mpi_profile_name` (the
``--mpi`` flag, else ``mpi.partition_defaults[$SLURM_JOB_PARTITION]``, else ``mpi.default``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpcsif.engine.base import HostContribution
from hpcsif.engine.binds import Bind, parse_bind
from hpcsif.errors import ConfigError

log = logging.getLogger(__name__)

MODELS = ("hybrid", "bind")
_VERSION = re.compile(r"\.so\.(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


@dataclass
class MPIProfile:
    """One parsed profile file."""

    name: str
    path: Path
    model: str = "hybrid"
    description: str = ""
    binds: list[str] = field(default_factory=list)
    env_prefixes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    ld_library_path: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    abi: dict[str, list[str]] = field(default_factory=dict)

    def contribution(self) -> HostContribution:
        """Binds (missing host paths skipped: profiles list the usual places), env and paths."""
        binds = []
        for spec in self.binds:
            binds += [Bind(b.src, b.dst, b.readonly, optional=True) for b in parse_bind(spec)]
        binds += [Bind(d, d, dev=True, optional=True) for d in self.devices]
        return HostContribution(
            binds=binds,
            env=dict(self.env),
            ld_paths=list(self.ld_library_path),
            pass_prefixes=tuple(self.env_prefixes),
            checks=[self.abi_warnings],
        )

    def abi_warnings(self, root: str) -> list[str]:
        """Compare host and container MPI/PMIx library versions (Sarus' rule); one line per problem.

        Compatible when the major versions are equal and the host's minor is at least the
        container's. *root* is the container's root directory on the host (the mount point).
        """
        problems = []
        for lib in ("mpi", "pmix"):
            host = _version(self.abi.get(f"{lib}_host", []), "/")
            cont = _version(self.abi.get(f"{lib}_container", []), root)
            if not host or not cont:
                continue
            (hname, hv), (cname, cv) = host, cont
            if hv[0] != cv[0] or hv[1] < cv[1]:
                hs, cs = ".".join(map(str, hv)), ".".join(map(str, cv))
                problems.append(
                    f"MPI profile {self.name}: host {hname} ({hs}) is not ABI-compatible with the "
                    f"container's {cname} ({cs}): majors must match and the host's minor must be >= "
                    "the container's; expect PMIx/MPI errors at MPI_Init"
                )
        return problems


def _version(patterns: list[str], root: str) -> tuple[str, tuple[int, int, int]] | None:
    """(file name, version) of the first library matching *patterns* under *root* (symlinks resolved)."""
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(root, pattern.lstrip("/")))):
            real = os.path.realpath(path)
            if not real.startswith(os.path.realpath(root)):
                # an absolute symlink inside the image: resolve it inside the image
                real = os.path.join(root, os.readlink(path).lstrip("/")) if os.path.islink(path) else real
            m = _VERSION.search(os.path.basename(real)) or _VERSION.search(os.path.basename(path))
            if m:
                nums = tuple(int(x or 0) for x in m.groups())
                return os.path.basename(real), nums  # type: ignore[return-value]
    return None


def profile_dirs() -> list[Path]:
    """Where profiles are looked up: ``mpi.profile_dirs``, ``/etc/hpcsif/mpi``, the shipped ones."""
    import hpcsif
    from hpcsif.config import get_config

    pkg = Path(hpcsif.__file__).resolve().parent
    dirs = [Path(os.path.expanduser(d)) for d in get_config().get("mpi.profile_dirs") or []]
    return [*dirs, Path("/etc/hpcsif/mpi"), pkg / "data" / "mpi"]


def load_profile(name: str) -> MPIProfile:
    """Load the profile *name* (a name in :func:`profile_dirs` or a path to a .toml file)."""
    import tomllib

    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
    else:
        found = [d / f"{name}.toml" for d in profile_dirs() if (d / f"{name}.toml").is_file()]
        if not found:
            avail = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})
            raise ConfigError(f"unknown MPI profile {name!r} (available: {', '.join(avail) or 'none'})")
        path = found[0]
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"MPI profile {path}: {exc}") from None
    known = {"model", "description", "binds", "env_prefixes", "devices", "ld_library_path", "env", "abi"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"MPI profile {path}: unknown keys {', '.join(sorted(unknown))}")
    prof = MPIProfile(name=path.stem, path=path, **data)
    if prof.model not in MODELS:
        raise ConfigError(f"MPI profile {path}: model must be one of {', '.join(MODELS)}, not {prof.model!r}")
    return prof
