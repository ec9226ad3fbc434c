"""Images without ``/bin/sh``: how they start (``oci-config.json``), and how they fail, as Apptainer."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NoReturn

from hpcsif.engine.image_paths import in_image, is_executable
from hpcsif.errors import EngineError, NoShellError

log = logging.getLogger(__name__)


def refuse_without_shell(image: Path, action: str, sandbox: str | None) -> NoReturn:
    """Fail a start that needs the image's /bin/sh: Apptainer's ERROR lines for ``shell``, and for
    ``run`` of a sandbox without a runscript."""
    if action == "shell":
        raise NoShellError("/bin/sh does not exist in container")
    if action == "run" and sandbox and not is_executable(in_image(sandbox, "/.singularity.d/runscript")):
        raise NoShellError("No runscript and no /bin/sh executable found in container, aborting")
    raise EngineError(f"{image}: the image has no /bin/sh and no oci-config.json to start it without")


def resolve_command(root: str, command: str, path: str, cwd: str, host_cwd: str | None) -> str:
    """*command* as exec will run it in an image without a shell, with Apptainer's errors.

    Apptainer looks the command up itself and reports what is wrong in one line (exit 255); a
    relative path it runs (and names) joined to the container's working directory *cwd* and
    cleaned, as Go's filepath.Abs makes it. Below *host_cwd* (the host's working directory,
    bound at its own path) a path is the host's, elsewhere the image's.
    """

    def absolute(p: str) -> str:
        return p if p.startswith("/") else os.path.normpath(os.path.join(cwd, p))

    def host_path(p: str) -> str | None:
        if host_cwd and (p + "/").startswith(host_cwd.rstrip("/") + "/"):
            return p if os.path.exists(p) else None
        return in_image(root, p)

    if "/" not in command:
        for d in path.split(":"):
            candidate = absolute(os.path.join(d or ".", command))
            if is_executable(host_path(candidate)):
                return candidate
        raise EngineError(f'"{command}": executable file not found in $PATH')
    found = host_path(absolute(command))
    if not found:
        raise EngineError(f"stat {absolute(command)}: no such file or directory")
    if os.path.isdir(found):
        raise EngineError("is a directory")
    if not os.access(found, os.X_OK):
        raise EngineError("permission denied")
    return absolute(command)


def oci_start_config(image: Path | None, action: str) -> dict[str, list[str]] | None:
    """``Env``, ``Entrypoint`` and ``Cmd`` of the SIF's ``oci-config.json`` as string lists.

    None if there is no such object (or no SIF: *image* None for a sandbox) and the action needs
    it; ``exec`` needs none. A string ``Entrypoint``/``Cmd`` is Docker's shell form.
    A document that cannot say how to start the image fails ``run`` with one line; ``exec``
    (which Apptainer runs without reading it at all) ignores it with a warning.
    """
    import json

    from hpcsif.sif.format import DataType
    from hpcsif.sif.reader import SIFImage, bare_filesystem

    data = None
    if image is not None and bare_filesystem(image) is None:  # a bare file system has no objects
        with SIFImage.open(image) as sif:
            found = sif.find(DataType.GENERIC_JSON, "oci-config.json")
            data = sif.read_object(found[0]) if found else None
    nothing: dict[str, list[str]] = {"Env": [], "Entrypoint": [], "Cmd": []}
    if data is None:
        return nothing if action == "exec" else None
    try:
        problem, config = None, _oci_lists(json.loads(data))
    except RecursionError:
        problem = "is nested too deeply"
    except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        problem = str(e) if isinstance(e, TypeError) else "is not valid JSON"
    if problem is None:
        return config
    if action != "exec":
        raise EngineError(f"{image}: the image has no /bin/sh, and its oci-config.json {problem}")
    log.warning("ignoring the image's oci-config.json: it %s", problem)
    return nothing


def _oci_lists(doc: object) -> dict[str, list[str]]:
    """The string lists of a parsed ``oci-config.json``; TypeError naming the first wrong part."""
    if not isinstance(doc, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(doc), "a number"
        )
        raise TypeError(f"is {kind}, not a JSON object")
    config = {}
    for key in ("Env", "Entrypoint", "Cmd"):
        value = doc.get(key)
        if isinstance(value, str) and key != "Env":
            value = ["/bin/sh", "-c", value]  # Docker's shell form, as the runscript has it
        elif value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise TypeError(f"has {key} that is not a list of strings")
        config[key] = value
    return config
