"""What an Apptainer user types on day one, on an ordinary image: build targets that exist,
``--force`` over another kind of file, ``shell`` with parameters, ``pull`` with too many words,
``cache clean`` without a terminal and ``-v``'s lines. The expected texts are Apptainer 1.4.5's
on the same inputs; where the peer is installed, the target checks are compared with it directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_oci_layout
from tests.conftest import CONVERSION_INFO, ROOT, peer_apptainer, run_cli
from tests.services.images import TestImage, busybox_binary
from tests.services.users import USER_PYTHON, TestUser

NOT_SANDBOX = (
    "FATAL:   While checking build target: {path} is not empty and is not an Apptainer sandbox, "
    "check its content first and use --force if you want to overwrite it\n"
)
EXISTS = (
    "FATAL:   While checking build target: build target '{name}' already exists. "
    "Use --force if you want to overwrite it\n"
)


@pytest.fixture(scope="module")
def sif(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image as a SIF, built once through the CLI."""
    path = tmp_path_factory.mktemp("day-one") / "busybox.sif"
    run_cli("build", str(path), f"oci://{busybox_image.layout}")
    return path


def _targets(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Existing build targets -> (build flags, Apptainer's stderr)."""
    (tmp_path / "data/sub").mkdir(parents=True)  # a user's directory: not a sandbox
    box = tmp_path / "box"  # what Apptainer takes for a sandbox: these four entries
    for name in (".singularity.d", "dev", "proc", "sys"):
        (box / name).mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d/old.sif").write_bytes(b"precious")
    return {
        "data": ([], NOT_SANDBOX.format(path=tmp_path / "data")),
        "data/": (["--sandbox"], NOT_SANDBOX.format(path=tmp_path / "data")),
        "box": (["--sandbox"], EXISTS.format(name="box")),
        "empty": (["--sandbox"], EXISTS.format(name="empty")),
        "d/old.sif": ([], EXISTS.format(name="old.sif")),  # the file's name, not the path given
        "d/../d/old.sif": ([], EXISTS.format(name="old.sif")),
    }


def test_existing_build_targets_are_refused_as_apptainer_refuses_them(
    busybox_image: TestImage, tmp_path: Path
) -> None:
    source = f"oci://{busybox_image.layout}"
    exe = peer_apptainer()
    for target, (flags, expected) in _targets(tmp_path).items():
        path = f"{tmp_path}/{target}"
        proc = run_cli("build", *flags, path, source, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (255, "", expected), target
        if exe is not None and path.startswith("/tmp/"):
            theirs = subprocess.run([exe, "build", *flags, path, source], capture_output=True, text=True)
            assert (theirs.returncode, theirs.stderr) == (255, expected), target
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["sub"]
    assert (tmp_path / "d/old.sif").read_bytes() == b"precious"


def test_force_replaces_a_directory_with_a_sif_and_a_file_with_a_sandbox(
    busybox_image: TestImage, tmp_path: Path
) -> None:
    source = f"oci://{busybox_image.layout}"
    (tmp_path / "was_dir/sub").mkdir(parents=True)
    run_cli("build", "--force", str(tmp_path / "was_dir"), source)
    assert (tmp_path / "was_dir").read_bytes()[:30] == b"#!/usr/bin/env run-singularity"
    (tmp_path / "was_file").write_text("old")
    run_cli("build", "-F", "--sandbox", str(tmp_path / "was_file"), source)
    assert (tmp_path / "was_file/bin/busybox").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["was_dir", "was_file"]  # nothing left aside


def test_a_failed_forced_build_keeps_the_old_target(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "fails.def"
    deffile.write_text(f"Bootstrap: oci\nFrom: {busybox_image.layout}\n\n%post\n    exit 3\n")
    (tmp_path / "keep/sub").mkdir(parents=True)
    proc = run_cli("build", "-F", str(tmp_path / "keep"), str(deffile), check=False)
    assert proc.returncode == 255 and proc.stderr.splitlines()[-1].startswith("FATAL:   ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fails.def", "keep"]
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["sub"]


def test_shell_ignores_its_parameters_with_apptainers_warning(sif: Path) -> None:
    """``shell IMG -c CMD`` is not ``exec``: Apptainer warns and starts the interactive shell."""
    proc = run_cli("shell", str(sif), "-c", "echo not run", check=False, input="echo in shell $#; exit 3\n")
    assert (proc.returncode, proc.stdout) == (3, "in shell 0\n")
    assert proc.stderr == "WARNING: Parameters to shell command are ignored\n"


def test_pull_with_three_words_is_a_usage_error() -> None:
    proc = run_cli("pull", "docker://busybox", "a.sif", "b.sif", check=False)  # the last is no URI
    assert (proc.returncode, proc.stderr) == (2, "FATAL:   pull takes at most two arguments: [OUTPUT] URI\n")


def test_cache_clean_without_an_answer_fails_as_apptainer_does() -> None:
    proc = run_cli("cache", "clean", check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255
    assert proc.stdout.endswith("Do you want to continue? [y/N] ")
    eof = "could not prompt user: could not read user's input: EOF"
    assert proc.stderr == f"FATAL:   Handle clean failed: {eof}\n"


def test_verbose_lines_are_apptainers_verbose_level(sif: Path, tmp_path: Path) -> None:
    proc = run_cli("-v", "build", str(tmp_path / "copy.sif"), str(sif))
    lines = proc.stderr.splitlines()
    assert any(line.startswith("VERBOSE: ") for line in lines), lines
    # INFO: is left to the lines Apptainer prints at its default level
    quiet = run_cli("build", str(tmp_path / "again.sif"), str(sif)).stderr.replace("again.sif", "copy.sif")
    assert [line for line in lines if line.startswith("INFO:")] == quiet.splitlines()


def test_global_flags_combine_and_have_apptainers_variables(sif: Path, tmp_path: Path) -> None:
    """``--nocolor`` is accepted; ``-q -v`` is -v (the most verbose wins); APPTAINER_QUIET/SILENT/
    VERBOSE act as the flags; the global -v is not ``cache list -v``."""
    assert run_cli("--nocolor", "version").stdout == run_cli("version").stdout
    both = run_cli("-s", "-q", "-v", "build", str(tmp_path / "a.sif"), str(sif)).stderr
    assert "INFO:    Build complete: " in both and "VERBOSE: " in both
    # (Apptainer names the legacy variable before it silences anything: that line stays)
    legacy = "INFO:    Environment variable SINGULARITY_SILENT is set, but APPTAINER_SILENT is preferred\n"
    for variable, said in (("APPTAINER_QUIET", ""), ("SINGULARITY_SILENT", legacy)):
        quiet = run_cli("build", "-F", str(tmp_path / "a.sif"), str(sif), env={variable: "1"})
        assert (quiet.stdout, quiet.stderr) == ("", said), variable
        exe = peer_apptainer()
        if exe is not None and str(sif).startswith("/tmp/"):
            cmd = [exe, "build", "-F", str(tmp_path / "p.sif"), str(sif)]
            theirs = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, variable: "1"})
            assert (theirs.returncode, theirs.stdout, theirs.stderr) == (0, "", said), variable
    loud = run_cli("build", "-F", str(tmp_path / "a.sif"), str(sif), env={"APPTAINER_VERBOSE": "true"})
    assert "VERBOSE: " in loud.stderr
    summary = run_cli("cache", "list").stdout
    assert run_cli("-v", "cache", "list").stdout == summary and summary.startswith("There are ")
    assert run_cli("cache", "list", "-v").stdout.startswith("NAME ")


def test_a_double_dash_after_the_image_is_the_containers(sif: Path) -> None:
    """As Apptainer: `--` before the image ends the options; after it, it is a word of the command."""
    assert run_cli("exec", "--", str(sif), "echo", "hi").stdout == "hi\n"
    assert run_cli("exec", str(sif), "echo", "--", "hi").stdout == "-- hi\n"
    proc = run_cli("exec", str(sif), "--", "echo", "hi", check=False)
    assert (proc.returncode, proc.stdout) == (255, "")
    assert proc.stderr == 'FATAL:   "--": executable file not found in $PATH\n'
    exe = peer_apptainer()
    if exe is not None and str(sif).startswith("/tmp/"):
        theirs = subprocess.run([exe, "exec", str(sif), "--", "echo", "hi"], capture_output=True, text=True)
        # (it also warns that this image has no /etc/passwd and /etc/group)
        assert (theirs.returncode, theirs.stdout) == (255, "")
        assert theirs.stderr.splitlines()[-1] == proc.stderr.strip()


def test_unreadable_images_are_named_as_apptainer_names_them(unpriv_user: TestUser, sif: Path) -> None:
    """inspect/run-help of a SIF or sandbox the user cannot read: Apptainer's FATAL line, not an
    empty (rc 0) report for the sandbox."""
    work = Path(tempfile.mkdtemp(prefix="hpcsif-day-one-", dir="/tmp"))
    try:
        work.chmod(0o755)
        shutil.copy(sif, work / "locked.sif")
        (work / "locked.sif").chmod(0o000)
        (work / "locked").mkdir(mode=0o700)
        for image, command in [("locked.sif", "inspect"), ("locked", "inspect"), ("locked", "run-help")]:
            proc = unpriv_user.run(
                [USER_PYTHON, "-m", "hpcsif.cli.main", command, image],
                env={"PYTHONPATH": str(ROOT)},
                cwd=work,
            )
            assert (proc.returncode, proc.stdout) == (255, ""), (image, command)
            assert proc.stderr == (
                f"FATAL:   Failed to open image {image}: {work / image} is not readable by the current user, "
                "check permissions\n"
            )
    finally:
        shutil.rmtree(work)


def test_sif_alone_prints_its_help() -> None:
    proc = run_cli("sif")
    assert proc.stdout == run_cli("sif", "--help").stdout and proc.stdout.startswith("usage: hpcsif sif")


def test_pull_sandbox_goes_through_the_sif_cache_as_apptainers(
    busybox_image: TestImage, tmp_path: Path
) -> None:
    """``pull --sandbox`` converts to a cached SIF, then unpacks it, saying both builds' steps."""
    ref = f"oci://{busybox_image.layout}"
    local = [
        "INFO:    Starting build...",
        "INFO:    Extracting local image...",
        "INFO:    Creating sandbox directory...",
    ]
    cold = run_cli("pull", "--sandbox", str(tmp_path / "a"), ref)
    assert cold.stderr.splitlines() == [
        *CONVERSION_INFO,
        *local,
        f"INFO:    Build complete: {tmp_path / 'a'}",
    ]
    warm = run_cli("pull", "--sandbox", str(tmp_path / "b"), ref)
    assert warm.stderr.splitlines() == [
        "INFO:    Using cached SIF image",
        *local,
        f"INFO:    Build complete: {tmp_path / 'b'}",
    ]
    uncached = run_cli("pull", "--disable-cache", "--sandbox", str(tmp_path / "c"), ref)
    assert uncached.stderr.splitlines() == cold.stderr.replace(f"{tmp_path}/a", f"{tmp_path}/c").splitlines()
    for box in "abc":
        assert (tmp_path / box / "bin/busybox").read_bytes() == busybox_image.files["bin/busybox"]
        assert (tmp_path / box / ".singularity.d/runscript").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # nothing left aside
    exe = peer_apptainer()
    if exe is not None and str(tmp_path).startswith("/tmp/"):  # every line ours prints, Apptainer prints
        env = {**os.environ, "APPTAINER_CACHEDIR": str(tmp_path / "peer-cache")}
        for mine in (cold, warm):
            theirs = subprocess.run(
                [exe, "pull", "-F", "--sandbox", str(tmp_path / "a"), ref],
                capture_output=True,
                text=True,
                env=env,
            )
            assert theirs.returncode == 0, theirs.stderr
            said = mine.stderr.replace(f"{tmp_path}/b", f"{tmp_path}/a")
            assert set(said.splitlines()) <= set(theirs.stderr.splitlines())


def test_an_unusable_cache_is_disabled_with_apptainers_warning(
    busybox_image: TestImage, tmp_path: Path
) -> None:
    """As Apptainer: pull, build and exec of a URI go on with a throw-away cache, after one warning
    (a cache directory that cannot be created, as here, or written)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"HPCSIF_CACHEDIR": str(blocker / "cache")}
    warning = f"WARNING: Cache disabled - cannot create cache directory {blocker / 'cache'}: "
    ref = f"oci://{busybox_image.layout}"
    pull = run_cli("pull", str(tmp_path / "a.sif"), ref, env=env).stderr.splitlines()
    assert pull[0].startswith(warning) and pull[1:] == CONVERSION_INFO, pull
    build = run_cli("build", str(tmp_path / "b.sif"), ref, env=env)
    assert build.stderr.startswith(warning) and "Traceback" not in build.stderr
    run = run_cli("exec", ref, "cat", "/etc/hello.txt", env=env)
    said = run.stderr.splitlines()
    assert (
        run.stdout == "hello from the etc layer\n"
        and said[0].startswith(warning)
        and said[1:] == CONVERSION_INFO
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sif", "b.sif", "file"]


def test_the_offline_demo_runs_and_says_what_the_cache_did(tmp_path: Path) -> None:
    """``make demo`` (``python -m hpcsif.demo``), twice: the second demo finds the image converted."""
    for first in ("cold cache: converts once: exit 0", "warm cache: converted by an earlier run: exit 0"):
        proc = subprocess.run(
            [sys.executable, "-m", "hpcsif.demo"],
            capture_output=True,
            text=True,
            env={**os.environ, "HPCSIF_DEMO_DIR": str(tmp_path)},
            cwd=ROOT,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"== {first} in " in proc.stdout and "== warm cache: no conversion: exit 0 in " in proc.stdout
        assert proc.stdout.count("Hello from the hpcsif demo container!\n") == 2
        assert "  arguments: arg one arg two\n" in proc.stdout


def _on_a_terminal(*args: str, answer: str | None = None) -> tuple[int, list[str]]:
    """``hpcsif ARGS`` with a terminal as stdin, stdout and stderr; ``answer`` is typed once it
    asks ``[y/N]``. Returns the exit status and the lines it wrote."""
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # a pty holds a few KiB: read while the command writes
        asked = answer is None
        with contextlib.suppress(OSError):
            while data := os.read(master, 65536):
                chunks.append(data)
                if not asked and b"[y/N] " in b"".join(chunks):
                    os.write(master, f"{answer}\n".encode())
                    asked = True

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        cmd = [sys.executable, "-m", "hpcsif.cli.main", *args]
        proc = subprocess.run(cmd, stdin=slave, stdout=slave, stderr=slave, timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode().replace("\r\n", "\n").split("\n")


def test_the_progress_bar_on_a_terminal_ends_once(tmp_path: Path) -> None:
    """On a terminal, a conversion's bar ends with one line (it was written again, on a new line,
    for every tar member read after the last compressed byte: hundreds of lines for busybox)."""
    # one gzip layer of many small members, as busybox images are (`busybox --install -s`)
    entries = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox_binary().read_bytes(), 0o755)]
    entries += [Entry(f"bin/applet{i}", symlink="busybox") for i in range(300)]
    write_oci_layout(tmp_path / "layout", ImageSpec([layer_tar(entries)], cmd=["sh"]))
    rc, lines = _on_a_terminal("build", str(tmp_path / "a.sif"), f"oci://{tmp_path / 'layout'}")
    assert rc == 0, lines
    bars = [line for line in lines if "layers   [" in line]
    assert len(bars) == 1 and bars[0].endswith("\x1b[K"), lines
    assert lines[-2] == f"INFO:    Build complete: {tmp_path / 'a.sif'}"


def test_build_asks_on_a_terminal_before_overwriting(sif: Path, tmp_path: Path) -> None:
    """As Apptainer: on a terminal, an existing target is a question (its words depend on whether
    the file is an image), not a refusal; anything but y/yes keeps it."""
    target = tmp_path / "t.sif"
    text = "Build target 't.sif' may be a definition file or a text/binary file that will be overwritten. "
    image = "Build target 't.sif' already exists and will be deleted during the build process. "
    for before, question, answer, fatal in [
        (b"text", text + "Do you still want to overwrite it? [y/N] ", "n", "stopping build"),
        (b"text", text + "Do you still want to overwrite it? [y/N] ", "", "stopping build"),
        (
            sif.read_bytes(),
            image + "Do you want to continue? [y/N] ",
            "maybe",
            'while reading the input: invalid answer: "maybe"',
        ),
        (sif.read_bytes(), image + "Do you want to continue? [y/N] ", "Yes", None),
    ]:
        target.write_bytes(before)
        rc, lines = _on_a_terminal("build", str(target), str(sif), answer=answer)
        assert lines[0] == question + answer, lines
        if fatal:
            assert (rc, lines[1:]) == (255, [f"FATAL:   While checking build target: {fatal}", ""])
            assert target.read_bytes() == before
        else:
            assert rc == 0 and lines[-2] == f"INFO:    Build complete: {target}", lines
            assert target.read_bytes() != before


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello\n", "image format not recognized (only 6 bytes, a SIF header has 128)"),
        (b"x" * 4096, "image format not recognized (bad magic)"),
    ],
)
def test_inspect_of_a_file_that_is_no_image_says_so_as_apptainer(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    """Apptainer's ``Failed to open image X: image format not recognized``, with what is wrong."""
    (tmp_path / "t.sif").write_bytes(content)
    for command in ("inspect", "run-help"):
        proc = run_cli(command, "t.sif", check=False, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
        assert (proc.returncode, proc.stdout) == (255, "")
        assert proc.stderr == f"FATAL:   Failed to open image t.sif: {reason}\n"


def test_inspect_of_a_dangling_or_looping_link_names_it(tmp_path: Path) -> None:
    """Not "not readable by the current user" (what a dangling link was called)."""
    (tmp_path / "l.sif").symlink_to("nowhere")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for image, reason in [
        ("l.sif", "no such file or directory (a symbolic link to 'nowhere')"),
        ("a", "too many levels of symbolic links"),
    ]:
        proc = run_cli("inspect", image, check=False, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
        assert (proc.returncode, proc.stderr) == (255, f"FATAL:   Failed to open image {image}: {reason}\n")


def test_a_configuration_file_named_with_c_must_exist(tmp_path: Path) -> None:
    """``hpcsif -c FILE`` with a mistyped FILE fails (as Apptainer's -c), instead of going on
    with the defaults."""
    for path, why in [(tmp_path / "nope.toml", "no such file"), (tmp_path, "not a file")]:
        proc = run_cli("-c", str(path), "version", check=False)
        assert (proc.returncode, proc.stdout) == (255, "")
        assert proc.stderr == f"FATAL:   couldn't read configuration file {path}: {why}\n"
    (tmp_path / "ok.toml").write_text('[convert]\ncompression = "gzip"\n')
    assert run_cli("-c", str(tmp_path / "ok.toml"), "version").returncode == 0


def test_inspect_keeps_the_bytes_of_files_that_are_not_utf8(tmp_path: Path) -> None:
    """As Apptainer: text output gives a runscript's bytes as they are (less NULs, which its shell
    drops); JSON escapes each invalid byte as \\ufffd; labels.json decodes each one to U+FFFD."""
    box = tmp_path / "box"
    (box / ".singularity.d/env").mkdir(parents=True)
    runscript = b"#!/bin/sh\necho \xff\xfe caf\xc3\xa9 \x00nul\n\n"
    (box / ".singularity.d/runscript").write_bytes(runscript)
    (box / ".singularity.d/env/90-environment.sh").write_bytes(b'export X="\xc3\x28"\n')
    (box / ".singularity.d/labels.json").write_bytes(b'{"k": "v\xe4\xbdA"}')

    def inspect(*flags: str) -> bytes:
        cmd = [sys.executable, "-m", "hpcsif.cli.main", "inspect", *flags, str(box)]
        return subprocess.run(cmd, capture_output=True, check=True).stdout

    assert inspect("-r") == b"#!/bin/sh\necho \xff\xfe caf\xc3\xa9 nul\n"
    assert inspect("-e") == b'=== /.singularity.d/env/90-environment.sh ===\nexport X="\xc3\x28"\n\n'
    assert inspect("-l") == "k: v\ufffd\ufffdA\n".encode()  # one U+FFFD per byte, as Go's decoder
    assert b'"runscript": "#!/bin/sh\\necho \\ufffd\\ufffd caf\xc3\xa9 nul"' in inspect("--all")
    exe = peer_apptainer()
    if exe is not None and str(box).startswith("/tmp/"):
        for flags in (["-r"], ["-e"], ["-l"], ["--all"], ["--json"]):
            theirs = subprocess.run([exe, "inspect", *flags, str(box)], capture_output=True, check=True)
            assert inspect(*flags) == theirs.stdout, flags
