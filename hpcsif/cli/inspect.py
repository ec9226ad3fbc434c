"""``hpcsif inspect``: an image's labels, runscript, environment, def file …, as Apptainer prints them."""

from __future__ import annotations

import argparse
import json
import sys

_FLAGS = [
    ("labels", "-l", "--labels", "show the labels (the default)"),
    ("deffile", "-d", "--deffile", "show the definition file the image was built from"),
    ("runscript", "-r", "--runscript", "show the runscript"),
    ("startscript", "-s", "--startscript", "show the startscript"),
    ("test", "-t", "--test", "show the test script"),
    ("environment", "-e", "--environment", "show the environment scripts"),
    ("helpfile", "-H", "--helpfile", "show the help text"),
    ("apps", None, "--list-apps", "list the SCIF apps"),
]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command."""
    p = sub.add_parser("inspect", help="show metadata of a SIF image or sandbox")
    for dest, short, long, text in _FLAGS:
        flags = [f for f in (short, long) if f]
        p.add_argument(*flags, dest=dest, action="store_true", help=text)
    p.add_argument("-j", "--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="show every attribute (implies --json)")
    p.add_argument("--app", help="inspect a SCIF app's metadata")
    p.add_argument("image", help="SIF file or sandbox directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the requested attributes."""
    from hpcsif.inspect import inspect

    wanted = [dest for dest, *_ in _FLAGS if getattr(args, dest)]
    if args.all:
        wanted = [dest for dest, *_ in _FLAGS]
        args.json = True
    wanted = wanted or ["labels"]
    attrs = inspect(args.image, wanted, app=args.app)
    if args.json:
        shown = {k: v for k, v in attrs.items() if v not in (None, "", {}, [])}
        print(json.dumps({"data": {"attributes": shown}, "type": "container"}, indent="\t"))
        return 0
    out = sys.stdout
    for name in wanted:
        value = attrs[name]
        if name == "labels":
            for key, val in sorted((value or {}).items()):
                out.write(f"{key}: {val}\n")
        elif name == "environment":
            for path, text in (value or {}).items():
                out.write(f"=== {path} ===\n{text.rstrip()}\n\n")
        elif name == "apps":
            out.writelines(f"{app}\n" for app in value or [])
        elif value:
            out.write(value if value.endswith("\n") else value + "\n")
    return 0
