"""conf/hpcsif.toml documents every built-in default, with the same values."""

from __future__ import annotations

import tomllib
from pathlib import Path

from hpcsif.config import DEFAULTS, ENV_OVERRIDES
from tests.conftest import run_cli

CONF = Path(__file__).resolve().parents[2] / "conf" / "hpcsif.toml"


def test_example_config_matches_the_defaults() -> None:
    assert tomllib.loads(CONF.read_text()) == DEFAULTS


def test_example_config_names_every_environment_override() -> None:
    text = CONF.read_text()
    missing = [name for names, _, _ in ENV_OVERRIDES for name in names if name not in text]
    assert not missing


def test_a_mistyped_setting_is_named(tmp_path: Path) -> None:
    """An unknown key (a typo such as failure_polcy) is a warning naming the file and the key;
    the free-form tables (registry.mirrors …) take any key."""
    conf = tmp_path / "hpcsif.toml"
    conf.write_text('[slurm]\nfailure_polcy = "hold"\n[registry.mirrors]\n"docker.io" = "m"\n')
    conf.write_text(conf.read_text() + "[bogus]\na = 1\n")
    env = {"HPCSIF_CONFIG": str(conf), "HPCSIF_CACHEDIR": str(tmp_path / "cache")}
    res = run_cli("cache", "list", env=env)
    assert res.stderr.splitlines() == [
        f"WARNING: {conf}: unknown setting slurm.failure_polcy (ignored)",
        f"WARNING: {conf}: unknown setting bogus (ignored)",
    ]
    conf.write_text(CONF.read_text())  # the documented example: not a word
    assert run_cli("cache", "list", env=env).stderr == ""
