"""Hostile OCI metadata (index/manifest/config JSON) fails with one FATAL line through the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpcsif.image.compose import ImageSpec, layer_tar, write_oci_layout


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    h = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / h).write_bytes(data)
    return "sha256:" + h, len(data)


def _hostile_layout(
    tmp: Path,
    *,
    index: bytes | None = None,
    manifest: bytes | None = None,
    config: Callable[[dict[str, Any]], Any] | None = None,
    layer_size: int | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
    edit_index: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """A one-layer layout whose index.json, manifest or config is replaced/edited."""
    layout = tmp / "layout"
    write_oci_layout(layout, ImageSpec(layers=[layer_tar([])]))
    idx = json.loads((layout / "index.json").read_text())
    mdesc = idx["manifests"][0]
    man = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    if layer_size is not None:
        man["layers"][0]["size"] = layer_size
    if config is not None:
        cfg = json.loads((layout / "blobs" / "sha256" / man["config"]["digest"][7:]).read_bytes())
        new = config(cfg)
        data = new if isinstance(new, bytes) else json.dumps(cfg).encode()
        man["config"]["digest"], man["config"]["size"] = _put(layout, data)
    if edit_manifest is not None:
        edit_manifest(man)
    mdesc["digest"], mdesc["size"] = _put(
        layout, manifest if manifest is not None else json.dumps(man).encode()
    )
    if edit_index is not None:
        edit_index(idx)
    (layout / "index.json").write_bytes(index if index is not None else json.dumps(idx).encode())
    return layout


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda cfg: cfg["config"].__setitem__(key, value)


def _layer(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda man: man["layers"][0].__setitem__(key, value)


def _entry(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda idx: idx["manifests"][0].__setitem__(key, value)


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "index-list": ({"index": b"[]"}, "is not a JSON object"),
    "index-string": ({"index": b'"x"'}, "is not a JSON object"),
    "index-deep": ({"index": b"[" * 100000 + b"]" * 100000}, "is not valid JSON"),
    "manifest-list": ({"manifest": b"[1]"}, "is not a JSON object"),
    "layer-size-lies": ({"layer_size": 10}, "bytes, not 10"),
    "config-list": ({"config": lambda cfg: b"[]"}, "is not a JSON object"),
    "env-int-item": ({"config": _set("Env", [1, "A=2"])}, "Env must be a list of strings"),
    "env-string": ({"config": _set("Env", "A=1")}, "Env must be a list of strings"),
    "entrypoint-int": ({"config": _set("Entrypoint", 5)}, "Entrypoint/Cmd"),
    "cmd-dict": ({"config": _set("Cmd", {"a": 1})}, "Entrypoint/Cmd"),
    "layers-string": ({"edit_manifest": lambda man: man.__setitem__("layers", "x")}, "layers"),
    "layer-number": ({"edit_manifest": lambda man: man.__setitem__("layers", [5])}, "descriptor"),
    "config-null": ({"edit_manifest": lambda man: man.__setitem__("config", None)}, "config"),
    "layer-size-float": ({"edit_manifest": _layer("size", 1.5)}, "size"),
    "layer-size-bool": ({"edit_manifest": _layer("size", True)}, "size"),
    "layer-size-negative": ({"edit_manifest": _layer("size", -1)}, "size"),
    "layer-digest-number": ({"edit_manifest": _layer("digest", 7)}, "digest"),
    "layer-annotations-list": ({"edit_manifest": _layer("annotations", [1, 2])}, "annotations"),
    "manifests-string": ({"edit_index": lambda idx: idx.__setitem__("manifests", "x")}, "manifests"),
    "manifests-number": ({"edit_index": lambda idx: idx.__setitem__("manifests", [5])}, "descriptor"),
    "platform-string": ({"edit_index": _entry("platform", "linux")}, "platform"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_metadata_fails_cleanly(tmp_path: Path, case: str) -> None:
    kwargs, message = CASES[case]
    layout = _hostile_layout(tmp_path, **kwargs)
    out = tmp_path / "out.sif"
    p = subprocess.run(
        ["hpcsif", "build", str(out), f"oci:{layout}"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    fatal = [line for line in p.stderr.splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and message in fatal[0], p.stderr
    assert not out.exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith("out.sif")]


@pytest.mark.parametrize("entry", [{"Config": 5, "Layers": "a"}, {"Config": "c.json", "Layers": [1]}])
def test_hostile_docker_archive_manifest_fails_cleanly(tmp_path: Path, entry: dict[str, Any]) -> None:
    data = json.dumps([entry]).encode()
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out.sif"
    p = subprocess.run(
        ["hpcsif", "build", str(out), f"docker-archive:{archive}"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "malformed manifest.json" in p.stderr.strip().splitlines()[-1]
    assert not out.exists()
