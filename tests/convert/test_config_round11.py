"""Round 11: an OCI image config as it becomes Apptainer metadata (labels, inspect, run, env).

Each test is one cause that a seeded differential fuzzer (random Entrypoint/Cmd/Env/WorkingDir/
Labels/… on a busybox layer, built by hpcsif and by Apptainer 1.4.5) found; the expected values
are what Apptainer 1.4.5 gives for the same image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcsif.image.compose import ImageSpec, layer_tar, write_oci_layout
from tests.conftest import run_cli


@dataclass
class _Spec(ImageSpec):
    runtime: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["config"] = self.runtime
        return cfg


def _sif(tmp_path: Path, runtime: dict[str, Any]) -> Path:
    layout, sif = tmp_path / "layout", tmp_path / "img.sif"
    write_oci_layout(layout, _Spec(layers=[layer_tar([])], runtime=runtime))
    run_cli("build", str(sif), f"oci:{layout}")
    return sif


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
