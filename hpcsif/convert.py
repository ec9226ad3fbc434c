"""Source → OCI image → flattened root filesystem → squashfs → SIF (or a sandbox directory).

The flattened layers stream straight into ``tar2sqfs``; no root tree is unpacked to disk.
The squashfs is written next to the destination (or in ``convert.tmpdir``) and copied into
the SIF by the kernel, then the SIF appears at its destination by an atomic rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from hpcsif.errors import BuildError
from hpcsif.fsutil import read_regular
from hpcsif.image.model import Image, Platform
from hpcsif.image.store import OCIStore, atomic_write_bytes
from hpcsif.refs import Reference, parse

if TYPE_CHECKING:  # the converter's heavy parts load only when converting
    from hpcsif.image.layers import ExtraFile
    from hpcsif.sif import metadata as md

log = logging.getLogger(__name__)

#: bump when the produced SIF changes for the same input, so cache keys change with it
FORMAT_VERSION = 1
COMPRESSIONS = ("zstd", "gzip", "lz4", "xz")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ConvertOptions:
    """Choices that shape the produced SIF (and so its cache key), plus where to work."""

    compression: str = "zstd"
    level: int | None = None
    jobs: int | None = None
    tmpdir: Path | None = None
    arch: str | None = None
    variant: str | None = None  # --arch-variant: 7 or v7 (arm), 8 (arm64)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise BuildError(
                f"unknown compression {self.compression!r}: choose one of {', '.join(COMPRESSIONS)}"
            )

    def key(self) -> str:
        """A short hash of the options that change the output (not tmpdir or jobs)."""
        doc = {"v": FORMAT_VERSION, "c": self.compression, "l": self.level, "a": self.arch}
        if self.variant:  # only then: keys of images converted without one stay as they were
            doc["av"] = self.variant
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_config(cls, **flags: Any) -> ConvertOptions:
        """Options from the ``[convert]`` configuration table, with any non-None ``flags`` on top."""
        from hpcsif.config import get_config

        cfg = get_config()
        values: dict[str, Any] = {
            "compression": cfg.get("convert.compression") or "zstd",
            "level": cfg.get("convert.level") or None,
            "jobs": cfg.get("convert.jobs") or None,
            "tmpdir": cfg.tmpdir(),
        }
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    @property
    def platform(self) -> Platform:
        """The platform to pick from multi-arch images (``--arch arm --arch-variant 7``: linux/arm/v7)."""
        variant = self.variant
        if variant and variant.isdigit():  # Apptainer takes 7 and v7 alike; OCI indexes say v7
            variant = f"v{variant}"
        if self.arch:
            return Platform(architecture=self.arch, variant=variant)
        return Platform(variant=variant)


def bootstrap_of(ref: Reference) -> str:
    """The ``bootstrap`` agent Apptainer would name for this reference."""
    return {"sif": "localimage", "sandbox": "localimage"}.get(ref.transport, ref.transport)


def from_of(ref: Reference) -> str:
    """The ``from`` value Apptainer records (the reference without its transport)."""
    if ref.is_registry or ref.transport == "docker-daemon":
        return str(ref).split("://", 1)[1]
    if ref.transport in ("oci", "oci-archive", "docker-archive"):
        return ref.path + (f":{ref.name}" if ref.name else "") if ref.path else ref.raw
    return ref.path or ref.raw


def image_metadata(image: Image, ref: Reference | None) -> md.Metadata:
    """The ``/.singularity.d`` metadata for an image fetched from ``ref``."""
    from hpcsif.sif import metadata as md

    bootstrap = bootstrap_of(ref) if ref else "oci"
    source = from_of(ref) if ref else image.source
    return md.for_image(image.config, bootstrap=bootstrap, source=source, arch=image.architecture)


def _work_dir(dest: Path, options: ConvertOptions) -> Path:
    base = options.tmpdir or dest.parent
    try:
        return Path(tempfile.mkdtemp(prefix=".hpcsif-build-", dir=base))
    except OSError as exc:
        raise BuildError(f"cannot create a temporary directory in {base}: {exc.strerror}") from None


def image_to_sif(
    image: Image,
    dest: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    meta: md.Metadata | None = None,
    ref: Reference | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert ``image`` to a SIF at ``dest`` atomically; returns ``dest``."""
    from hpcsif.image.layers import flatten
    from hpcsif.sif import metadata as md
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.squashfs import squashfs_from_tar
    from hpcsif.sif.writer import ObjectSpec, SIFWriter

    options = options or ConvertOptions()
    dest = Path(dest)
    meta = meta or image_metadata(image, ref)
    layers = image.layer_blobs()
    work = _work_dir(dest, options)
    try:
        squash = work / "rootfs.squashfs"
        total = sum(d.size for d in image.layers)
        report = (lambda done, _t: progress("layers", done, total)) if progress else None
        log.info("Creating squashfs (%s) from %d layer(s)", options.compression, len(layers))

        def write_tree(out: BinaryIO) -> None:
            stats = flatten(layers, out, extra=meta.files(), progress=report)
            log.debug("root filesystem: %d entries in a %d-byte tar stream", stats.entries, stats.bytes_out)

        squashfs_from_tar(
            write_tree,
            squash,
            compression=options.compression,
            level=options.level,
            jobs=options.jobs,
            tmpdir=work,
        )
        log.info("Creating SIF file %s", dest)
        with SIFWriter(dest, arch=image.architecture) as writer:
            writer.add(ObjectSpec(DataType.DEFFILE, data=md.raw(meta.deffile)))
            writer.add(
                ObjectSpec(DataType.GENERIC_JSON, data=meta.inspect_json(), name="inspect-metadata.json")
            )
            writer.add(ObjectSpec(DataType.GENERIC_JSON, data=meta.oci_config_json(), name="oci-config.json"))
            # the squashfs becomes the SIF in place (no copy) when it lies on dest's file system
            part = ObjectSpec(
                DataType.PARTITION,
                path=squash,
                fstype=FSType.SQUASHFS,
                parttype=PartType.PRIMSYS,
                arch=image.architecture,
            )
            writer.adopt(part)
            return writer.commit()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def image_to_sandbox(
    image: Image,
    dest: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    meta: md.Metadata | None = None,
    ref: Reference | None = None,
) -> Path:
    """Unpack ``image`` into a new writable directory tree at ``dest`` (built aside, then renamed)."""
    from hpcsif.image.layers import extract_tree

    meta = meta or image_metadata(image, ref)

    def fill(tmp: Path) -> None:
        extract_tree(image.layer_blobs(), tmp, extra=meta.files())

    return _build_dir(Path(dest), fill)


def _build_dir(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Create a directory tree aside with ``fill(tmp)`` and swap it in for ``dest`` at the end.

    An existing ``dest`` directory is replaced only after the new tree is complete.
    """
    if dest.exists() and not dest.is_dir():
        raise BuildError(f"{dest} exists and is not a directory")
    parent = dest.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    old = None
    try:
        os.rmdir(tmp)  # fill() gets a path that does not exist yet
        fill(tmp)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=parent))
            try:
                os.replace(dest, old / "tree")
            except OSError as exc:  # another user's sandbox (or one in a sticky directory)
                raise BuildError(f"cannot replace {dest}: {exc.strerror}") from None
        os.replace(tmp, dest)
    except BaseException:
        remove_tree(tmp)
        if old is not None and not dest.exists():
            os.replace(old / "tree", dest)
        raise
    finally:
        if old is not None:
            remove_tree(old)
    return dest


def sandbox_to_sif(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    options: ConvertOptions,
    *,
    meta: md.Metadata | None = None,
    arch: str | None = None,
    origin: str | None = None,
    oci_config: dict[str, Any] | None = None,
    scratch: bool = False,
) -> Path:
    """Pack a sandbox directory into a SIF with mksquashfs.

    ``meta`` (a definition-file build's) supplies the def file and the inspect/OCI-config
    objects; without it they are read from the tree, with the build labels renewed as
    Apptainer renews them (date, ``localimage`` from ``origin``), and ``oci_config`` (a repacked
    SIF's) is stored when given. ``arch`` overrides ``options.arch``; ``origin`` is what the def
    file record names as the source (default: ``src``). A ``scratch`` tree (ours to change) gets
    the renewed labels and def file in its ``/.singularity.d`` too (:func:`renew_local_image`);
    a user's sandbox is never written to.
    """
    from hpcsif.sif import metadata as md
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.squashfs import squashfs_from_dir
    from hpcsif.sif.writer import ObjectSpec, SIFWriter

    src, dest = Path(src), Path(dest)
    if not scratch:
        refuse_unreadable(src)
    inside = dest.resolve().parent.is_relative_to(src.resolve())  # mksquashfs would pack dest too
    if not scratch and meta is None and (inside or lacks_base_environment(src)):
        # Apptainer builds from a copy of the sandbox, to which it adds its base environment (a
        # root file system made with debootstrap, say): so does this, where part of it is missing
        # or where the image is written into the sandbox itself
        base = options.tmpdir or (tempfile.gettempdir() if inside else dest.parent)
        work = Path(tempfile.mkdtemp(prefix=".hpcsif-rebuild-", dir=base))
        try:
            copy_tree(src, work / "rootfs")
            origin = origin or str(src)
            return sandbox_to_sif(work / "rootfs", dest, options, arch=arch, origin=origin, scratch=True)
        finally:
            remove_tree(work)
    deffile = meta.deffile if meta else f"bootstrap: localimage\nfrom: {origin or src}\n"
    if meta is None:  # a local image: built for this host, labelled with what --arch asked
        wanted, arch = local_arch(arch or options.arch, options.variant), Platform().architecture
    else:
        arch = arch or options.arch or Platform().architecture
    with SIFWriter(dest, arch=arch) as writer:
        writer.add(ObjectSpec(DataType.DEFFILE, data=md.raw(deffile)))
        # inspect-metadata.json, then oci-config.json (where there is one), as Apptainer orders them
        if meta:
            inspect = meta.inspect_json()
            runtime = meta.oci_config_json() if meta.oci_config else None
        else:
            runtime = md.go_json(md.utf8(oci_config), separators=(",", ":")).encode() if oci_config else None
            if scratch:
                labels = renew_local_image(src, origin or str(src), wanted)
            else:
                labels = _local_labels(src, origin or str(src), wanted)
            # what `inspect --all` shows of the tree (environment, help, test, apps …), as Apptainer
            # records it: `apptainer inspect -e` and `run-help` read only this object
            from hpcsif.inspect import ATTRIBUTE_ORDER, ImageView, gather, present

            attrs = gather(ImageView(src, sandbox=True), ATTRIBUTE_ORDER)
            attrs.update(labels=labels, deffile=deffile)
            inspect = md.inspect_object(present(attrs, ATTRIBUTE_ORDER))
        writer.add(ObjectSpec(DataType.GENERIC_JSON, data=inspect, name="inspect-metadata.json"))
        if runtime is not None:
            writer.add(ObjectSpec(DataType.GENERIC_JSON, data=runtime, name="oci-config.json"))
        # mksquashfs 4.5 zeroes whatever precedes its -o offset, so it writes a file of its own
        # next to dest, which then becomes the SIF in place
        squash = Path(tempfile.mkdtemp(prefix=".hpcsif-build-", dir=options.tmpdir or dest.parent))
        try:
            squashfs_from_dir(
                src,
                squash / "rootfs.squashfs",
                compression=options.compression,
                level=options.level,
                jobs=options.jobs,
            )
            part = ObjectSpec(
                DataType.PARTITION,
                path=squash / "rootfs.squashfs",
                fstype=FSType.SQUASHFS,
                parttype=PartType.PRIMSYS,
                arch=arch,
            )
            writer.adopt(part)
            return writer.commit()  # the adopted file becomes dest: commit before squash goes
        finally:
            shutil.rmtree(squash, ignore_errors=True)


def sif_to_sif(src: str | os.PathLike[str], dest: str | os.PathLike[str], options: ConvertOptions) -> Path:
    """Repack a SIF (e.g. with another codec; signatures are not carried over), as
    ``apptainer build new.sif old.sif`` does: unpacked to a scratch tree, then packed anew
    with the old image's ``oci-config.json`` (a shell-less image needs it to start)."""
    dest = Path(dest)
    oci_config = sif_oci_config(src)
    scratch = Path(tempfile.mkdtemp(prefix=".hpcsif-rebuild-", dir=options.tmpdir or dest.parent))
    try:
        tree = sif_to_sandbox(src, scratch / "rootfs")
        return sandbox_to_sif(tree, dest, options, origin=str(src), oci_config=oci_config, scratch=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def sif_oci_config(sif: str | os.PathLike[str]) -> dict[str, Any]:
    """The base SIF's ``oci-config.json``, which the new image keeps, as Apptainer's keeps it.

    A shell-less image needs it to start; one that is not a JSON object could not start it and
    is left behind with a warning. A bare squashfs or ext3 image file has none.
    """
    from hpcsif.errors import IntegrityError
    from hpcsif.image.store import load_json_object
    from hpcsif.sif.format import DataType
    from hpcsif.sif.reader import SIFImage, bare_filesystem

    if bare_filesystem(sif):
        return {}
    with SIFImage.open(sif) as img:
        found = img.find(DataType.GENERIC_JSON, "oci-config.json")
        data = img.read_object(found[0]) if found else b""
    if not data:
        return {}
    try:
        return load_json_object(data, f"{sif}: oci-config.json")
    except IntegrityError as exc:
        log.warning("%s; the new image goes without it", exc)
        return {}


def local_arch(wanted: str | None, variant: str | None = None) -> str | None:
    """``--arch`` of a build from a local image: Apptainer labels the image with it but builds
    for this host, saying so when they differ (naming it with its *variant*: ``arm32v7``)."""
    host = Platform().architecture
    if wanted and wanted != host:
        asked = Platform(architecture=wanted, variant=f"v{variant.removeprefix('v')}" if variant else None)
        log.warning("Architecture %s does not match build arch %s", host, _arch_name(asked))
    return wanted


def _local_labels(
    tree: Path, origin: str, arch: str | None, bootstrap: str = "localimage", update: bool = False
) -> dict[str, Any]:
    """The labels of an image built from the local image *tree*: its own, with the build
    labels renewed as Apptainer renews them (date, *bootstrap* from *origin*, *arch* or the
    image's own or this host's); an *update* renews only the date, as Apptainer's ``--update``
    keeps the labels a sandbox has."""
    from hpcsif.sif import metadata as md

    found = _read_json(_text_inside(tree / ".singularity.d", "labels.json") or "")
    labels = {k: v for k, v in found.items() if isinstance(v, str)}
    if len(labels) < len(found):  # Apptainer refuses to build; its inspect could not read them
        dropped = ", ".join(sorted(found.keys() - labels))
        log.warning("labels of %s that are not strings are left out: %s", origin, dropped)
    build_arch = arch or str(labels.get("org.label-schema.build-arch") or Platform().architecture)
    renewed = md.build_labels(bootstrap=bootstrap, source=origin, arch=build_arch)
    if update:
        date = "org.label-schema.build-date"
        return {**renewed, **labels, date: renewed[date]}
    return {**labels, **renewed}


def keep_bootstrap_history(tree: Path) -> None:
    """Move *tree*'s def file to ``/.singularity.d/bootstrap_history/ApptainerN``, where (and as)
    Apptainer keeps the def file of the image a build started from."""
    from hpcsif.build.builder import resolve_inside  # symlinks resolved inside the tree

    old = resolve_inside(tree, "/.singularity.d") / "Singularity"
    if old.is_symlink() or old.is_file():  # a link is moved as it is, never followed
        history = resolve_inside(tree, "/.singularity.d/bootstrap_history")
        history.mkdir(parents=True, exist_ok=True)
        os.replace(old, history / f"Apptainer{len(list(history.iterdir()))}")


#: the runscript Apptainer gives an image built from a local one that has none
NO_RUNSCRIPT = '#!/bin/sh\n\necho "There is no runscript defined for this container\\n";\n'


def _base_environment(deffile: str, labels: dict[str, Any]) -> list[ExtraFile]:
    """Apptainer's base environment of an image built from a local one, with *deffile* and
    *labels* as its record."""
    from hpcsif.sif import metadata as md

    environment = {f"{md.SD}/env/90-environment.sh": md.ENV_90}
    meta = md.Metadata(deffile, labels, NO_RUNSCRIPT, environment, oci_config={})
    return meta.files()


def lacks_base_environment(tree: Path) -> bool:
    """Whether the sandbox *tree* lacks part of Apptainer's base environment (a root file system
    made with debootstrap, say), which a build from it adds."""
    return any(not os.path.lexists(tree / f.path.lstrip("/")) for f in _base_environment("", {}))


def renew_local_image(
    tree: Path, origin: str, arch: str | None = None, bootstrap: str = "localimage", update: bool = False
) -> dict[str, Any]:
    """Record in *tree* (a scratch copy of a local image) that it was built from *origin*, as
    Apptainer's ``build`` from a local image does: the old def file goes to the bootstrap history,
    ``/.singularity.d/Singularity`` names ``localimage`` *origin* and ``labels.json`` has the
    renewed build labels (returned). Apptainer's base environment (mount points, action scripts,
    env files, a runscript that says there is none) is added where the tree has nothing, so an
    image made with ``mksquashfs ROOT`` gets it as there."""
    from hpcsif.build.builder import resolve_inside  # symlinks resolved inside the tree
    from hpcsif.sif import metadata as md

    labels = _local_labels(tree, origin, arch, bootstrap, update)
    keep_bootstrap_history(tree)
    deffile = f"bootstrap: {bootstrap}\nfrom: {origin}\n\n"
    renewed = (f"{md.SD}/Singularity", f"{md.SD}/labels.json")
    for f in _base_environment(deffile, labels):
        parent = resolve_inside(tree, os.path.dirname(f.path))
        path = parent / os.path.basename(f.path)
        ours = f.path in renewed and not path.is_symlink() and not path.is_dir()
        if not parent.is_dir() or (os.path.lexists(path) and not ours):
            continue  # the image's own (a link is never written through)
        if f.symlink is not None:
            os.symlink(f.symlink, path)
        elif f.data is None:
            path.mkdir()
            os.chmod(path, f.mode)  # not the umask's
        else:
            atomic_write_bytes(path, f.data, f.mode)
    return labels


def update_sandbox(sandbox: Path, ref: Reference) -> Path:
    """``build --update --sandbox DIR IMAGE``, as Apptainer 1.4 does it: the image is not fetched
    and the sandbox keeps its files; only its record of where it came from is renewed
    (:func:`renew_local_image`), naming *ref*."""
    source = ref.raw.split("://", 1)[1] if "://" in ref.raw else from_of(ref)  # as typed: alpine
    renew_local_image(sandbox, source, bootstrap=bootstrap_of(ref), update=True)
    return sandbox


def sandbox_to_sandbox(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    origin: str | None = None,
    arch: str | None = None,
) -> Path:
    """Copy a sandbox directory (:func:`copy_tree`); with *origin*, the copy records it as its
    source (:func:`renew_local_image`)."""

    def fill(tmp: Path) -> None:
        copy_tree(Path(src), tmp)
        if origin is not None:
            renew_local_image(tmp, origin, arch)

    return _build_dir(Path(dest), fill)


def sif_to_sandbox(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    origin: str | None = None,
    arch: str | None = None,
) -> Path:
    """Unpack a local image's root file system into a new directory; with *origin*, the tree
    records it as its source (:func:`renew_local_image`).

    As Apptainer builds from them: a SIF's primary partition (squashfs, or ext3), a bare
    squashfs file or a bare ext3 image file. A SIF's overlay partition (what ``apptainer exec
    --writable`` wrote) is left out, as Apptainer leaves it out of a build.
    """
    from hpcsif.sif.format import FSType
    from hpcsif.sif.reader import SIFImage, bare_filesystem
    from hpcsif.sif.squashfs import unsquash_to_dir

    squashfs = False
    if bare_filesystem(src) is None:
        with SIFImage.open(src) as img:
            part = img.primary_partition(check=False)
            squashfs = part.fstype != FSType.EXT3 or not part.size
            if squashfs:
                offset, path = img.primary_partition().offset, img.path  # checked
    if not squashfs:
        from hpcsif.engine.image_files import root_image

        info = root_image(Path(src))  # a bare file system, or a SIF's ext3 root: checked there
        squashfs, offset, path = info.fstype == "squashfs", info.offset, info.path

    def fill(tmp: Path) -> None:
        if squashfs:
            unsquash_to_dir(path, tmp, offset=offset)
        else:
            _copy_mounted(path, tmp)
        if origin is not None:
            renew_local_image(tmp, origin, arch)

    return _build_dir(Path(dest), fill)


def _copy_mounted(image: Path, dest: Path) -> None:
    """Copy the root file system of *image* (an ext3 one, mounted read-only) to the new *dest*."""
    from hpcsif.engine.image_files import mount_root
    from hpcsif.engine.mounts import SharedMount

    mounts: list[SharedMount] = []
    try:
        copy_tree(mount_root(image, mounts), dest, what=f"the file system of {image}", shown=f"{image}:")
    finally:
        for mount in reversed(mounts):
            mount.release()


def copy_tree(src: Path, dest: Path, what: str | None = None, shown: str | None = None) -> None:
    """Copy the directory *src* to the new *dest* as ``cp -a`` copies it, as Apptainer copies a
    sandbox: symlinks as they are, owners (where the caller may set them), modes, times, hard
    links, FIFOs and sockets kept; xattrs dropped. One :class:`BuildError` line if anything
    cannot be copied (an unreadable file), with nothing left at *dest*; *shown* is how *src* is
    named there (a mount point means nothing to the user)."""
    proc = subprocess.run(
        ["cp", "-a", "--no-preserve=xattr", "--", f"{src}/.", str(dest)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        remove_tree(dest)
        detail = proc.stderr.replace(f"{src}/./", f"{shown or src}/").strip().splitlines()
        raise BuildError(f"cannot copy {what or src}: {detail[0] if detail else 'cp failed'}")


def remove_tree(path: Path) -> None:
    """Remove *path* even where a copied directory has no write or search permission for its
    owner (``chmod 000`` in the image): each is made accessible before it is emptied."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    os.chmod(path, 0o700)
    for dirpath, dirs, _files in os.walk(path):  # top-down: a directory is opened after its chmod
        for d in dirs:
            with contextlib.suppress(OSError):
                if not os.path.islink(os.path.join(dirpath, d)):
                    os.chmod(os.path.join(dirpath, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def refuse_unreadable(tree: Path) -> None:
    """One :class:`BuildError` line for the first entry of *tree* the caller cannot read.

    mksquashfs packs such a file as an empty one and leaves out such a directory with a warning
    only; Apptainer's build, which copies the sandbox first, fails there. Root reads everything.
    """
    if os.geteuid() == 0:
        return

    def unreadable(path: str, exc: OSError | None = None) -> NoReturn:
        why = os.strerror(exc.errno) if exc and exc.errno else "Permission denied"
        raise BuildError(f"cannot build from {tree}: {path} cannot be read ({why})")

    for dirpath, dirs, files in os.walk(tree, onerror=lambda exc: unreadable(exc.filename, exc)):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            need = os.R_OK | os.X_OK if stat.S_ISDIR(mode) else os.R_OK
            if (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) and not os.access(path, need):
                unreadable(path)


def _read_json(text: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    return {}


def _text_inside(directory: Path, name: str) -> str | None:
    """The regular file ``name`` in an image's ``directory``; None where either is a symbolic
    link (which could name a file of the host: a root build must not copy that into the SIF)."""
    from hpcsif.sif.reader import SMALL_OBJECT_LIMIT

    if directory.is_symlink():
        return None
    try:
        data = read_regular(directory / name, SMALL_OBJECT_LIMIT, follow=False)
    except OSError:
        return None
    return None if data is None else data[:SMALL_OBJECT_LIMIT].decode(errors="replace")


def fetch_image(
    ref: Reference, store: OCIStore, options: ConvertOptions, source_options: dict[str, Any] | None = None
) -> Image:
    """Fetch ``ref`` into ``store`` with the source for its transport.

    A ``notify`` callable among ``source_options`` hears Apptainer's "Converting OCI blobs to SIF
    format", so that ``pull`` can tell a conversion from a cache hit as Apptainer's does. As in
    Apptainer, it is said once the image is found (when its download starts, or when the fetch
    is done): an image that cannot be found or chosen fails with its error line alone.
    """
    from hpcsif.sources import get_source

    opts = dict(source_options or {})
    notify = opts.pop("notify", None)
    pending = [notify] if notify else []

    def announce() -> None:
        if pending:
            pending.pop()("Converting OCI blobs to SIF format")

    if pending and callable(progress := opts.get("progress")):

        def progress_after_announcing(*args: Any) -> None:
            announce()
            progress(*args)

        opts["progress"] = progress_after_announcing
    source = get_source(ref, platform=options.platform, **opts)
    image = source.fetch(ref, store)
    announce()
    if options.arch or options.variant:  # a single-arch image is taken whatever --arch says
        want, got = (
            options.platform,
            Platform(architecture=image.architecture, variant=image.config.get("variant") or None),
        )
        # (compared by Apptainer's names: a variant counts only for arm, as there)
        if _arch_name(got) != _arch_name(want) and not (
            want.variant is None and got.architecture == want.architecture
        ):
            log.warning("Architecture %s does not match build arch %s", _arch_name(got), _arch_name(want))
    return image


def _arch_name(p: Platform) -> str:
    """Apptainer's name of a platform's architecture (``arm32v7``, ``arm64v8``, ``amd64``)."""
    if p.variant and p.architecture in ("arm", "arm64"):
        return f"{'arm32' if p.architecture == 'arm' else 'arm64'}{p.variant}"
    return p.architecture


def convert_ref(
    ref: str | Reference,
    dest: str | os.PathLike[str],
    *,
    options: ConvertOptions | None = None,
    store: OCIStore | None = None,
    sandbox: bool = False,
    source_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch and convert any reference to a SIF (or a sandbox) at ``dest``, without the SIF cache.

    ``store`` is the blob cache to fetch into; without one, a temporary store is used and
    removed afterwards. Local SIFs and sandboxes convert to either form.
    """
    options = options or ConvertOptions()
    ref = parse(ref) if isinstance(ref, str) else ref
    if ref.transport == "sandbox":
        if sandbox:
            return sandbox_to_sandbox(
                ref.path or "", dest, origin=ref.path, arch=local_arch(options.arch, options.variant)
            )
        return sandbox_to_sif(ref.path or "", dest, options, origin=ref.path)  # as typed: ./dir/
    if ref.transport == "sif":
        if sandbox:
            return sif_to_sandbox(
                ref.path or "", dest, origin=ref.path, arch=local_arch(options.arch, options.variant)
            )
        return sif_to_sif(ref.path or "", dest, options)
    if ref.transport in ("http", "https", "fsspec", "oras"):
        # a SIF somewhere else: downloaded aside, then repacked (or unpacked) as a local one
        from hpcsif.sources import download_sif

        with tempfile.TemporaryDirectory(prefix="hpcsif-download-", dir=options.tmpdir) as tmp:
            local = str(download_sif(ref, Path(tmp) / "image.sif", source_options or {}))
            return sif_to_sandbox(local, dest) if sandbox else sif_to_sif(local, dest, options)
    with contextlib.ExitStack() as stack:
        if store is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hpcsif-blobs-", dir=options.tmpdir))
            store = OCIStore(tmp)
        image = fetch_image(ref, store, options, source_options)
        if sandbox:
            return image_to_sandbox(image, dest, options, ref=ref)
        return image_to_sif(image, dest, options, ref=ref, progress=progress)
