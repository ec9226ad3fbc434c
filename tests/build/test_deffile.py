"""The definition-file parser: header, sections, apps, stages, %arguments and line-numbered errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpcsif.build.builder import reference, resolve_inside
from hpcsif.build.deffile import app_files, is_definition_file, parse, parse_labels
from hpcsif.errors import DefinitionError

FULL = """\
# a comment before the header
BootStrap: docker
FROM: godlovedc/lolcow   # comment after the value
Namespace: myns
Registry: registry.example:5000
IncludeCmd: yes

%setup
    touch $APPTAINER_ROOTFS/setup
%files
    data.txt /opt/data.txt
    "with space.txt" /opt/
    only-src.txt
%environment
    export MYVAR="a b"
%post -c /bin/bash
    echo built > /opt/built.txt
%runscript
    exec fortune "$@"
%startscript
    echo start
%test
    test -f /opt/built.txt
%labels
    Author someone
    Empty
    Long a value with spaces
%help
    Usage text
%post
    echo second part
%apprun foo
    echo foo
%appinstall foo
    make
%appenv foo
    export FOO=bar
%applabels foo
    Maint me
%apphelp foo
    help for foo
%apptest foo
    true
%appfiles foo
    a.txt b.txt
%apprun bar
    echo bar
"""


def test_full_definition() -> None:
    d = parse(FULL, "app.def")
    st = d.final
    assert len(d.stages) == 1
    assert st.bootstrap == "docker" and st.source == "godlovedc/lolcow"
    assert st.header["namespace"] == "myns" and st.header["includecmd"] == "yes"
    assert st.header_lines["from"] == 3
    assert st.body("environment") == '    export MYVAR="a b"\n'
    # repeated sections concatenate; the first one's arguments and line stay
    assert st.body("post") == "    echo built > /opt/built.txt\n    echo second part\n"
    assert st.sections["post"].interpreter("x") == ["/bin/bash"]
    assert st.sections["post"].line == 16
    assert st.sections["runscript"].interpreter("x") == ["/bin/sh"]
    assert st.labels == {"Author": "someone", "Empty": "", "Long": "a value with spaces"}
    [block] = st.files
    assert block.stage is None
    assert [(c.src, c.dst, c.line) for c in block.copies] == [
        ("data.txt", "/opt/data.txt", 11),
        ("with space.txt", "/opt/", 12),
        ("only-src.txt", "", 13),
    ]
    assert list(st.apps) == ["foo", "bar"]
    foo = st.apps["foo"]
    assert foo.body("run") == "    echo foo\n" and foo.body("install") == "    make\n"
    assert foo.sections["labels"].line == 38
    assert [(c.src, c.dst) for c in app_files(foo, "x")] == [("a.txt", "b.txt")]
    assert st.apps["bar"].body("env") == ""
    assert d.raw == FULL[FULL.index("BootStrap") :]  # as Apptainer, the file from Bootstrap on


def test_reference_from_header() -> None:
    st = parse(FULL).final
    assert reference(st) == "docker://registry.example:5000/godlovedc/lolcow"  # From has a namespace
    st = parse("Bootstrap: docker\nFrom: lolcow:1\nNamespace: me\nRegistry: 127.0.0.1:5000\n").final
    assert reference(st) == "docker://127.0.0.1:5000/me/lolcow:1"
    st = parse("Bootstrap: docker\nFrom: quay.io/org/app\nRegistry: ignored.example\n").final
    assert reference(st) == "docker://quay.io/org/app"
    assert reference(parse("Bootstrap: oci-archive\nFrom: /x/a.tar\n").final) == "oci-archive:///x/a.tar"
    assert reference(parse("bootstrap: docker-daemon\nfrom: a/b:1\n").final) == "docker-daemon://a/b:1"


def test_header_continuation_and_case() -> None:
    st = parse("bootstrap: SCRATCH\nfrom: \\\n  ignored\n").final
    assert st.bootstrap == "scratch"
    assert st.header["from"] == "ignored"


def test_multi_stage() -> None:
    text = """Bootstrap: oci
From: /layout:latest
Stage: build

%post
    make

Bootstrap: scratch
Stage: final
%files from build
    /app/bin /bin/app
%files
    host.txt
"""
    d = parse(text, "multi.def")
    assert [s.name for s in d.stages] == ["build", "final"]
    assert d.stages[1].line == 8
    blocks = d.final.files
    assert [b.stage for b in blocks] == ["build", None]
    assert blocks[0].copies[0].line == 11
    assert d.stage("build", 1, 0) == 0


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Bootstrap: docker\nFrom: a\n%bogus\n  x\n", 3, "invalid section(s) specified: bogus"),
        ("# c\nBootstrap: docker\n\n%post\n  true\n", 2, "needs a 'From:' header"),
        ("Bootstrap: nosuch\nFrom: a\n", 1, "invalid build source nosuch"),
        ("\nBootstrap: library\nFrom: a\n", 2, "'library' is not supported"),
        ("Bootstrap: docker\nFrom: a\n%files\n  ok /x\n  one two three\n", 5, "bad %files line"),
        ('Bootstrap: docker\nFrom: a\n%files\n  "unterminated /x\n', 4, "bad %files line"),
        ("Bootstrap: docker\nFrom: a\nColour: red\n", 3, "invalid header keyword found: colour"),
        ("Bootstrap: docker\nFrom: a\nnocolon\n", 3, "is not 'Key: value'"),
        ("hello\nBootstrap: docker\nFrom: a\n", 1, "comes before the 'Bootstrap:' header"),
        ("Bootstrap: docker\nFrom: a\n%apprun\n  x\n", 3, "%apprun needs an app name"),
        ("Bootstrap: docker\nFrom: a\n%files from nowhere\n  /a /b\n", 4, "no earlier stage named 'nowhere'"),
        ("Bootstrap: docker\nFrom: a\n%post\n  echo {{ missing }}\n", 4, "build var missing is not defined"),
        ("Bootstrap: docker\nFrom: a\n%appfiles foo\n  a b c\n", 4, "bad %files line"),
        ("%post\n  true\n", 1, "no bootstrap specification found"),
    ],
)
def test_errors_carry_line_numbers(text: str, line: int, message: str) -> None:
    with pytest.raises(DefinitionError, match=rf"^my\.def:{line}: .*{re.escape(message)}"):
        parse(text, "my.def")


def test_arguments_defaults_and_overrides() -> None:
    text = "Bootstrap: docker\nFrom: {{ image }}:{{tag}}\n%arguments\n  image=alpine\n  tag = 3.19\n"
    assert parse(text).final.source == "alpine:3.19"
    assert parse(text, build_args={"tag": "edge"}).final.source == "alpine:edge"
    # as in Apptainer 1.4, quotes are part of a default value
    quoted = parse('Bootstrap: scratch\n%arguments\n  V="1.2"\n%runscript\n  echo {{ V }}\n')
    assert quoted.final.body("runscript") == '  echo "1.2"\n'


def test_raw_starts_at_bootstrap_and_keeps_crlf() -> None:
    d = parse("# note\n\nBootstrap: scratch\r\n%labels\r\n  A b\r\n")
    assert d.raw == "Bootstrap: scratch\r\n%labels\r\n  A b\r\n"
    assert d.final.labels == {"A": "b"}


def test_parse_labels() -> None:
    assert parse_labels("  # comment\n  A 1\n\n  B two words  \n") == {"A": "1", "B": "two words"}


def test_is_definition_file(tmp_path: Path) -> None:
    import tarfile

    from hpcsif.sif.format import DataType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    d = tmp_path / "a.def"
    d.write_text("Bootstrap: scratch\n")
    sif = write_sif(tmp_path / "a.sif", [ObjectSpec(DataType.DEFFILE, data=b"x")])
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        t.add(d, "a.def")
    assert is_definition_file(d)
    assert not is_definition_file(sif)
    assert not is_definition_file(tar)
    assert not is_definition_file(tmp_path)
    assert not is_definition_file(tmp_path / "missing")


def test_resolve_inside_keeps_symlinks_in_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "abs").symlink_to("/real")
    (root / "escape").symlink_to("../../../../etc")
    (root / "loop").symlink_to("loop")
    assert resolve_inside(root, "/abs/file") == root / "real" / "file"
    assert resolve_inside(root, "/escape/passwd") == root / "etc" / "passwd"
    assert resolve_inside(root, "../../x") == root / "x"
    with pytest.raises(Exception, match="too many levels"):
        resolve_inside(root, "/loop/x")
