"""``hpcsif`` entry point: global flags, command modules, error to exit-code mapping.

Each command group lives in ``hpcsif/cli/<name>.py`` with ``register(subparsers)``; those
modules import only the standard library at top level so that ``hpcsif exec`` starts fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from typing import NoReturn

from hpcsif import __version__

# command modules, in the order their commands appear in --help
COMMAND_MODULES = ["build", "pull", "inspect", "sif", "cache", "overlay", "run", "sign", "stage", "slurm"]
# command word -> its module: a command loads only its own module (about 10 ms less per start,
# which container starts, prolog hooks and conversions all pay); --help and unknown words get all
FAST_COMMANDS = {
    **{c: "run" for c in ("run", "exec", "shell", "test")},
    **{c: "sign" for c in ("sign", "verify", "key")},
    **{c: "pull" for c in ("pull", "push")},
    "run-help": "inspect",
    **{c: c for c in ("build", "inspect", "sif", "cache", "overlay", "stage", "slurm")},
}

# commands main.py itself provides, which need no command module
BUILTIN_COMMANDS = ("version",)

_NO_LIBRARY = "there is no Library, keyserver or remote endpoint client; use docker:// or oras:// references"
#: Apptainer's commands that hpcsif does not provide, and what to do instead (one FATAL line each)
UNSUPPORTED_COMMANDS = {
    "instance": "there are no background instances; start the service with `hpcsif exec IMAGE CMD &`",
    "oci": "there are no OCI runtime commands; run/exec/shell run OCI images (docker://, oci://, …)",
    "registry": "credentials are never written to disk; use --docker-login, --authfile FILE or "
    "APPTAINER_DOCKER_USERNAME/APPTAINER_DOCKER_PASSWORD",
    "remote": _NO_LIBRARY,
    "keyserver": _NO_LIBRARY,
    "search": _NO_LIBRARY,
    "delete": _NO_LIBRARY,
    "plugin": "there is no plugin interface; admins configure hpcsif in /etc/hpcsif/hpcsif.toml",
    "capability": "hpcsif runs unprivileged and grants no capabilities; see --add-caps and --fakeroot",
    "config": "hpcsif has no setuid configuration; settings live in /etc/hpcsif/hpcsif.toml (see hpcsif -c)",
    "checkpoint": "there is no DMTCP checkpointing; let the application checkpoint to a bound directory",
    "completion": "there are no shell completion scripts; see hpcsif help and hpcsif COMMAND --help",
}

log = logging.getLogger("hpcsif")


def command_of(argv: list[str]) -> str | None:
    """The command word in ``argv`` (skipping global options), if any."""
    args = iter(argv)
    for arg in args:
        if arg in ("-c", "--config"):
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistyped command line in one FATAL line naming the command, status 2.

    argparse's own report is the top-level usage (for a subcommand's unknown flag too) and an
    ``error:`` line; Apptainer's is one line naming the command (then its flag list).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # the innermost command's default wins: main() names it for an unknown flag
        self.set_defaults(command_prog=self.prog)

    def error(self, message: str) -> NoReturn:
        """Print *message* as one FATAL line for this (sub)command and exit with status 2."""
        fail(self.prog, message)

    def _get_nargs_pattern(self, action: argparse.Action) -> str:
        # argparse lets a positional take the `--` after it (and drops it); the container's words
        # keep theirs, as Apptainer's (`exec IMG -- cmd` runs `--`, `run IMG -- x` passes `-- x`)
        if getattr(action, "words_follow", False):
            return "(-*A)"
        return super()._get_nargs_pattern(action)


def fail(prog: str, message: str) -> NoReturn:
    """Exit with status 2 after one line: what is wrong with the command line of *prog*."""
    print(f"FATAL:   {prog}: {message} (see: {prog} --help)", file=sys.stderr)
    sys.exit(2)


def build_parser(modules: list[str] | None = None, command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with the commands of ``modules`` (default: all) registered.

    A module with ``register_one`` registers just ``command`` of its commands, when given.
    """
    parser = _Parser(
        prog="hpcsif",
        description="Docker/OCI containers as Apptainer-compatible SIF images on HPC clusters.",
    )
    parser.add_argument("--version", action="version", version=f"hpcsif version {__version__}")
    # as Apptainer's, these may be combined: the most verbose wins (-d, then -v, -q, -s)
    parser.add_argument("-d", "--debug", action="store_true", help="print debugging information")
    parser.add_argument("-v", "--verbose", action="store_true", help="print additional information")
    parser.add_argument("-q", "--quiet", action="store_true", help="suppress normal output")
    parser.add_argument("-s", "--silent", action="store_true", help="only print errors")
    parser.add_argument("--nocolor", action="store_true", help="accepted: hpcsif prints no colours")
    parser.add_argument("-c", "--config", metavar="FILE", help="extra configuration file (TOML)")
    parser.add_argument(
        "--build-config", action="store_true", help="accepted: builds use the same configuration as runs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES if modules is None else modules:
        module = importlib.import_module(f"hpcsif.cli.{name}")
        if command and hasattr(module, "register_one"):
            module.register_one(sub, command)
        else:
            module.register(sub)
    version = sub.add_parser("version", help="show the version (only the number, as Apptainer prints it)")
    version.set_defaults(func=_print_version)
    return parser


def _print_version(args: argparse.Namespace) -> int:
    print(__version__)
    return 0


def help_argv(argv: list[str]) -> list[str]:
    """``help [COMMAND…]`` (Apptainer's help command) as ``[COMMAND…] --help``; other argv as given."""
    if command_of(argv) != "help":
        return argv
    at = argv.index("help")
    rest = [*argv[:at], *argv[at + 1 :]]
    if command_of(rest) == "help":  # `help help`: the command list, as Apptainer's help of help
        rest.remove("help")
    return [*rest, "--help"]


def attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--opt -value`` written ``--opt=-value`` for the command's valued options.

    Apptainer (cobra) takes a value that starts with a dash (``--mksquashfs-args -all-root``);
    argparse would read it as an unknown option. Only the options before the command's first
    positional argument are looked at: what follows the image belongs to the container.
    """
    command = command_of(argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    cmd_parser = sub.choices.get(command) if sub and command else None
    if cmd_parser is None:
        return argv
    out, i = list(argv[: argv.index(command) + 1]), argv.index(command) + 1
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-") or tok == "--":
            break  # the first positional: the rest is the container's
        action = cmd_parser._option_string_actions.get(tok)
        if action is not None and action.nargs is None and i + 1 < len(argv):
            nxt = argv[i + 1]
            if nxt.startswith("-") and nxt not in cmd_parser._option_string_actions:
                out.append(f"{tok}={nxt}")
            else:
                out += [tok, nxt]
            i += 2
            continue
        out.append(tok)
        i += 1
    return out + argv[i:]


#: Apptainer's APPTAINER_<KEY> forms of the global flags
GLOBAL_ENV = {
    "debug": ("DEBUG",),
    "verbose": ("VERBOSE",),
    "quiet": ("QUIET",),
    "silent": ("SILENT",),
    "nocolor": ("NOCOLOR",),
}


def setup_logging(args: argparse.Namespace) -> None:
    """Map -d/-v/-q/-s to log levels as Apptainer does (-q keeps warnings, -s only errors); to stderr.

    The flags (or their variables) may be combined; the most verbose one wins, and the others
    are turned off for the commands, which look at ``args.quiet`` and ``args.silent`` too.
    """
    from hpcsif.cli.envflags import flags_from_env

    flags_from_env(args, GLOBAL_ENV)
    if args.debug or args.verbose:
        args.quiet = args.silent = False
    elif args.quiet:
        args.silent = False
    if args.debug:
        level = logging.DEBUG
    elif args.verbose:
        level = logging.INFO
    elif args.silent:
        level = logging.ERROR
    else:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("hpcsif")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # a quieter hpcsif also silences chatty libraries
    logging.getLogger("urllib3").setLevel(max(level, logging.WARNING))
    logging.getLogger("paramiko").setLevel(max(level, logging.WARNING))


class _Formatter(logging.Formatter):
    # what -v adds is Apptainer's VERBOSE level: its INFO lines (shown by default) are printed
    # by the commands themselves
    _NAMES = {
        "DEBUG": "DEBUG",
        "INFO": "VERBOSE",
        "WARNING": "WARNING",
        "ERROR": "ERROR",
        "CRITICAL": "FATAL",
    }

    def format(self, record: logging.LogRecord) -> str:
        name = self._NAMES.get(record.levelname, record.levelname)
        text = f"{name + ':':<9}{record.getMessage()}"
        return f"{text}\n{self.formatException(record.exc_info)}" if record.exc_info else text


class Terminated(BaseException):
    """SIGTERM arrived (scancel, a job's time limit): unwind, so temporary files are removed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None, *, front: bool = False) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the exit status.

    *front*: the native ``hpcsif`` front started us with its own command line, and repeats
    the launches we save (:mod:`hpcsif.engine.launch_plan`).
    """
    words = sys.argv[1:] if argv is None else None
    argv = sys.argv[1:] if argv is None else argv
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # the container engine forwards its own
        signal.signal(signal.SIGTERM, _terminate)
    argv = help_argv(argv)
    command = command_of(argv) or ""
    if command in UNSUPPORTED_COMMANDS:
        print(
            f"FATAL:   {command} is not supported by hpcsif: {UNSUPPORTED_COMMANDS[command]}", file=sys.stderr
        )
        return 2
    fast = FAST_COMMANDS.get(command)
    parser = build_parser(
        [] if command in BUILTIN_COMMANDS else [fast] if fast else None, command if fast else None
    )
    if not command and not {"-h", "--help", "--version"} & set(argv):
        parser.print_help()  # `hpcsif` alone: the command list, as Apptainer prints its usage
        return 1
    args, unknown = parser.parse_known_args(attach_dash_values(parser, argv))
    if unknown:  # the innermost command's, not the top-level usage argparse would name
        flag = unknown[0].split("=", 1)[0]
        what = f"unknown flag: {flag}" if flag.startswith("-") else f"unexpected argument: {unknown[0]!r}"
        fail(args.command_prog, what)
    args.front_words = words if front else None
    setup_logging(args)
    log.debug("hpcsif version: %s", __version__)  # as Apptainer's first -d line
    from hpcsif.errors import HpcsifError

    try:
        if args.config:
            from pathlib import Path

            from hpcsif.config import Config, set_config
            from hpcsif.errors import ConfigError

            if not Path(args.config).is_file():  # asked for by name: its absence is no default
                why = "not a file" if Path(args.config).exists() else "no such file"
                raise ConfigError(f"couldn't read configuration file {args.config}: {why}")
            set_config(Config.load([Path(args.config)]))
        return int(args.func(args) or 0)
    except HpcsifError as exc:
        # even with -s, which Apptainer says prints errors
        print(f"{exc.level + ':':<9}{exc}", file=sys.stderr)
        if args.debug:
            log.debug("traceback", exc_info=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("FATAL:   interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("FATAL:   terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # the reader went away (e.g. `hpcsif … | head`); do not print a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the system refused something no check foresaw (a full disk …)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"FATAL:   {where}{exc.strerror or exc}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 255
    except Exception as exc:  # a bug: still one line, the traceback with -d
        print(
            f"FATAL:   internal error: {type(exc).__name__}: {str(exc)[:300]} "
            "(run with -d for the traceback, and please report it)",
            file=sys.stderr,
        )
        log.debug("traceback", exc_info=True)
        return 255


def _leaving(code: int) -> int:
    """``code``, after handing what the run left behind to the process's exit."""
    # the interpreter's last garbage collection would walk every object still alive, about
    # 10 ms per run here (a container start is 70 ms); the process ends, the kernel frees them
    gc.freeze()
    return code


def console(front: bool = False) -> int:
    """The ``hpcsif`` command: :func:`main` on the command line, as the process's last act.

    *front*: called by the native front (``hpcsif/native/front.c``) rather than as the console script.
    """
    return _leaving(main(front=front))


def run_singularity_main() -> int:
    """``run-singularity SIF ARGS…``: what a SIF's launch line ``#!/usr/bin/env run-singularity`` calls."""
    return _leaving(main(["run", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(console())
