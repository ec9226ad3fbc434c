"""Read an image's metadata (labels, runscript, environment, def file …) from a SIF or sandbox.

SIFs carry an ``inspect-metadata.json`` object (Apptainer ≥ 1.2 and hpcsif write one);
for older SIFs, and for what that object lacks, the files under ``/.singularity.d`` are
read from the squashfs partition with ``unsquashfs -cat`` without mounting anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcsif.errors import MissingToolError, SIFError

if TYPE_CHECKING:
    from hpcsif.sif.reader import SIFImage

log = logging.getLogger(__name__)

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

# the key order of Apptainer's inspect.Attributes and inspect.AppAttributes in its JSON
ATTRIBUTE_ORDER = ["apps", "environment", "labels", "runscript", "test", "helpfile", "deffile", "startscript"]
APP_ATTRIBUTES = ["environment", "labels", "runscript", "startscript", "test", "helpfile"]


@dataclass
class ImageView:
    """Uniform read access to files inside a SIF (without mounting) or a sandbox directory."""

    path: Path
    sandbox: bool
    partition_offset: int = 0
    inspect_object: dict[str, Any] | None = None
    #: why the SIF's root file system cannot be read (what its metadata object lacks fails with it)
    partition_error: SIFError | None = None

    @classmethod
    def open(cls, path: str | Path) -> ImageView:
        """Open ``path``: a sandbox directory, a SIF file or a bare squashfs or ext3 file (SIFError if none).

        As in Apptainer, a SIF whose root file system is missing or unusable can still be
        inspected as far as its ``inspect-metadata.json`` object goes.
        """
        p = Path(path)
        try:  # named as given: Path() would turn docker://x into docker:/x
            os.stat(path)
        except FileNotFoundError:
            dangling = f" (a symbolic link to {os.readlink(path)!r})" if os.path.islink(path) else ""
            raise SIFError(f"Failed to open image {path}: no such file or directory{dangling}") from None
        except OSError as exc:  # a link loop, a path through a file …
            raise SIFError(f"Failed to open image {path}: {exc.strerror.lower()}") from None
        if not os.access(path, os.R_OK | os.X_OK if p.is_dir() else os.R_OK):
            # a sandbox whose files cannot be read is not an image without metadata
            raise SIFError(
                f"Failed to open image {path}: {os.path.abspath(path)} is not readable by the current "
                "user, check permissions"
            )
        if p.is_dir():
            return cls(p, sandbox=True)
        from hpcsif.sif.reader import SIFImage, bare_filesystem

        kind = bare_filesystem(p)
        if kind == "squashfs":  # mksquashfs of a root tree: no metadata objects, the file system at 0
            return cls(p, sandbox=False)
        if kind == "ext3":
            from hpcsif.engine.image_files import mounted_until_exit

            return cls(mounted_until_exit(p), sandbox=True)

        try:
            sif = SIFImage.open(p)
        except SIFError as exc:  # Apptainer's words first, then what is wrong with the file
            reason = str(exc).removeprefix(f"{p}: ")
            if reason.startswith("not a SIF file ("):  # "… (bad magic)", "… (only 6 bytes …)"
                reason = f"image format not recognized {reason.removeprefix('not a SIF file ')}"
            raise SIFError(f"Failed to open image {path}: {reason}") from None
        with sif as img:
            attrs = _inspect_metadata(img)
            try:
                return cls(p, False, img.primary_partition().offset, attrs)
            except SIFError as exc:
                if attrs is None:
                    raise
                return cls(p, False, 0, attrs, partition_error=exc)

    def read(self, inner: str) -> str | None:
        """Text of the in-image file ``inner`` (absolute path), or None if absent."""
        if self.partition_error:
            raise self.partition_error
        if self.sandbox:
            # links followed inside the sandbox: one to /etc/shadow names the image's, not the host's
            target = self._in_sandbox(inner)
            try:
                return _text(target.read_bytes()) if target and target.is_file() else None
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
        self._check_damage(proc.stderr.decode(errors="replace"))
        return _text(proc.stdout) if proc.returncode == 0 else None

    def _check_damage(self, stderr: str) -> None:
        """SIFError when unsquashfs reports the file system damaged (not merely a file absent)."""
        for line in stderr.splitlines():
            if line.startswith("FATAL ERROR:"):
                why = line.removeprefix("FATAL ERROR:").strip()
                raise SIFError(f"{self.path}: its squashfs file system cannot be read ({why})")

    def _in_sandbox(self, inner: str) -> Path | None:
        from hpcsif.engine.image_paths import in_image

        found = in_image(str(self.path), inner)
        return Path(found) if found else None

    def listdir(self, inner: str) -> list[str]:
        """Names in the in-image directory ``inner`` (empty if absent)."""
        if self.sandbox:
            d = self._in_sandbox(inner)
            return sorted(p.name for p in d.iterdir()) if d and d.is_dir() else []
        if self.partition_error:
            raise self.partition_error
        proc = subprocess.run(
            ["unsquashfs", "-o", str(self.partition_offset), "-l", "-d", "", str(self.path), inner],
            capture_output=True,
            text=True,
            check=False,
        )
        self._check_damage(proc.stderr)
        prefix = inner.rstrip("/") + "/"
        return sorted(
            {
                line[len(prefix) :].split("/", 1)[0]
                for line in proc.stdout.splitlines()
                if line.startswith(prefix)
            }
        )

    def labels(self, inner: str) -> dict[str, str]:
        """The labels in the in-image JSON file ``inner`` ({} if absent).

        As Apptainer's: a file that is not a JSON object of strings gives a warning and {}, or,
        for values that are not strings, an empty value each.
        """
        text = self.read(inner)
        try:
            # each invalid UTF-8 byte is U+FFFD, as Go's encoding/json decodes it
            doc = json.loads(INVALID_BYTE.sub("\ufffd", text)) if text else {}
        except (ValueError, RecursionError) as exc:
            problem = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
            log.warning("Unable to parse labels: %s is %s", inner, problem)
            return {}
        if not isinstance(doc, dict):
            log.warning("Unable to parse labels: %s is not a JSON object", inner)
            return {}
        if not all(isinstance(v, str) for v in doc.values()):
            log.warning("Unable to parse labels: %s has values that are not strings", inner)
        return {k: v if isinstance(v, str) else "" for k, v in doc.items()}

    def attribute(self, name: str) -> Any:
        """One inspect attribute: labels (dict), environment (dict), apps (list) or text (str/None)."""
        if self.inspect_object and name in self.inspect_object and name != "apps":
            return self.inspect_object[name]
        if name == "labels":
            return self.labels(f"{SD}/labels.json")
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


#: a byte that is not UTF-8, as :func:`_text` keeps it (a lone surrogate, ``surrogateescape``)
INVALID_BYTE = re.compile("[\udc80-\udcff]")


def _text(data: bytes) -> str:
    """A file's text with its bytes kept: Apptainer prints a runscript's or environment's bytes
    as they are, and escapes each invalid one in JSON (see :data:`INVALID_BYTE`); it reads the
    file through a shell, which drops NUL bytes."""
    return data.replace(b"\0", b"").decode("utf-8", "surrogateescape")


def _inspect_metadata(img: SIFImage) -> dict[str, Any] | None:
    """The attributes of the SIF's ``inspect-metadata.json`` object; None (with a warning, as
    Apptainer gives) when it is missing, too large, not JSON, nested too deeply or mistyped."""
    from hpcsif.sif.format import DataType

    found = img.find(DataType.GENERIC_JSON, "inspect-metadata.json")
    if not found:
        return None
    try:
        # invalid UTF-8 becomes U+FFFD, as Go's encoding/json decodes it
        text = img.read_object(found[0]).decode(errors="replace")
        attrs = json.loads(text)["data"]["attributes"]
    except (SIFError, ValueError, RecursionError, KeyError, TypeError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
        log.warning("Unable to read inspect-metadata.json SIF descriptor: %s", problem)
        return None
    bad = _mistyped(attrs)
    if bad:
        log.warning("Unable to read inspect-metadata.json SIF descriptor: %s", bad)
        return None
    return attrs


def _mistyped(attrs: Any) -> str | None:
    """What is wrong with the types of an ``attributes`` object, None if nothing."""
    if not isinstance(attrs, dict):
        return "attributes is not a JSON object"
    for key, value in attrs.items():
        want = (dict,) if key in ("labels", "environment", "apps") else (str, type(None))
        if key in (*ATTRIBUTE_FILES, "environment", "apps") and not isinstance(value, want):
            return f"attribute {key!r} has the wrong type ({type(value).__name__})"
        if key in ("labels", "environment") and not all(isinstance(v, str) for v in value.values()):
            return f"attribute {key!r} holds a value that is not a string"
    return None


def inspect(image: str | Path | ImageView, attributes: list[str], app: str | None = None) -> dict[str, Any]:
    """The requested attributes of the image (a path, or a view opened earlier) (for an app: its own)."""
    view = image if isinstance(image, ImageView) else ImageView.open(image)
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
        return view.labels(f"{base}/labels.json")
    if name == "environment":
        return {f"{base}/env/90-environment.sh": view.read(f"{base}/env/90-environment.sh") or ""}
    if name == "apps":
        return view.listdir("/scif/apps")
    return view.read(f"{base}/{ATTRIBUTE_FILES[name]}")


def present(attrs: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """``attrs`` in ``order`` without empty values (Go's ``omitempty``); text loses trailing newlines."""
    out = {}
    for key in order:
        value = attrs.get(key)
        if isinstance(value, str):
            value = value.rstrip("\n")
        elif isinstance(value, dict) and key != "apps":
            # an app's environment file that is not there is no entry (Apptainer reads only those
            # present); an empty label is one
            value = {
                k: v.rstrip("\n") if isinstance(v, str) else v
                for k, v in sorted(value.items())
                if v or key == "labels"
            }
        if value:
            out[key] = value
    return out


def gather(image: str | Path | ImageView, wanted: list[str], app: str | None = None) -> dict[str, Any]:
    """The ``attributes`` object Apptainer's ``inspect --json`` prints for these flags."""
    view = image if isinstance(image, ImageView) else ImageView.open(image)  # once: warnings once
    top = [w for w in wanted if w != "apps" and not (app and w in APP_ATTRIBUTES)]
    attrs = inspect(view, top)
    apps: dict[str, Any] = {}
    names = inspect(view, ["apps"])["apps"] or [] if app or "apps" in wanted else []
    if "apps" in wanted:
        # every app with all of its attributes, as a SIF's metadata object gives them and as --all
        # gathers them; Apptainer's --list-apps of a sandbox (or an older SIF) names them only
        full = view.inspect_object is not None or set(ATTRIBUTE_ORDER) <= set(wanted)
        for name in names:
            apps[name] = present(inspect(view, APP_ATTRIBUTES, app=name), APP_ATTRIBUTES) if full else {}
    if app:
        mine = present(inspect(view, [w for w in wanted if w in APP_ATTRIBUTES], app=app), APP_ATTRIBUTES)
        if mine or app in names:  # an app of the image is shown, even with none of these attributes
            apps[app] = {**apps.get(app, {}), **mine}
    attrs["apps"] = dict(sorted(apps.items()))
    return present(attrs, ATTRIBUTE_ORDER)
