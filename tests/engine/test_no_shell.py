"""Images without /bin/sh (distroless) run their command directly, as Apptainer runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive
from tests.conftest import run_cli
from tests.engine.conftest import fuse_mounts
from tests.services.images import ETC_USERS, busybox_binary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distroless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static busybox in /app, /etc/passwd and /etc/group (as distroless images have them), and
    nothing else: no /bin/sh."""
    d = tmp_path_factory.mktemp("distroless")
    app = [Entry("app", mode=0o755), Entry("app/busybox", busybox_binary().read_bytes(), 0o755)]
    layer = layer_tar([*app, Entry("etc", mode=0o755), *(Entry(k, v) for k, v in ETC_USERS.items())])
    spec = ImageSpec(
        [layer],
        entrypoint=["/app/busybox", "echo"],
        cmd=["default", "args"],
        env=["PATH=/app", "GREETING=from the image", "HOSTWINS=image"],
    )
    archive = write_docker_archive(d / "distroless.tar", [("test/distroless:1", spec)])
    sif = d / "distroless.sif"
    run_cli("build", str(sif), f"docker-archive://{archive}")
    return sif


def test_run_uses_entrypoint_and_cmd(distroless: Path) -> None:
    assert run_cli("run", str(distroless)).stdout == "default args\n"
    assert run_cli("run", str(distroless), "given", "it's a b").stdout == "given it's a b\n"


def test_exec_environment_and_exit_codes(distroless: Path) -> None:
    out = run_cli(
        "exec",
        "--env",
        "SET=by flag",
        str(distroless),
        "busybox",
        "sh",
        "-c",
        'echo "$GREETING|$HOSTWINS|$SET|$PATH"',
        env={"HOSTWINS": "host"},
    ).stdout
    # as in Apptainer 1.4 the image's value wins over the host's; default PATH dirs are appended
    assert (
        out
        == "from the image|image|by flag|/app:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    # in name order, as Apptainer's interpreter passes them on (PWD too, which bwrap sets last)
    for flags in ([], ["--cleanenv"]):
        out = run_cli("exec", *flags, str(distroless), "busybox", "env").stdout
        names = [ln.partition("=")[0] for ln in out.splitlines()]
        assert names == sorted(names) and "GREETING" in names and "PWD" in names
    proc = run_cli("exec", str(distroless), "busybox", "sh", "-c", "exit 42", check=False)
    assert proc.returncode == 42
    proc = subprocess.run(
        ["python3", "-m", "hpcsif.cli.main", "exec", str(distroless), "busybox", "cat"],
        input="stdin passes\n",
        capture_output=True,
        text=True,
    )
    assert proc.stdout == "stdin passes\n"


def test_shell_needs_a_shell(distroless: Path) -> None:
    proc = run_cli("shell", str(distroless), check=False)
    assert proc.returncode != 0 and "needs a shell" in proc.stderr


def test_exec_of_what_cannot_run(distroless: Path) -> None:
    """Apptainer's one-line errors (status 255), also where no shell can look the command up."""
    for command, message in (
        ("nosuch", '"nosuch": executable file not found in $PATH'),
        ("/nope", "stat /nope: no such file or directory"),
        ("/app", "is a directory"),
    ):
        proc = run_cli("exec", str(distroless), command, check=False)
        assert (proc.returncode, proc.stderr) == (255, f"FATAL:   {message}\n")
    # a relative path joined to the working directory (the image's /app here) and cleaned, as
    # Go's filepath.Abs makes it (hpcsif looked for it in the host's working directory)
    proc = run_cli("exec", "--pwd", "/app", str(distroless), "./x/../nope", check=False)
    assert (proc.returncode, proc.stderr) == (255, "FATAL:   stat /app/nope: no such file or directory\n")
    for flags, command in (
        (["--pwd", "/app"], "./busybox"),
        (["--pwd", "/app", "--env", "PATH=:/x"], "busybox"),
    ):
        proc = run_cli("exec", *flags, str(distroless), command, "sh", "-c", 'echo "$0"')
        assert (proc.returncode, proc.stdout) == (0, "sh\n")
    assert run_cli("exec", str(distroless), "busybox", "true").returncode == 0


def test_a_repacked_image_keeps_its_oci_config(distroless: Path, tmp_path: Path) -> None:
    """``build new.sif old.sif`` carries oci-config.json over, as Apptainer's does: without it a
    shell-less image cannot start its entrypoint (it used to fail with 'no /bin/sh')."""
    repacked = tmp_path / "repacked.sif"
    run_cli("build", "--compression", "gzip", str(repacked), str(distroless))
    assert run_cli("sif", "list", str(repacked)).stdout.count("JSON.Generic") == 2  # oci-config, inspect
    assert run_cli("run", str(repacked)).stdout == "default args\n"
    out = run_cli("exec", str(repacked), "busybox", "sh", "-c", 'echo "$GREETING"').stdout
    assert out == "from the image\n"


def test_overrides_of_path_and_libraries(distroless: Path) -> None:
    """As with a shell (and in Apptainer): an empty PATH or PS1 given leaves the container's, an
    empty LD_LIBRARY_PATH stays empty, and one given goes before /.singularity.d/libs (hpcsif
    dropped it and set the empty ones)."""
    path = "/app:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for given, libs in (
        ("PATH=,LD_LIBRARY_PATH=,PS1=", ""),
        ("LD_LIBRARY_PATH=/x", "/x:/.singularity.d/libs"),
    ):
        show = 'echo "[$PATH][$LD_LIBRARY_PATH][$PS1]"'
        out = run_cli("exec", "--env", given, str(distroless), "busybox", "sh", "-c", show).stdout
        assert out == f"[{path}][{libs}][Apptainer> ]\n"


def test_an_app_the_image_lacks(distroless: Path) -> None:
    """``--app NAME`` of an app the image lacks: Apptainer's line on standard output and status
    1, as its env script says it where a shell runs (hpcsif ran the command, ignoring --app)."""
    for args in (["run"], ["exec", "busybox", "true"]):
        action, *command = args
        proc = run_cli(action, "--app", "nosuch", str(distroless), *command, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            1,
            "Could not locate the container application: nosuch\n",
            "",
        )
    assert not fuse_mounts()
