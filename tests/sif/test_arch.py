"""Which image architectures this host can run, read from a binfmt_misc directory like the kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcsif.errors import SIFError
from hpcsif.image.model import host_arch
from hpcsif.sif.arch import can_run, require_runnable

pytestmark = pytest.mark.skipif(host_arch() != "amd64", reason="the cases name amd64 as the host")

# what qemu-user-static registers for aarch64 (Debian's binfmt-support entry)
QEMU_AARCH64 = (
    "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\noffset 0\n"
    "magic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n"
)


def _binfmt(tmp_path: Path, status: str = "enabled\n", **entries: str) -> Path:
    root = tmp_path / "binfmt_misc"
    root.mkdir()
    (root / "status").write_text(status)
    (root / "register").write_text("")
    for name, text in entries.items():
        (root / name).write_text(text)
    return root


def test_native_and_compatible_architectures_run(tmp_path: Path) -> None:
    empty = _binfmt(tmp_path)
    assert can_run("amd64", empty) and can_run("386", empty) and can_run("unknown", empty)
    assert not can_run("arm64", empty) and not can_run("s390x", empty)


@pytest.mark.parametrize(
    ("status", "entry", "runs"),
    [
        ("enabled\n", QEMU_AARCH64.format(flags="OCF"), True),
        ("enabled\n", QEMU_AARCH64.format(flags="OC"), False),  # not fixed: gone inside a container
        ("enabled\n", QEMU_AARCH64.format(flags="F").replace("enabled", "disabled"), False),
        ("disabled\n", QEMU_AARCH64.format(flags="F"), False),
        ("enabled\n", "enabled\nflags: F\nmagic zz\n", False),
    ],
)
def test_emulation_needs_an_enabled_fixed_binfmt_entry(
    tmp_path: Path, status: str, entry: str, runs: bool
) -> None:
    binfmt = _binfmt(tmp_path, status, **{"qemu-aarch64": entry})
    assert can_run("arm64", binfmt) is runs
    assert not can_run("riscv64", binfmt)


def test_refusal_in_apptainer_words(tmp_path: Path) -> None:
    with pytest.raises(
        SIFError, match=r"^x\.sif: the image's architecture \(arm64\) could not run on the host's \(amd64\)$"
    ):
        require_runnable("x.sif", "arm64", _binfmt(tmp_path))
    require_runnable("x.sif", "amd64", tmp_path / "absent")  # no binfmt_misc at all: native still runs
    assert not can_run("arm64", tmp_path / "absent")
