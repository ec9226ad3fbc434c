"""Interoperability of our SIF reader/writer with Apptainer 1.4 (``apptainer`` or ``peer-apptainer``).

Skipped where neither is on PATH. Files live under pytest's tmp_path (in /tmp), which the
peer sees at the same path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.listing import format_header, format_info, format_list
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, SIFWriter, add_objects, write_sif

APPTAINER = shutil.which("apptainer") or shutil.which("peer-apptainer")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
OCI_ARCHIVE = Path("/work/bench-images/busybox.oci-archive.tar")

pytestmark = [
    pytest.mark.peer,
    pytest.mark.slow,
    pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH"),
]


def apptainer(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Apptainer with *args*; returns the completed process (stdout/stderr as text)."""
    return subprocess.run(
        [str(APPTAINER), *map(str, args)], capture_output=True, text=True, check=check, timeout=300
    )


def _squashfs(tmp_path: Path) -> Path:
    """A squashfs holding a static busybox and a marker file."""
    if not (shutil.which("mksquashfs") and os.path.exists(BUSYBOX)):
        pytest.skip("needs mksquashfs and busybox-static")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "hello.txt").write_text("hello from hpcsif\n")
    fs = tmp_path / "rootfs.sqfs"
    subprocess.run(
        ["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress", "-comp", "gzip"], check=True
    )
    return fs


@pytest.fixture
def our_sif(tmp_path: Path) -> Path:
    """A SIF with the objects Apptainer writes for an OCI image, made by our writer."""
    fs = _squashfs(tmp_path)
    # Apptainer's `inspect` reads labels, deffile, runscript … from this object, not the image
    metadata = (
        b'{"data":{"attributes":{"labels":{"org.example.label":"from-hpcsif"},'
        b'"deffile":"bootstrap: localimage\\nfrom: rootfs"}},"type":"container"}'
    )
    return write_sif(
        tmp_path / "ours.sif",
        [
            ObjectSpec(DataType.DEFFILE, data=b"bootstrap: localimage\nfrom: rootfs\n"),
            ObjectSpec(DataType.GENERIC_JSON, data=metadata, name="inspect-metadata.json"),
            ObjectSpec(DataType.GENERIC_JSON, data=b'{"Cmd":["sh"]}', name="oci-config.json"),
            ObjectSpec(DataType.PARTITION, path=fs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS),
        ],
    )


def test_apptainer_lists_our_sif_as_we_do(our_sif: Path) -> None:
    with SIFImage.open(our_sif) as img:
        assert apptainer("sif", "list", our_sif).stdout == format_list(img)
        assert apptainer("sif", "header", our_sif).stdout == format_header(img)
        for desc in img.descriptors:
            assert apptainer("sif", "info", desc.id, our_sif).stdout == format_info(desc)
        assert apptainer("sif", "dump", 2, our_sif).stdout.encode() == img.read_object(img.get(2))


def test_apptainer_inspects_and_runs_our_sif(our_sif: Path) -> None:
    assert "org.example.label: from-hpcsif" in apptainer("inspect", our_sif).stdout
    assert apptainer("inspect", "--deffile", our_sif).stdout.startswith("bootstrap: localimage")
    assert apptainer("exec", our_sif, "/bin/busybox", "true").returncode == 0
    assert apptainer("exec", our_sif, "/bin/busybox", "cat", "/hello.txt").stdout == "hello from hpcsif\n"
    failing = apptainer("exec", our_sif, "/bin/busybox", "false", check=False)
    assert failing.returncode == 1


def test_apptainer_runs_sif_built_around_its_partition(tmp_path: Path) -> None:
    """The zero-copy path (SIFWriter.adopt) yields a SIF Apptainer runs."""
    fs = _squashfs(tmp_path)
    with SIFWriter(tmp_path / "adopted.sif") as writer:
        writer.add(ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n"))
        writer.adopt(ObjectSpec(DataType.PARTITION, path=fs))
        sif = writer.commit()
    with SIFImage.open(sif) as img:
        assert apptainer("sif", "list", sif).stdout == format_list(img)
    assert apptainer("exec", sif, "/bin/busybox", "cat", "/hello.txt").stdout == "hello from hpcsif\n"


def test_we_read_objects_apptainer_adds(our_sif: Path, tmp_path: Path) -> None:
    blob = tmp_path / "extra.json"
    blob.write_text('{"added": "by apptainer"}')
    apptainer("sif", "add", "--datatype", 6, "--groupid", 1, "--filename", "extra.json", our_sif, blob)
    with SIFImage.open(our_sif) as img:
        assert apptainer("sif", "list", our_sif).stdout == format_list(img)
        (added,) = img.find(DataType.GENERIC_JSON, "extra.json")
        assert added.id == 5 and added.group_id == 1
        assert img.read_object(added) == blob.read_bytes()


@pytest.fixture(scope="module")
def apptainer_sif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SIF built by Apptainer from the busybox OCI archive."""
    if not OCI_ARCHIVE.exists():
        pytest.skip(f"{OCI_ARCHIVE} not built yet")
    work = tmp_path_factory.mktemp("apptainer-build")
    archive = shutil.copy(OCI_ARCHIVE, work / OCI_ARCHIVE.name)  # the peer sees /tmp, not /work
    sif = work / "busybox.sif"
    apptainer("build", "-F", sif, f"oci-archive://{archive}")
    return sif


def test_we_read_apptainer_sif(apptainer_sif: Path) -> None:
    with SIFImage.open(apptainer_sif) as img:
        assert apptainer("sif", "list", apptainer_sif).stdout == format_list(img)
        assert apptainer("sif", "header", apptainer_sif).stdout == format_header(img)
        for desc in img.descriptors:
            assert apptainer("sif", "info", desc.id, apptainer_sif).stdout == format_info(desc)
        # the object set an OCI conversion must reproduce
        assert [(d.id, d.datatype, d.name, d.group_id, d.link_id) for d in img.descriptors] == [
            (1, DataType.DEFFILE, "", 1, 0),
            (2, DataType.GENERIC_JSON, "inspect-metadata.json", 1, 0),
            (3, DataType.GENERIC_JSON, "oci-config.json", 1, 0),
            (4, DataType.PARTITION, "", 1, 0),
        ]
        part = img.primary_partition()
        assert (part.fstype, part.parttype, part.arch) == (FSType.SQUASHFS, PartType.PRIMSYS, img.header.arch)
        assert part.offset % 4096 == 0
        assert img.read_object(part)[:4] == b"hsqs"
        assert img.read_object(img.get(1)).startswith(b"bootstrap: oci-archive\n")


def test_rewriting_apptainer_sif_is_byte_identical(apptainer_sif: Path, tmp_path: Path) -> None:
    """Same objects, UUID and time through our writer give Apptainer's exact bytes."""
    with SIFImage.open(apptainer_sif) as img:
        specs = [
            ObjectSpec(
                d.datatype,
                data=img.read_object(d),
                name=d.name,
                group_id=d.group_id,
                link_id=d.link_id,
                fstype=d.fstype,
                parttype=d.parttype,
                arch=d.arch,
            )
            for d in img.descriptors
        ]
        copy = write_sif(tmp_path / "copy.sif", specs, uuid=img.header.uuid, created=img.header.ctime)
    assert copy.read_bytes() == apptainer_sif.read_bytes()


def test_apptainer_accepts_objects_we_add_to_its_sif(apptainer_sif: Path, tmp_path: Path) -> None:
    sif = Path(shutil.copy(apptainer_sif, tmp_path / "modified.sif"))
    add_objects(sif, [ObjectSpec(DataType.GENERIC, data=b"payload", name="note.txt", group_id=0)])
    listing = apptainer("sif", "list", sif).stdout
    with SIFImage.open(sif) as img:
        assert listing == format_list(img)
        note = img.find(DataType.GENERIC, "note.txt")[0]
        assert note.id == 5 and note.offset == img.primary_partition().offset + img.primary_partition().size
    assert apptainer("sif", "dump", 5, sif).stdout == "payload"
    assert apptainer("exec", sif, "/bin/busybox", "true").returncode == 0
