"""The command line: each command loads only its own module, and every command is reachable so."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from hpcsif.cli import main as cli
from tests.conftest import run_cli


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_command_has_its_module() -> None:
    assert _commands(cli.build_parser()) == set(cli.FAST_COMMANDS) | set(cli.BUILTIN_COMMANDS)
    for word, module in cli.FAST_COMMANDS.items():
        assert word in _commands(cli.build_parser([module])), (word, module)


@pytest.mark.parametrize(("argv", "loaded", "not_loaded"), [
    (["build", "--help"], "hpcsif.cli.build", "hpcsif.cli.sign"),
    (["-q", "slurm", "--help"], "hpcsif.cli.slurm", "hpcsif.cli.build"),
    (["exec", "--help"], "hpcsif.cli.run", "hpcsif.cli.cache"),
])  # fmt: skip
def test_a_command_loads_only_its_module(argv: list[str], loaded: str, not_loaded: str) -> None:
    code = (
        "import sys; from hpcsif.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print({loaded!r} in sys.modules, {not_loaded!r} in sys.modules, file=sys.stderr)"
    )
    err = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True).stderr
    assert err.strip().splitlines()[-1] == "True False"


def test_help_and_unknown_commands_list_them_all() -> None:
    out = run_cli("--help").stdout
    assert all(word in out for word in ("build", "exec", "cache", "sign", "slurm", "stage"))
    bad = run_cli("frobnicate", check=False)
    assert bad.returncode == 2 and "invalid choice: 'frobnicate'" in bad.stderr


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["exec", "--bogus", "x.sif", "true"], "FATAL:   hpcsif exec: unknown flag: --bogus"),
        (["pull", "-q", "docker://busybox"], "FATAL:   hpcsif pull: unknown flag: -q"),
        (["cache", "list", "--zz=1"], "FATAL:   hpcsif cache list: unknown flag: --zz"),
        (["inspect", "a.sif", "b.sif"], "FATAL:   hpcsif inspect: unexpected argument: 'b.sif'"),
        (["exec"], "FATAL:   hpcsif exec: the following arguments are required: image, args"),
        (["run"], "FATAL:   hpcsif run: the following arguments are required: image"),  # not ", args"
        (
            ["sign", "-k", "one", "x.sif"],
            "FATAL:   hpcsif sign: argument -k/--keyidx: invalid int value: 'one'",
        ),
    ],
)
def test_a_mistyped_command_line_is_one_line_naming_the_command(argv: list[str], line: str) -> None:
    """Not argparse's top-level usage (which named no command for a subcommand's unknown flag) and
    an ``error:`` line: one FATAL line for the command the flag belongs to, status 2."""
    proc = run_cli(*argv, check=False)
    command = line.split(":", 2)[1].strip()
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == f"{line} (see: {command} --help)\n", proc.stderr


def test_an_unexpected_error_is_one_line_and_a_traceback_with_d(monkeypatch, capsys) -> None:
    """A bug (an exception no check foresaw) still ends in one FATAL line and status 255; -d adds
    the traceback."""
    import hpcsif.cli.inspect

    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(hpcsif.cli.inspect, "run", broken)
    # main() sets up the "hpcsif" logger for a command line: put it back for the tests after
    logger = logging.getLogger("hpcsif")
    handlers, level = list(logger.handlers), logger.level
    try:
        assert cli.main(["inspect", "x.sif"]) == 255
        err = capsys.readouterr().err
        assert err.splitlines() == [
            "FATAL:   internal error: RuntimeError: something no check foresaw "
            "(run with -d for the traceback, and please report it)"
        ]
        assert cli.main(["-d", "inspect", "x.sif"]) == 255
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in broken" in err
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
