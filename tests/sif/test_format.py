"""SIF v2 format, reader, writer, listing and CLI (no Apptainer needed)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcsif.errors import SIFError
from hpcsif.sif.format import (
    DESCRIPTOR_SIZE,
    GROUP_MASK,
    HEADER_SIZE,
    LAUNCH_SCRIPT,
    DataType,
    Descriptor,
    FSType,
    HashType,
    Header,
    PartType,
    arch_code,
    partition_extra,
    signature_extra,
)
from hpcsif.sif.listing import format_header, format_info, format_list, readable_size
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, SIFWriter, add_objects, remove_objects, write_sif

FIXED_UUID = uuid.UUID("8d7e1a4b-5788-42b8-b757-b3e63d9f48f9")
FIXED_TIME = 1795713170  # 2026-11-26 17:12:50 UTC
DATA_OFFSET = 4096 + 48 * DESCRIPTOR_SIZE  # 32176, where sylabs/sif puts the first object


def _sample(tmp_path: Path, part_size: int = 10000) -> tuple[Path, list[ObjectSpec], bytes]:
    part = os.urandom(part_size)
    part_path = tmp_path / "part.img"
    part_path.write_bytes(part)
    specs = [
        ObjectSpec(DataType.DEFFILE, data=b"bootstrap: docker\nfrom: busybox\n"),
        ObjectSpec(DataType.GENERIC_JSON, data=b'{"a": 1}', name="inspect-metadata.json"),
        ObjectSpec(DataType.GENERIC_JSON, data=b'{"Cmd": ["sh"]}', name="oci-config.json"),
        ObjectSpec(
            DataType.PARTITION,
            path=part_path,
            fstype=FSType.SQUASHFS,
            parttype=PartType.PRIMSYS,
            arch="arm64",
        ),
        ObjectSpec(DataType.GENERIC, data=b"x" * 5, group_id=0, link_id=1, link_is_group=True, alignment=512),
    ]
    return part_path, specs, part


def test_record_sizes_and_constants() -> None:
    assert HEADER_SIZE == 128
    assert DESCRIPTOR_SIZE == 585
    assert len(LAUNCH_SCRIPT) < 32
    assert arch_code("amd64") == b"02\x00"
    assert arch_code("arm64") == b"04\x00"
    assert arch_code("ppc64le") == b"06\x00"
    assert arch_code("riscv64") == b"12\x00"
    with pytest.raises(SIFError, match="unknown architecture 'x86'"):
        arch_code("x86")


def test_header_pack_layout_and_round_trip() -> None:
    h = Header(
        arch="amd64", uuid_bytes=FIXED_UUID.bytes, ctime=FIXED_TIME, mtime=FIXED_TIME + 1, data_size=77
    )
    raw = h.pack()
    assert len(raw) == 128
    assert raw[:32] == LAUNCH_SCRIPT.encode().ljust(32, b"\x00")
    assert raw[32:42] == b"SIF_MAGIC\x00"
    assert raw[42:45] == b"01\x00"
    assert raw[45:48] == b"02\x00"
    assert raw[48:64] == FIXED_UUID.bytes
    assert int.from_bytes(raw[64:72], "little") == FIXED_TIME
    assert int.from_bytes(raw[96:104], "little") == 4096
    assert Header.unpack(raw) == h


def test_descriptor_pack_masks_and_extras() -> None:
    d = Descriptor(
        datatype=DataType.SIGNATURE,
        id=5,
        group_id=0,
        link_id=1,
        link_is_group=True,
        offset=123,
        size=45,
        size_with_padding=50,
        ctime=1,
        mtime=2,
        name="sig",
        extra=signature_extra(HashType.SHA384, bytes(range(20))),
    )
    raw = d.pack()
    assert len(raw) == 585
    assert int.from_bytes(raw[0:4], "little") == 0x4005
    assert raw[4] == 1
    assert int.from_bytes(raw[9:13], "little") == GROUP_MASK  # "no group" still carries the mask
    assert int.from_bytes(raw[13:17], "little") == GROUP_MASK | 1  # link to group 1
    back = Descriptor.unpack(raw)
    assert back == d
    assert len(back.extra) == 384
    assert back.hashtype == HashType.SHA384
    assert back.entity == bytes(range(20))
    assert back.fstype is None and back.arch is None

    part = Descriptor.unpack(
        Descriptor(
            DataType.PARTITION, 1, extra=partition_extra(FSType.SQUASHFS, PartType.PRIMSYS, "s390x")
        ).pack()
    )
    assert (part.fstype, part.parttype, part.arch) == (FSType.SQUASHFS, PartType.PRIMSYS, "s390x")
    assert part.group_id == 1 and not part.link_is_group
    assert part.hashtype is None


@given(
    datatype=st.sampled_from(list(DataType)),
    ids=st.tuples(*[st.integers(0, 0x0FFFFFFF)] * 3),
    link_is_group=st.booleans(),
    numbers=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 7),
    name=st.text(max_size=32),
    extra=st.binary(max_size=384),
)
def test_descriptor_round_trip_property(
    datatype: DataType,
    ids: tuple[int, int, int],
    link_is_group: bool,
    numbers: tuple[int, ...],
    name: str,
    extra: bytes,
) -> None:
    d = Descriptor(datatype, ids[0], ids[1], ids[2], link_is_group and ids[2] != 0, *numbers, name, extra)
    raw = d.pack()
    assert len(raw) == DESCRIPTOR_SIZE
    back = Descriptor.unpack(raw)
    assert back.name == name.rstrip("\x00")
    assert back == Descriptor(**{**d.__dict__, "name": back.name})


def test_round_trip(tmp_path: Path) -> None:
    _, specs, part = _sample(tmp_path)
    dest = write_sif(tmp_path / "img.sif", specs, arch="amd64", uuid=FIXED_UUID, created=FIXED_TIME)
    assert dest == tmp_path / "img.sif"
    assert dest.stat().st_mode & 0o777 == 0o755
    assert dest.read_bytes().startswith(b"#!/usr/bin/env run-singularity\n\x00")

    with SIFImage.open(dest) as img:
        h = img.header
        assert (h.arch, h.uuid, h.ctime, h.mtime) == ("arm64", FIXED_UUID, FIXED_TIME, FIXED_TIME)
        assert (h.descriptors_total, h.descriptors_free, h.data_offset) == (48, 43, DATA_OFFSET)
        ds = img.descriptors
        assert [d.id for d in ds] == [1, 2, 3, 4, 5]
        assert [d.datatype for d in ds] == [
            DataType.DEFFILE,
            DataType.GENERIC_JSON,
            DataType.GENERIC_JSON,
            DataType.PARTITION,
            DataType.GENERIC,
        ]
        # small objects are packed back to back from the data offset, partitions page-aligned
        assert ds[0].offset == DATA_OFFSET
        assert ds[1].offset == ds[0].offset + ds[0].size
        assert ds[3].offset % 4096 == 0 and ds[3].offset > ds[2].offset + ds[2].size
        assert ds[3].size_with_padding == ds[3].offset - (ds[2].offset + ds[2].size) + len(part)
        assert ds[4].offset % 512 == 0
        assert h.data_size == ds[4].offset + 5 - DATA_OFFSET
        assert img.file_size == ds[4].offset + 5
        for spec, desc in zip(specs, ds, strict=True):
            expected = spec.data if spec.data is not None else part
            assert img.read_object(desc) == expected
            assert desc.name == spec.name
            assert (desc.ctime, desc.mtime) == (FIXED_TIME, FIXED_TIME)
        assert [d.group_id for d in ds] == [1, 1, 1, 1, 0]
        assert (ds[4].link_id, ds[4].link_is_group) == (1, True)
        prim = img.primary_partition(check=False)
        assert prim.id == 4
        assert (prim.fstype, prim.parttype, prim.arch) == (FSType.SQUASHFS, PartType.PRIMSYS, "arm64")
        assert [d.id for d in img.find(DataType.GENERIC_JSON)] == [2, 3]
        assert [d.id for d in img.find(DataType.GENERIC_JSON, "oci-config.json")] == [3]
        assert img.find(DataType.SIGNATURE) == []
        assert b"".join(img.iter_object(prim, chunk_size=1000)) == part


def test_default_partition_metadata_and_header_arch(tmp_path: Path) -> None:
    dest = write_sif(tmp_path / "a.sif", [ObjectSpec(DataType.PARTITION, data=b"fs")], arch="ppc64le")
    with SIFImage.open(dest) as img:
        prim = img.primary_partition(check=False)
        assert (prim.fstype, prim.parttype, prim.arch) == (FSType.SQUASHFS, PartType.PRIMSYS, "ppc64le")
        assert img.header.arch == "ppc64le"
        assert img.header.uuid.version == 4
    # without a primary partition the header arch stays unknown, as in sylabs/sif
    dest = write_sif(tmp_path / "b.sif", [ObjectSpec(DataType.DEFFILE, data=b"x")])
    with SIFImage.open(dest) as img:
        assert img.header.arch == "unknown"
        with pytest.raises(SIFError, match="no primary system partition"):
            img.primary_partition(check=False)


@pytest.mark.parametrize(
    ("overlays", "found"),
    [
        ([(FSType.EXT3, 1)], 2),
        ([(FSType.EXT3, 2)], None),  # another group than the root file system's: Apptainer ignores it
        ([(FSType.SQUASHFS, 1)], None),
        ([(FSType.EXT3, 2), (FSType.EXT3, 1)], 3),
        ([], None),
    ],
)
def test_overlay_partition(tmp_path: Path, overlays: list[tuple[FSType, int]], found: int | None) -> None:
    part = ObjectSpec(DataType.PARTITION, data=b"root", fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)
    extra = [
        ObjectSpec(DataType.PARTITION, data=b"ovl", fstype=fs, parttype=PartType.OVERLAY, group_id=group)
        for fs, group in overlays
    ]
    with SIFImage.open(write_sif(tmp_path / "x.sif", [part, *extra])) as img:
        overlay = img.overlay_partition()
        assert (overlay.id if overlay else None) == found


def test_add_and_remove_objects(tmp_path: Path) -> None:
    _, specs, part = _sample(tmp_path)
    dest = write_sif(tmp_path / "img.sif", specs[:4], uuid=FIXED_UUID, created=FIXED_TIME)
    dest.chmod(0o750)
    before = dest.read_bytes()
    added = add_objects(
        dest,
        [
            ObjectSpec(
                DataType.SIGNATURE,
                data=b"SIG",
                group_id=0,
                link_id=1,
                link_is_group=True,
                hashtype=HashType.SHA256,
                entity=b"\xab" * 20,
            )
        ],
    )
    assert [d.id for d in added] == [5]
    assert dest.stat().st_mode & 0o777 == 0o750  # the mode of the image being modified is kept
    with SIFImage.open(dest) as img:
        assert img.header.mtime > FIXED_TIME and img.header.ctime == FIXED_TIME
        assert img.header.descriptors_free == 43
        sig = img.get(5)
        assert img.read_object(sig) == b"SIG"
        assert (sig.hashtype, sig.entity, sig.link_id, sig.link_is_group) == (
            HashType.SHA256,
            b"\xab" * 20,
            1,
            True,
        )
        assert sig.offset == img.get(4).offset + len(part)  # appended right after the partition
        assert img.read_object(img.get(4)) == part
    after = dest.read_bytes()
    assert after[DATA_OFFSET : len(before)] == before[DATA_OFFSET:]  # existing data untouched

    remove_objects(dest, [5])
    with SIFImage.open(dest) as img:
        assert [d.id for d in img.descriptors] == [1, 2, 3, 4]
        assert img.header.descriptors_free == 44
        assert img.file_size == len(before)  # trailing dead space dropped
    remove_objects(dest, [4])
    with SIFImage.open(dest) as img:
        assert img.header.arch == "unknown"
        assert img.find(DataType.PARTITION) == []
    with pytest.raises(SIFError, match="no data object with id 9"):
        remove_objects(dest, [9])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_writer_refuses_bad_specs(tmp_path: Path) -> None:
    dest = tmp_path / "x.sif"
    bad = [
        ([ObjectSpec(DataType.DEFFILE)], "exactly one of data or path"),
        (
            [ObjectSpec(DataType.DEFFILE, data=b"a", path=Path("/etc/hostname"))],
            "exactly one of data or path",
        ),
        ([ObjectSpec(DataType.DEFFILE, data=b"a", arch="amd64")], "partitions only"),
        ([ObjectSpec(DataType.GENERIC, data=b"a", name="n" * 129)], "too long"),
        ([ObjectSpec(DataType.PARTITION, data=b"a", arch="vax")], "unknown architecture"),
        ([ObjectSpec(DataType.SIGNATURE, data=b"a")], "needs a hashtype"),
        ([ObjectSpec(DataType.PARTITION, data=b"a")] * 2, "already has a primary system partition"),
    ]
    for specs, message in bad:
        with pytest.raises(SIFError, match=message):
            write_sif(dest, specs)
        assert list(tmp_path.iterdir()) == []


def test_no_free_slot(tmp_path: Path) -> None:
    with SIFWriter(tmp_path / "x.sif", capacity=1) as w:
        w.add(ObjectSpec(DataType.DEFFILE, data=b"a"))
        with pytest.raises(SIFError, match="no free descriptor slot"):
            w.add(ObjectSpec(DataType.DEFFILE, data=b"b"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_on_failure(tmp_path: Path) -> None:
    specs = [
        ObjectSpec(DataType.DEFFILE, data=b"bootstrap: x\n"),
        ObjectSpec(DataType.PARTITION, path=tmp_path / "missing.sqfs"),
    ]
    with pytest.raises(SIFError, match=r"cannot read .*missing\.sqfs"):
        write_sif(tmp_path / "img.sif", specs)
    assert list(tmp_path.iterdir()) == []
    # an existing image is left exactly as it was
    good = write_sif(tmp_path / "img.sif", specs[:1])
    content = good.read_bytes()
    with pytest.raises(SIFError):
        write_sif(good, specs)
    assert good.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.sif"]


def test_unwritable_destination(tmp_path: Path) -> None:
    with pytest.raises(SIFError, match="cannot create"):
        write_sif(tmp_path / "no" / "such" / "img.sif", [ObjectSpec(DataType.DEFFILE, data=b"x")])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    _, specs, _ = _sample(tmp_path)
    return write_sif(tmp_path / "img.sif", specs, uuid=FIXED_UUID, created=FIXED_TIME)


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_files_are_refused(image: Path, tmp_path: Path) -> None:
    def refused(path: Path, pattern: str) -> None:
        with pytest.raises(SIFError, match=pattern):
            SIFImage.open(path)

    refused(tmp_path / "absent.sif", "cannot open")
    short = tmp_path / "short.sif"
    short.write_bytes(image.read_bytes()[:100])
    refused(short, "not a SIF file")
    other = tmp_path / "text.sif"
    other.write_bytes(b"#!/bin/sh\n" + b"\x00" * 500)
    refused(other, r"not a SIF file \(bad magic\)")

    data = image.read_bytes()
    (tmp_path / "version.sif").write_bytes(data)
    _corrupt(tmp_path / "version.sif", 42, b"02\x00")
    refused(tmp_path / "version.sif", "unsupported SIF version '02'")

    table = tmp_path / "table.sif"
    table.write_bytes(data[: 4096 + 10 * DESCRIPTOR_SIZE])
    refused(table, "truncated descriptor table")

    truncated = tmp_path / "trunc.sif"
    truncated.write_bytes(data[:-100])
    refused(truncated, r"object 5 .* extends past the end of the file")

    geometry = tmp_path / "geometry.sif"
    geometry.write_bytes(data)
    _corrupt(geometry, 88, (-1).to_bytes(8, "little", signed=True))  # descriptors_total
    refused(geometry, "corrupt SIF header")

    dup = tmp_path / "dup.sif"
    dup.write_bytes(data)
    _corrupt(dup, 4096 + DESCRIPTOR_SIZE + 5, (1).to_bytes(4, "little"))  # object 2 claims id 1
    refused(dup, "id 1 appears twice")


def test_large_object_is_copied_by_the_kernel(tmp_path: Path) -> None:
    """A 300 MB object is copied without passing through Python memory."""
    big = tmp_path / "big.img"
    size = 300 * 1024 * 1024
    with open(big, "wb") as f:
        f.write(b"HEAD")
        f.truncate(size - 4)
        f.seek(size - 4)
        f.write(b"TAIL")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from hpcsif.sif.format import DataType
        from hpcsif.sif.writer import ObjectSpec, write_sif
        write_sif({str(tmp_path / "big.sif")!r},
                  [ObjectSpec(DataType.PARTITION, path=Path({str(big)!r}))])
        # VmHWM belongs to this address space; ru_maxrss would carry over the forking parent's
        # peak across execve (large when pytest itself is large)
        status = Path("/proc/self/status").read_text().split("\\n")
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    peak_kib = int(out.stdout)
    assert peak_kib < 100 * 1024, f"writer peak RSS {peak_kib} KiB for a {size >> 20} MiB object"
    big.unlink()
    with SIFImage.open(tmp_path / "big.sif") as img:
        part = img.primary_partition(check=False)
        assert part.size == size
        assert os.pread(img.fd, 4, part.offset) == b"HEAD"
        assert os.pread(img.fd, 4, part.offset + size - 4) == b"TAIL"
        assert os.pread(img.fd, 8, part.offset + size // 2) == bytes(8)


needs_squashfs = pytest.mark.skipif(
    not (shutil.which("mksquashfs") and shutil.which("squashfuse") and os.path.exists("/dev/fuse")),
    reason="needs mksquashfs, squashfuse and /dev/fuse",
)


def _squashfs_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello from the SIF\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(3000))


def _mounted_read(sif: Path, offset: int, mnt: Path, name: str) -> bytes:
    mnt.mkdir()
    subprocess.run(["squashfuse", "-o", f"offset={offset}", str(sif), str(mnt)], check=True)
    try:
        return (mnt / name).read_bytes()
    finally:
        umount = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
        subprocess.run([umount, "-u", str(mnt)] if "fuser" in umount else [umount, str(mnt)], check=True)


@needs_squashfs
@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "external", "adopt"])
def test_squashfs_partition_mounts(tmp_path: Path, how: str) -> None:
    root = tmp_path / "root"
    _squashfs_tree(root)
    sif = tmp_path / "img.sif"
    mksquashfs = ["mksquashfs", str(root), "-noappend", "-quiet", "-no-progress", "-comp", "gzip"]
    deffile = ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n")
    if how in ("path", "adopt"):
        subprocess.run([*mksquashfs[:2], str(tmp_path / "fs.sqfs"), *mksquashfs[2:]], check=True)
        fs_spec = ObjectSpec(DataType.PARTITION, path=tmp_path / "fs.sqfs")
    if how == "path":
        write_sif(sif, [deffile, fs_spec])
    elif how == "adopt":
        with SIFWriter(sif) as w:
            w.add(deffile)
            w.adopt(fs_spec)
            w.commit()
    else:
        with SIFWriter(sif) as w:
            w.add(deffile)
            w.add_external(
                ObjectSpec(DataType.PARTITION),
                lambda temp, offset: subprocess.run(
                    [*mksquashfs[:2], str(temp), *mksquashfs[2:], "-o", str(offset)], check=True
                ),
            )
            w.commit()
    with SIFImage.open(sif) as img:
        part = img.primary_partition(check=False)
        assert part.offset % 4096 == 0
        assert img.read_object(part)[:4] == b"hsqs"
        assert img.file_size == part.offset + part.size
    assert _mounted_read(sif, part.offset, tmp_path / "mnt", "etc/motd") == b"hello from the SIF\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("elsewhere", [False, True], ids=["in-place", "other-fs"])
def test_adopt_inserts_in_front_without_copying(tmp_path: Path, elsewhere: bool) -> None:
    content = os.urandom(3 * 4096 + 123)
    where = Path(tempfile.mkdtemp(dir="/dev/shm")) if elsewhere else tmp_path
    src = where / "fs.sqfs"
    src.write_bytes(content)
    inode = src.stat().st_ino
    try:
        with SIFWriter(tmp_path / "img.sif", created=FIXED_TIME) as w:
            w.add(ObjectSpec(DataType.DEFFILE, data=b"bootstrap: x\n"))
            w.add(ObjectSpec(DataType.GENERIC_JSON, data=b"{}" * 3000, name="inspect-metadata.json"))
            part = w.adopt(ObjectSpec(DataType.PARTITION, path=src))
            with pytest.raises(SIFError, match="no object can follow an adopted one"):
                w.add(ObjectSpec(DataType.GENERIC, data=b"late"))
            dest = w.commit()
        assert not src.exists()  # consumed either way
        # on ext4/XFS the partition file itself became the image; elsewhere it was copied
        assert (dest.stat().st_ino == inode) is not elsewhere
        assert dest.stat().st_mode & 0o777 == 0o755
        with SIFImage.open(dest) as img:
            assert [d.id for d in img.descriptors] == [1, 2, 3]
            assert img.primary_partition(check=False) == part and part.offset % 4096 == 0
            assert img.read_object(part) == content
            assert img.read_object(img.get(2)) == b"{}" * 3000
            assert img.file_size == part.offset + len(content)
            assert img.header.data_size == img.file_size - DATA_OFFSET
        assert sorted(p.name for p in tmp_path.iterdir()) == ["img.sif"]
    finally:
        if elsewhere:
            shutil.rmtree(where)


def test_adopt_failure_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "fs.sqfs"
    src.write_bytes(b"hsqs" * 2000)
    with SIFWriter(tmp_path / "img.sif") as w:
        w.add(ObjectSpec(DataType.PARTITION, data=b"first"))
        with pytest.raises(SIFError, match="already has a primary system partition"):
            w.adopt(ObjectSpec(DataType.PARTITION, path=src))
    assert list(tmp_path.iterdir()) == []


def test_readable_size() -> None:
    assert readable_size(512) == "512 B"
    assert readable_size(28080) == "27 KiB"
    assert readable_size(1536) == "2 KiB"  # Go's math.Round: half away from zero
    assert readable_size(1061456) == "1 MiB"
    assert readable_size(3 * 1024**3) == "3 GiB"


def test_listing_matches_apptainer_format(image: Path) -> None:
    """Text as `apptainer sif list|header|info` print it (checked against Apptainer 1.4.5)."""
    with SIFImage.open(image) as img:
        assert format_list(img) == (
            "------------------------------------------------------------------------------\n"
            "ID   |GROUP   |LINK    |SIF POSITION (start-end)  |TYPE\n"
            "------------------------------------------------------------------------------\n"
            "1    |1       |NONE    |32176-32208               |Def.FILE\n"
            "2    |1       |NONE    |32208-32216               |JSON.Generic\n"
            "3    |1       |NONE    |32216-32231               |JSON.Generic\n"
            "4    |1       |NONE    |32768-42768               |FS (Squashfs/*System/arm64)\n"
            "5    |NONE    |1   (G) |43008-43013               |Generic/Raw\n"
        )
        assert format_header(img) == (
            "Launch Script:        #!/usr/bin/env run-singularity\n"
            "Version:              01\n"
            "Primary Architecture: arm64\n"
            "ID:                   8d7e1a4b-5788-42b8-b757-b3e63d9f48f9\n"
            "Created At:           2026-11-26 17:12:50 +0000 UTC\n"
            "Modified At:          2026-11-26 17:12:50 +0000 UTC\n"
            "Descriptors Free:     43\n"
            "Descriptors Total:    48\n"
            "Descriptors Offset:   4096\n"
            "Descriptors Size:     27 KiB\n"
            "Data Offset:          32176\n"
            f"Data Size:            {readable_size(img.header.data_size)}\n"
        )
        assert format_info(img.get(2)) == (
            "  Data Type:    JSON.Generic\n"
            "  ID:           2\n"
            "  Group ID:     1\n"
            "  Linked ID:    NONE\n"
            "  Offset:       32208\n"
            "  Size:         8\n"
            "  Created At:   2026-11-26 17:12:50 +0000 UTC\n"
            "  Modified At:  2026-11-26 17:12:50 +0000 UTC\n"
            "  Name:         inspect-metadata.json\n"
        )
        assert format_info(img.primary_partition(check=False)).endswith(
            "  Filesystem Type:  Squashfs\n  Partition Type:   *System\n  Architecture:     arm64\n"
        )


def _cli(args: list[str]) -> int:
    from hpcsif.cli import sif as sif_cli

    parser = argparse.ArgumentParser()
    sif_cli.register(parser.add_subparsers())
    ns = parser.parse_args(args)
    return ns.func(ns)


def test_cli_handlers(image: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with SIFImage.open(image) as img:
        listing, header = format_list(img), format_header(img)
        info = format_info(img.get(4))
        part = img.read_object(img.get(4))
    assert _cli(["sif", "list", str(image)]) == 0
    assert capsysbinary.readouterr().out.decode() == listing
    assert _cli(["sif", "header", str(image)]) == 0
    assert capsysbinary.readouterr().out.decode() == header
    assert _cli(["sif", "info", "4", str(image)]) == 0
    assert capsysbinary.readouterr().out.decode() == info
    assert _cli(["sif", "dump", "4", str(image)]) == 0
    assert capsysbinary.readouterr().out == part
    with pytest.raises(SIFError, match="no data object with id 7"):
        _cli(["sif", "dump", "7", str(image)])
