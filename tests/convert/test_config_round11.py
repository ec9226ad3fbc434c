"""Round 11: an OCI image config as it becomes Apptainer metadata (labels, inspect, run, env).

Each test is one cause that a seeded differential fuzzer (random Entrypoint/Cmd/Env/WorkingDir/
Labels/… on a busybox layer, built by hpcsif and by Apptainer 1.4.5) found; the expected values
are what Apptainer 1.4.5 gives for the same image.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hpcsif.image.compose import Entry, layer_tar, write_oci_layout
from tests.conftest import run_cli
from tests.convert.test_oci_config import _Spec
from tests.services.images import busybox_binary


def _sif(tmp_path: Path, runtime: dict[str, Any], layer: bytes | None = None, **top: Any) -> Path:
    proc = _build(tmp_path, runtime, layer, **top)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "img.sif"


def _build(
    tmp_path: Path, runtime: dict[str, Any], layer: bytes | None = None, **top: Any
) -> subprocess.CompletedProcess[str]:
    """Build img.sif from an image of this layer (an empty one) with this runtime config and
    these other config members."""
    layout, sif = tmp_path / "layout", tmp_path / "img.sif"
    write_oci_layout(layout, _Spec(layers=[layer or layer_tar([])], runtime=runtime))
    # the config as given, its keys in their order (compose writes them sorted)
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    manifest["config"] = _blob(blobs, {**config, "config": runtime, **top}, manifest["config"]["mediaType"])
    index["manifests"][0].update(_blob(blobs, manifest, index["manifests"][0]["mediaType"]))
    (layout / "index.json").write_text(json.dumps(index))
    return run_cli("build", str(sif), f"oci:{layout}", check=False)


def _fatal(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("INFO:")]


def _blob(blobs: Path, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _labels(sif: Path) -> dict[str, str]:
    return json.loads(run_cli("inspect", "--json", str(sif)).stdout)["data"]["attributes"]["labels"]


def test_the_build_labels_win_over_image_labels_of_the_same_name(tmp_path: Path) -> None:
    image = {
        "org.label-schema.build-arch": "A",
        "org.label-schema.build-date": "D",
        "org.label-schema.schema-version": "S",
        "org.label-schema.usage.singularity.deffile.bootstrap": "B",
        "org.label-schema.usage.singularity.deffile.from": "F",
        "org.label-schema.usage.singularity.version": "kept",
    }
    labels = _labels(_sif(tmp_path, {"Labels": image}))
    assert labels["org.label-schema.build-arch"] != "A"
    assert labels["org.label-schema.build-date"] != "D"
    assert labels["org.label-schema.schema-version"] == "1.0"
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "oci"
    assert labels["org.label-schema.usage.singularity.deffile.from"] == str(tmp_path / "layout")
    assert labels["org.label-schema.usage.singularity.version"] == "kept"  # no build label of that name


def test_json_nulls_in_string_lists_and_labels_are_empty_strings(tmp_path: Path) -> None:
    runtime = {"Env": [None, "A=1"], "Entrypoint": [None, "x"], "Labels": {"b": None}, "Shell": [None]}
    sif = _sif(tmp_path, runtime)  # Apptainer builds it: Go reads each null as ""
    assert _labels(sif)["b"] == ""
    assert run_cli("sif", "dump", "3", str(sif)).stdout == (
        '{"Entrypoint":["","x"],"Env":["","A=1"],"Labels":{"b":""},"Shell":[""]}'
    )
    env = run_cli("inspect", "--environment", str(sif)).stdout
    assert 'export A="${A:-"1"}"' in env


@pytest.mark.parametrize("value", [True, {"x": 1}])
def test_a_label_that_is_no_string_refuses_the_image(tmp_path: Path, value: Any) -> None:
    proc = _build(tmp_path, {"Labels": {"a": value}})
    assert proc.returncode != 0 and not (tmp_path / "img.sif").exists()
    assert _fatal(proc) == [f"FATAL:   image config: label 'a' is not a string: {value!r}"]


def test_oci_config_maps_are_written_with_sorted_keys_as_go_writes_them(tmp_path: Path) -> None:
    runtime = {
        "Labels": {"z": "1", "a": "2"},
        "Volumes": {"/z": {}, "/a": {}},
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
    }
    assert run_cli("sif", "dump", "3", str(_sif(tmp_path, runtime))).stdout == (
        '{"Labels":{"a":"2","z":"1"},"Volumes":{"/a":{},"/z":{}},"ExposedPorts":{"53/udp":{},"80/tcp":{}}}'
    )


@pytest.mark.parametrize("rootfs", ["x", {"type": "layers", "diff_ids": [5]}])
def test_a_rootfs_of_the_wrong_shape_is_one_fatal_line(tmp_path: Path, rootfs: Any) -> None:
    proc = _build(tmp_path, {"Cmd": ["true"]}, None, rootfs=rootfs)  # was a traceback (AttributeError)
    assert proc.returncode != 0 and not (tmp_path / "img.sif").exists()
    [line] = _fatal(proc)
    assert "config rootfs is not an object with a list of diff_id digests" in line


def _attributes(*args: str) -> dict[str, Any]:
    return json.loads(run_cli("inspect", "--json", *args).stdout)["data"]["attributes"]


def test_inspect_apps_of_a_sandbox_and_of_a_sif_as_apptainer_shows_them(tmp_path: Path) -> None:
    box = tmp_path / "box"
    (box / ".singularity.d").mkdir(parents=True)
    for app, help_text in (("foo", "foo help\n"), ("bar", None)):
        scif = box / "scif" / "apps" / app / "scif"
        scif.mkdir(parents=True)
        (scif / "runscript").write_text(f"#!/bin/sh\necho {app}\n")
        if help_text:
            (scif / "runscript.help").write_text(help_text)
    foo = {"runscript": "#!/bin/sh\necho foo", "helpfile": "foo help"}
    # a sandbox is read inside it: --list-apps names the apps, --all gathers their attributes
    assert _attributes("--list-apps", str(box)) == {"apps": {"bar": {}, "foo": {}}}
    assert _attributes("--list-apps", "--app", "foo", "-H", str(box)) == {
        "apps": {"bar": {}, "foo": {"helpfile": "foo help"}}
    }
    assert _attributes("--all", str(box))["apps"]["foo"] == foo
    sif = tmp_path / "apps.sif"
    run_cli("build", str(sif), str(box))
    for image in (box, sif):
        # an app of the image without the attributes asked for is still shown; one it lacks is not
        assert _attributes("--app", "bar", "-H", str(image)) == {"apps": {"bar": {}}}
        assert _attributes("--app", "nope", "-H", str(image)) == {}
    # a SIF's metadata object holds every app's attributes
    assert _attributes("--list-apps", str(sif))["apps"]["foo"] == foo


def _busybox_layer(*applets: str) -> bytes:
    links = [Entry(f"bin/{a}", symlink="busybox") for a in applets]
    return layer_tar(
        [Entry("bin", mode=0o755), Entry("bin/busybox", busybox_binary().read_bytes(), 0o755), *links]
    )


def test_an_app_that_a_converted_image_lacks_is_apptainers_line(tmp_path: Path) -> None:
    sif = _sif(tmp_path, {"Cmd": ["echo", "cmd"]}, _busybox_layer("sh", "echo", "true"))
    for action in (["run"], ["exec", "--app", "nope", str(sif), "true"], ["test"], ["shell"]):
        args = action if len(action) > 1 else [*action, "--app", "nope", str(sif)]
        proc = run_cli(*args, check=False, stdin=subprocess.DEVNULL)
        # on standard output and with status 1, as Apptainer's 95-apps.sh in every image says it
        # (run and test said "ERROR:   no runscript/No tests for contained app", exec ran the command)
        assert (proc.returncode, proc.stdout) == (1, "Could not locate the container application: nope\n")
        assert "app" not in proc.stderr


def test_an_env_name_ending_in_a_newline_is_skipped_like_other_odd_names(tmp_path: Path) -> None:
    env = ["F\n=6", "G\n", "A=1", "PATH=/bin"]
    sif = _sif(tmp_path, {"Env": env}, _busybox_layer("sh", "env"))
    # it was written as "export F" and a line the shell could not parse: every start failed
    proc = run_cli("exec", str(sif), "env", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "A=1" in proc.stdout.splitlines()
    assert not any(line.startswith(("F=", "G=", "=")) for line in proc.stdout.splitlines())
