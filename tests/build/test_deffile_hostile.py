"""Hostile and unusual definition files through ``hpcsif build``.

Each case pins what a user sees: one ``FATAL:`` line naming the problem (file:line where
there is one), a non-zero exit, no output left and nothing written outside the build tree on
the host; or, where Apptainer 1.4.5 builds the file, the same image content (measured with
the peer: a form feed or a lone CR inside a script is no line break, bytes that are not
UTF-8 become U+FFFD in labels).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import error_lines, run_cli
from tests.services.images import TestImage
from tests.services.users import USER_PYTHON, TestUser

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(busybox_image: TestImage) -> Iterator[Path]:
    """A busybox SIF to bootstrap from, where the unprivileged user can read it (not under
    pytest's own directory, which each pytest run makes root's alone again)."""
    with tempfile.TemporaryDirectory(prefix="hpcsif-hostile-base-") as d:
        os.chmod(d, 0o755)
        sif = Path(d) / "base.sif"
        run_cli("build", str(sif), f"oci://{busybox_image.layout}:latest")
        yield sif


def header(base: Path) -> str:
    """The header of a definition built from ``base``."""
    return f"Bootstrap: localimage\nFrom: {base}\n"


def fails(deffile: Path, dest: Path, *extra: str, status: int = 255) -> str:
    """Build ``deffile``; assert one FATAL line, ``status``, nothing at ``dest``; return the line."""
    proc = run_cli("build", *extra, str(dest), str(deffile), check=False, timeout=60)
    lines = error_lines(proc.stderr)
    assert proc.returncode == status, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("FATAL:   "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".hpcsif-build-")]
    return lines[0]


def test_form_feed_and_lone_cr_stay_in_their_line(base: Path, tmp_path: Path) -> None:
    """Only ``\\n`` ends a line (Apptainer): a form feed or CR in a script is kept as written."""
    deffile = tmp_path / "ff.def"
    deffile.write_bytes(header(base).encode() + b"%runscript\n  echo 'x\x0cy\rz'\n%labels\n  k a\x0cb\n")
    sif = tmp_path / "ff.sif"
    run_cli("build", str(sif), str(deffile))
    cmd = [sys.executable, "-m", "hpcsif.cli.main", "inspect", "-r", str(sif)]
    script = subprocess.run(cmd, capture_output=True, check=True).stdout  # bytes: text mode reads CR as EOL
    assert b"\n  echo 'x\x0cy\rz'\n" in script
    assert "k: a\x0cb\n" in run_cli("inspect", "-l", str(sif)).stdout


def test_definition_not_utf8_keeps_its_bytes_in_scripts(base: Path, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (Latin-1 text) do not make the file an image; as in Apptainer
    1.4.5, scripts, files and the kept definition have them unchanged, and only the JSON
    metadata (labels, inspect) has U+FFFD in their place."""
    deffile = tmp_path / "latin1.def"
    body = (
        b'%post\n  echo "caf\xe9 post" > /post.txt\n%runscript\n  echo "caf\xe9 run"\n'
        b'%environment\n  export GREET="caf\xe9 env"\n%labels\n  a \xff\xfe\n%help\n  caf\xe9 help\n'
    )
    deffile.write_bytes(header(base).encode() + body)
    sif = tmp_path / "latin1.sif"
    run_cli("build", str(sif), str(deffile), errors="surrogateescape")  # %post's trace has them
    assert "a: \ufffd\ufffd\n" in run_cli("inspect", "-l", str(sif)).stdout

    def out(*args: str) -> bytes:
        cmd = [sys.executable, "-m", "hpcsif.cli.main", *args]
        return subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout

    script = 'cat /post.txt /.singularity.d/runscript.help; printf "%s\\n" "$GREET"'
    assert out("exec", str(sif), "sh", "-c", script) == b"caf\xe9 post\n  caf\xe9 help\n\ncaf\xe9 env\n"
    assert out("run", str(sif)) == b"caf\xe9 run\n"
    assert out("sif", "dump", "1", str(sif)) == header(base).encode() + body
    assert out("inspect", "-H", str(sif)) == "  caf\ufffd help\n".encode()


def test_lone_cr_line_endings_one_readable_line(base: Path, tmp_path: Path) -> None:
    """A file with CR line endings is one line, as Apptainer reads it; the error shows the CRs."""
    deffile = tmp_path / "cr.def"
    deffile.write_bytes(header(base).replace("\n", "\r").encode())
    line = fails(deffile, tmp_path / "cr.sif")
    assert line.startswith(f"FATAL:   {deffile}:1: invalid build source 'localimage\\rfrom: ")
    assert "\r" not in line


def test_empty_bootstrap(tmp_path: Path) -> None:
    deffile = tmp_path / "empty.def"
    deffile.write_text("Bootstrap:\nFrom: x\n")
    assert f"{deffile}:1: 'Bootstrap:' names no build source" in fails(deffile, tmp_path / "e.sif")


def test_huge_inputs_are_refused_at_once(base: Path, tmp_path: Path) -> None:
    """A definition over 4 MiB (Apptainer refuses sections over 64 KiB), or an endless
    ``--build-arg-file``, is one FATAL line, not gigabytes of memory."""
    deffile = tmp_path / "big.def"
    deffile.write_text(header(base) + "%help\n" + ("  " + "v" * 97 + "\n") * 50_000)
    line = fails(deffile, tmp_path / "big.sif")
    assert line == f"FATAL:   definition file {deffile} is larger than 4 MiB, the most hpcsif reads"
    small = tmp_path / "small.def"
    small.write_text(header(base))
    line = fails(small, tmp_path / "s.sif", "--build-arg-file", "/dev/zero", status=2)
    assert line == "FATAL:   --build-arg-file /dev/zero: larger than 4 MiB"


def test_too_many_stages_are_refused_before_any_is_built(tmp_path: Path) -> None:
    """Apptainer builds every stage in full, 2,000 empty ones in 106 s: 70,000 (4 MiB) would
    take hours. hpcsif builds at most 1,000 and says so at once."""
    deffile = tmp_path / "stages.def"
    deffile.write_text("".join(f"Bootstrap: scratch\nStage: s{i}\n\n" for i in range(70_000)))
    line = fails(deffile, tmp_path / "s.sif")
    assert line == f"FATAL:   {deffile}: 70000 stages, more than the 1000 hpcsif builds"


def test_build_arg_file_not_utf8(base: Path, tmp_path: Path) -> None:
    """Lines that are no KEY=VALUE (binary ones too) are skipped with a warning, as Apptainer does;
    a Latin-1 value reaches the script as the same bytes (JSON labels get U+FFFD)."""
    deffile = tmp_path / "args.def"
    deffile.write_text(header(base) + '%labels\n  a {{ X }}\n%runscript\n  echo "{{ X }}"\n')
    args = tmp_path / "args"
    args.write_bytes(b"\x00\xff\nX=v\xe9\n")
    sif = tmp_path / "args.sif"
    proc = run_cli("build", "--build-arg-file", str(args), str(sif), str(deffile))
    assert (
        'WARNING: Skipping "\\x00\\xff" in build arg file: "\\x00\\xff" is not a key=value pair'
        in proc.stderr
    )
    assert "a: v\ufffd\n" in run_cli("inspect", "-l", str(sif)).stdout
    cmd = [sys.executable, "-m", "hpcsif.cli.main", "run", str(sif)]
    assert subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout == b"v\xe9\n"


@pytest.mark.parametrize("sandbox", [False, True])
def test_files_never_write_through_a_symlink_to_the_host(base: Path, tmp_path: Path, sandbox: bool) -> None:
    """A symlink in the tree (from the base image, or %setup) where a copied file lands is
    replaced; Apptainer's ``cp -fLr`` writes through it into the host file it names."""
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("payload\n")
    deffile = tmp_path / "sym.def"
    deffile.write_text(
        header(base) + f"%setup\n  mkdir -p $APPTAINER_ROOTFS/opt/src\n"
        f"  ln -s {victim} $APPTAINER_ROOTFS/opt/src/file\n%files\n  {src} /opt\n"
    )
    dest = tmp_path / "sym.out"
    run_cli("build", *(["--sandbox"] if sandbox else []), str(dest), str(deffile))
    assert victim.read_text() == "host file\n"
    out = run_cli("exec", str(dest), "cat", "/opt/src/file").stdout
    assert out == "payload\n"


def test_files_glob_failures_are_one_line(base: Path, tmp_path: Path) -> None:
    """cp's complaint about each of several sources stays on the one FATAL line."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "loop1").symlink_to("loop2")
    (ctx / "loop2").symlink_to("loop1")
    deffile = tmp_path / "glob.def"
    deffile.write_text(header(base) + f"%files\n  {ctx}/* /all/\n")
    line = fails(deffile, tmp_path / "glob.sif")
    assert line.startswith(f"FATAL:   {deffile}:4: copying {ctx}/*: cp: cannot stat")
    assert "loop1" in line and "loop2" in line


def test_unbalanced_quote_in_section_arguments(base: Path, tmp_path: Path) -> None:
    deffile = tmp_path / "quote.def"
    deffile.write_text(header(base) + "%runscript -c '/bin/sh\n  echo hi\n")
    line = fails(deffile, tmp_path / "q.sif")
    assert line == f"""FATAL:   {deffile}:3: bad %runscript arguments "-c '/bin/sh": No closing quotation"""


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../../x"])
def test_app_names_cannot_leave_scif_apps(base: Path, tmp_path: Path, name: str) -> None:
    deffile = tmp_path / "app.def"
    deffile.write_text(header(base) + f"%apprun {name}\n  echo hi\n")
    assert f"{deffile}:3: %apprun needs an app name" in fails(deffile, tmp_path / "app.sif")


def test_stage_trees_go_once_no_later_stage_needs_them(base: Path, tmp_path: Path) -> None:
    """Only the stages a later ``%files from`` names are kept while later ones build
    (1000 stages would otherwise hold 1000 trees on disk)."""
    seen = tmp_path / "seen"
    stage = header(base) + "Stage: {}\n"
    deffile = tmp_path / "stages.def"
    deffile.write_text(
        stage.format("a")
        + stage.format("b")
        + stage.format("c")
        + f'%setup\n  ls "$APPTAINER_ROOTFS/.." > {seen}\n%files from a\n  /bin/sh /sh-from-a\n'
    )
    run_cli("build", str(tmp_path / "stages.sif"), str(deffile))
    assert [n for n in seen.read_text().split() if n.startswith("stage")] == ["stage0", "stage2"]


def test_post_daemon_does_not_outlive_the_build(base: Path, tmp_path: Path) -> None:
    """A daemon %post starts (even in its own session) is gone when the build ends."""
    deffile = tmp_path / "daemon.def"
    deffile.write_text(header(base) + "%post\n  (setsid sleep 4242 </dev/null >/dev/null 2>&1 &)\n")
    run_cli("build", str(tmp_path / "d.sif"), str(deffile), timeout=60)
    procs = subprocess.run(["pgrep", "-f", "sleep 4242"], capture_output=True, text=True)
    assert procs.stdout == ""


@pytest.mark.parametrize("sandbox", [False, True])
def test_unprivileged_build_hostile_files(base: Path, unpriv_user: TestUser, sandbox: bool) -> None:
    """As a plain user: a symlink to a file the user owns outside the tree is not written
    through, a bad app name is one FATAL line, and no build directory is left."""
    with tempfile.TemporaryDirectory(prefix="hpcsif-hostile-") as d:
        work = Path(d)
        os.chown(work, unpriv_user.uid, unpriv_user.gid)
        victim = work / "victim"
        victim.write_text("mine\n")
        os.chown(victim, unpriv_user.uid, unpriv_user.gid)
        (work / "file").write_text("payload\n")
        good, bad = work / "good.def", work / "bad.def"
        good.write_text(
            header(base) + f"%setup\n  mkdir -p $APPTAINER_ROOTFS/opt\n"
            f"  ln -s {victim} $APPTAINER_ROOTFS/opt/file\n%files\n  {work}/file /opt/file\n"
        )
        bad.write_text(header(base) + "%apprun ..\n  echo hi\n")
        env = {"PYTHONPATH": str(ROOT), "HPCSIF_CACHEDIR": str(work / "cache")}
        flag = ["--sandbox"] if sandbox else []
        for deffile, status in ((good, 0), (bad, 255)):
            dest = work / f"out-{deffile.stem}"
            cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "build", *flag, str(dest), str(deffile)]
            proc = unpriv_user.run(cmd, env=env, cwd=work, timeout=60)
            assert proc.returncode == status, proc.stderr
            assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        assert len(error_lines(proc.stderr)) == 1 and not dest.exists(), proc.stderr
        assert victim.read_text() == "mine\n"
        assert not [p for p in work.iterdir() if p.name.startswith(".hpcsif-")]


def test_files_from_stage_keep_symlinks(base: Path, tmp_path: Path) -> None:
    """Symlinks inside a tree copied from a stage stay symlinks, as Apptainer copies them:
    followed on the host, ``/stuff/link -> /SECRET`` in a base image copied the host's file."""
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    deffile = tmp_path / "from.def"
    deffile.write_text(
        header(base) + "Stage: a\n%setup\n  mkdir -p $APPTAINER_ROOTFS/stuff\n"
        f"  ln -s {secret} $APPTAINER_ROOTFS/stuff/link\n" + header(base) + "%files from a\n  /stuff /stuff\n"
    )
    sif = tmp_path / "from.sif"
    run_cli("build", str(sif), str(deffile))
    listing = run_cli("exec", "--no-mount", "tmp", str(sif), "ls", "-l", "/stuff/link").stdout
    assert listing.startswith("l") and listing.rstrip().endswith(f"-> {secret}")


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("Stage: a\0b\n", 3, "header line 'Stage: a\\x00b' contains a NUL byte"),
        ("%files\n  /etc/hostname\0x /a\n", 4, "bad %files line '/etc/hostname\\x00x /a': a path cannot"),
        ("%post -c /bin/sh\0x\n  true\n", 3, "bad %post arguments '-c /bin/sh\\x00x': a NUL byte"),
    ],
)
def test_nul_bytes_in_paths_and_arguments(
    base: Path, tmp_path: Path, body: str, line: int, message: str
) -> None:
    """A NUL in a header, a %files path or a section's interpreter is one FATAL line naming it
    (a NUL elsewhere, as in a label, is kept as Apptainer keeps it)."""
    deffile = tmp_path / "nul.def"
    deffile.write_text(header(base) + body)
    assert fails(deffile, tmp_path / "nul.sif").startswith(f"FATAL:   {deffile}:{line}: {message}")


def test_doubled_percent_starts_the_section(base: Path, tmp_path: Path) -> None:
    """``%%labels`` is ``%labels`` to Apptainer 1.4 too (it strips every leading ``%``)."""
    deffile = tmp_path / "pct.def"
    deffile.write_text(header(base) + "%%arguments\n  V=1\n%%labels\n  a {{ V }}\n")
    sif = tmp_path / "pct.sif"
    run_cli("build", str(sif), str(deffile))
    assert "a: 1\n" in run_cli("inspect", "-l", str(sif)).stdout


@pytest.mark.parametrize("sandbox", [False, True])
def test_files_dot_where_the_image_is_written(base: Path, tmp_path: Path, sandbox: bool) -> None:
    """``%files . /app`` run in the directory the image goes to builds, as with Apptainer
    (the build tree was next to the output, so cp refused to copy '.' into itself)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('hi')\n")
    (project / "app.def").write_text(header(base) + "%files\n  . /app\n")
    flag = ["--sandbox"] if sandbox else []
    run_cli("build", *flag, "out", "app.def", cwd=project)
    listing = run_cli("exec", str(project / "out"), "ls", "/app").stdout.split()
    assert listing == ["app.def", "main.py"]
    assert sorted(p.name for p in project.iterdir()) == ["app.def", "main.py", "out"]


@pytest.mark.parametrize("make", ["mkfifo", "mknod"])
def test_post_leaves_a_fifo_or_device_where_metadata_is_read(base: Path, tmp_path: Path, make: str) -> None:
    """Read back from the tree, a FIFO blocked the build for ever and /dev/zero ate the memory."""
    deffile = tmp_path / "special.def"
    labels = "/.singularity.d/labels.json"
    made = f"{make} {labels}" + (" c 1 5" if make == "mknod" else "")  # /dev/zero
    deffile.write_text(header(base) + f"%post\n  rm -f {labels}\n  {made}\n%labels\n  a b\n")
    sif = tmp_path / "special.sif"
    run_cli("build", str(sif), str(deffile), timeout=60)
    assert "a: b\n" in run_cli("inspect", "-l", str(sif)).stdout


def test_build_script_never_written_through_a_symlink(base: Path, tmp_path: Path) -> None:
    """The script hpcsif puts in the tree for %post is a new file: a symlink the image has at
    that name (to a host file) is not followed on the host."""
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    deffile = tmp_path / "script.def"
    deffile.write_text(
        header(base) + f"%setup\n  ln -s {victim} $APPTAINER_ROOTFS/.hpcsif-build-script\n"
        "%post\n  echo in-post\n"
    )
    proc = run_cli("build", str(tmp_path / "script.sif"), str(deffile))
    assert "in-post" in proc.stdout + proc.stderr
    assert victim.read_text() == "host file\n"


def test_files_source_named_like_an_option(base: Path, tmp_path: Path) -> None:
    """A %files source called ``-s`` is a file to copy, not an option of cp (a symlink maker)."""
    (tmp_path / "-s").write_text("plain\n")
    (tmp_path / "dash.def").write_text(header(base) + "%files\n  -s /dash\n")
    run_cli("build", "dash.sif", "dash.def", cwd=tmp_path)
    assert run_cli("exec", str(tmp_path / "dash.sif"), "cat", "/dash").stdout == "plain\n"


def test_many_repeated_sections_parse_in_linear_time(base: Path, tmp_path: Path) -> None:
    """280,000 repeated ``%labels`` sections (within the 4 MiB cap) are concatenated, as
    Apptainer does, in well under a second (joining them one by one took 16 s)."""
    deffile = tmp_path / "many.def"
    deffile.write_text(header(base) + "%labels\n a b\n" * 280_000)
    sif = tmp_path / "many.sif"
    run_cli("build", str(sif), str(deffile), timeout=10)
    assert "a: b\n" in run_cli("inspect", "-l", str(sif)).stdout


def test_files_from_the_stage_itself(base: Path, tmp_path: Path) -> None:
    """``%files from a`` in stage ``a`` copies within its own tree, as Apptainer 1.4 does."""
    deffile = tmp_path / "self.def"
    deffile.write_text(header(base) + "Stage: a\n%files from a\n  /bin/busybox /copied\n")
    sif = tmp_path / "self.sif"
    run_cli("build", str(sif), str(deffile))
    same = "cmp /bin/busybox /copied && echo same"
    assert run_cli("exec", str(sif), "sh", "-c", same).stdout == "same\n"


def test_byte_order_mark_is_not_part_of_the_header(base: Path, tmp_path: Path) -> None:
    """A file a Windows editor saved with a BOM builds (Apptainer 1.4 fails on the key
    '\\ufeffbootstrap'); the stored definition starts at 'Bootstrap:'."""
    deffile = tmp_path / "bom.def"
    deffile.write_bytes(b"\xef\xbb\xbf" + header(base).encode())
    sif = tmp_path / "bom.sif"
    run_cli("build", str(sif), str(deffile))
    assert run_cli("inspect", "-d", str(sif)).stdout.startswith("Bootstrap: localimage\n")
