"""What a new Apptainer user sees first: inspect output, pull names, messages, version, help, cache list.

The expected texts were taken from Apptainer 1.4.5 on the same inputs; where the peer is
installed, the inspect outputs are also compared with it directly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpcsif import __version__
from hpcsif.refs import parse
from tests.conftest import peer_apptainer, run_cli

DIGEST = "sha256:" + "5e" * 32


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A sandbox with labels (one needing Go's JSON escapes), scripts, environment and two apps."""
    box = tmp_path / "box"
    files = {
        ".singularity.d/labels.json": '{"Zed": "1", "Author": "me<&>\\u00e9", "A": "2"}',
        ".singularity.d/runscript": "#!/bin/sh\necho run\n\n",
        ".singularity.d/env/90-environment.sh": "#!/bin/sh\nexport A=1\n",
        ".singularity.d/env/10-docker2singularity.sh": "#!/bin/sh\nexport PATH=/bin\n",
        ".singularity.d/Singularity": "Bootstrap: docker\nFrom: x\n",
        ".singularity.d/runscript.help": "  help me\n",
        "scif/apps/foo/scif/runscript": "#!/bin/sh\necho foo\n",
        "scif/apps/foo/scif/labels.json": '{"APPL": "x"}',
        "scif/apps/foo/scif/env/90-environment.sh": "export F=1\n",
        "scif/apps/bar/scif/runscript": "#!/bin/sh\necho bar\n",
    }
    for name, text in files.items():
        (box / name).parent.mkdir(parents=True, exist_ok=True)
        (box / name).write_text(text)
    return box


# (flags, Apptainer 1.4.5's stdout for the sandbox above)
INSPECT_CASES = [
    (
        ["--json"],
        '{\n\t"data": {\n\t\t"attributes": {\n\t\t\t"labels": {\n\t\t\t\t"A": "2",\n'
        '\t\t\t\t"Author": "me\\u003c\\u0026\\u003eé",\n\t\t\t\t"Zed": "1"\n\t\t\t}\n\t\t}\n\t},\n'
        '\t"type": "container"\n}\n',
    ),
    (
        ["--all"],
        '{\n\t"data": {\n\t\t"attributes": {\n\t\t\t"apps": {\n\t\t\t\t"bar": {\n'
        '\t\t\t\t\t"runscript": "#!/bin/sh\\necho bar"\n\t\t\t\t},\n\t\t\t\t"foo": {\n'
        '\t\t\t\t\t"environment": {\n\t\t\t\t\t\t"/scif/apps/foo/scif/env/90-environment.sh": "export F=1"\n'
        '\t\t\t\t\t},\n\t\t\t\t\t"labels": {\n\t\t\t\t\t\t"APPL": "x"\n\t\t\t\t\t},\n'
        '\t\t\t\t\t"runscript": "#!/bin/sh\\necho foo"\n\t\t\t\t}\n\t\t\t},\n\t\t\t"environment": {\n'
        '\t\t\t\t"/.singularity.d/env/10-docker2singularity.sh": "#!/bin/sh\\nexport PATH=/bin",\n'
        '\t\t\t\t"/.singularity.d/env/90-environment.sh": "#!/bin/sh\\nexport A=1"\n\t\t\t},\n'
        '\t\t\t"labels": {\n\t\t\t\t"A": "2",\n\t\t\t\t"Author": "me\\u003c\\u0026\\u003eé",\n'
        '\t\t\t\t"Zed": "1"\n\t\t\t},\n\t\t\t"runscript": "#!/bin/sh\\necho run",\n'
        '\t\t\t"helpfile": "  help me",\n\t\t\t"deffile": "Bootstrap: docker\\nFrom: x"\n\t\t}\n\t},\n'
        '\t"type": "container"\n}\n',
    ),
    (
        ["-l", "-H", "-d", "-e", "-r"],  # printed in Apptainer's fixed order, not the flags'
        "Bootstrap: docker\nFrom: x\n#!/bin/sh\necho run\n  help me\n"
        "=== /.singularity.d/env/10-docker2singularity.sh ===\n#!/bin/sh\nexport PATH=/bin\n\n"
        "=== /.singularity.d/env/90-environment.sh ===\n#!/bin/sh\nexport A=1\n\n"
        "A: 2\nAuthor: me<&>é\nZed: 1\n",
    ),
    (
        ["--app", "foo", "-r", "-e", "-l"],
        "#!/bin/sh\necho foo\n=== /scif/apps/foo/scif/env/90-environment.sh ===\nexport F=1\n\nAPPL: x\n",
    ),
    (["--app", "foo"], "APPL: x\n"),
    (["--list-apps"], "bar\nfoo\n"),
    (
        ["-j", "--app", "foo", "-r", "-e"],
        '{\n\t"data": {\n\t\t"attributes": {\n\t\t\t"apps": {\n\t\t\t\t"foo": {\n'
        '\t\t\t\t\t"environment": {\n\t\t\t\t\t\t"/scif/apps/foo/scif/env/90-environment.sh": "export F=1"\n'
        '\t\t\t\t\t},\n\t\t\t\t\t"runscript": "#!/bin/sh\\necho foo"\n\t\t\t\t}\n\t\t\t}\n\t\t}\n\t},\n'
        '\t"type": "container"\n}\n',
    ),
]


@pytest.mark.parametrize(("flags", "expected"), INSPECT_CASES)
def test_inspect_prints_what_apptainer_prints(sandbox: Path, flags: list[str], expected: str) -> None:
    out = run_cli("inspect", *flags, str(sandbox)).stdout
    assert out == expected
    if "--json" in flags or "-j" in flags or "--all" in flags:
        json.loads(out)  # Go's escapes are still plain JSON


def test_inspect_matches_the_peer(sandbox: Path) -> None:
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer on PATH")
    if not str(sandbox).startswith("/tmp/"):
        pytest.skip("the peer sees only /tmp")
    for flags, _ in INSPECT_CASES:
        theirs = subprocess.run([exe, "inspect", *flags, str(sandbox)], capture_output=True, text=True)
        assert run_cli("inspect", *flags, str(sandbox)).stdout == theirs.stdout, flags


@pytest.mark.parametrize(("ref", "name"), [
    ("docker://127.0.0.1:5000/ns/busybox:1.36", "busybox_1.36"),
    ("docker://godlovedc/lolcow", "lolcow_latest"),
    (f"docker://127.0.0.1:5000/ns/busybox@{DIGEST}", f"busybox@sha256_{DIGEST[7:]}"),
    ("oras://127.0.0.1:5000/ns/app:v2", "app_v2"),
    ("oci-archive:///tmp/x/busybox.oci-archive.tar", "busybox.oci-archive.tar_latest"),
    ("docker-archive:/tmp/x/busybox.docker-archive.tar", "busybox.docker-archive.tar_latest"),
])  # fmt: skip
def test_pull_names_are_apptainers(ref: str, name: str) -> None:
    assert parse(ref).short_name() == name


def test_existing_targets_are_refused_with_apptainers_words(tmp_path: Path) -> None:
    target = tmp_path / "x.sif"
    target.write_bytes(b"precious")
    # an unreachable registry: the target check comes first, so nothing is fetched
    pull = run_cli("pull", str(target), "docker://127.0.0.1:9/ns/busybox:1.36", check=False)
    assert pull.returncode == 255
    assert pull.stderr == f'FATAL:   Image file already exists: "{target}" - will not overwrite\n'
    build = run_cli("build", str(target), "docker://127.0.0.1:9/ns/busybox:1.36", check=False)
    assert build.returncode == 255
    assert build.stderr == (
        "FATAL:   While checking build target: build target 'x.sif' already exists. "
        "Use --force if you want to overwrite it\n"
    )
    assert target.read_bytes() == b"precious"


def test_build_reports_on_stderr_only(tmp_path: Path, sandbox: Path) -> None:
    proc = run_cli("build", str(tmp_path / "x.sif"), str(sandbox))
    assert proc.stdout == "" and f"INFO:    Build complete: {tmp_path / 'x.sif'}" in proc.stderr


def test_version_and_help_commands() -> None:
    assert run_cli("version").stdout == f"{__version__}\n"
    assert run_cli("--version").stdout == f"hpcsif version {__version__}\n"
    assert run_cli("help").stdout == run_cli("--help").stdout
    assert run_cli("help", "inspect").stdout == run_cli("inspect", "--help").stdout
    assert run_cli("-q", "help", "cache", "list").stdout.startswith("usage: hpcsif cache list")


def test_cache_list_flags_and_total(tmp_path: Path) -> None:
    env = {"APPTAINER_CACHEDIR": str(tmp_path / "cache"), "HPCSIF_CACHEDIR": "", "HPCSIF_SYSTEM_CACHEDIR": ""}
    empty = "There are 0 container file(s) using 0.00 KiB and 0 oci blob file(s) using 0.00 KiB of space\n"
    assert run_cli("cache", "list", env=env).stdout == empty + "Total space used: 0.00 KiB\n"
    header = f"{'NAME':<24} {'DATE CREATED':<22} {'SIZE':<16} TYPE\n\n"  # Apptainer's, even when empty
    assert run_cli("cache", "list", "-v", env=env).stdout == header + empty + "Total space used: 0.00 KiB\n"
    blobs = run_cli("cache", "list", "-T", "blob", env=env).stdout
    assert blobs == "There are 0 oci blob file(s) using 0.00 KiB of space\nTotal space used: 0.00 KiB\n"
    dry = run_cli("cache", "clean", "--dry-run", env=env).stdout
    assert dry.startswith("User requested a dry run. Not actually deleting any data!\n")


def test_singularity_and_apptainer_variables_that_disagree(tmp_path: Path) -> None:
    """As Apptainer: a warning, and the APPTAINER_ value wins; agreeing values say nothing."""
    env = {"HPCSIF_CACHEDIR": "", "HPCSIF_SYSTEM_CACHEDIR": "", "APPTAINER_CACHEDIR": str(tmp_path / "a")}
    proc = run_cli("cache", "list", "-v", env={**env, "SINGULARITY_CACHEDIR": str(tmp_path / "s")})
    assert proc.stderr == (
        "WARNING: SINGULARITY_CACHEDIR and APPTAINER_CACHEDIR have different values, using the latter\n"
    )
    assert (tmp_path / "a").is_dir() and not (tmp_path / "s").exists()
    assert run_cli("cache", "list", env={**env, "SINGULARITY_CACHEDIR": str(tmp_path / "a")}).stderr == ""


def test_silent_still_prints_errors(tmp_path: Path) -> None:
    # Apptainer's -s is "only print errors", not "print nothing"
    for flag in ("-s", "-q"):
        proc = run_cli(flag, "inspect", str(tmp_path / "missing.sif"), check=False)
        assert proc.returncode == 255 and proc.stderr.startswith("FATAL:   "), flag


def test_build_accepts_fix_perms(tmp_path: Path, sandbox: Path) -> None:
    # Apptainer's --fix-perms is what hpcsif's conversion always does; scripts pass it
    run_cli("build", "--fix-perms", str(tmp_path / "x.sif"), str(sandbox))
    assert (tmp_path / "x.sif").read_bytes()[:30] == b"#!/usr/bin/env run-singularity"


def test_option_values_may_start_with_a_dash(tmp_path: Path, sandbox: Path) -> None:
    """As cobra lets Apptainer users write ``--mksquashfs-args -all-root``: the value is taken, not
    read as an unknown option; what follows the image stays the container's."""
    proc = run_cli(
        "build", "--mksquashfs-args", "-all-root", str(tmp_path / "x.sif"), str(sandbox), check=False
    )
    assert proc.returncode != 0 and "usage:" not in proc.stderr
    assert proc.stderr.startswith("FATAL:   --mksquashfs-args '-all-root' is not supported"), proc.stderr
    proc = run_cli("pull", "--dir", "-odd", f"oci-archive://{tmp_path}/missing.tar", check=False)
    assert proc.stderr.startswith("FATAL:   ") and "usage:" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "words", [["instance", "start", "x.sif", "web"], ["registry", "login", "docker://h"]]
)
def test_apptainer_commands_hpcsif_lacks_fail_in_one_line(words: list[str]) -> None:
    proc = run_cli(*words, check=False)
    assert proc.returncode == 2 and "usage:" not in proc.stderr
    assert proc.stderr.startswith(f"FATAL:   {words[0]} is not supported by hpcsif: ")
    assert proc.stderr.count("\n") == 1


def test_inspect_keeps_empty_labels(tmp_path: Path) -> None:
    """A label with an empty value is printed (``C: ``) and kept in --json, as Apptainer 1.4.5 does."""
    box = tmp_path / "box"
    (box / ".singularity.d").mkdir(parents=True)
    (box / ".singularity.d/labels.json").write_text('{"A": "1", "C": ""}')
    assert run_cli("inspect", str(box)).stdout == "A: 1\nC: \n"
    assert run_cli("inspect", "--json", str(box)).stdout == (
        '{\n\t"data": {\n\t\t"attributes": {\n\t\t\t"labels": {\n\t\t\t\t"A": "1",\n\t\t\t\t"C": ""\n'
        '\t\t\t}\n\t\t}\n\t},\n\t"type": "container"\n}\n'
    )
