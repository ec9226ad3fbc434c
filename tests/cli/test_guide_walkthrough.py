"""The Apptainer 1.4 user guide's own examples, typed as a new user types them, on local images.

Each test follows one page of the guide (definition files' SCIF apps, environment and metadata,
…) where hpcsif once differed from Apptainer 1.4.5. The expected texts are Apptainer's on the
same inputs; where the peer is installed, its outputs are compared directly as well.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer, run_cli
from tests.services.images import TestImage

#: the guide's SCIF example (definition_files "SCIF Apps"), on a local base image
APPS_DEF = """\
Bootstrap: localimage
From: {base}

%environment
    GLOBAL=variables
    AVAILABLE="to all apps"

%apprun foo
    exec echo "RUNNING FOO"

%appstart foo
    exec echo "STARTING FOO"

%applabels foo
    BESTAPP FOO

%appinstall foo
    touch foo.exec

%appenv foo
    SOFTWARE=foo
    export SOFTWARE

%apphelp foo
    This is the help for foo.

%apprun bar
    exec echo "RUNNING BAR"

%appstart bar
    exec echo "STARTING BAR"

%appenv bar
    SOFTWARE=bar
    export SOFTWARE
"""


@pytest.fixture(scope="module")
def base(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image as a SIF (under /tmp, which the peer sees), built once through the CLI."""
    path = tmp_path_factory.mktemp("guide") / "base.sif"
    run_cli("build", str(path), f"oci://{busybox_image.layout}")
    return path


def _tool(
    exe: str | None, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``hpcsif ARGS`` (exe None) or the peer's ``apptainer ARGS``, unchecked; ``env`` is added."""
    if exe is None:
        return run_cli(*args, check=False, env=env, cwd=cwd)
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )


def _apps_sif(exe: str | None, base: Path) -> Path:
    work = base.parent
    deffile = work / "apps.def"
    deffile.write_text(APPS_DEF.format(base=base))
    sif = work / f"apps-{'peer' if exe else 'ours'}.sif"
    if not sif.exists():
        flags = ["--fakeroot"] if exe else []  # the peer's root has too few capabilities for %post
        built = _tool(exe, "build", *flags, str(sif), str(deffile))
        assert built.returncode == 0, built.stderr
    return sif


def _app_view(exe: str | None, sif: Path) -> dict[str, object]:
    """What a user sees of the apps: inspect's apps object, app scripts and a missing app."""
    attrs = json.loads(_tool(exe, "inspect", "--json", "--all", str(sif)).stdout)["data"]["attributes"]
    missing = _tool(exe, "run", "--app", "baz", str(sif))
    return {
        "apps": attrs["apps"],
        "start": _tool(exe, "inspect", "--startscript", "--app", "bar", str(sif)).stdout,
        "start-json": _tool(exe, "inspect", "--json", "-s", "--app", "foo", str(sif)).stdout,
        "exports": _tool(exe, "exec", str(sif), "sh", "-c", "echo $SCIF_APPSTART_foo").stdout,
        "run": _tool(exe, "run", "--app", "foo", str(sif)).stdout,
        "env": _tool(exe, "exec", "--app", "bar", str(sif), "sh", "-c", "echo $SOFTWARE").stdout,
        # (Apptainer also warns that this image has no /etc/passwd and /etc/group to update)
        "missing": (missing.returncode, missing.stdout, _no_passwd_warnings(missing.stderr)),
    }


def _no_passwd_warnings(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(True) if "file doesn't exist in container" not in line)


def test_the_guides_scif_apps_build_with_appstart_as_in_apptainer(base: Path) -> None:
    ours = _app_view(None, _apps_sif(None, base))
    foo = ours["apps"]["foo"]
    # Apptainer's AppAttributes order: environment, labels, runscript, startscript, test, helpfile
    assert list(foo) == ["environment", "labels", "runscript", "startscript", "helpfile"]
    assert foo["startscript"] == '#!/bin/sh\n\n    exec echo "STARTING FOO"'
    assert ours["start"] == '#!/bin/sh\n\n    exec echo "STARTING BAR"\n'
    assert json.loads(ours["start-json"])["data"]["attributes"] == {
        "apps": {"foo": {"startscript": '#!/bin/sh\n\n    exec echo "STARTING FOO"'}}
    }
    assert ours["exports"] == "/scif/apps/foo/scif/startscript\n"
    assert ours["run"] == "RUNNING FOO\n"
    assert ours["env"] == "bar\n"
    # Apptainer's words, on standard output, status 1
    assert ours["missing"] == (1, "Could not locate the container application: baz\n", "")
    if exe := peer_apptainer():
        assert ours == _app_view(exe, _apps_sif(exe, base))


def test_env_file_names_several_files_separated_by_commas(base: Path, tmp_path: Path) -> None:
    (tmp_path / "myenvs").write_text('MYVAR="Hello from a file"\n')
    (tmp_path / "myenvs2").write_text('MYVAR="Hello from a file 2"\n')
    (tmp_path / "my,envs").write_text('MYVAR="a name with a comma"\n')
    show = [str(base), "sh", "-c", "echo $MYVAR"]
    cases = {  # the guide's examples: the later file wins
        ("--env-file", "myenvs", "--env-file", "myenvs2"): "Hello from a file 2\n",
        ("--env-file", "myenvs2,myenvs"): "Hello from a file\n",
        ("--env-file", '"my,envs"'): "a name with a comma\n",  # a CSV field, as Apptainer reads it
    }
    tools = [None] + ([exe] if (exe := peer_apptainer()) else [])
    for exe in tools:
        for flags, expected in cases.items():
            got = _tool(exe, "exec", *flags, *show, cwd=tmp_path)
            assert (got.returncode, got.stdout) == (0, expected), (exe, flags, got.stderr)
        got = _tool(exe, "exec", *show, cwd=tmp_path, env={"APPTAINER_ENV_FILE": "myenvs2,myenvs"})
        assert (got.returncode, got.stdout) == (0, "Hello from a file\n"), (exe, got.stderr)


BASE_DEF = """\
Bootstrap: localimage
From: {base}

%help
    first help

%labels
    A 1
    B 2
"""
CHILD_DEF = """\
Bootstrap: localimage
From: {base}

%help
    second help

%post
    echo "A from-post" >> $APPTAINER_LABELS
    echo "C from-post" >> $APPTAINER_LABELS

%labels
    B 3
    C 4
    org.label-schema.build-arch bogus
"""
KEPT = "WARNING: Label: {} already exists and force option is false, not overwriting"


def _labels_view(exe: str | None, base: Path, work: Path) -> list[tuple[str, dict[str, str], list[str]]]:
    """For a build without and with -F: the help text, the labels a user set, the warnings."""
    parent, child = work / f"parent-{bool(exe)}.sif", work / f"child-{bool(exe)}.sif"
    (work / "parent.def").write_text(BASE_DEF.format(base=base))
    (work / "child.def").write_text(CHILD_DEF.format(base=parent))
    flags = ["--fakeroot"] if exe else []
    assert _tool(exe, "build", *flags, str(parent), str(work / "parent.def")).returncode == 0
    seen = []
    for force in ([], ["-F"]):
        built = _tool(exe, "build", *flags, *force, str(child), str(work / "child.def"))
        assert built.returncode == 0, built.stderr
        attrs = json.loads(_tool(exe, "inspect", "--json", "-l", "-H", str(child)).stdout)["data"][
            "attributes"
        ]
        mine = {
            k: v for k, v in attrs["labels"].items() if k in ("A", "B", "C", "org.label-schema.build-arch")
        }
        warnings = sorted(line for line in built.stderr.splitlines() if line.startswith("WARNING"))
        seen.append((attrs["helpfile"], mine, warnings))
    return seen


def test_inherited_help_and_labels_stay_unless_forced(base: Path, tmp_path: Path) -> None:
    # environment_and_metadata, "Inherited Labels": without --force a base image's label (and
    # %help) is kept, with a warning; $APPTAINER_LABELS lines of %post are set before %labels
    ours = _labels_view(None, base, tmp_path)
    assert ours == [
        (
            "    first help",
            {"A": "from-post", "B": "2", "C": "from-post", "org.label-schema.build-arch": "amd64"},
            sorted(
                [
                    "WARNING: Help message already exists and force option is false, not overwriting",
                    *(KEPT.format(k) for k in ("B", "C", "org.label-schema.build-arch")),
                ]
            ),
        ),
        (
            "    second help",
            {"A": "from-post", "B": "3", "C": "4", "org.label-schema.build-arch": "bogus"},
            [],
        ),
    ]
    if exe := peer_apptainer():
        assert ours == _labels_view(exe, base, tmp_path)


SHEBANG_DEF = """\
Bootstrap: localimage
From: {base}

%runscript -e
    #!/bin/sh
    false
    echo not reached

%startscript
#!/bin/cat
    started

%test
    #!/bin/sh -e
    echo "testing $0"
    false
    echo not reached
"""


def test_script_sections_keep_their_hashbang_lines(base: Path, tmp_path: Path) -> None:
    # definition_files: "%test and %runscript recognise hashbang lines (#!) for specifying a
    # custom shell"; as in Apptainer 1.4.5 also %startscript, and the section's arguments follow
    (tmp_path / "shebang.def").write_text(SHEBANG_DEF.format(base=base))
    for exe in [None] + ([peer] if (peer := peer_apptainer()) else []):
        sif = tmp_path / f"shebang-{bool(exe)}.sif"
        flags = ["--fakeroot"] if exe else []
        built = _tool(exe, "build", *flags, "--notest", str(sif), str(tmp_path / "shebang.def"))
        assert built.returncode == 0, built.stderr
        inspected = json.loads(_tool(exe, "inspect", "--json", "-r", "-s", "-t", str(sif)).stdout)
        assert inspected["data"]["attributes"] == {
            "runscript": "#!/bin/sh -e\n\n    false\n    echo not reached",
            "test": '#!/bin/sh -e\n\n    echo "testing $0"\n    false\n    echo not reached',
            "startscript": "#!/bin/cat\n\n    started",
        }, exe
        ran = _tool(exe, "run", str(sif))
        assert (ran.returncode, ran.stdout) == (1, ""), exe
        # the build's own %test runs the script under its #! line: -e stops it at `false`
        failed = _tool(exe, "build", *flags, str(tmp_path / "no.sif"), str(tmp_path / "shebang.def"))
        assert failed.returncode != 0 and not (tmp_path / "no.sif").exists(), exe
        assert "testing /.singularity.d/test\n" in failed.stdout + failed.stderr, exe
        assert "not reached" not in failed.stdout, exe
