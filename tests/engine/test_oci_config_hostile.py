"""A shell-less image's ``oci-config.json`` that cannot say how to start it.

Apptainer never reads the object for native ``exec`` (its action scripts need no /bin/sh), so
``exec`` ignores a broken one with a warning; ``run`` has nothing to start and fails in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive
from hpcsif.sif.format import DataType
from hpcsif.sif.reader import SIFImage
from tests.conftest import run_cli
from tests.services.images import ETC_USERS, busybox_binary

pytestmark = pytest.mark.slow

GOOD = {"Entrypoint": ["/app/busybox", "echo"], "Cmd": ["default"], "Env": ["PATH=/app"]}
HOSTILE = {
    "array": (b"[1, 2]", "is an array, not a JSON object"),
    "string": (b'"run me"', "is a string, not a JSON object"),
    "number": (b"42", "is a number, not a JSON object"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply"),
    "deep-env": (b'{"Env":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "is nested too deeply"),
    "not-utf8": (b'{"Env": ["A=\xff"]}', "is not valid JSON"),
    "env-string": (
        json.dumps({**GOOD, "Env": "PATH=/app"}).encode(),
        "has Env that is not a list of strings",
    ),
    "env-nul": (json.dumps({**GOOD, "Env": ["A=\0"]}).encode(), "has Env that is not a list of strings"),
    "entrypoint-number": (
        json.dumps({**GOOD, "Entrypoint": 5}).encode(),
        "has Entrypoint that is not a list of strings",
    ),
    "cmd-numbers": (json.dumps({**GOOD, "Cmd": [1, None]}).encode(), "has Cmd that is not a list of strings"),
    "cmd-object": (json.dumps({**GOOD, "Cmd": {"a": 1}}).encode(), "has Cmd that is not a list of strings"),
}


@pytest.fixture(scope="module")
def shell_less(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static busybox in /app, /etc/passwd and /etc/group (as distroless images have them), and
    nothing else: no /bin/sh."""
    d = tmp_path_factory.mktemp("shell-less")
    app = [Entry("app", mode=0o755), Entry("app/busybox", busybox_binary().read_bytes(), 0o755)]
    layer = layer_tar([*app, Entry("etc", mode=0o755), *(Entry(k, v) for k, v in ETC_USERS.items())])
    spec = ImageSpec([layer], entrypoint=GOOD["Entrypoint"], cmd=GOOD["Cmd"], env=GOOD["Env"])
    archive = write_docker_archive(d / "shell-less.tar", [("test/shell-less:1", spec)])
    run_cli("build", str(d / "shell-less.sif"), f"docker-archive://{archive}")
    return d / "shell-less.sif"


def with_config(base: Path, dest: Path, document: bytes | None) -> Path:
    """A copy of *base* whose oci-config.json holds *document*, or has none (through ``hpcsif sif``)."""
    shutil.copy(base, dest)
    with SIFImage.open(dest) as sif:
        (old,) = sif.find(DataType.GENERIC_JSON, "oci-config.json")
    run_cli("sif", "del", str(old.id), str(dest))
    if document is None:
        return dest
    obj = dest.with_suffix(".json")
    obj.write_bytes(document)
    run_cli("sif", "add", "--datatype", "6", "--filename", "oci-config.json", str(dest), str(obj))
    return dest


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_run_fails_in_one_line_and_exec_ignores_it(shell_less: Path, tmp_path: Path, name: str) -> None:
    document, problem = HOSTILE[name]
    sif = with_config(shell_less, tmp_path / f"{name}.sif", document)
    proc = run_cli("run", str(sif), check=False, timeout=60)
    assert proc.returncode == 255 and proc.stdout == ""
    assert proc.stderr.startswith("FATAL:   ") and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no /bin/sh, and its oci-config.json {problem}" in proc.stderr
    proc = run_cli("exec", str(sif), "/app/busybox", "echo", "still runs", check=False, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "still runs\n"), proc.stderr
    assert proc.stderr == f"WARNING: ignoring the image's oci-config.json: it {problem}\n"


def test_shell_form_and_missing_commands(shell_less: Path, tmp_path: Path) -> None:
    """A string ENTRYPOINT/CMD is Docker's shell form, which needs the missing /bin/sh."""
    for name, config, message in (
        ("shell-form", {**GOOD, "Entrypoint": "echo hi"}, "stat /bin/sh: no such file or directory"),
        ("missing", {**GOOD, "Entrypoint": ["/nope"]}, "stat /nope: no such file or directory"),
        ("not-in-path", {**GOOD, "Entrypoint": ["nope"]}, '"nope": executable file not found in $PATH'),
    ):
        sif = with_config(shell_less, tmp_path / f"{name}.sif", json.dumps(config).encode())
        proc = run_cli("run", str(sif), check=False, timeout=60)
        assert (proc.returncode, proc.stderr) == (255, f"FATAL:   {message}\n")


def test_exec_without_oci_config(shell_less: Path, tmp_path: Path) -> None:
    """Apptainer execs in a shell-less SIF without oci-config.json or sandbox; run has nothing to start."""
    sif = with_config(shell_less, tmp_path / "none.sif", None)
    assert run_cli("exec", str(sif), "/app/busybox", "echo", "ok").stdout == "ok\n"
    proc = run_cli("run", str(sif), check=False)
    assert proc.returncode == 255 and "no /bin/sh and no oci-config.json" in proc.stderr
    # nor does a sandbox have one: exec in it works, with Apptainer's lookup errors
    sandbox = tmp_path / "sandbox"
    run_cli("build", "--sandbox", str(sandbox), str(shell_less))
    assert run_cli("exec", str(sandbox), "/app/busybox", "echo", "ok").stdout == "ok\n"
    proc = run_cli("exec", str(sandbox), "true", check=False)
    assert (proc.returncode, proc.stderr) == (255, 'FATAL:   "true": executable file not found in $PATH\n')
    # Apptainer 1.4.5's lines and status for run of such a sandbox without a runscript, and
    # shell of either
    (sandbox / ".singularity.d/runscript").unlink()
    proc = run_cli("run", str(sandbox), check=False)
    message = "ERROR:   No runscript and no /bin/sh executable found in container, aborting\n"
    assert (proc.returncode, proc.stderr) == (1, message)
    for image in (sif, sandbox):
        proc = run_cli("shell", str(image), check=False, stdin=subprocess.DEVNULL)
        assert (proc.returncode, proc.stderr) == (1, "ERROR:   /bin/sh does not exist in container\n")


def test_localimage_build_keeps_oci_config(shell_less: Path, tmp_path: Path) -> None:
    """``Bootstrap: localimage`` of a shell-less SIF keeps its oci-config.json, as Apptainer's build
    does, so that the new image still runs; one that is not an object is left behind, with a warning."""
    definition, out = tmp_path / "x.def", tmp_path / "out.sif"
    definition.write_text(f"Bootstrap: localimage\nFrom: {shell_less}\n")
    run_cli("build", str(out), str(definition))
    assert run_cli("run", str(out)).stdout == "default\n"
    hostile = with_config(shell_less, tmp_path / "array.sif", b"[1, 2]")
    definition.write_text(f"Bootstrap: localimage\nFrom: {hostile}\n")
    proc = run_cli("build", "-F", str(out), str(definition))
    warning = (
        f"WARNING: {hostile}: oci-config.json is not a JSON object (got list); the new image goes without it"
    )
    assert warning in proc.stderr
    proc = run_cli("run", str(out), check=False)
    assert proc.returncode == 255 and "no /bin/sh and no oci-config.json" in proc.stderr
