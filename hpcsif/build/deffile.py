"""Parse Apptainer definition files: header, sections, SCIF apps and multi-stage builds.

The grammar follows Apptainer's parser: a header of ``Key: value`` lines (keys are
case-insensitive, ``#`` starts a comment, a trailing ``\\`` continues a value), then sections
that start with a line whose first word is ``%name`` and run to the next such line. A new
``Bootstrap:`` line at the start of a line begins a new stage. Repeated sections are
concatenated, as Apptainer does. Unlike Apptainer, every error names the file and line.
"""

from __future__ import annotations

import collections
import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hpcsif.errors import DefinitionError

#: bootstrap agents hpcsif builds from, and whether they need a ``From:``
AGENTS = {
    "docker": True,
    "docker-daemon": True,
    "docker-archive": True,
    "oci": True,
    "oci-archive": True,
    "localimage": True,
    "oras": True,
    "scratch": False,
}
#: agents Apptainer knows that hpcsif does not build from (a clearer error than "unknown")
UNSUPPORTED_AGENTS = (
    "library",
    "shub",
    "yum",
    "dnf",
    "zypper",
    "debootstrap",
    "arch",
    "busybox",
)
HEADER_KEYS = {
    "bootstrap",
    "from",
    "stage",
    "registry",
    "namespace",
    "includecmd",
    # keys of other agents Apptainer accepts; kept so such def files parse, unused here
    "mirrorurl",
    "updateurl",
    "osversion",
    "include",
    "library",
    "product",
    "user",
    "regcode",
    "productpgp",
    "confurl",
    "setopt",
    "fingerprints",
}
SECTIONS = (
    "pre",  # run on the host before the bootstrap: Apptainer 1.4 still runs it
    "help",
    "setup",
    "files",
    "labels",
    "environment",
    "post",
    "runscript",
    "test",
    "startscript",
    "arguments",
)
APP_SECTIONS = {
    "appinstall": "install",
    "appfiles": "files",
    "appenv": "env",
    "apptest": "test",
    "apphelp": "help",
    "apprun": "run",
    "appstart": "start",
    "applabels": "labels",
}
#: the largest definition file read: its text is kept in the image's metadata several times
#: (Apptainer 1.4 refuses any section over 64 KiB)
MAX_SIZE = 4 << 20
#: the most stages a definition file may have: Apptainer has no limit, but builds each stage in
#: full (2,000 empty stages take it 106 s), so 70,000 stages of a 4 MiB file would build for hours
MAX_STAGES = 1000
#: where a stage starts, as Apptainer splits stages: "Bootstrap:" at the start of a line, no
#: space before the colon ("Bootstrap : x" later in the file is text of the section above)
_STAGE_START = re.compile(r"^bootstrap:", re.IGNORECASE | re.MULTILINE)
#: a header line of the first stage, which may be indented or spaced ("  Bootstrap : docker")
_HEADER_START = re.compile(r"^\s*bootstrap\s*:", re.IGNORECASE | re.MULTILINE)
_TEMPLATE = re.compile(r"{{\s*(\w+)\s*}}")
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Section:
    """One section: its arguments (text after ``%name``) and body, with the ``%name`` line number."""

    name: str
    args: str
    body: str
    line: int

    def interpreter(self, where: str) -> list[str]:
        """The shell for a script section: the command ``-c PATH [ARGS…]`` names, else
        ``/bin/sh`` with the section's arguments (``%runscript -x``: ``#!/bin/sh -x``)."""
        try:
            if "\0" in self.args:
                raise ValueError("a NUL byte")
            words = shlex.split(self.args)
        except ValueError as exc:  # an unbalanced quote, a NUL
            raise DefinitionError(
                f"{where}:{self.line}: bad %{self.name} arguments {self.args!r}: {exc}"
            ) from None
        if words[:1] == ["-c"]:
            if len(words) < 2:
                raise DefinitionError(f"{where}:{self.line}: %{self.name} -c needs a shell")
            return words[1:]
        return ["/bin/sh", *words]

    def shell_argv(self, where: str) -> list[str]:
        """How ``%setup``/``%post`` run their script: ``/bin/sh -e -x [ARGS…]``, or ``-c`` as given.

        As Apptainer: a shell named with ``-c`` gets no ``-e -x``, so a failing command in
        ``%post -c /bin/bash`` does not stop the build (``-c /bin/bash -e`` asks for that);
        other arguments go to ``/bin/sh`` before the script (``%post -v``).
        """
        shell = self.interpreter(where)
        return shell if self.args.split()[:1] == ["-c"] else [shell[0], "-e", "-x", *shell[1:]]


@dataclass(frozen=True)
class FileCopy:
    """One ``%files`` line: source (host path, glob, or path in another stage) and destination."""

    src: str
    dst: str
    line: int


@dataclass
class FilesBlock:
    """A ``%files`` section; ``stage`` names the stage the sources come from (``%files from NAME``)."""

    stage: str | None
    copies: list[FileCopy]


@dataclass
class App:
    """One SCIF app: its sections keyed install, files, env, test, help, run, start, labels."""

    name: str
    sections: dict[str, Section] = field(default_factory=dict)

    def body(self, key: str) -> str:
        """The body of section ``key`` ("" when absent)."""
        sec = self.sections.get(key)
        return sec.body if sec else ""


@dataclass
class Stage:
    """One build stage: its header, sections, ``%files`` blocks, labels and apps."""

    header: dict[str, str]
    header_lines: dict[str, int]
    sections: dict[str, Section]
    files: list[FilesBlock]
    labels: dict[str, str]
    apps: dict[str, App]  # in the order they first appear (``%appinstall`` runs in this order)
    line: int  # where the stage starts

    @property
    def bootstrap(self) -> str:
        """The bootstrap agent (lower case)."""
        return self.header["bootstrap"].lower()

    @property
    def source(self) -> str:
        """The ``From:`` value ("" for scratch)."""
        return self.header.get("from", "")

    @property
    def name(self) -> str | None:
        """The ``Stage:`` name, if any."""
        return self.header.get("stage") or None

    def body(self, name: str) -> str:
        """The body of section ``name`` ("" when absent)."""
        sec = self.sections.get(name)
        return sec.body if sec else ""


@dataclass
class Definition:
    """A parsed definition file: its stages (the last one is the image) and its full text."""

    stages: list[Stage]
    raw: str
    where: str
    #: ``--build-arg`` names no ``{{ NAME }}`` used (Apptainer fails on them unless told to warn)
    unused_build_args: list[str] = field(default_factory=list)

    @property
    def final(self) -> Stage:
        """The stage that becomes the image."""
        return self.stages[-1]

    def stage(self, name: str, at: int, line: int) -> int:
        """Index of the stage called ``name``: one before stage ``at``, or ``at`` itself
        (``%files from`` its own stage copies within the tree, as in Apptainer)."""
        for i, st in enumerate(self.stages[: at + 1]):
            if st.name == name:
                return i
        raise DefinitionError(f"{self.where}:{line}: no earlier stage named {name!r}")

    def source_stages(self) -> set[int]:
        """Indexes of the stages some later ``%files from STAGE`` copies from."""
        return {
            j
            for i, st in enumerate(self.stages)
            for block in st.files
            if block.stage is not None and (j := self.stage(block.stage, i, st.line)) < i
        }


def is_definition_file(path: str | Path) -> bool:
    """True when ``path`` is a regular file that looks like a definition file, not a SIF or an archive."""
    from hpcsif.sif.format import LAUNCH_LEN, MAGIC

    p = Path(path)
    try:
        if not p.is_file():
            return False
        with p.open("rb") as f:
            head = f.read(512)
    except OSError:  # unreadable: not taken for a definition; opening it as an image names why
        return False
    if head[LAUNCH_LEN : LAUNCH_LEN + len(MAGIC)] == MAGIC:
        return False
    from hpcsif.sif.reader import bare_filesystem

    if bare_filesystem(p):  # a squashfs or ext3 image file (an ext3 one starts with 1 KiB of zeros)
        return False
    # gzip, zstd, xz, bzip2 and tar archives are images (docker-archive …), not text
    if head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ", b"BZh")) or head[257:262] == b"ustar":
        return False
    try:
        head.decode()
    except UnicodeDecodeError:  # text in another encoding is a definition if it has a header
        return _HEADER_START.search(head.decode(errors="replace")) is not None
    return True


def load(path: str | Path, build_args: dict[str, str] | None = None) -> Definition:
    """Read and parse the definition file at ``path`` (at most :data:`MAX_SIZE` bytes)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise DefinitionError(f"cannot read definition file {p}: {exc}") from None
    if len(data) > MAX_SIZE:
        raise DefinitionError(
            f"definition file {p} is larger than {MAX_SIZE >> 20} MiB, the most hpcsif reads"
        )
    # line endings as written: the image keeps the file as is; bytes that are not UTF-8 stay
    # in the scripts and files (surrogateescape), and become U+FFFD only in JSON (labels,
    # inspect metadata), as in Apptainer; a byte order mark (Windows editors write one) is
    # no part of the first header key
    text = data.decode(errors="surrogateescape").removeprefix("\ufeff")
    return parse(text, where=str(p), build_args=build_args)


def parse(text: str, where: str = "<definition>", build_args: dict[str, str] | None = None) -> Definition:
    """Parse definition text; ``where`` names it in errors, ``build_args`` override ``%arguments``.

    The definition kept for the image (``raw``) is the text from the first ``Bootstrap:`` on,
    after ``{{ NAME }}`` substitution, with its line endings as written, as Apptainer keeps it;
    CRLF line endings are parsed as LF.
    """
    used: set[str] = set()
    raw = _substitute(text, where, build_args or {}, used)
    text = raw.replace("\r\n", "\n")
    starts = [m.start() for m in _STAGE_START.finditer(text)]
    content = [ln.strip() for ln in _lines(text[: starts[0] if starts else len(text)])]
    content = [ln for ln in content if ln and not ln.startswith("#")]
    if content and _HEADER_START.match(content[0]):  # an indented first header: the file is the stage
        starts.insert(0, 0)
    if not starts:
        if not any(line.strip() and not line.strip().startswith("#") for line in _lines(text)):
            raise DefinitionError(f"{where}: no stages found in definition file")
        raise DefinitionError(f"{where}:1: no bootstrap specification found: no 'Bootstrap:' header")
    if len(starts) > MAX_STAGES:
        raise DefinitionError(f"{where}: {len(starts)} stages, more than the {MAX_STAGES} hpcsif builds")
    pre = text[: starts[0]]
    for n, line in enumerate(_lines(pre), 1):
        if line.strip() and not line.strip().startswith("#"):
            raise DefinitionError(f"{where}:{n}: {line.strip()!r} comes before the 'Bootstrap:' header")
    bounds = [*starts, len(text)]
    stages = []
    first_line = text.count("\n", 0, starts[0]) + 1
    for begin, end in itertools.pairwise(bounds):
        stages.append(_parse_stage(text[begin:end], first_line, where))
        first_line += text.count("\n", begin, end)
    names = collections.Counter(s.name for s in stages if s.name)
    for st in stages:
        if st.name and names[st.name] > 1:
            raise DefinitionError(f"{where}:{st.header_lines['stage']}: stage name {st.name!r} is used twice")
    unused = sorted(set(build_args or {}) - used)
    # kept from the first stage on: the whole file when that stage's header is indented or
    # spaced (Apptainer's stage split does not see it), comments before it included
    first = _STAGE_START.search(raw)
    raw = raw[first.start() :] if first and starts[0] else raw
    definition = Definition(stages=stages, raw=raw, where=where, unused_build_args=unused)
    for i, st in enumerate(stages):
        for block in st.files:
            if block.stage is not None:
                definition.stage(block.stage, i, block.copies[0].line if block.copies else st.line)
    return definition


def _lines(text: str, keepends: bool = False) -> list[str]:
    """``text`` split at ``\\n`` only, as Apptainer splits it: a form feed, a lone CR or
    U+2028 in a script or a label is part of its line, not a line break (``str.splitlines``)."""
    parts = text.split("\n")
    tail = parts.pop()  # what follows the last newline
    lines = [p + "\n" for p in parts] if keepends else parts
    return [*lines, tail] if tail else lines


def _substitute(text: str, where: str, build_args: dict[str, str], used: set[str]) -> str:
    """Replace ``{{ NAME }}`` with ``--build-arg`` values or the ``%arguments`` defaults.

    As in Apptainer, each stage has its own defaults: a name only another stage's
    ``%arguments`` sets is not defined. The names replaced are added to ``used``.
    """
    if not _TEMPLATE.search(text) and "%arguments" not in text.lower():
        return text
    stages: list[list[tuple[int, str]]] = [[]]
    for n, line in enumerate(_lines(text, keepends=True), 1):
        if _STAGE_START.match(line) and stages[-1]:
            stages.append([])
        stages[-1].append((n, line))
    return "".join(_substitute_stage(lines, where, build_args, used) for lines in stages)


def _substitute_stage(
    lines: list[tuple[int, str]], where: str, build_args: dict[str, str], used: set[str]
) -> str:
    """:func:`_substitute` for the numbered lines of one stage."""
    defaults: dict[str, str] = {}
    in_args = False
    for _, line in lines:
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if word.startswith("%"):
            in_args = word.lstrip("%").lower() == "arguments"
            continue
        if in_args and line.strip() and not line.strip().startswith("#"):
            key, sep, value = line.strip().partition("=")
            if sep:
                defaults[key.strip()] = value.strip()  # quotes stay part of the value (Apptainer)
    values = {**defaults, **build_args}
    out = []
    in_args = False
    for n, line in lines:
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if word.startswith("%"):
            in_args = word.lstrip("%").lower() == "arguments"
        if in_args:  # the defaults themselves stay as written
            out.append(line)
            continue

        def value(m: re.Match[str], n: int = n) -> str:
            if m.group(1) not in values:
                raise DefinitionError(
                    f"{where}:{n}: build var {m.group(1)} is not defined through either --build-arg "
                    "(--build-arg-file) or 'arguments' section"
                )
            used.add(m.group(1))
            return values[m.group(1)]

        out.append(_TEMPLATE.sub(value, line))
    return "".join(out)


def _parse_stage(text: str, first_line: int, where: str) -> Stage:
    lines = _lines(text)
    # split into the header and (name line, args, body lines, line number) chunks
    chunks: list[tuple[str, str, list[str], int]] = []
    seen: dict[tuple[str, str], list[str]] = {}
    body: list[str] | None = None
    header_end = len(lines)
    for i, line in enumerate(lines):
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if word.startswith("%"):
            if not chunks:
                header_end = i
            # a "#" ends the arguments, as in Apptainer: "%post # install" runs /bin/sh -e -x,
            # "%files # from the host" copies from the host
            rest = line.strip()[len(word) :].split("#", 1)[0].strip()
            name = word.lstrip("%").lower()  # "%%labels" is %labels to Apptainer too
            # a repeated section continues the first one (Apptainer), which keeps its line and
            # arguments; %files blocks stay apart (each may copy from another stage)
            key = (name, rest.split()[0] if name in APP_SECTIONS and rest.split() else "")
            if name != "files" and key in seen:
                body = seen[key]
                continue
            body = seen[key] = []
            chunks.append((name, rest, body, first_line + i))
        elif body is not None:
            body.append(line)
    header, header_lines = _parse_header(lines[:header_end], first_line, where)
    stage = Stage(
        header=header,
        header_lines=header_lines,
        sections={},
        files=[],
        labels={},
        apps={},
        line=first_line,
    )
    for name, args, body_lines, line_no in chunks:
        body = "\n".join(body_lines) + ("\n" if body_lines else "")
        _add_section(stage, name, args, body, line_no, where)
    if "labels" in stage.sections:
        stage.labels = parse_labels(stage.sections["labels"].body)
    return stage


def _parse_header(lines: list[str], first_line: int, where: str) -> tuple[dict[str, str], dict[str, int]]:
    header: dict[str, str] = {}
    at: dict[str, int] = {}
    cont_key, cont_val = "", ""
    for i, raw in enumerate(lines):
        n = first_line + i
        line = raw.strip()
        if not line or line.startswith("#"):
            if cont_key:
                header[cont_key], cont_key, cont_val = cont_val, "", ""
            continue
        line = line.split("#", 1)[0].strip()
        if "\0" in line:  # no path, reference or name can hold one
            raise DefinitionError(f"{where}:{n}: header line {line!r} contains a NUL byte")
        if cont_key:
            key, value = cont_key, cont_val + line
            cont_key, cont_val = "", ""
        else:
            key, sep, value = line.partition(":")
            if not sep:
                raise DefinitionError(f"{where}:{n}: header line {line!r} is not 'Key: value'")
            key, value = key.strip().lower(), value.strip()
            if key not in HEADER_KEYS:
                raise DefinitionError(f"{where}:{n}: invalid header keyword found: {key}")
            at[key] = n
        if value.endswith("\\"):
            cont_key, cont_val = key, value[:-1]
            continue
        header[key] = value
    if cont_key:
        header[cont_key] = cont_val
    agent = header.get("bootstrap", "").lower()
    bline = at.get("bootstrap", first_line)
    if agent in UNSUPPORTED_AGENTS:
        raise DefinitionError(f"{where}:{bline}: bootstrap agent {agent!r} is not supported by hpcsif")
    if agent not in AGENTS:
        known = ", ".join(AGENTS)
        shown = agent if agent.isprintable() else repr(agent)  # a lone CR would garble the line
        if not agent:
            raise DefinitionError(f"{where}:{bline}: 'Bootstrap:' names no build source (known: {known})")
        raise DefinitionError(f"{where}:{bline}: invalid build source {shown} (known: {known})")
    if AGENTS[agent] and not header.get("from"):
        raise DefinitionError(f"{where}:{bline}: bootstrap {agent} needs a 'From:' header")
    return header, at


def _add_section(stage: Stage, name: str, args: str, body: str, line: int, where: str) -> None:
    if name == "files":
        stage.files.append(_parse_files(args, body, line, where))
        return
    if name in APP_SECTIONS:
        words = args.split()
        # "." or ".." would put the app's files in /scif or /scif/apps itself
        if not words or not _APP_NAME.match(words[0]) or words[0] in (".", ".."):
            raise DefinitionError(
                f"{where}:{line}: %{name} needs an app name (letters, digits, _ . -; not . or ..)"
            )
        app = stage.apps.setdefault(words[0], App(words[0]))
        key = APP_SECTIONS[name]
        if key == "files":
            _parse_files("", body, line, where)  # reject bad lines now, with their line numbers
        app.sections[key] = Section(name, " ".join(words[1:]), body, line)
        return
    if name not in SECTIONS:
        raise DefinitionError(f"{where}:{line}: invalid section(s) specified: {name}")
    stage.sections[name] = Section(name, args, body, line)


def _parse_files(args: str, body: str, line: int, where: str) -> FilesBlock:
    words = args.split()
    stage = None
    if words:
        if len(words) != 2 or words[0].lower() != "from":
            raise DefinitionError(f"{where}:{line}: %files takes no arguments but 'from STAGE', got {args!r}")
        stage = words[1]
    copies = []
    for i, raw in enumerate(_lines(body), 1):
        n = line + i
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            parts = shlex.split(text, comments=True)
        except ValueError as exc:
            raise DefinitionError(f"{where}:{n}: bad %files line {text!r}: {exc}") from None
        if len(parts) > 2:
            raise DefinitionError(f"{where}:{n}: bad %files line {text!r}: expected 'SOURCE [DESTINATION]'")
        if not parts:
            continue
        if any("\0" in part for part in parts):
            raise DefinitionError(f"{where}:{n}: bad %files line {text!r}: a path cannot contain a NUL byte")
        copies.append(FileCopy(parts[0], parts[1] if len(parts) == 2 else "", n))
    return FilesBlock(stage, copies)


def parse_labels(body: str) -> dict[str, str]:
    """``%labels`` lines ``KEY VALUE…`` as a dict (a key alone gets "")."""
    labels = {}
    for raw in _lines(body):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        labels[key.strip()] = value.strip()
    return labels


def app_files(app: App, where: str) -> list[FileCopy]:
    """The ``%appfiles`` lines of ``app`` (destinations are relative to ``/scif/apps/NAME``)."""
    sec = app.sections.get("files")
    return _parse_files("", sec.body, sec.line, where).copies if sec else []
