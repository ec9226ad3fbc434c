"""The image config a SIF keeps in ``oci-config.json``: every field Apptainer keeps, in its form."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpcsif.image.compose import ImageSpec, layer_tar, write_oci_layout
from tests.conftest import run_cli

# a Dockerfile's HEALTHCHECK, STOPSIGNAL, VOLUME, EXPOSE, SHELL and ONBUILD, the legacy Docker
# fields, keys Apptainer's decoder does not know, and values it normalises
FULL = {
    "AttachStderr": True,
    "AttachStdin": True,
    "Cmd": ["/bin/sh"],
    "Healthcheck": {
        "Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
        "Interval": 30000000000,
        "Timeout": 5000000000,
        "StartPeriod": 1000000000,
        "Retries": 3,
        "StartInterval": 5,
    },
    "Domainname": "dom",
    "Env": ["PATH=/bin"],
    "Hostname": "host",
    "Labels": {"a": "b"},
    "OnBuild": ["RUN echo hi"],
    "Tty": True,
    "User": "0",
    "Volumes": {"/data": {"x": 1}},
    "WorkingDir": "/tmp",
    "ExposedPorts": {"80/tcp": {}},
    "ArgsEscaped": False,
    "MacAddress": "00:11",
    "StopSignal": "SIGTERM",
    "Shell": ["/bin/sh", "-c"],
    "StopTimeout": 10,
    "Unknown": {"z": 1},
}
# what Apptainer 1.4.5 writes for FULL (byte for byte)
EXPECTED = (
    '{"AttachStderr":true,"AttachStdin":true,"Cmd":["/bin/sh"],"Healthcheck":{"Test":["CMD-SHELL",'
    '"curl -f http://localhost/ || exit 1"],"Interval":30000000000,"Timeout":5000000000,'
    '"StartPeriod":1000000000,"Retries":3},"Domainname":"dom","Env":["PATH=/bin"],"Hostname":"host",'
    '"Labels":{"a":"b"},"OnBuild":["RUN echo hi"],"Tty":true,"User":"0","Volumes":{"/data":{}},'
    '"WorkingDir":"/tmp","ExposedPorts":{"80/tcp":{}},"MacAddress":"00:11","StopSignal":"SIGTERM",'
    '"Shell":["/bin/sh","-c"]}'
)


@dataclass
class _Spec(ImageSpec):
    runtime: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["config"] = self.runtime
        return cfg


def _layout(tmp_path: Path, runtime: dict[str, Any]) -> Path:
    layout = tmp_path / "layout"
    write_oci_layout(layout, _Spec(layers=[layer_tar([])], runtime=runtime))
    return layout


def _oci_config(sif: Path) -> str:
    return run_cli("sif", "dump", "3", str(sif)).stdout


def test_oci_config_keeps_healthcheck_shell_onbuild_as_apptainer_does(tmp_path: Path) -> None:
    out = tmp_path / "out.sif"
    run_cli("build", str(out), f"oci:{_layout(tmp_path, FULL)}")
    assert run_cli("sif", "list", str(out)).stdout.splitlines()[5].endswith("JSON.Generic")
    assert _oci_config(out) == EXPECTED


def test_oci_config_equals_apptainers(tmp_path: Path, apptainer: str) -> None:
    layout = _layout(tmp_path, FULL)
    ours, theirs = tmp_path / "ours.sif", tmp_path / "theirs.sif"
    run_cli("build", str(ours), f"oci:{layout}")
    subprocess.run([apptainer, "build", str(theirs), f"oci:{layout}"], capture_output=True, check=True)
    dump = subprocess.run([apptainer, "sif", "dump", "3", str(theirs)], capture_output=True, text=True)
    assert _oci_config(ours) == dump.stdout == EXPECTED


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"Labels": [1]}, "image config: Labels must be a JSON object, not [1]"),
        ([1], "image config: config must be a JSON object, not [1]"),
    ],
)
def test_a_config_of_the_wrong_shape_is_one_fatal_line(tmp_path: Path, runtime: Any, message: str) -> None:
    out = tmp_path / "out.sif"
    p = run_cli("build", str(out), f"oci:{_layout(tmp_path, runtime)}", check=False)
    errors = [line for line in p.stderr.splitlines() if not line.startswith("INFO:")]
    assert p.returncode != 0 and errors == [f"FATAL:   {message}"], p.stderr
    assert not list(tmp_path.glob("out.sif*"))


def test_fields_of_the_wrong_type_that_nothing_reads_are_left_out(tmp_path: Path) -> None:
    """Apptainer refuses such an image; hpcsif converts it without them (they are never used)."""
    out = tmp_path / "out.sif"
    runtime = {"Cmd": ["/bin/sh"], "Healthcheck": "x", "Volumes": ["/a"], "User": 5, "Tty": "yes"}
    run_cli("build", str(out), f"oci:{_layout(tmp_path, runtime)}")
    assert json.loads(_oci_config(out)) == {"Cmd": ["/bin/sh"]}


def test_lone_surrogate_escapes_become_replacement_characters(tmp_path: Path) -> None:
    """``"\\ud800"`` in the config's JSON is no character: U+FFFD, as Apptainer's decoder makes it
    (it was an internal error)."""
    out = tmp_path / "out.sif"
    runtime = {"Cmd": ["/bin/sh", "\ud800"], "Env": ["A=\udce9x"], "Labels": {"l": "\ud800"}}
    run_cli("build", str(out), f"oci:{_layout(tmp_path, runtime)}")
    assert json.loads(_oci_config(out)) == {
        "Cmd": ["/bin/sh", "\ufffd"],
        "Env": ["A=\ufffdx"],
        "Labels": {"l": "\ufffd"},
    }
    assert "l: \ufffd\n" in run_cli("inspect", "-l", str(out)).stdout


def test_rebuilds_keep_it_after_the_inspect_metadata_as_apptainer(tmp_path: Path) -> None:
    """``build new.sif old.sif`` and a definition file bootstrapped from the image store it
    byte for byte, as the object after ``inspect-metadata.json`` (Apptainer's order)."""
    image = tmp_path / "image.sif"
    run_cli("build", str(image), f"oci:{_layout(tmp_path, FULL)}")
    deffile = tmp_path / "def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {image}\n%runscript\n  echo hi\n")
    for name, source in (("repacked.sif", str(image)), ("built.sif", str(deffile))):
        out = tmp_path / name
        run_cli("build", str(out), source)
        assert run_cli("sif", "dump", "2", str(out)).stdout.startswith('{"data":{"attributes":')
        assert _oci_config(out) == EXPECTED
