"""Whether this host can run an image built for an architecture, as Apptainer decides it.

Apptainer refuses to start a SIF whose primary partition names another architecture ("the
image's architecture (arm64) could not run on the host's (amd64)") unless the host runs that
architecture's 32-bit sibling natively (386 on amd64, arm on arm64 …) or the kernel's
``binfmt_misc`` has an enabled emulator for it registered with the F (fix binary) flag, which
keeps it usable inside a container.
"""

from __future__ import annotations

from pathlib import Path

from hpcsif.errors import SIFError
from hpcsif.image.model import host_arch

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")

#: GOARCH -> (ELF class, little-endian, e_machine): the ELF executables of that architecture
_ELF = {
    "386": (1, True, 3),
    "amd64": (2, True, 62),
    "arm": (1, True, 40),
    "arm64": (2, True, 183),
    "ppc64": (2, False, 21),
    "ppc64le": (2, True, 21),
    "mips": (1, False, 8),
    "mipsle": (1, True, 8),
    "mips64": (2, False, 8),
    "mips64le": (2, True, 8),
    "s390x": (2, False, 22),
    "riscv64": (2, True, 243),
}
#: architectures a host of another one runs natively: image arch -> host arch
_RUNS_ON = {"386": "amd64", "arm": "arm64", "mips": "mips64", "mipsle": "mips64le"}


def _elf_kind(magic: bytes) -> tuple[int, bool, int] | None:
    """(class, little-endian, machine) that a binfmt_misc ELF magic matches; None if not ELF."""
    if len(magic) < 20 or not magic.startswith(b"\x7fELF"):
        return None
    little = magic[5] == 1
    return magic[4], little, int.from_bytes(magic[18:20], "little" if little else "big")


def can_emulate(arch: str, binfmt: Path = BINFMT_MISC) -> bool:
    """True if *binfmt* holds an enabled, fix-binary (F) emulator for *arch*'s ELF executables."""
    want = _ELF.get(arch)
    try:
        if want is None or (binfmt / "status").read_text() != "enabled\n":
            return False
        entries = [p for p in binfmt.iterdir() if p.name not in ("status", "register")]
    except OSError:
        return False
    for entry in entries:
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(" ", 1) for line in lines if " " in line)
        try:
            magic = bytes.fromhex(fields.get("magic", ""))
        except ValueError:
            continue
        if "enabled" in lines and "F" in fields.get("flags:", "") and _elf_kind(magic) == want:
            return True
    return False


def can_run(arch: str, binfmt: Path = BINFMT_MISC) -> bool:
    """True if this host can run executables of *arch* (a GOARCH name; ``unknown`` always can)."""
    host = host_arch()
    return arch in ("unknown", host) or _RUNS_ON.get(arch) == host or can_emulate(arch, binfmt)


def require_runnable(image: str | Path, arch: str, binfmt: Path = BINFMT_MISC) -> None:
    """Raise :class:`SIFError` with Apptainer's words unless this host can run *arch* images."""
    if not can_run(arch, binfmt):
        raise SIFError(
            f"{image}: the image's architecture ({arch}) could not run on the host's ({host_arch()})"
        )
