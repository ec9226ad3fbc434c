"""GPU support: ``--nv`` (NVIDIA) and ``--rocm`` (AMD) device nodes and driver files.

Libraries are found with ``nvidia-container-cli list`` when it is installed (its list follows
the installed driver), else from Apptainer-format lists (``nvliblist.conf``/``rocmliblist.conf``:
one name a line, ``.so`` names are libraries, the rest programs) matched against the dynamic
linker cache (``ldconfig -p``). Libraries are bound into ``/.singularity.d/libs`` (which the
launcher puts on ``LD_LIBRARY_PATH``), programs into ``/usr/local/bin`` (on every image's PATH;
binding into a populated ``/usr/bin`` of a read-only image would need an underlay of hundreds
of entries), device nodes into ``/dev``.

``gpu.driver_root`` (default ``/``) and ``gpu.dev_dir`` (default ``/dev``) point discovery at
another tree, e.g. a prepared fake driver installation in the tests: the linker cache is then
``<driver_root>/etc/ld.so.cache`` and programs are searched under ``<driver_root>/usr/bin`` etc.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from hpcsif.engine.base import HostContribution, which
from hpcsif.engine.binds import Bind
from hpcsif.errors import ConfigError

log = logging.getLogger(__name__)

LIBS_DIR = "/.singularity.d/libs"
BIN_DIR = "/usr/local/bin"
_BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin", "usr/local/bin")


def conf_file(name: str, configured: str = "", looked: list[str] | None = None) -> Path:
    """Locate an admin config file: the configured path, /etc/hpcsif, then the shipped copy.

    *looked*, when given, gets every path looked at, the one found last.
    """
    import hpcsif

    pkg = Path(hpcsif.__file__).resolve().parent
    candidates = [Path(configured)] if configured else []
    candidates += [Path("/etc/hpcsif") / name, pkg / "data" / name]
    for c in candidates:
        if looked is not None:
            looked.append(str(c))
        if c.is_file():
            return c
    raise ConfigError(f"{name} not found (looked in {', '.join(map(str, candidates))})")


def read_liblist(path: Path) -> tuple[list[str], list[str]]:
    """(programs, libraries) named in an Apptainer-format list file."""
    progs, libs = [], []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            (libs if ".so" in name else progs).append(name)
    return progs, libs


def ldconfig_cache(driver_root: str) -> dict[str, str]:
    """Library name → host path from ``ldconfig -p`` (64-bit entries preferred)."""
    ldconfig = which("ldconfig") or "/sbin/ldconfig"
    cmd = [ldconfig, "-p"]
    if driver_root != "/":
        cmd += ["-C", os.path.join(driver_root, "etc/ld.so.cache")]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError as exc:
        log.warning("cannot run %s: %s", ldconfig, exc.strerror)
        return {}
    found: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(" (")
        flags, _, path = rest.partition(") => ")
        if not path:
            continue
        host = os.path.join(driver_root, path.lstrip("/")) if driver_root != "/" else path
        # a 64-bit entry replaces a 32-bit one of the same name, never the other way round
        if name not in found or "64" in flags:
            found[name] = host
    return found


def _select(names: list[str], cache: dict[str, str]) -> dict[str, str]:
    """Cache entries whose name starts with one of the list's library names."""
    return {lib: path for lib, path in cache.items() if any(lib.startswith(n) for n in names)}


def _programs(names: list[str], driver_root: str) -> dict[str, str]:
    if driver_root == "/":
        return {n: p for n in names if (p := which(n))}
    found = {}
    for n in names:
        for d in _BIN_DIRS:
            p = os.path.join(driver_root, d, n)
            if os.access(p, os.X_OK):
                found[n] = p
                break
    return found


def _container_cli_list() -> tuple[dict[str, str], dict[str, str]] | None:
    """(programs, libraries) from ``nvidia-container-cli list``, None when it is not usable."""
    cli = which("nvidia-container-cli")
    if not cli:
        return None
    res = subprocess.run([cli, "list", "--binaries", "--libraries"], capture_output=True, text=True)
    if res.returncode != 0:
        log.warning("nvidia-container-cli list failed (%s); using nvliblist.conf", res.stderr.strip())
        return None
    progs, libs = {}, {}
    for path in res.stdout.split():
        (libs if ".so" in os.path.basename(path) else progs)[os.path.basename(path)] = path
    return progs, libs


def _visible(dev_dir: str, names: list[str]) -> list[str]:
    """Per-GPU NVIDIA device nodes allowed by ``NVIDIA_VISIBLE_DEVICES`` (all when unset/all)."""
    sel = os.environ.get("NVIDIA_VISIBLE_DEVICES", "all").strip()
    if sel in ("none", "void", ""):
        return []
    gpus = [n for n in names if n.startswith("nvidia") and n[6:].isdigit()]
    if sel == "all":
        return gpus
    wanted = {s.strip() for s in sel.split(",")}
    return [n for n in gpus if n[6:] in wanted]


def _discover(kind: str) -> HostContribution:
    from hpcsif.config import get_config

    cfg = get_config()
    root = str(cfg.get("gpu.driver_root") or "/")
    dev_dir = str(cfg.get("gpu.dev_dir") or "/dev")
    contrib = HostContribution(
        ld_paths=[], pass_prefixes=("CUDA_", "NVIDIA_") if kind == "nv" else ("ROCR_", "HIP_", "GPU_", "HSA_")
    )
    try:
        entries = sorted(os.listdir(dev_dir))
    except OSError:
        entries = []
    if kind == "nv":
        shared = [
            n
            for n in entries
            if n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")
        ]
        devices = _visible(dev_dir, entries)
        flag, listname = "--nv", "nvliblist.conf"
    else:
        shared, devices = [n for n in entries if n in ("kfd", "dri")], []
        flag, listname = "--rocm", "rocmliblist.conf"
    if not devices and not shared:
        log.warning("%s: no GPU devices found in %s; continuing without GPU devices", flag, dev_dir)
    for n in shared + devices:
        contrib.binds.append(Bind(os.path.join(dev_dir, n), f"/dev/{n}", dev=True, optional=True))
    # what a saved launch must find unchanged to repeat these binds: the device directory, the
    # list, the linker cache and the directories programs are looked for in (and whatever
    # nvidia-container-cli reads, which is not known: its answer is asked for each time)
    contrib.witnesses.append(dev_dir)
    listed = _container_cli_list() if kind == "nv" and root == "/" else None
    if listed is None:
        configured = cfg.get(f"gpu.{'nvliblist' if kind == 'nv' else 'rocmliblist'}")
        progs_names, lib_names = read_liblist(conf_file(listname, configured, contrib.witnesses))
        progs = _programs(progs_names, root)
        libs = _select(lib_names, ldconfig_cache(root))
        contrib.witnesses.append(os.path.join(root, "etc/ld.so.cache"))
        if root == "/":
            contrib.witnesses += [d or "." for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
        else:
            contrib.witnesses += [os.path.join(root, d) for d in _BIN_DIRS]
    else:
        progs, libs = listed
        contrib.replayable = False
    if not libs:
        log.warning("%s: no driver libraries found under %s; the container may not see the GPU", flag, root)
    for name, path in sorted(libs.items()):
        contrib.binds.append(Bind(path, f"{LIBS_DIR}/{name}", readonly=True, optional=True))
    for name, path in sorted(progs.items()):
        contrib.binds.append(Bind(path, f"{BIN_DIR}/{name}", readonly=True, optional=True))
    return contrib


def nvidia() -> HostContribution:
    """Binds and environment for ``--nv``."""
    return _discover("nv")


def rocm() -> HostContribution:
    """Binds and environment for ``--rocm``."""
    return _discover("rocm")
