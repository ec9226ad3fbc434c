"""Apptainer's ``APPTAINER_<KEY>``/``SINGULARITY_<KEY>`` environment forms of command-line flags.

Each command maps a flag's ``dest`` to Apptainer's keys for it; a flag given on the command
line wins, as in Apptainer. Only the standard library is imported (``hpcsif exec`` start-up).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection

# Go's strconv.ParseBool, which Apptainer's flags use, plus the yes/on hpcsif's settings accept
_TRUE = ("1", "t", "true", "yes", "on")


def _env_value(*keys: str) -> str:
    """The first of ``APPTAINER_<K>``/``SINGULARITY_<K>`` set, for each key in turn ('' if none)."""
    for key in keys:
        for prefix in ("APPTAINER", "SINGULARITY"):
            if value := os.environ.get(f"{prefix}_{key}"):
                return value
    return ""


def flags_from_env(
    args: argparse.Namespace, table: dict[str, tuple[str, ...]], append: Collection[str] = ()
) -> None:
    """Apply the variables of ``table`` (flag dest -> keys) to the flags not given in ``args``.

    A switch (False) is turned on by a true value; a value or list flag left empty takes the
    variable's value; a list flag named in ``append`` gets the value added after what the
    command line gave (Apptainer's EnvAppendValue: ``APPTAINER_BIND`` and ``-B`` both apply, and
    of two binds to one destination the command line's wins).
    Dests the command lacks are skipped (commands share tables).
    """
    for dest, keys in table.items():
        if not hasattr(args, dest) or not (value := _env_value(*keys)):
            continue
        current = getattr(args, dest)
        if current is False:
            setattr(args, dest, value.strip().lower() in _TRUE)
        elif dest in append:
            setattr(args, dest, [*current, value])
        elif not current:
            setattr(args, dest, [value] if isinstance(current, list) else value)
