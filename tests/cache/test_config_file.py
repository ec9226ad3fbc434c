"""conf/hpcsif.toml documents every built-in default, with the same values."""

from __future__ import annotations

import tomllib
from pathlib import Path

from hpcsif.config import DEFAULTS, ENV_OVERRIDES

CONF = Path(__file__).resolve().parents[2] / "conf" / "hpcsif.toml"


def test_example_config_matches_the_defaults() -> None:
    assert tomllib.loads(CONF.read_text()) == DEFAULTS


def test_example_config_names_every_environment_override() -> None:
    text = CONF.read_text()
    missing = [name for names, _, _ in ENV_OVERRIDES for name in names if name not in text]
    assert not missing
