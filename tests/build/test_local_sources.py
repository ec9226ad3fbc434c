"""``hpcsif build`` from local image files and sandboxes, as Apptainer 1.4 builds from them.

* a bare squashfs file, a bare ext3 image file and a SIF whose primary partition is ext3
  (``build new.sif img.sqfs``, ``build --sandbox dir img.ext3``, ``Bootstrap: localimage``);
* a SIF's ext3 overlay partition is left out of a build, as Apptainer leaves it out;
* a build from a local image records it (``/.singularity.d/Singularity``, the old def file in
  ``bootstrap_history``, the build labels) in a sandbox as in a SIF;
* a sandbox is copied with owners, hard links and FIFOs;
* bad image files, and a sandbox with files its user cannot read: one FATAL line, nothing written.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer, run_cli
from tests.services.users import USER_PYTHON, TestUser

pytestmark = pytest.mark.slow

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
OLD_DEF = "bootstrap: docker\nfrom: busybox\n"
#: a local-image build's steps, as Apptainer says them (no "Verifying" for a bare file system)
STEPS = ["INFO:    Starting build...", "INFO:    Extracting local image..."]


def _fatal(proc: subprocess.CompletedProcess) -> str:
    """The one FATAL line of a failed run (and nothing else on stderr)."""
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:")]
    assert len(lines) == 1 and lines[0].startswith("FATAL:   "), proc.stderr
    return lines[0].removeprefix("FATAL:   ")


def _tree(root: Path) -> Path:
    """A small image tree: busybox, an image def file and labels, a file of uid 1000 that only
    its owner and group read, a hard-linked pair, a FIFO and a symlink out of the tree."""
    for d in ("bin", ".singularity.d/env", "opt/data", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    for tool in ("sh", "cat", "ls"):
        (root / "bin" / tool).symlink_to("busybox")
    sd = root / ".singularity.d"
    (sd / "Singularity").write_text(OLD_DEF)
    (sd / "labels.json").write_text('{\n\t"org.example.kept": "yes"\n}')
    (sd / "runscript").write_text("#!/bin/sh\necho runscript\n")
    (sd / "runscript").chmod(0o755)
    (sd / "env/90-environment.sh").write_text("#!/bin/sh\nexport FROM_TREE=1\n")
    (sd / "env/90-environment.sh").chmod(0o755)
    private = root / "opt/data/private"
    private.write_text("secret\n")
    private.chmod(0o640)
    os.chown(private, 1000, 1000)
    (root / "opt/data/one").write_text("linked\n")
    os.link(root / "opt/data/one", root / "opt/data/two")
    os.mkfifo(root / "opt/data/fifo")
    (root / "opt/data/out").symlink_to("/etc/passwd")
    (root / "etc/marker").write_text("from the tree\n")
    return root


def _listing(root: Path) -> dict[str, tuple]:
    """What a user sees of each entry: type and mode, owner, link count, link target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink if p.is_file() else 0)
            if p.is_symlink():
                out[rel] += (os.readlink(p),)
    return out


#: what a build from a local image changes or adds (the record of where it came from)
RENEWED = {".singularity.d/Singularity", ".singularity.d/labels.json", ".singularity.d/bootstrap_history"}


#: Apptainer's base environment, which a build adds where the image has nothing
BASE = {".exec", ".singularity.d/actions", ".singularity.d/actions/run", ".singularity.d/startscript", "proc"}


def _same_tree(source: Path, built: Path) -> None:
    """*built* has *source*'s entries as they are, and the base environment besides."""
    got = _listing(built)
    want = {k: v for k, v in _listing(source).items() if k not in RENEWED and k != "lost+found"}
    assert {k: got.get(k) for k in want} == want
    assert set(got) >= BASE


def _records(tree: Path, origin: str) -> None:
    """The sandbox records its local source as Apptainer's does."""
    sd = tree / ".singularity.d"
    assert (sd / "Singularity").read_text() == f"bootstrap: localimage\nfrom: {origin}\n\n"
    assert (sd / "bootstrap_history/Apptainer0").read_text() == OLD_DEF
    labels = (sd / "labels.json").read_text()
    assert '"org.example.kept": "yes"' in labels
    assert f'"org.label-schema.usage.singularity.deffile.from": "{origin}"' in labels


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/tmp/…/tree plus tree.sqfs and tree.ext3 made from it (the peer sees /tmp)."""
    d = tmp_path_factory.mktemp("local-sources")
    tree = _tree(d / "tree")
    subprocess.run(["mksquashfs", str(tree), str(d / "tree.sqfs"), "-quiet", "-noappend"], check=True)
    with open(d / "tree.ext3", "wb") as f:
        f.truncate(16 << 20)
    mkfs = shutil.which("mkfs.ext3") or "/usr/sbin/mkfs.ext3"
    subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(d / "tree.ext3")], check=True)
    return d


def _needs(fs: str) -> None:
    if fs == "ext3" and not shutil.which("fuse2fs"):
        pytest.skip("fuse2fs is not installed")


@pytest.mark.parametrize("fs", ["sqfs", "ext3"])
def test_build_from_a_bare_file_system_image(work: Path, tmp_path: Path, fs: str) -> None:
    _needs(fs)
    src = f"tree.{fs}"
    proc = run_cli("build", "--sandbox", str(tmp_path / "box"), src, cwd=work)
    assert proc.stderr.splitlines() == [
        *STEPS,
        "INFO:    Creating sandbox directory...",
        f"INFO:    Build complete: {tmp_path / 'box'}",
    ]
    _same_tree(work / "tree", tmp_path / "box")
    _records(tmp_path / "box", src)
    sif = tmp_path / "new.sif"
    proc = run_cli("build", str(sif), src, cwd=work)
    assert proc.stderr.splitlines()[:2] == STEPS
    assert run_cli("inspect", "--deffile", str(sif)).stdout.strip() == f"bootstrap: localimage\nfrom: {src}"
    assert run_cli("exec", str(sif), "cat", "/etc/marker", "/.singularity.d/Singularity").stdout == (
        f"from the tree\nbootstrap: localimage\nfrom: {src}\n\n"
    )
    # and the SIF back to a sandbox: the same tree, with its history one deeper
    run_cli("build", "--sandbox", str(tmp_path / "again"), str(sif))
    _same_tree(work / "tree", tmp_path / "again")
    history = tmp_path / "again/.singularity.d/bootstrap_history"
    assert (history / "Apptainer1").read_text() == f"bootstrap: localimage\nfrom: {src}\n\n"


def test_ext3_primary_partition_and_overlay_partition(work: Path, tmp_path: Path) -> None:
    """A SIF with an ext3 root builds as Apptainer builds it; an overlay partition (what
    ``apptainer exec --writable`` wrote) is not part of the new image, as in Apptainer."""
    _needs("ext3")
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.writer import ObjectSpec, SIFWriter, add_objects

    ext3_root = tmp_path / "ext3-root.sif"
    with SIFWriter(ext3_root, arch="amd64") as w:
        w.add(ObjectSpec(DataType.PARTITION, path=work / "tree.ext3", fstype=FSType.EXT3))
        w.commit()
    run_cli("build", "--sandbox", str(tmp_path / "box"), str(ext3_root))
    _same_tree(work / "tree", tmp_path / "box")

    overlay = tmp_path / "overlay"
    (overlay / "upper/etc").mkdir(parents=True)
    (overlay / "upper/etc/written").write_text("by --writable\n")
    (overlay / "work/work").mkdir(parents=True)
    with open(tmp_path / "ov.ext3", "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(
        [shutil.which("mkfs.ext3") or "/usr/sbin/mkfs.ext3", "-q", "-F", "-d", overlay, tmp_path / "ov.ext3"],
        check=True,
    )
    base = tmp_path / "base.sif"
    run_cli("build", str(base), str(work / "tree.sqfs"))
    add_objects(
        base,
        [
            ObjectSpec(
                DataType.PARTITION, path=tmp_path / "ov.ext3", fstype=FSType.EXT3, parttype=PartType.OVERLAY
            )
        ],
    )
    assert run_cli("exec", str(base), "cat", "/etc/written").stdout == "by --writable\n"
    run_cli("build", "--sandbox", str(tmp_path / "from-ov"), str(base))
    assert not (tmp_path / "from-ov/etc/written").exists()
    assert (tmp_path / "from-ov/etc/marker").is_file()


def test_localimage_from_a_squashfs_file_relative_to_the_working_directory(
    work: Path, tmp_path: Path
) -> None:
    sub = tmp_path / "defs"
    sub.mkdir()
    (sub / "local.def").write_text("Bootstrap: localimage\nFrom: tree.sqfs\n\n%post\n    echo post > /post\n")
    out = tmp_path / "built.sif"
    proc = run_cli("build", str(out), str(sub / "local.def"), cwd=work)  # as in Apptainer: not the def's dir
    assert proc.stderr.splitlines()[:2] == STEPS  # no "Verifying bootstrap image" for a file system
    got = run_cli(
        "exec", str(out), "cat", "/post", "/etc/marker", "/.singularity.d/bootstrap_history/Apptainer0"
    )
    assert got.stdout == f"post\nfrom the tree\n{OLD_DEF}"
    out.unlink()
    proc = run_cli("build", str(out), str(sub / "local.def"), check=False, cwd=tmp_path)
    assert _fatal(proc) == f"{sub / 'local.def'}:2: localimage tree.sqfs: no such file or directory"
    assert not out.exists()


def test_sandbox_copy_keeps_owners_hard_links_and_fifos(work: Path, tmp_path: Path) -> None:
    """``build --sandbox new old-sandbox`` copies as Apptainer does (a plain copy lost the owner
    of a file of uid 1000 and split hard links) and records the old sandbox as its source."""
    box = tmp_path / "copy"
    run_cli("build", "--sandbox", str(box), str(work / "tree"))
    _same_tree(work / "tree", box)
    _records(box, str(work / "tree"))
    assert (box / ".singularity.d/runscript").read_text() == "#!/bin/sh\necho runscript\n"  # the image's
    assert (work / "tree/.singularity.d/Singularity").read_text() == OLD_DEF  # the source is left alone
    run_cli("build", str(tmp_path / "tree.sif"), "./tree/", cwd=work)  # recorded as typed, as Apptainer
    assert (
        run_cli("inspect", "--deffile", str(tmp_path / "tree.sif")).stdout
        == "bootstrap: localimage\nfrom: ./tree/\n"
    )


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        ("truncated.sqfs", r"truncated.sqfs: not a valid squashfs file system \(damaged or truncated\)"),
        ("ext2.img", r"could not open image ext2.img: file is not a valid ext3 image"),
        ("ext4.img", r"could not open image ext4.img: file is not a valid ext3 image"),
        # the superblock is whole, the rest is not: the copy names the image, not its mount point
        # (fuse2fs answers a read past the end with EIO or, now and then, ERANGE)
        (
            "cut.ext3",
            r"cannot copy the file system of cut.ext3: cp: .*'cut.ext3:/.*': "
            r"(Input/output error|Numerical result out of range)",
        ),
    ],
)
def test_bad_file_system_images_are_one_line(work: Path, tmp_path: Path, make: str, expect: str) -> None:
    if make == "truncated.sqfs":
        (tmp_path / make).write_bytes((work / "tree.sqfs").read_bytes()[:20000])
    elif make == "cut.ext3":
        _needs("ext3")
        (tmp_path / make).write_bytes((work / "tree.ext3").read_bytes()[: 2 << 20])
    else:
        with open(tmp_path / make, "wb") as f:
            f.truncate(8 << 20)
        kind = make.split(".")[0]
        subprocess.run(
            [shutil.which(f"mkfs.{kind}") or f"/usr/sbin/mkfs.{kind}", "-q", "-F", tmp_path / make],
            check=True,
        )
    for flags in ([], ["--sandbox"]):
        proc = run_cli("build", *flags, "out", make, check=False, cwd=tmp_path)
        assert re.fullmatch(expect, _fatal(proc))
        assert sorted(p.name for p in tmp_path.iterdir()) == [make]


def test_same_sandbox_as_apptainer_from_a_squashfs_file(work: Path, tmp_path: Path) -> None:
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer on PATH")
    subprocess.run(
        [exe, "-q", "build", "--sandbox", str(tmp_path / "peer"), "tree.sqfs"], cwd=work, check=True
    )
    run_cli("-q", "build", "--sandbox", str(tmp_path / "ours"), "tree.sqfs", cwd=work)
    # what Apptainer adds to every build it makes (its own apps/env files and bind points)
    added = {
        ".singularity.d/env/94-appsbase.sh",
        ".singularity.d/env/95-apps.sh",
        "etc/hosts",
        "etc/resolv.conf",
    }
    peer = {k: v for k, v in _listing(tmp_path / "peer").items() if k not in added}
    ours = {k: v for k, v in _listing(tmp_path / "ours").items() if k not in added}
    for listing in (peer, ours):
        listing.pop(".singularity.d/labels.json")  # Apptainer adds its version label
    assert ours == peer
    for name in ("Singularity", "bootstrap_history/Apptainer0"):
        sd = ".singularity.d/"
        assert (tmp_path / "ours" / sd / name).read_text() == (tmp_path / "peer" / sd / name).read_text()


@pytest.mark.parametrize("source", ["root.sqfs", "root"])
def test_a_bare_root_file_system_gets_the_base_environment(tmp_path: Path, source: str) -> None:
    """``mksquashfs ROOT img.sqfs`` of a tree without ``/.singularity.d``, or the tree itself (a
    debootstrap directory, say): the built image runs Apptainer's "no runscript" runscript and
    has its mount points and action scripts; the tree is not changed."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    subprocess.run(
        ["mksquashfs", root, tmp_path / "root.sqfs", "-quiet", "-noappend", "-no-progress"], check=True
    )
    sif = tmp_path / "root.sif"
    run_cli("build", str(sif), str(tmp_path / source))
    assert run_cli("run", str(sif)).stdout == "There is no runscript defined for this container\\n\n"
    attrs = run_cli("inspect", "--json", "--all", str(sif)).stdout
    assert '"startscript": "#!/bin/sh"' in attrs and "90-environment.sh" in attrs
    listing = run_cli("exec", str(sif), "/bin/busybox", "ls", "-a", "/").stdout.split()
    assert {".exec", ".run", "environment", "singularity", "proc", "home", "var"} <= set(listing)
    assert sorted(os.listdir(root)) == ["bin"]
    assert sorted(os.listdir(tmp_path)) == ["root", "root.sif", "root.sqfs"]


@pytest.fixture
def user_dir(unpriv_user: TestUser) -> Iterator[Path]:
    """A directory under /tmp that the test user owns (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="hpcsif-build-user-"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", d], check=False)  # what the user closed
        shutil.rmtree(d)


def test_unreadable_files_in_a_users_sandbox_are_one_line(unpriv_user: TestUser, user_dir: Path) -> None:
    """mksquashfs would pack a file the user cannot read as an empty one and leave out a closed
    directory, with a warning only; the copy of a sandbox left a directory it could not remove."""
    work = user_dir
    os.chown(work, unpriv_user.uid, unpriv_user.gid)
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HPCSIF_CACHEDIR": str(work / "cache")}
    setup = "mkdir -p sb/bin sb/x/closed && echo s > sb/x/secret && chmod 000 sb/x/secret sb/x/closed"
    assert unpriv_user.run(setup, cwd=work).returncode == 0
    for flags, expect in (
        ([], r"cannot build from sb: sb/x/(closed|secret) cannot be read \(Permission denied\)"),
        (
            ["--sandbox"],
            r"cannot copy sb: cp: cannot (open|access) 'sb/x/(secret|closed)'.*: Permission denied",
        ),
    ):
        cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "build", *flags, "out", "sb"]
        assert re.fullmatch(expect, _fatal(unpriv_user.run(cmd, env=env, cwd=work, timeout=60)))
        assert sorted(p.name for p in work.iterdir() if p.name != "cache") == ["sb"]
    # --force over the user's own sandbox with such a directory: the old one goes entirely
    make = "mkdir old && echo x > old/f && mksquashfs old img.sqfs -quiet -no-progress"
    assert unpriv_user.run(make, cwd=work).returncode == 0
    cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "build", "-F", "--sandbox", "sb", "img.sqfs"]
    assert unpriv_user.run(cmd, env=env, cwd=work, timeout=60).returncode == 0
    assert sorted(p.name for p in work.iterdir() if p.name != "cache") == ["img.sqfs", "old", "sb"]
    # a SIF forced over a sandbox of such directories: the old sandbox goes entirely too
    assert unpriv_user.run("mkdir -p box/x/closed && chmod 000 box/x/closed", cwd=work).returncode == 0
    cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "build", "-F", "box", "img.sqfs"]
    assert unpriv_user.run(cmd, env=env, cwd=work, timeout=60).returncode == 0
    assert (work / "box").is_file()
    assert sorted(p.name for p in work.iterdir() if p.name != "cache") == ["box", "img.sqfs", "old", "sb"]


def test_update_of_a_sandbox(work: Path, tmp_path: Path) -> None:
    """``--update``: with a definition file, Apptainer's step line and the sandbox's files kept;
    with an image, as Apptainer 1.4, nothing is fetched and no file is replaced (the sandbox was
    replaced by the image, losing what the user had written there), only the record renewed."""
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), str(work / "tree.sqfs"))
    (box / "mine").write_text("kept\n")
    definition = tmp_path / "up.def"
    definition.write_text(
        f"Bootstrap: localimage\nFrom: {work / 'tree.sqfs'}\n\n%post\n    echo up >> /log\n"
    )
    proc = run_cli("build", "--update", "--sandbox", "box", str(definition), cwd=tmp_path)
    assert proc.stderr.splitlines()[:2] == [STEPS[0], f"INFO:    Building into existing container: {box}"]
    assert (box / "mine").read_text() == "kept\n" and (box / "log").read_text() == "up\n"
    labels = (box / ".singularity.d/labels.json").read_text()
    for source in ("docker://alpine", "docker://nowhere.invalid/x:1", "tree.sqfs"):
        proc = run_cli("build", "--update", "--sandbox", str(box), source, cwd=work)
        assert proc.stderr.splitlines() == [
            STEPS[0],
            f"INFO:    Building into existing container: {box}",
            "INFO:    Creating sandbox directory...",
            f"INFO:    Build complete: {box}",
        ]
        assert (box / "mine").read_text() == "kept\n" and (box / "log").read_text() == "up\n"
    assert (box / ".singularity.d/Singularity").read_text() == "bootstrap: localimage\nfrom: tree.sqfs\n\n"
    history = box / ".singularity.d/bootstrap_history"
    assert (history / "Apptainer3").read_text() == "bootstrap: docker\nfrom: alpine\n\n"  # as typed
    assert (history / "Apptainer4").read_text() == "bootstrap: docker\nfrom: nowhere.invalid/x:1\n\n"
    date = "org.label-schema.build-date"
    keep = [ln for ln in labels.splitlines() if date not in ln]  # only the date is renewed
    assert [
        ln for ln in (box / ".singularity.d/labels.json").read_text().splitlines() if date not in ln
    ] == keep


def test_force_over_a_sandbox_the_user_cannot_replace(
    work: Path, unpriv_user: TestUser, user_dir: Path
) -> None:
    """Root's sandbox in a directory the user may write: one line naming it, nothing changed."""
    d = user_dir
    os.chmod(d, 0o777)  # root's sandbox in the user's reach
    shutil.copy(work / "tree.sqfs", d)  # pytest's tmp_path is root's alone
    run_cli("build", "--sandbox", str(d / "rootbox"), str(d / "tree.sqfs"))
    before = _listing(d / "rootbox")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HPCSIF_CACHEDIR": str(d / "cache")}
    cmd = [
        USER_PYTHON,
        "-m",
        "hpcsif.cli.main",
        "build",
        "-F",
        "--sandbox",
        "rootbox",
        "tree.sqfs",
    ]
    proc = unpriv_user.run(cmd, env=env, cwd=d, timeout=60)
    assert _fatal(proc) == "cannot replace rootbox: Permission denied"
    assert _listing(d / "rootbox") == before
    assert sorted(p.name for p in d.iterdir()) == ["cache", "rootbox", "tree.sqfs"]


def test_files_from_a_stage_keep_owners_times_and_hard_links(work: Path, tmp_path: Path) -> None:
    """As Apptainer copies from a stage: owners, modes, times and hard links kept inside, a
    directory copied anew (0755); a plain ``cp -r`` gave root's files and split hard links."""
    definition = tmp_path / "stages.def"
    definition.write_text(
        f"Bootstrap: localimage\nFrom: {work / 'tree.sqfs'}\nStage: one\n\n%post\n"
        "    mkdir -p /src/sub && echo a > /src/a && ln /src/a /src/hard && chown 1000:1000 /src/a\n"
        "    touch -d 2001-01-01 /src/a /src/sub && chmod 750 /src && chmod 700 /src/sub\n\n"
        f"Bootstrap: localimage\nFrom: {work / 'tree.sqfs'}\nStage: two\n\n"
        "%files from one\n    /src /dst\n    /src /opt/\n"
    )
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), str(definition))
    for top in (box / "dst", box / "opt/src"):
        assert stat.S_IMODE(top.stat().st_mode) == 0o755
        a, hard, sub = (top / "a").stat(), (top / "hard").stat(), (top / "sub").stat()
        assert (a.st_uid, a.st_gid, a.st_ino, a.st_nlink) == (1000, 1000, hard.st_ino, 2)
        assert stat.S_IMODE(sub.st_mode) == 0o700
        assert time.gmtime(a.st_mtime)[:3] == time.gmtime(sub.st_mtime)[:3] == (2001, 1, 1)


def test_image_written_into_the_sandbox_it_is_built_from(work: Path, tmp_path: Path) -> None:
    """``build box/out.sif box``: the image does not hold its own temporary files (mksquashfs
    packed the half-written SIF beside it), as Apptainer's, built from a copy, does not."""
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), str(work / "tree.sqfs"))
    run_cli("build", str(box / "out.sif"), str(box))
    listing = run_cli("exec", str(box / "out.sif"), "/bin/busybox", "ls", "-a", "/").stdout.split()
    assert not [name for name in listing if "sif" in name or "hpcsif" in name]
    assert sorted(p.name for p in box.iterdir() if "sif" in p.name) == ["out.sif"]


def test_hostile_metadata_entries_in_the_source(work: Path, tmp_path: Path) -> None:
    """What a build renews in a copy (def file, history, labels) is never written through a
    link to the host, and a directory where a file is expected stays (no temp-path error)."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("host\n")
    for case in ("links", "dirs"):
        src = tmp_path / f"src-{case}"
        run_cli("build", "--sandbox", str(src), str(work / "tree.sqfs"))
        sd = src / ".singularity.d"
        for name in ("Singularity", "labels.json"):
            (sd / name).unlink()
            if case == "links":
                (sd / name).symlink_to(host / "file")
            else:
                (sd / name).mkdir()
        shutil.rmtree(sd / "bootstrap_history")
        if case == "links":
            (sd / "bootstrap_history").symlink_to(host)
        out = tmp_path / f"out-{case}"
        run_cli("build", "--sandbox", str(out), str(src))
        run_cli("build", str(out) + ".sif", str(src))
        assert sorted(os.listdir(host)) == ["file"] and (host / "file").read_text() == "host\n"
        renewed = out / ".singularity.d/Singularity"  # the link went into the history
        assert renewed.is_dir() if case == "dirs" else renewed.read_text().startswith("bootstrap: localimage")


def test_fingerprints_of_a_squashfs_file_cannot_be_checked(work: Path, tmp_path: Path) -> None:
    """Kept different: Apptainer skips a ``Fingerprints:`` check it cannot make (no signature
    outside a SIF) and builds; a build that asked for one is refused in one line instead."""
    definition = tmp_path / "fpr.def"
    fpr = "1234567890ABCDEF1234567890ABCDEF12345678"
    definition.write_text(f"Bootstrap: localimage\nFrom: tree.sqfs\nFingerprints: {fpr}\n")
    proc = run_cli("build", str(tmp_path / "out.sif"), str(definition), check=False, cwd=work)
    assert _fatal(proc) == (
        f"{definition}:3: while checking fingerprint: tree.sqfs is not a SIF file, so it cannot be verified"
    )
    assert not (tmp_path / "out.sif").exists()


def test_labels_that_are_not_strings(tmp_path: Path) -> None:
    """Apptainer refuses to build from an image whose labels.json has values that are not
    strings; kept different: they are left out with one warning, not made into an image that
    ``inspect`` cannot read."""
    root = _tree(tmp_path / "root")
    (root / ".singularity.d/labels.json").write_text('{"kept": "yes", "n": 1, "o": {"c": 2}}')
    sif = tmp_path / "out.sif"
    proc = run_cli("build", str(sif), str(root))
    assert f"WARNING: labels of {root} that are not strings are left out: n, o" in proc.stderr.splitlines()
    labels = run_cli("inspect", "-l", str(sif))
    assert "kept: yes" in labels.stdout.splitlines() and not labels.stderr
    assert not [ln for ln in labels.stdout.splitlines() if ln.startswith(("n:", "o:"))]


def test_arch_flag_with_a_local_image(work: Path, tmp_path: Path) -> None:
    """As Apptainer: the image is built for this host (its partition says so), labelled with
    ``--arch``, and one warning, once the SIF is made, says they differ (the partition said
    arm64, so it never ran); a sandbox gets no warning."""
    from hpcsif.image.model import host_arch

    other = "arm64" if host_arch() != "arm64" else "amd64"
    warning = f"WARNING: Architecture {host_arch()} does not match build arch {other}"
    sif, box = tmp_path / "out.sif", tmp_path / "box"
    for args, said in (
        ([str(sif), str(work / "tree.sqfs")], [warning]),
        (["--sandbox", str(box), str(work / "tree.sqfs")], []),
    ):
        proc = run_cli("build", "--arch", other, *args)
        assert [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:")] == said
    assert f"org.label-schema.build-arch: {other}" in run_cli("inspect", "-l", str(sif)).stdout.splitlines()
    assert f'"org.label-schema.build-arch": "{other}"' in (box / ".singularity.d/labels.json").read_text()
    assert run_cli("exec", str(sif), "cat", "/etc/marker").stdout == "from the tree\n"
    definition = tmp_path / "local.def"
    definition.write_text(f"Bootstrap: localimage\nFrom: {work / 'tree.sqfs'}\n")
    proc = run_cli("build", "-F", "--arch", other, str(sif), str(definition))
    assert [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:")] == [warning]
    assert f"org.label-schema.build-arch: {other}" in run_cli("inspect", "-l", str(sif)).stdout.splitlines()
    assert run_cli("exec", str(sif), "cat", "/etc/marker").stdout == "from the tree\n"
