"""Generated runscripts and environment scripts, executed by a real /bin/sh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpcsif.sif import metadata as md

ECHO_ARGS = 'for a in "$@"; do printf "[%s]" "$a"; done'


def run_script(tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None) -> str:
    path = tmp_path / "script"
    path.write_text(script)
    path.chmod(0o755)
    return subprocess.run(
        ["/bin/sh", str(path), *args], capture_output=True, text=True, check=True, env=env
    ).stdout


# ENTRYPOINT/CMD combinations: (entrypoint, cmd, args, expected words)
CASES = [
    (["/bin/sh", "-c", ECHO_ARGS, "ep"], None, [], ""),
    (["/bin/sh", "-c", ECHO_ARGS, "ep"], None, ["a b", "c"], "[a b][c]"),
    (None, ["/bin/sh", "-c", ECHO_ARGS, "cmd", "x y"], [], "[x y]"),
    (
        None,
        ["/bin/sh", "-c", "exit 9"],
        ["/bin/sh", "-c", ECHO_ARGS, "s", "q'uote", 'd"q', "$HOME"],
        "[q'uote][d\"q][$HOME]",
    ),
    (["/bin/sh", "-c", ECHO_ARGS, "ep"], ["default arg", "two"], [], "[default arg][two]"),
    (["/bin/sh", "-c", ECHO_ARGS, "ep"], ["default"], ["given", "it's"], "[given][it's]"),
    ("echo shell-form $0", None, [], "shell-form /bin/sh"),
]


@pytest.mark.parametrize(("entrypoint", "cmd", "args", "expected"), CASES)
def test_runscript_precedence(tmp_path: Path, entrypoint, cmd, args, expected) -> None:
    out = run_script(tmp_path, md.runscript_for(entrypoint, cmd), *args)
    assert out.strip() == expected


def test_runscript_without_entrypoint_or_cmd_runs_its_arguments_else_a_shell(tmp_path: Path) -> None:
    """As Apptainer and Docker: the arguments are the command; with none, a shell reads stdin."""
    script = md.runscript_for(None, None)
    assert run_script(tmp_path, script, "/bin/sh", "-c", ECHO_ARGS, "s", "a b", "$X").strip() == "[a b][$X]"
    path = tmp_path / "script"
    out = subprocess.run(["/bin/sh", str(path)], input="echo from-shell", capture_output=True, text=True)
    assert out.stdout.strip() == "from-shell"


def test_env_script_defaults_host_wins_path_from_image(tmp_path: Path) -> None:
    env = ["PATH=/img/bin:/bin", "SPACED=a b  c", 'QUOTED=it\'s "q" $x', "HOSTWINS=image", "EMPTY=", "9BAD=x"]
    script = (
        md.env_script(env)
        + 'printf "%s|%s|%s|%s|%s" "$PATH" "$SPACED" "$QUOTED" "$HOSTWINS" "${EMPTY-unset}"\n'
    )
    out = run_script(tmp_path, script, env={"PATH": "/usr/bin:/bin", "HOSTWINS": "host"})
    assert out == '/img/bin:/bin|a b  c|it\'s "q" $x|host|'


def test_env_script_lines_are_apptainers() -> None:
    """A name without ``=`` has no value in the line (Apptainer's ``${NAME:-}``); ``NAME=`` an
    empty one (``${NAME:-""}``)."""
    lines = md.env_script(["NOEQ", "EMPTY=", "A=b c"]).splitlines()
    assert lines == [
        "#!/bin/sh",
        'export NOEQ="${NOEQ:-}"',
        'export EMPTY="${EMPTY:-""}"',
        'export A="${A:-"b c"}"',
    ]


def test_metadata_objects_match_apptainers_shape() -> None:
    config = {
        "architecture": "amd64",
        "config": {
            "Env": ["A=1"],
            "Entrypoint": ["/e"],
            "Cmd": ["c"],
            "Labels": {"x.y": "z"},
            "WorkingDir": "/w",
        },
    }
    meta = md.for_image(config, bootstrap="oci-archive", source="/in.tar", arch="amd64", now=0)
    attrs = json.loads(meta.inspect_json())["data"]["attributes"]
    assert set(attrs) >= {"environment", "labels", "runscript", "deffile", "startscript"}
    assert attrs["labels"]["x.y"] == "z"
    assert attrs["labels"]["org.label-schema.usage.singularity.deffile.bootstrap"] == "oci-archive"
    assert (
        attrs["labels"]["org.label-schema.build-date"] == "Thursday_1_January_1970_0:0:0_UTC"
    )  # Go layout, no zero padding
    assert meta.deffile == "bootstrap: oci-archive\nfrom: /in.tar\n"
    # the stored texts end without a newline, as in Apptainer's SIFs (its inspect adds one)
    assert attrs["deffile"] == "bootstrap: oci-archive\nfrom: /in.tar"
    texts = [attrs["runscript"], attrs["startscript"], *attrs["environment"].values()]
    assert texts and not [t for t in texts if t.endswith("\n")]
    assert json.loads(meta.oci_config_json())["WorkingDir"] == "/w"
    paths = {f.path for f in meta.files()}
    for name in ("runscript", "labels.json", "Singularity", "actions/run", "actions/exec", "env/99-base.sh"):
        assert f"/.singularity.d/{name}" in paths
