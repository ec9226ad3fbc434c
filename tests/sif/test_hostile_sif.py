"""Hostile SIF files through the CLI: one ``FATAL:`` line and a non-zero exit, never a traceback,
a hang or output left behind; and where Apptainer still works (``inspect`` of an image whose
metadata or root file system is broken), hpcsif works too.

The files are crafted from a small real SIF (squashfs root file system, inspect metadata) by
editing its header, descriptors and objects with the records of :mod:`hpcsif.sif.format`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcsif.sif.format import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    DataType,
    Descriptor,
    FSType,
    Header,
    PartType,
    partition_extra,
)
from hpcsif.sif.reader import SMALL_OBJECT_LIMIT, SIFImage
from hpcsif.sif.writer import ObjectSpec, write_sif
from tests.conftest import peer_apptainer, run_cli

METADATA = (
    b'{"data":{"attributes":{"labels":{"from.metadata":"yes"},"runscript":"#!/bin/sh\\necho meta\\n"}}}'
)
PARTITION_LABELS = '{"from.partition": "yes"}'


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid SIF: deffile, inspect metadata, squashfs root fs holding labels.json and a runscript."""
    if not shutil.which("mksquashfs"):
        pytest.skip("needs mksquashfs")
    base = tmp_path_factory.mktemp("hostile")
    sd = base / "root" / ".singularity.d"
    sd.mkdir(parents=True)
    (sd / "labels.json").write_text(PARTITION_LABELS)
    (sd / "runscript").write_text("#!/bin/sh\necho partition\n")
    fs = base / "root.sqfs"
    subprocess.run(
        ["mksquashfs", str(base / "root"), str(fs), "-noappend", "-quiet", "-no-progress", "-comp", "gzip"],
        check=True,
    )
    return write_sif(
        base / "good.sif",
        [
            ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n"),
            ObjectSpec(DataType.GENERIC_JSON, data=METADATA, name="inspect-metadata.json"),
            ObjectSpec(DataType.PARTITION, path=fs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS),
        ],
    )


def _variant(good: Path, dest: Path, edit: Callable[[bytearray, list[Descriptor]], None]) -> Path:
    """Copy *good* to *dest*, letting *edit* change the bytes and the descriptors (written back)."""
    data = bytearray(good.read_bytes())
    with SIFImage.open(good) as img:
        slots = img.slots
    edit(data, slots)
    for i, desc in enumerate(slots):
        at = 4096 + i * DESCRIPTOR_SIZE
        data[at : at + DESCRIPTOR_SIZE] = desc.pack()
    dest.write_bytes(data)
    return dest


def _header(**fields: int) -> Callable[[bytearray, list[Descriptor]], None]:
    def edit(data: bytearray, _slots: list[Descriptor]) -> None:
        header = Header.unpack(bytes(data))
        for name, value in fields.items():
            setattr(header, name, value)
        data[:HEADER_SIZE] = header.pack()

    return edit


def _append(datatype_index: int, content: bytes) -> Callable[[bytearray, list[Descriptor]], None]:
    """Point descriptor *datatype_index* at *content*, appended at the end of the file."""

    def edit(data: bytearray, slots: list[Descriptor]) -> None:
        slots[datatype_index].offset, slots[datatype_index].size = len(data), len(content)
        data += content

    return edit


def _fails_cleanly(proc: subprocess.CompletedProcess, *expect: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    fatal = [line for line in lines if line.startswith("FATAL:")]
    assert len(fatal) == 1, proc.stderr
    for text in expect:
        assert text in fatal[0], fatal[0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, check=False, timeout=30, stdin=subprocess.DEVNULL)


HEADER_LIES = {
    "count-2^31": (_header(descriptors_total=2**31), "corrupt SIF header"),
    "count-negative": (_header(descriptors_total=-1), "corrupt SIF header"),
    "table-beyond-eof": (_header(descriptors_offset=1 << 40), "truncated descriptor table"),
    "table-size-lies": (_header(descriptors_size=10), "corrupt SIF header"),
}


@pytest.mark.parametrize("case", sorted(HEADER_LIES))
def test_header_lies_fail_cleanly(good: Path, tmp_path: Path, case: str) -> None:
    edit, message = HEADER_LIES[case]
    sif = _variant(good, tmp_path / "x.sif", edit)
    for args in (["sif", "list"], ["inspect"], ["exec"]):
        _fails_cleanly(_cli(*args, str(sif), *(["true"] if args == ["exec"] else [])), message)


def test_truncation_at_every_boundary(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    with SIFImage.open(good) as img:
        part = img.primary_partition()
    for cut in (0, 1, HEADER_SIZE - 1, HEADER_SIZE, 4096, 4096 + DESCRIPTOR_SIZE + 7, part.offset + 100):
        sif = tmp_path / f"cut{cut}.sif"
        sif.write_bytes(data[:cut])
        _fails_cleanly(_cli("sif", "list", str(sif)), "sif")


def test_special_files_neither_hang_nor_trace(tmp_path: Path) -> None:
    """A FIFO (Apptainer waits forever on it), a directory, a symlink loop as the SIF."""
    fifo = tmp_path / "fifo.sif"
    os.mkfifo(fifo)
    (tmp_path / "dir.sif").mkdir()
    (tmp_path / "loop.sif").symlink_to("loop.sif")
    for args in (["sif", "list", fifo], ["exec", fifo, "true"], ["inspect", fifo], ["verify", fifo]):
        _fails_cleanly(_cli(*map(str, args)), "not a regular file")
    _fails_cleanly(_cli("sif", "header", str(tmp_path / "dir.sif")), "not a regular file")
    _fails_cleanly(_cli("sif", "list", str(tmp_path / "loop.sif")), "symbolic links")


def _partition(
    edit: Callable[[Descriptor, bytearray], None],
) -> Callable[[bytearray, list[Descriptor]], None]:
    def outer(data: bytearray, slots: list[Descriptor]) -> None:
        edit(next(d for d in slots if d.datatype == DataType.PARTITION), data)

    return outer


def _garbage(part: Descriptor, data: bytearray) -> None:
    data[part.offset : part.offset + part.size] = b"\x5a" * part.size


def _second_primary(data: bytearray, slots: list[Descriptor]) -> None:
    meta = slots[1]
    meta.datatype, meta.extra = (
        DataType.PARTITION,
        partition_extra(FSType.SQUASHFS, PartType.PRIMSYS, "amd64"),
    )


BROKEN_ROOTFS = {
    "empty": (_partition(lambda p, _d: setattr(p, "size", 0)), "is empty"),
    # past the superblock, short of the file system's end
    "truncated-squashfs": (_partition(lambda p, _d: setattr(p, "size", 200)), "is truncated"),
    "garbage": (_partition(_garbage), "no valid squashfs"),
    "encrypted": (
        _partition(lambda p, _d: setattr(p, "extra", partition_extra(FSType.ENCRYPTED_SQUASHFS, 2, "amd64"))),
        "encrypted SIF images are not supported",
    ),
    # an ext3 root file system runs as in Apptainer (fuse2fs); this one is squashfs labelled ext3
    "ext3": (
        _partition(lambda p, _d: setattr(p, "extra", partition_extra(FSType.EXT3, 2, "amd64"))),
        "the primary partition (object 3) is not a valid ext3 file system",
    ),
    "two-primaries": (_second_primary, "several primary system partitions: objects 2 and 3"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ROOTFS))
def test_broken_root_fs_fails_before_mount_or_unpack(good: Path, tmp_path: Path, case: str) -> None:
    edit, message = BROKEN_ROOTFS[case]
    sif = _variant(good, tmp_path / "x.sif", edit)
    out = tmp_path / "out"
    out.mkdir()
    _fails_cleanly(_cli("exec", str(sif), "true"), message)
    _fails_cleanly(_cli("build", str(out / "new.sif"), str(sif)), message)
    _fails_cleanly(_cli("build", "--sandbox", str(out / "sandbox"), str(sif)), message)
    assert os.listdir(out) == []


@pytest.mark.parametrize("case", ["garbage", "encrypted", "ext3"])
def test_inspect_reads_metadata_when_root_fs_is_unusable(good: Path, tmp_path: Path, case: str) -> None:
    """Apptainer prints what inspect-metadata.json holds without the root fs; so do we."""
    sif = _variant(good, tmp_path / "x.sif", BROKEN_ROOTFS[case][0])
    proc = _cli("inspect", str(sif))
    assert proc.returncode == 0 and proc.stdout == "from.metadata: yes\n", proc.stderr
    assert _cli("inspect", "--runscript", str(sif)).stdout == "#!/bin/sh\necho meta\n"


def _no_primary(data: bytearray, slots: list[Descriptor]) -> None:
    part = slots[2]
    part.extra = partition_extra(FSType.SQUASHFS, PartType.OVERLAY, "amd64")


def test_inspect_without_primary_partition(good: Path, tmp_path: Path) -> None:
    sif = _variant(good, tmp_path / "x.sif", _no_primary)
    assert _cli("inspect", str(sif)).stdout == "from.metadata: yes\n"
    _fails_cleanly(_cli("inspect", "--list-apps", str(sif)), "no primary system partition")
    _fails_cleanly(_cli("exec", str(sif), "true"), "no primary system partition")
    peer = peer_apptainer()
    if peer:  # Apptainer, too, prints the metadata's labels
        shown = subprocess.run([peer, "inspect", str(sif)], capture_output=True, text=True, timeout=60)
        assert shown.stdout == "from.metadata: yes\n"


BAD_METADATA = {
    "invalid": (b"{not json", "Expecting property name"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "labels-not-object": (b'{"data":{"attributes":{"labels":"x"}}}', "'labels' has the wrong type"),
    "attributes-list": (b'{"data":{"attributes":[1]}}', "attributes is not a JSON object"),
    "too-large": (b" " * (SMALL_OBJECT_LIMIT + 1) + b"{}", "hpcsif reads at most 16 MiB"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_inspect_metadata_warns_and_falls_back(good: Path, tmp_path: Path, case: str) -> None:
    """As Apptainer: a WARNING naming the problem, then the files of the root file system."""
    content, warning = BAD_METADATA[case]
    sif = _variant(good, tmp_path / "x.sif", _append(1, content))
    proc = _cli("inspect", str(sif))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "from.partition: yes\n"
    assert proc.stderr.count("WARNING") == 1 and warning in proc.stderr, proc.stderr


def test_non_utf8_metadata_is_read_as_apptainer_reads_it(good: Path, tmp_path: Path) -> None:
    sif = _variant(good, tmp_path / "x.sif", _append(1, b'{"data":{"attributes":{"labels":{"a":"\xff"}}}}'))
    proc = _cli("inspect", str(sif))
    assert proc.returncode == 0 and proc.stdout == "a: \ufffd\n", proc.stderr


def test_oversized_signature_is_not_loaded(good: Path, tmp_path: Path) -> None:
    def add_signature(data: bytearray, slots: list[Descriptor]) -> None:
        slots[3] = Descriptor(DataType.SIGNATURE, id=4, link_id=1, link_is_group=True, extra=b"\x01")
        _append(3, b"-----BEGIN PGP SIGNED MESSAGE-----\n" + b"A" * SMALL_OBJECT_LIMIT)(data, slots)

    sif = _variant(good, tmp_path / "x.sif", add_signature)
    _fails_cleanly(_cli("verify", str(sif)), "too large to load")
