"""``hpcsif inspect``: an image's labels, runscript, environment, def file …, as Apptainer prints them.

Scripts parse ``inspect --json``, so the JSON is Apptainer's byte for byte: its key order (that
of Apptainer's Go structs), tab indentation, empty attributes left out, and Go's escaping of
``<``, ``>`` and ``&``; apps appear as a map of app name to that app's attributes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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
# what the text form prints, in Apptainer's order (apps first, labels last)
TEXT_ORDER = ["apps", "deffile", "runscript", "startscript", "test", "helpfile", "environment", "labels"]


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

    p = sub.add_parser("run-help", help="show the help text (%%help, or an app's %%apphelp) of an image")
    p.add_argument("--app", help="show the help for an app")
    p.add_argument("image", help="SIF file or sandbox directory")
    p.set_defaults(func=run_help)


def go_json(obj: Any) -> str:
    """``obj`` as Go's ``json.MarshalIndent(obj, "", "\\t")`` writes it (a byte that is not
    UTF-8, kept by :mod:`hpcsif.inspect` as a lone surrogate, becomes ``\\ufffd``, as Go's)."""
    from hpcsif.inspect import INVALID_BYTE

    text = json.dumps(obj, indent="\t", ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return INVALID_BYTE.sub(lambda _: "\\ufffd", text)


def emit(text: str) -> None:
    """Write ``text`` to stdout with the bytes of the image's files as they are (Apptainer
    prints a runscript that is not UTF-8 unchanged)."""
    data = text.encode("utf-8", "surrogateescape")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (tests' capture)
        sys.stdout.write(data.decode("utf-8", "replace"))
        return
    sys.stdout.flush()
    buffer.write(data)
    buffer.flush()


def run(args: argparse.Namespace) -> int:
    """Print the requested attributes."""
    wanted = [dest for dest, *_ in _FLAGS if getattr(args, dest)]
    app = args.app
    if args.all:
        wanted, args.json, app = [dest for dest, *_ in _FLAGS], True, None
    # labels unless another attribute was asked for (--json and --app alone leave the default)
    if not any(w != "labels" for w in wanted) and "labels" not in wanted:
        wanted.append("labels")
    from hpcsif.inspect import gather

    attrs = gather(args.image, wanted, app)
    if args.json:
        print(go_json({"data": {"attributes": attrs}, "type": "container"}))
        return 0
    mine = attrs.get("apps", {}).get(app, {}) if app else {}
    out: list[str] = []
    for name in TEXT_ORDER:
        if name == "apps" and name not in wanted:
            continue
        value = attrs.get(name) or mine.get(name)  # an app's own attributes stand in for the image's
        if not value:
            continue
        if name == "apps":
            out += [f"{a}\n" for a in value]
        elif name == "environment":
            out += [f"=== {path} ===\n{text}\n\n" for path, text in value.items()]
        elif name == "labels":
            out += [f"{key}: {val}\n" for key, val in value.items()]
        else:
            out.append(f"{value}\n")
    emit("".join(out))
    return 0


def run_help(args: argparse.Namespace) -> int:
    """Print the image's (or ``--app``'s) help text as ``inspect --helpfile`` does, or Apptainer's note."""
    import os

    from hpcsif.errors import NotFoundError

    if not os.path.exists(args.image):
        raise NotFoundError(f"container not found: stat {args.image}: no such file or directory")
    from hpcsif.inspect import gather

    attrs = gather(args.image, ["helpfile"], args.app)
    text = (attrs.get("apps", {}).get(args.app, {}) if args.app else attrs).get("helpfile")
    # Apptainer runs `inspect --helpfile` and prints its output, or this line when it printed nothing
    emit(f"{text}\n" if text else "No help sections were defined for this image\n")
    return 0
