"""Read an image's metadata (labels, runscript, environment, def file …) from a SIF or sandbox.

SIFs carry an ``inspect-metadata.json`` object (Apptainer ≥ 1.2 and hpcsif write one);
for older SIFs, and for what that object lacks, the files under ``/.singularity.d`` are
read from the squashfs partition with ``unsquashfs -cat`` without mounting anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcsif.errors import MissingToolError, SIFError

SD = "/.singularity.d"

# attribute -> file under /.singularity.d it comes from
ATTRIBUTE_FILES = {
    "labels": "labels.json",
    "runscript": "runscript",
    "deffile": "Singularity",
    "startscript": "startscript",
    "test": "test",
    "helpfile": "runscript.help",
}


@dataclass
class ImageView:
    """Uniform read access to files inside a SIF (without mounting) or a sandbox directory."""

    path: Path
    sandbox: bool
    partition_offset: int = 0
    inspect_object: dict[str, Any] | None = None

    @classmethod
    def open(cls, path: str | Path) -> ImageView:
        """Open ``path``: a sandbox directory or a SIF file (SIFError if neither)."""
        p = Path(path)
        if p.is_dir():
            return cls(p, sandbox=True)
        from hpcsif.sif.format import DataType
        from hpcsif.sif.reader import SIFImage

        with SIFImage.open(p) as img:
            offset = img.primary_partition().offset
            found = img.find(DataType.GENERIC_JSON, "inspect-metadata.json")
            attrs = None
            if found:
                try:
                    attrs = json.loads(img.read_object(found[0]))["data"]["attributes"]
                except (ValueError, KeyError, TypeError):
                    attrs = None  # fall back to the files in the partition
        return cls(p, sandbox=False, partition_offset=offset, inspect_object=attrs)

    def read(self, inner: str) -> str | None:
        """Text of the in-image file ``inner`` (absolute path), or None if absent."""
        if self.sandbox:
            target = self.path / inner.lstrip("/")
            try:
                return target.read_text(errors="replace") if target.is_file() else None
            except OSError:
                return None
        tool = shutil.which("unsquashfs")
        if tool is None:
            raise MissingToolError("unsquashfs", "squashfs-tools")
        proc = subprocess.run(
            [tool, "-o", str(self.partition_offset), "-cat", str(self.path), inner],
            capture_output=True,
            check=False,
        )
        return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None

    def listdir(self, inner: str) -> list[str]:
        """Names in the in-image directory ``inner`` (empty if absent)."""
        if self.sandbox:
            d = self.path / inner.lstrip("/")
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        proc = subprocess.run(
            ["unsquashfs", "-o", str(self.partition_offset), "-l", "-d", "", str(self.path), inner],
            capture_output=True,
            text=True,
            check=False,
        )
        prefix = inner.rstrip("/") + "/"
        return sorted(
            {
                line[len(prefix) :].split("/", 1)[0]
                for line in proc.stdout.splitlines()
                if line.startswith(prefix)
            }
        )

    def attribute(self, name: str) -> Any:
        """One inspect attribute: labels (dict), environment (dict), apps (list) or text (str/None)."""
        if self.inspect_object and name in self.inspect_object and name != "apps":
            return self.inspect_object[name]
        if name == "labels":
            text = self.read(f"{SD}/labels.json")
            try:
                return json.loads(text) if text else {}
            except ValueError:
                raise SIFError(f"{self.path}: /.singularity.d/labels.json is not valid JSON") from None
        if name == "environment":
            env = {}
            for fname in self.listdir(f"{SD}/env"):
                if fname.startswith(("10-", "90-", "91-")) and fname.endswith(".sh"):
                    env[f"{SD}/env/{fname}"] = self.read(f"{SD}/env/{fname}") or ""
            return env
        if name == "apps":
            return self.listdir("/scif/apps")
        if name in ATTRIBUTE_FILES:
            return self.read(f"{SD}/{ATTRIBUTE_FILES[name]}")
        raise SIFError(f"unknown inspect attribute {name!r}")


def inspect(path: str | Path, attributes: list[str], app: str | None = None) -> dict[str, Any]:
    """The requested attributes of the image at ``path`` (for an app: its own files)."""
    view = ImageView.open(path)
    if app:
        return {name: _app_attribute(view, app, name) for name in attributes}
    return {name: view.attribute(name) for name in attributes}


def _app_attribute(view: ImageView, app: str, name: str) -> Any:
    base = f"/scif/apps/{app}/scif"
    if name not in (*ATTRIBUTE_FILES, "environment", "apps"):
        raise SIFError(f"unknown inspect attribute {name!r}")
    # definition-file builds (Apptainer's and ours) record each app in inspect-metadata.json
    recorded = ((view.inspect_object or {}).get("apps") or {}).get(app)
    if isinstance(recorded, dict) and name in recorded:
        return recorded[name]
    if name == "labels":
        text = view.read(f"{base}/labels.json")
        return json.loads(text) if text else {}
    if name == "environment":
        return {f"{base}/env/90-environment.sh": view.read(f"{base}/env/90-environment.sh") or ""}
    if name == "apps":
        return view.listdir("/scif/apps")
    return view.read(f"{base}/{ATTRIBUTE_FILES[name]}")
