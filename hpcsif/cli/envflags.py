"""Apptainer's ``APPTAINER_<KEY>``/``SINGULARITY_<KEY>`` environment forms of command-line flags.

Each command maps a flag's ``dest`` to Apptainer's keys for it; a flag given on the command
line wins, as in Apptainer. Only the standard library is imported (``hpcsif exec`` start-up).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection

# Go's strconv.ParseBool, which Apptainer's flags use, plus the yes/on hpcsif's settings accept
_TRUE = ("1", "t", "true", "yes", "on")


def _env_value(*keys: str) -> str:
    """For each key in turn, ``APPTAINER_<K>`` if set (even empty: it wins, as in Apptainer),
    else ``SINGULARITY_<K>``; the first non-empty value ('' if none)."""
    for key in keys:
        value = os.environ.get(f"APPTAINER_{key}")
        if value is None:
            value = os.environ.get(f"SINGULARITY_{key}")
        if value:
            return value
    return ""


def _legacy_notices(args: argparse.Namespace, table: dict[str, tuple[str, ...]]) -> None:
    """Apptainer's lines for the ``SINGULARITY_<K>`` of the command's flags, in flag-name order:
    INFO that ``APPTAINER_<K>`` is preferred, or a WARNING where both are set and differ.

    As there, only ``-q``/``-s`` on the command line hide them (not ``APPTAINER_QUIET``: the
    lines of the global flags come before it applies); ``args.env_notices`` tells that some
    were printed (a launch the native front must not repeat without them).
    """
    if not hasattr(args, "given_quiet"):  # the first call, before any variable applied
        args.given_quiet = bool(getattr(args, "quiet", False) or getattr(args, "silent", False))
        args.given_silent = bool(getattr(args, "silent", False))
    for dest in sorted(table, key=lambda d: d.replace("_", "-")):
        if not hasattr(args, dest):
            continue
        for key in table[dest]:
            legacy, new = f"SINGULARITY_{key}", f"APPTAINER_{key}"
            if legacy not in os.environ or os.environ.get(new) == os.environ[legacy]:
                continue
            if new in os.environ:
                if args.given_silent:
                    continue
                line = f"WARNING: {legacy} and {new} have different values, using the latter"
            elif not args.given_quiet:
                line = f"INFO:    Environment variable {legacy} is set, but {new} is preferred"
            else:
                continue
            print(line, file=sys.stderr, flush=True)
            args.env_notices = True


def flags_from_env(
    args: argparse.Namespace, table: dict[str, tuple[str, ...]], append: Collection[str] = ()
) -> None:
    """Apply the variables of ``table`` (flag dest -> keys) to the flags not given in ``args``.

    A switch (False) is turned on by a true value; a value or list flag left empty takes the
    variable's value; a list flag named in ``append`` gets the value added after what the
    command line gave (Apptainer's EnvAppendValue: ``APPTAINER_BIND`` and ``-B`` both apply, and
    of two binds to one destination the command line's wins).
    Dests the command lacks are skipped (commands share tables). A ``SINGULARITY_<K>`` gets
    Apptainer's line (:func:`_legacy_notices`).
    """
    _legacy_notices(args, table)
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
