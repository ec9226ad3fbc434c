"""Ordinary Docker-style images, used as a new Apptainer user would, against Apptainer 1.4.

Each test checks hpcsif's own behaviour through the CLI, then (where ``apptainer`` or
``peer-apptainer`` is on PATH) that Apptainer shows the same thing for the same image.
The images are OCI layouts and archives built here from busybox-static, under /tmp so that
the peer (in its chroot) sees them at the same path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_oci_layout
from tests.conftest import CONVERSION_INFO, peer_apptainer
from tests.engine.conftest import need_tools
from tests.services.images import busybox_binary

pytestmark = pytest.mark.slow

APPLETS = ("sh", "echo", "env", "true", "printf", "cat", "id")
#: ENTRYPOINT words that need every kind of quoting in the runscript's OCI_ENTRYPOINT
#: an ordinary image's Env: a longer PATH, library path, spaces, `=` and an empty value
ENV = ["PATH=/opt/x/bin:/usr/bin:/bin", "LD_LIBRARY_PATH=/opt/x/lib", "SPACEY=a  b", "EQ=a=b=c", "EMPTY="]
TRICKY = ["/bin/printf", "<%s>\\n", "it's", 'say "hi"', "back\\slash", "tick`date`", "$HOME"]


@dataclass
class Ordinary:
    """The SIFs hpcsif built from the test layouts, and where the layouts are."""

    base: Path
    cmdonly: Path  # CMD ["echo", "hello from cmd"], no ENTRYPOINT
    tricky: Path  # ENTRYPOINT TRICKY, CMD ["c'md"]
    layouts: dict[str, Path]


def _env(base: Path) -> dict[str, str]:
    return {**os.environ, "HPCSIF_CACHEDIR": str(base / "cache"), "PATH": os.environ["PATH"] + ":/usr/sbin"}


def hpcsif(
    base: Path, *args: str, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    """``hpcsif ARGS…`` in ``base`` with its own cache."""
    argv = [sys.executable, "-m", "hpcsif.cli.main", *args]
    env = {**_env(base), **(env or {})}
    return subprocess.run(argv, cwd=base, env=env, capture_output=True, text=True, timeout=120, **kw)


def peer(base: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    """The same command with Apptainer and its own cache (skips the test without it)."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer is on PATH")
    env = {**_env(base), "APPTAINER_CACHEDIR": str(base / "peer-cache"), **(env or {})}
    return subprocess.run([exe, *args], cwd=base, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory: pytest.TempPathFactory) -> Ordinary:
    need_tools()
    base = tmp_path_factory.mktemp("ordinary")
    assert str(base).startswith("/tmp/")
    root = [
        Entry("bin", mode=0o755),
        Entry("bin/busybox", busybox_binary().read_bytes(), 0o755),
        *(Entry(f"bin/{a}", symlink="busybox", mode=0o777) for a in APPLETS),
        Entry("etc", mode=0o755),
        Entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/group", b"root:x:0:\n"),
    ]
    layouts = {}
    for name, entrypoint, cmd in (
        ("cmdonly", None, ["echo", "hello from cmd"]),
        ("tricky", TRICKY, ["c'md"]),
    ):
        layouts[name] = base / name
        spec = ImageSpec([layer_tar(root)], entrypoint=entrypoint, cmd=cmd, env=ENV)
        write_oci_layout(layouts[name], spec)
        built = hpcsif(base, "-q", "build", f"{name}.sif", f"oci:{layouts[name]}")
        assert built.returncode == 0, built.stderr
    return Ordinary(base, base / "cmdonly.sif", base / "tricky.sif", layouts)


def oci_archive(layout: Path, dest: Path) -> Path:
    """An oci-archive of ``layout`` with member names as Apptainer wants them (no ``./``)."""
    with tarfile.open(dest, "w") as tar:
        for item in sorted(layout.iterdir()):
            tar.add(item, arcname=item.name)
    return dest


@pytest.mark.parametrize(
    "command, message",
    [
        ("nosuch", '"nosuch": executable file not found in $PATH'),
        ("/nope", "stat /nope: no such file or directory"),
        ("/etc", "is a directory"),
        ("/etc/passwd", "permission denied"),
    ],
)
def test_run_arguments_that_cannot_run_fail_as_in_apptainer(
    ordinary: Ordinary, command: str, message: str
) -> None:
    """`run IMG ARGS` of a CMD-only image runs ARGS; one that cannot run is a FATAL line, status 255."""
    ours = hpcsif(ordinary.base, "run", str(ordinary.cmdonly), command)
    assert (ours.returncode, ours.stdout, ours.stderr) == (255, "", f"FATAL:   {message}\n")
    theirs = peer(ordinary.base, "run", str(ordinary.cmdonly), command)
    assert (theirs.returncode, theirs.stderr) == (ours.returncode, ours.stderr)


def test_run_defaults_and_arguments(ordinary: Ordinary) -> None:
    """CMD without arguments, the arguments instead of CMD; ENTRYPOINT words reach it unchanged."""
    assert hpcsif(ordinary.base, "run", str(ordinary.cmdonly)).stdout == "hello from cmd\n"
    assert hpcsif(ordinary.base, "run", str(ordinary.cmdonly), "echo", "a  b").stdout == "a  b\n"
    words = [*TRICKY[2:], "c'md"]
    assert hpcsif(ordinary.base, "run", str(ordinary.tricky)).stdout == "".join(f"<{w}>\n" for w in words)


def test_runscript_oci_variables_as_apptainer_writes_them(ordinary: Ordinary) -> None:
    """OCI_ENTRYPOINT/OCI_CMD hold double-quoted words that `eval "set -- …"` gives back."""
    script = hpcsif(ordinary.base, "inspect", "--runscript", str(ordinary.tricky)).stdout
    assigns = [line for line in script.splitlines() if line.startswith(("OCI_ENTRYPOINT=", "OCI_CMD="))]
    assert len(assigns) == 2
    words = subprocess.run(
        [
            "/bin/sh",
            "-c",
            "\n".join([*assigns, 'eval "set -- $OCI_ENTRYPOINT $OCI_CMD"; printf "<%s>" "$@"']),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert words == "".join(f"<{w}>" for w in [*TRICKY, "c'md"])
    theirs = peer(ordinary.base, "build", "peer-tricky.sif", f"oci:{ordinary.layouts['tricky']}")
    assert theirs.returncode == 0, theirs.stderr
    peer_script = peer(ordinary.base, "inspect", "--runscript", "peer-tricky.sif").stdout
    assert assigns == [
        line for line in peer_script.splitlines() if line.startswith(("OCI_ENTRYPOINT=", "OCI_CMD="))
    ]


def test_environment_script_as_apptainer_writes_it(ordinary: Ordinary) -> None:
    """`inspect --environment` shows Apptainer's lines for the image's Env; values stay literal."""
    section = "=== /.singularity.d/env/10-docker2singularity.sh ===\n"
    ours = hpcsif(ordinary.base, "inspect", "--environment", str(ordinary.cmdonly)).stdout
    assert section + "#!/bin/sh\n" + 'export PATH="/opt/x/bin:/usr/bin:/bin"\n' in ours
    assert (
        'export SPACEY="${SPACEY:-"a  b"}"\nexport EQ="${EQ:-"a=b=c"}"\nexport EMPTY="${EMPTY:-""}"\n' in ours
    )
    script = 'echo "$SPACEY|$EQ|${EMPTY-unset}|$LD_LIBRARY_PATH"'
    env = hpcsif(ordinary.base, "exec", str(ordinary.cmdonly), "sh", "-c", script, env={"SPACEY": "host"})
    assert env.stdout == "a  b|a=b=c||/opt/x/lib:/.singularity.d/libs\n", env.stderr
    built = peer(ordinary.base, "build", "peer-cmdonly.sif", f"oci:{ordinary.layouts['cmdonly']}")
    assert built.returncode == 0, built.stderr
    theirs = peer(ordinary.base, "inspect", "--environment", "peer-cmdonly.sif").stdout
    assert ours.split(section)[1].split("\n\n")[0] == theirs.split(section)[1].split("\n\n")[0]
    for image in (ordinary.cmdonly, "peer-cmdonly.sif"):  # each engine reads the other's script alike
        assert (
            peer(ordinary.base, "exec", str(image), "sh", "-c", script, env={"SPACEY": "host"}).stdout
            == env.stdout
        )
        assert (
            hpcsif(ordinary.base, "exec", str(image), "sh", "-c", script, env={"SPACEY": "host"}).stdout
            == env.stdout
        )


def test_test_without_test_script(ordinary: Ordinary) -> None:
    """Apptainer prints its INFO line on stderr and its action script's line on stdout."""
    ours = hpcsif(ordinary.base, "test", str(ordinary.cmdonly))
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        0,
        "No test found in container, executing /bin/sh -c true\n",
        "INFO:    No test script found in container, exiting\n",
    )
    theirs = peer(ordinary.base, "test", str(ordinary.cmdonly))
    assert (theirs.returncode, theirs.stdout, theirs.stderr) == (ours.returncode, ours.stdout, ours.stderr)


def test_user_path_is_the_callers_path(ordinary: Ordinary) -> None:
    """USER_PATH holds the caller's PATH (not with --cleanenv; APPTAINERENV_USER_PATH wins)."""
    path = "/opt/caller/bin:" + os.environ["PATH"] + ":/usr/sbin"
    script = 'echo "${USER_PATH-unset}"'
    res = hpcsif(ordinary.base, "exec", str(ordinary.cmdonly), "sh", "-c", script, env={"PATH": path})
    assert res.stdout == path + "\n", res.stderr
    res = hpcsif(
        ordinary.base, "exec", "--cleanenv", str(ordinary.cmdonly), "sh", "-c", script, env={"PATH": path}
    )
    assert res.stdout == "unset\n", res.stderr
    res = hpcsif(
        ordinary.base, "exec", str(ordinary.cmdonly), "sh", "-c", script, env={"APPTAINERENV_USER_PATH": "x"}
    )
    assert res.stdout == "x\n", res.stderr
    theirs = peer(ordinary.base, "exec", str(ordinary.cmdonly), "sh", "-c", script)
    assert theirs.stdout.strip().startswith("/"), theirs  # the peer's own PATH, which its wrapper sets


@pytest.mark.parametrize(
    "flags, host, stdout, warnings",
    [
        (
            ["--env", "HOME=/x"],
            {},
            "/root\n",
            ["Overriding HOME environment variable with APPTAINERENV_HOME is not permitted"],
        ),
        (
            [],
            {"APPTAINERENV_HOME": "/x"},
            "/root\n",
            ["Overriding HOME environment variable with APPTAINERENV_HOME is not permitted"],
        ),
        (["--env-file", "home.env"], {}, "/root file\n", []),
        (
            [],
            {"SINGULARITYENV_FOO": "old", "APPTAINERENV_FOO": "new"},
            "/root new\n",
            [
                "SINGULARITYENV_FOO and APPTAINERENV_FOO have different values, using the latter",
                "Skipping environment variable [SINGULARITYENV_FOO=old], FOO is already overridden"
                " with different value [new]",
            ],
        ),
        ([], {"SINGULARITYENV_FOO": "same", "APPTAINERENV_FOO": "same"}, "/root same\n", []),
        (
            ["--cleanenv"],
            {"SINGULARITYENV_FOO": "old"},
            "/root old\n",
            ["INFO:    Environment variable SINGULARITYENV_FOO is set, but APPTAINERENV_FOO is preferred"],
        ),
        (
            ["--env", "FOO=flag", "--env-file", "home.env"],
            {},
            "/root flag\n",
            ["Ignored environment file variable FOO: override from --env"],
        ),
    ],
)
def test_environment_overrides_as_apptainer_takes_them(
    ordinary: Ordinary, flags: list[str], host: dict[str, str], stdout: str, warnings: list[str]
) -> None:
    """HOME is not overridden (--home sets it); APPTAINERENV_ beats SINGULARITYENV_; --env beats a file."""
    (ordinary.base / "home.env").write_text("HOME=/from/file\nFOO=file\n")
    argv = ["exec", *flags, str(ordinary.cmdonly), "sh", "-c", "echo $HOME${FOO:+ $FOO}"]
    ours = hpcsif(ordinary.base, *argv, env={"HOME": "/root", **host})
    lines = [w if w.startswith("INFO:") else f"WARNING: {w}" for w in warnings]
    assert (ours.returncode, ours.stdout, ours.stderr.splitlines()) == (0, stdout, lines)
    theirs = peer(ordinary.base, *argv, env={"HOME": "/root", **host})
    assert (theirs.returncode, theirs.stdout, theirs.stderr) == (0, ours.stdout, ours.stderr)


def test_shell_sets_shell_to_the_shell_it_starts(ordinary: Ordinary) -> None:
    """`shell` (commands on stdin) sets SHELL to the shell it runs, not the caller's; -s keeps it."""
    host = {"SHELL": "/bin/zsh"}
    for flags, expected in (([], "/bin/sh /bin/sh\n"), (["-s", "/bin/sh"], "/bin/sh /bin/zsh\n")):
        argv = ["shell", *flags, str(ordinary.cmdonly)]
        ours = hpcsif(ordinary.base, *argv, env=host, input='echo "$0 $SHELL"\n')
        assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr
        theirs = peer(ordinary.base, *argv, env=host, input='echo "$0 $SHELL"\n')
        assert (theirs.returncode, theirs.stdout) == (0, expected), theirs.stderr


def test_pull_and_exec_print_apptainers_build_steps(ordinary: Ordinary, tmp_path: Path) -> None:
    """A conversion prints Apptainer's INFO lines, a cache hit its one line; both as the peer's."""
    archive = oci_archive(ordinary.layouts["cmdonly"], tmp_path / "cmdonly.oci.tar")
    uri = f"oci-archive:{archive}"
    steps = CONVERSION_INFO
    results = []
    for run in (hpcsif, peer):
        first = run(tmp_path, "pull", "first.sif", uri)
        again = run(tmp_path, "pull", "again.sif", uri)
        hit = run(tmp_path, "exec", uri, "true")
        results.append([(r.returncode, r.stderr.splitlines()) for r in (first, again, hit)])
        assert results[0] == [(0, steps), *[(0, ["INFO:    Using cached SIF image"])] * 2]
        for name in ("first.sif", "again.sif"):
            (tmp_path / name).unlink()
    assert results[1] == results[0]


@pytest.mark.parametrize("image", ["missing.sif", "docker://127.0.0.1:1/app:1"])
def test_inspect_of_no_local_image_names_it_as_given(ordinary: Ordinary, image: str) -> None:
    """inspect reads local images only; what is not there is named as typed (URIs included)."""
    ours = hpcsif(ordinary.base, "inspect", image)
    prefix = f"FATAL:   Failed to open image {image}: "
    assert (ours.returncode, ours.stdout, ours.stderr) == (255, "", prefix + "no such file or directory\n")
    theirs = peer(ordinary.base, "inspect", image)
    assert theirs.returncode == 255 and theirs.stderr.startswith(prefix), theirs.stderr


def test_prompt_from_the_image_or_the_user(ordinary: Ordinary, tmp_path: Path) -> None:
    """Apptainer's prompt unless the image's Env or APPTAINERENV_PS1 sets one; PROMPT_COMMAND
    re-sets the final PS1 (after a PROMPT_COMMAND the user passes)."""
    layout = tmp_path / "prompt"
    root = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox_binary().read_bytes(), 0o755)]
    root += [Entry(f"bin/{a}", symlink="busybox", mode=0o777) for a in APPLETS]
    write_oci_layout(layout, ImageSpec([layer_tar(root)], cmd=["sh"], env=[*ENV, "PS1=img> "]))
    assert hpcsif(tmp_path, "-q", "build", "prompt.sif", f"oci:{layout}").returncode == 0
    script = 'echo "$PS1|$PROMPT_COMMAND"'
    for image, flags, host, expected in (
        (ordinary.cmdonly, [], {"PS1": "host> "}, 'Apptainer> |PS1="Apptainer> "; unset PROMPT_COMMAND'),
        (tmp_path / "prompt.sif", [], {}, 'img> |PS1="img> "; unset PROMPT_COMMAND'),
        (
            tmp_path / "prompt.sif",
            [],
            {"APPTAINERENV_PS1": "me $ "},
            'me $ |PS1="me $ "; unset PROMPT_COMMAND',
        ),
        (
            ordinary.cmdonly,
            ["--env", "PROMPT_COMMAND=date"],
            {},
            'Apptainer> |date; PROMPT_COMMAND="${PROMPT_COMMAND%%; PROMPT_COMMAND=*}"; PS1="Apptainer> "',
        ),
    ):
        argv = ["exec", *flags, str(image), "sh", "-c", script]
        ours = hpcsif(tmp_path, *argv, env=host)
        assert (ours.returncode, ours.stdout) == (0, expected + "\n"), ours.stderr
        theirs = peer(tmp_path, *argv, env=host)
        assert (theirs.returncode, theirs.stdout) == (0, ours.stdout), theirs.stderr


def test_shlvl_counts_only_the_users_shells(ordinary: Ordinary) -> None:
    """The launcher's own busybox sh does not count: a --cleanenv `sh -c` is at level 1."""
    argv = ["exec", "--cleanenv", str(ordinary.cmdonly), "sh", "-c", 'echo "${SHLVL-unset}"']
    ours = hpcsif(ordinary.base, *argv)
    assert (ours.returncode, ours.stdout) == (0, "1\n"), ours.stderr
    theirs = peer(ordinary.base, *argv)
    assert (theirs.returncode, theirs.stdout) == (0, ours.stdout), theirs.stderr
