"""Layered configuration.

Built-in defaults < ``/etc/hpcsif/hpcsif.toml`` < ``~/.config/hpcsif/hpcsif.toml``
(or ``$XDG_CONFIG_HOME``) < the file named by ``HPCSIF_CONFIG`` < environment variables
< command-line flags (applied by the CLI through :meth:`Config.override`).
Keys are dotted paths into the TOML tables, e.g. ``cache.quota``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from hpcsif.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/hpcsif/hpcsif.toml")

DEFAULTS: dict[str, Any] = {
    "cache": {
        "dir": "",  # empty: $HPCSIF_CACHEDIR… or ~/.cache/hpcsif
        "system_dir": "/var/lib/hpcsif/cache",  # filled by the prolog as root, read-only to users
        "shared_dir": "",  # optional shared tier (path or fsspec URL)
        "quota": "50GiB",
        "max_age_days": 0,  # 0: no age limit
        "tag_ttl": 300,  # seconds a tag -> digest resolution is reused
        "lock_timeout": 3600,  # seconds to wait for another process's conversion
        "lock_mode": "fcntl",  # fcntl | excl (O_EXCL lock files + heartbeat, for NFS/Lustre)
        "shared_lock_mode": "excl",  # lock mode on the shared tier (cache.shared_dir)
        "stale_lock_seconds": 120,
        "require_signed": False,
        "trusted_keys": [],
    },
    "convert": {"compression": "zstd", "level": 0, "tmpdir": "", "jobs": 0},
    "registry": {"mirrors": {}, "insecure": [], "retries": 5, "timeout": 60, "parallel_downloads": 4},
    "engine": {"default": "auto", "squashfuse": "", "bwrap": "bwrap", "mount_dir": "", "launch_plans": True},
    "gpu": {"driver_root": "/", "dev_dir": "/dev", "nvliblist": "", "rocmliblist": ""},
    "mpi": {"default": "", "profile_dirs": [], "partition_defaults": {}},
    "slurm": {
        "failure_policy": "record",
        "prolog_timeout": 240,
        "pyslurm": "auto",
        "discovery": ["spank", "directive", "comment"],
    },
    "remote": {
        "ssh_parallel": 8,
        "ssh_timeout": 600,
        "auto_add_host_keys": False,
        "ssh_port": 22,
        "ssh_user": "",
    },
}

# environment variable -> (key, type); the first one set wins
ENV_OVERRIDES: list[tuple[tuple[str, ...], str, type]] = [
    (("HPCSIF_CACHEDIR", "APPTAINER_CACHEDIR", "SINGULARITY_CACHEDIR"), "cache.dir", str),
    (("HPCSIF_SYSTEM_CACHEDIR",), "cache.system_dir", str),
    (("HPCSIF_SHARED_CACHEDIR",), "cache.shared_dir", str),
    (("HPCSIF_CACHE_QUOTA",), "cache.quota", str),
    (("HPCSIF_TAG_TTL",), "cache.tag_ttl", int),
    (("HPCSIF_LOCK_MODE",), "cache.lock_mode", str),
    (("HPCSIF_ENGINE",), "engine.default", str),
    (("HPCSIF_TMPDIR", "APPTAINER_TMPDIR", "SINGULARITY_TMPDIR"), "convert.tmpdir", str),
    (("HPCSIF_COMPRESSION",), "convert.compression", str),
]


def env_flag(*names: str) -> bool:
    """True if any of the environment variables is set to a true value (1, true, yes)."""
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def _warn_if_both_differ(names: tuple[str, ...]) -> None:
    """Apptainer's warning when ``SINGULARITY_X`` and ``APPTAINER_X`` disagree (the latter wins)."""
    values = {n.split("_", 1)[0]: os.environ.get(n) for n in names}
    if values.get("HPCSIF") or not values.get("APPTAINER") or not values.get("SINGULARITY"):
        return
    if values["APPTAINER"] != values["SINGULARITY"]:
        import logging

        old, new = (next(n for n in names if n.startswith(p)) for p in ("SINGULARITY", "APPTAINER"))
        logging.getLogger(__name__).warning("%s and %s have different values, using the latter", old, new)


def parse_size(text: str | int) -> int:
    """Parse ``50GiB``, ``10G``, ``500M``, ``1024`` into bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ConfigError(f"invalid size {text!r} (expected e.g. 50GiB, 500M, 1024)") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _unknown_keys(layer: dict[str, Any], known: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of *layer* that *known* lacks (a typo an admin would not see otherwise);
    below a table that is empty in *known* (``registry.mirrors`` …) every key is the user's."""
    unknown = []
    for key, value in layer.items():
        if key not in known:
            unknown.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(known[key], dict) and known[key]:
            unknown += _unknown_keys(value, known[key], f"{prefix}{key}.")
    return unknown


def config_files() -> list[Path]:
    """The configuration files looked for, lowest layer first (each may be missing)."""
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files = [SYSTEM_CONFIG, xdg / "hpcsif" / "hpcsif.toml"]
    if os.environ.get("HPCSIF_CONFIG"):
        files.append(Path(os.environ["HPCSIF_CONFIG"]))
    return files


class Config:
    """The effective configuration, read once per process."""

    def __init__(self, data: dict[str, Any], sources: list[str]) -> None:
        self.data = data
        self.sources = sources

    @classmethod
    def load(cls, extra_files: list[Path] | None = None) -> Config:
        """Read every layer that exists, in order."""
        data = copy.deepcopy(DEFAULTS)
        sources = ["defaults"]
        for path in [*config_files(), *(extra_files or [])]:
            if path.is_file():
                import tomllib  # only when there is a file: exec's start-up time counts

                try:
                    layer = tomllib.loads(path.read_text())
                except (OSError, tomllib.TOMLDecodeError) as exc:
                    raise ConfigError(f"{path}: {exc}") from None
                for key in _unknown_keys(layer, DEFAULTS):
                    import logging

                    logging.getLogger(__name__).warning("%s: unknown setting %s (ignored)", path, key)
                _merge(data, layer)
                sources.append(str(path))
        for names, key, typ in ENV_OVERRIDES:
            _warn_if_both_differ(names)
            for name in names:
                if os.environ.get(name):
                    try:
                        cls._set(data, key, typ(os.environ[name]))
                    except ValueError:
                        raise ConfigError(f"{name}={os.environ[name]!r}: expected {typ.__name__}") from None
                    sources.append(f"${name}")
                    break
        return cls(data, sources)

    @staticmethod
    def _set(data: dict[str, Any], key: str, value: Any) -> None:
        *parents, leaf = key.split(".")
        for p in parents:
            data = data.setdefault(p, {})
        data[leaf] = value

    def get(self, key: str, default: Any = None) -> Any:
        """The value at dotted ``key`` (``default`` if absent)."""
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def override(self, key: str, value: Any) -> None:
        """Set ``key`` (used for command-line flags, the top layer)."""
        if value is not None:
            self._set(self.data, key, value)

    def cache_dir(self) -> Path:
        """The user cache root: config/env, else ``$XDG_CACHE_HOME/hpcsif`` or ``~/.cache/hpcsif``."""
        if self.get("cache.dir"):
            return Path(os.path.expanduser(self.get("cache.dir")))
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "hpcsif"

    def cache_disabled(self) -> bool:
        """True when ``*_DISABLE_CACHE`` asks for a throw-away cache."""
        return env_flag("HPCSIF_DISABLE_CACHE", "APPTAINER_DISABLE_CACHE", "SINGULARITY_DISABLE_CACHE")

    def tmpdir(self) -> Path | None:
        """Where large temporary files go (None: next to the output)."""
        t = self.get("convert.tmpdir")
        return Path(t) if t else None


_current: Config | None = None


def get_config() -> Config:
    """The process-wide configuration (loaded on first use)."""
    global _current
    if _current is None:
        _current = Config.load()
    return _current


def set_config(cfg: Config | None) -> None:
    """Replace the process-wide configuration (tests, CLI flags)."""
    global _current
    _current = cfg
