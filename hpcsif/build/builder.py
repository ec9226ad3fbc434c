"""Build a SIF (or a sandbox) from a definition file, the way ``apptainer build`` does.

Each stage: bootstrap a root tree (an image source, a local SIF/sandbox, or nothing) →
``%files from STAGE`` → ``%setup`` on the host → the host's ``%files`` → SCIF app layout →
``%post`` (and ``%appinstall``) inside the tree with bubblewrap as uid 0 → ``/.singularity.d``
metadata → ``%test``. The last stage's tree becomes the SIF or the sandbox.
The tree under ``/.singularity.d`` is the source of truth: the SIF's metadata objects are
read back from it at the end, as Apptainer's assembler does.

Run by root, ``%post`` runs as real root, as ``apptainer build`` by root does. Otherwise it
runs as fake root, which maps only the caller's uid to 0, so files owned by other uids in a
base image stay read-only to ``%post`` and chown to other users fails (Apptainer's
``--fakeroot`` maps a subuid range instead).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcsif import __version__
from hpcsif.build.deffile import App, Definition, FileCopy, Section, Stage, app_files, load, parse_labels
from hpcsif.convert import ConvertOptions
from hpcsif.errors import BuildError, MissingToolError, ReferenceError, SourceError
from hpcsif.fsutil import read_regular
from hpcsif.image.model import Platform
from hpcsif.image.store import OCIStore
from hpcsif.sif import metadata as md

log = logging.getLogger(__name__)

SD = md.SD
POST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SCRIPT_NAME = ".hpcsif-build-script"  # in the tree's root while a section runs, then removed
# source the image's environment, then run the section's interpreter on the script
# (LANG is C unless the image's environment sets it, as in Apptainer's %post and %test)
_WITH_ENV = (
    f'for f in {SD}/env/*.sh; do if [ -f "$f" ]; then . "$f"; fi; done; export LANG="${{LANG:-C}}"; exec "$@"'
)
_HOST_BINDS = ("/etc/resolv.conf", "/etc/hosts")
#: Apptainer builds with umask 0002: files %setup, %files, %post and %test make are group-writable
BUILD_UMASK = 0o002
#: where ``%post`` may write ``KEY VALUE`` lines ($APPTAINER_LABELS) that become labels
_POST_LABELS = "/.build.labels"
#: what ``--section`` may name (besides ``all`` and ``none``), as Apptainer's RunSection checks
SECTION_NAMES = frozenset(
    ("setup", "files", "post", "environment", "runscript", "startscript", "test", "help", "labels")
)
# mount points every built image gets, as in Apptainer's build skeleton
SKELETON = ("proc", "dev", "sys", "home", "root", "tmp", "var/tmp", "etc")

APP_ENV_BASE = """#!/bin/sh

SCIF_APPNAME={name}
SCIF_APPROOT="/scif/apps/{name}"
SCIF_APPMETA="/scif/apps/{name}/scif"
SCIF_DATA="/scif/data"
SCIF_APPDATA="/scif/data/{name}"
SCIF_APPINPUT="/scif/data/{name}/input"
SCIF_APPOUTPUT="/scif/data/{name}/output"
export SCIF_APPDATA SCIF_APPNAME SCIF_APPROOT SCIF_APPMETA SCIF_APPINPUT SCIF_APPOUTPUT SCIF_DATA
"""
APPS_GLOBAL_ENV = """## App Global Exports For: {var}

SCIF_APPDATA_{var}=/scif/data/{name}
SCIF_APPMETA_{var}=/scif/apps/{name}/scif
SCIF_APPROOT_{var}=/scif/apps/{name}
SCIF_APPBIN_{var}=/scif/apps/{name}/bin
SCIF_APPLIB_{var}=/scif/apps/{name}/lib

export SCIF_APPDATA_{var} SCIF_APPMETA_{var} SCIF_APPROOT_{var} SCIF_APPBIN_{var} SCIF_APPLIB_{var}
"""
APP_INSTALL = """
cd /
. {root}/scif/env/01-base.sh

cd {root}
{body}
cd /
"""


@dataclass
class BuildOptions:
    """How to build: output kind, whether to run ``%test``, conversion options, blob store.

    ``sections`` (``--section``) limits the sections run (None: all); ``update`` (``-u``) runs
    the definition over the existing sandbox ``dest`` instead of bootstrapping; ``binds`` and
    ``mounts`` (``-B``/``--mount`` specs), ``nv``/``rocm`` (host GPU files, found as the engine
    finds them) apply to ``%post`` and ``%test``; ``writable_tmpfs`` lets ``%test`` write to a
    throw-away overlay; ``no_cleanup`` keeps the build directory and says where it is;
    ``fakeroot`` runs ``%post``/``%test`` as fake root even for root (as ``--fakeroot``);
    ``force`` (``-F``) lets ``%help`` and ``%labels`` replace the base image's; ``notify``
    hears each step in Apptainer's words ("Running post scriptlet" …).
    """

    convert: ConvertOptions = field(default_factory=ConvertOptions)
    sandbox: bool = False
    notest: bool = False
    store: OCIStore | None = None  # the blob cache; None: a temporary one
    source_options: dict[str, Any] = field(default_factory=dict)
    build_args: dict[str, str] = field(default_factory=dict)
    warn_unused_build_args: bool = False
    sections: frozenset[str] | None = None
    update: bool = False
    binds: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    nv: bool = False
    rocm: bool = False
    writable_tmpfs: bool = False
    no_cleanup: bool = False
    fakeroot: bool = False  # -f: fake root in a user namespace even when root builds
    force: bool = False  # -F: %help and %labels replace what the base image has
    notify: Callable[[str], None] | None = None
    _started: bool = field(default=False, repr=False)

    def say(self, step: str) -> None:
        """Tell ``notify`` (if any) about a build step, after "Starting build..." the first time.

        The first step is said once it has worked, so that input refused at once (a missing
        base image, a bad definition file) fails with its error line alone.
        """
        if self.notify:
            if not self._started:
                self._started = True
                self.notify("Starting build...")
            self.notify(step)

    def runs(self, section: str) -> bool:
        """True if ``section`` is to run (``--section``)."""
        return self.sections is None or section in self.sections

    def host_binds(self) -> list[Any]:  # list[hpcsif.engine.binds.Bind]
        """The binds ``%post`` and ``%test`` get: ``-B``, ``--mount``, then the GPU files."""
        from hpcsif.engine.binds import parse_bind, parse_mount

        binds = [b for spec in self.binds for b in parse_bind(spec)]
        binds += [parse_mount(spec) for spec in self.mounts]
        if self.nv or self.rocm:
            from hpcsif.engine import gpu

            for wanted, discover in ((self.nv, gpu.nvidia), (self.rocm, gpu.rocm)):
                if wanted:
                    binds += discover().binds
        return binds


@dataclass
class _Built:
    """A finished stage: its tree, the image config it came from and its architecture."""

    root: Path
    oci_config: dict[str, Any]
    arch: str


def build_definition(
    deffile: str | os.PathLike[str] | Definition,
    dest: str | os.PathLike[str],
    options: BuildOptions | None = None,
) -> Path:
    """Build the definition file ``deffile`` into a SIF (or sandbox) at ``dest``; returns ``dest``.

    Nothing appears at ``dest`` unless every stage and ``%test`` succeed.
    """
    from hpcsif.convert import _build_dir

    options = options or BuildOptions()
    definition = deffile if isinstance(deffile, Definition) else load(deffile, options.build_args)
    if definition.unused_build_args:
        names = " ".join(definition.unused_build_args)
        if not options.warn_unused_build_args:
            raise BuildError(
                f"unused build args: {names}. "
                "Use option --warn-unused-build-args to show a warning instead of a fatal message"
            )
        log.warning("Unused build args: %s", names)
    dest = Path(dest)
    binds = options.host_binds()
    base = options.convert.tmpdir or _work_base(definition, dest.resolve().parent)
    try:
        work = Path(tempfile.mkdtemp(prefix=".hpcsif-build-", dir=base))
    except OSError as exc:
        raise BuildError(f"cannot create a temporary directory in {base}: {exc.strerror}") from None
    try:
        with contextlib.ExitStack() as stack:
            store = options.store
            if store is None:
                store = OCIStore(stack.enter_context(tempfile.TemporaryDirectory(dir=work)))
            built: list[_Built] = []
            sources = definition.source_stages()
            for i, stage in enumerate(definition.stages):
                log.info("Building stage %d of %d (%s)", i + 1, len(definition.stages), stage.bootstrap)
                update = dest if options.update and i == len(definition.stages) - 1 else None
                builder = _StageBuilder(definition, i, work / f"stage{i}", built, options, store, binds)
                built.append(builder.build(update))
                # every stage's %test runs when the stage is done, as in Apptainer; a section of
                # blank lines runs too (Apptainer runs any section with a body)
                test = stage.sections.get("test")
                if test is not None and test.body and not options.notest and options.runs("test"):
                    _run_test(built[-1].root, test, definition.where, binds, options)
                if i < len(definition.stages) - 1 and i not in sources:  # no later %files needs it
                    shutil.rmtree(built[-1].root, ignore_errors=True)
        final = built[-1]
        if options.sandbox:
            options.say("Creating sandbox directory...")
            return _build_dir(dest, lambda tmp: shutil.move(str(final.root), str(tmp)))
        options.say("Creating SIF file...")
        return _pack(final, definition, dest, options.convert)
    finally:
        if options.no_cleanup:  # as Apptainer: kept whether the build failed or not
            log.warning("Build performed with no clean up option, build directory left at %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _work_base(definition: Definition, near: Path) -> Path:
    """Where the build trees go by default: ``near`` (the output's directory), unless a host
    ``%files`` source holds it (``%files . /app`` where the image is written would copy the
    tree into itself); then the system's temporary directory, where Apptainer builds."""
    for stage in definition.stages:
        copies = [c for block in stage.files if block.stage is None for c in block.copies]
        copies += [c for app in stage.apps.values() for c in app_files(app, definition.where)]
        for copy in copies:
            for src in sorted(glob.glob(copy.src)) if glob.has_magic(copy.src) else [copy.src]:
                if near.is_relative_to(os.path.realpath(src)):
                    return Path(tempfile.gettempdir())
    return near


def reference(stage: Stage) -> str:
    """The image reference a stage's ``Bootstrap``/``From``/``Registry``/``Namespace`` name."""
    agent, src = stage.bootstrap, stage.source
    if agent == "docker":
        src = src.removeprefix("docker://")
        first = src.split("/", 1)[0]
        has_registry = "/" in src and ("." in first or ":" in first or first == "localhost")
        namespace, registry = stage.header.get("namespace"), stage.header.get("registry")
        if namespace and "/" not in src:
            src = f"{namespace}/{src}"
        if registry and not has_registry:
            src = f"{registry}/{src}"
        return f"docker://{src}"
    return f"{agent}://{src.removeprefix(agent + '://')}"


def resolve_inside(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were ``/``.

    Nothing a tree's symlinks point at can lead outside ``root`` (``/etc -> /host/etc``
    in an image stays in the image), so copying into the result is safe.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"too many levels of symbolic links resolving {path} in {root}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return root.joinpath(*done)


class _StageBuilder:
    """Builds one stage's tree in ``root``."""

    def __init__(
        self,
        definition: Definition,
        index: int,
        root: Path,
        earlier: list[_Built],
        options: BuildOptions,
        store: OCIStore,
        binds: list[Any] | None = None,
    ) -> None:
        self.definition = definition
        self.binds = binds or []
        self.stage = definition.stages[index]
        self.index = index
        self.root = root
        self.earlier = earlier
        self.options = options
        self.store = store
        self.where = definition.where
        self.post_labels: dict[str, str] = {}  # written by %post to $APPTAINER_LABELS

    def build(self, update: Path | None = None) -> _Built:
        """``%pre``, bootstrap (or, with ``update``, copy that existing sandbox), then the sections."""
        if self.options.runs("pre"):
            self.pre()
        if update is not None:
            self.options.say(f"Building into existing container: {os.path.abspath(update)}")
            oci_config, arch = self._local_image(update, self.stage.line)
        else:
            oci_config, arch = self.bootstrap()
        for d in SKELETON:
            path = resolve_inside(self.root, d)
            if not os.path.lexists(path):
                path.mkdir(mode=0o755, parents=True)
        runs = self.options.runs
        if runs("files"):  # as Apptainer: what comes from other stages is there for %setup
            self.copy_files(from_stage=True)
        if runs("setup"):
            self.setup()
        if runs("files"):
            self.copy_files(from_stage=False)
        self.make_apps()
        if runs("post"):
            self.post()
        self.write_metadata(bootstrapped=update is None)
        return _Built(self.root, oci_config, arch)

    # -- bootstrap ------------------------------------------------------------------------

    def bootstrap(self) -> tuple[dict[str, Any], str]:
        """Fill the tree from the bootstrap source; returns (OCI runtime config, architecture)."""
        from hpcsif.image.layers import extract_tree

        stage, opts = self.stage, self.options.convert
        line = self.stage.header_lines.get("from", stage.line)
        if stage.bootstrap in ("localimage", "oras"):
            with self._base_image(line) as src:
                self._check_fingerprints(Path(src))
                found = self._local_image(Path(src), line)
                from hpcsif.sif.reader import bare_filesystem

                if bare_filesystem(src):  # a squashfs or ext3 file: Apptainer verifies only a SIF
                    self.options.say("Extracting local image...")
                    return found
                if Path(src).is_file():  # Apptainer verifies no sandbox
                    self.options.say(f"Verifying bootstrap image {src}")
                if Path(src).is_file() and "fingerprints" not in stage.header:
                    from hpcsif.signing.verify import warn_unverified_base

                    warn_unverified_base(src)
                if stage.bootstrap == "localimage":  # Apptainer's oras build does not say it
                    self.options.say("Extracting local image...")
                return found
        if stage.bootstrap == "scratch":
            arch = opts.arch or Platform().architecture
            meta = md.for_image({}, bootstrap="scratch", source="", arch=arch)
            # no image, so no image Env and no ENTRYPOINT/CMD: Apptainer's empty runscript
            del meta.environment[f"{SD}/env/10-docker2singularity.sh"]
            # nor a source: the "from" label comes only from a From: header, as in Apptainer
            del meta.labels["org.label-schema.usage.singularity.deffile.from"]
            meta.runscript = "#!/bin/sh\n"
            extract_tree([], self.root, extra=meta.files())
            return {}, arch
        from hpcsif.convert import fetch_image
        from hpcsif.refs import parse

        self.options.say("Fetching OCI image...")
        try:
            image = fetch_image(parse(reference(stage)), self.store, opts, self.options.source_options)
        except (SourceError, ReferenceError) as exc:  # same error, told where the reference came from
            raise type(exc)(f"{self.where}:{line}: {exc}") from exc
        # the runscript runs ENTRYPOINT with CMD as default arguments; IncludeCmd (any non-empty
        # value) asks for CMD in it, which this runscript always has; a %runscript replaces it later
        meta = md.for_image(
            image.config, bootstrap=stage.bootstrap, source=stage.source, arch=image.architecture
        )
        extract_tree(image.layer_blobs(), self.root, extra=meta.files())
        self.options.say("Extracting OCI image...")
        self.options.say("Inserting Apptainer configuration...")
        return meta.oci_config, image.architecture

    @contextlib.contextmanager
    def _base_image(self, line: int) -> Iterator[str]:
        """The local image a ``localimage`` or ``oras`` stage starts from. ``oras``: the SIF pulled
        into the SIF cache (as Apptainer's oras cache) and leased while it is read, or, with the
        cache disabled, downloaded into the build directory."""
        stage = self.stage
        if stage.bootstrap != "oras":
            yield stage.source
            return
        from hpcsif.cache.api import downloaded_sif
        from hpcsif.refs import parse

        said: list[str] = []

        def notify(message: str) -> None:
            said.append(message)
            self.options.say(message)

        source_options = {**self.options.source_options, "notify": notify}
        aside = self.root.parent / f"stage{self.index}-base.sif" if self.options.store is None else None
        with contextlib.ExitStack() as stack:
            try:
                ref = parse(reference(stage))
                if aside is not None:
                    self.options.say(f"Downloading oras image to tmp cache: {aside}")
                sif = stack.enter_context(downloaded_sif(ref.raw, source_options, aside=aside))
            except (SourceError, ReferenceError) as exc:  # told where the reference came from
                raise type(exc)(f"{self.where}:{line}: {exc}") from exc
            if aside is None and not said:
                self.options.say("Using cached SIF image")
            yield str(sif)

    def _check_fingerprints(self, src: Path) -> None:
        """``Fingerprints: FPR[,FPR…]``: the base SIF must be signed by every one of these keys.

        The keys come from the local keyring (``hpcsif key import``); a sandbox cannot be checked.
        """
        wanted = [f.strip() for f in self.stage.header.get("fingerprints", "").split(",") if f.strip()]
        if not wanted:
            return
        from hpcsif.errors import SignatureError
        from hpcsif.signing.keys import Keyring
        from hpcsif.signing.verify import verify_image

        where = f"{self.where}:{self.stage.header_lines['fingerprints']}: while checking fingerprint"
        from hpcsif.sif.reader import bare_filesystem

        # Apptainer skips the check there; a build that asked for it is not made unchecked
        if not src.is_file() or bare_filesystem(src):
            raise BuildError(f"{where}: {src} is not a SIF file, so it cannot be verified")
        # as Apptainer: every signature is checked against the whole local keyring (a signer the
        # keyring does not know fails), and the wanted keys must be among the signers
        try:
            report = verify_image(src, Keyring().list())
        except SignatureError as exc:
            raise SignatureError(f"{where}: {exc}") from None
        signers = [r.key for r in report.verified]
        missing = [fpr for fpr in wanted if not any(key.matches(fpr) for key in signers)]
        if missing:
            raise SignatureError(
                f"{where}: image not signed by required entities: {', '.join(missing)} "
                "(a signer's public key must be in the keyring: hpcsif key import)"
            )

    def _local_image(self, src: Path, line: int) -> tuple[dict[str, Any], str]:
        from hpcsif.convert import (
            copy_tree,
            keep_bootstrap_history,
            local_arch,
            sif_oci_config,
            sif_to_sandbox,
        )

        oci_config: dict[str, Any] = {}
        if src.is_dir():
            try:
                copy_tree(src, self.root, what=f"sandbox {src}")
            except BuildError as exc:
                raise BuildError(f"{self.where}:{line}: {exc}") from None
        elif src.is_file():
            sif_to_sandbox(src, self.root)
            oci_config = sif_oci_config(src)
        else:
            from hpcsif.refs import reason, stat_error

            error = stat_error(src)
            why = reason(error) if error else "not a file or directory"
            raise BuildError(f"{self.where}:{line}: localimage {src}: {why}")
        # built for this host, labelled with --arch (Apptainer)
        local_arch(self.options.convert.arch, self.options.convert.variant)
        keep_bootstrap_history(self.root)
        return oci_config, Platform().architecture

    # -- host side: %setup and %files ------------------------------------------------------------

    def pre(self) -> None:
        """Run ``%pre`` on the host before the bootstrap, as Apptainer 1.4 still does: as
        ``%setup``, with ``$APPTAINER_ROOTFS`` naming the tree, still empty then."""
        sec = self.stage.sections.get("pre")
        if sec is None or not sec.body:
            return
        self.root.mkdir()
        self.host_script(sec)
        try:
            self.root.rmdir()  # the bootstrap makes the tree anew
        except OSError:
            raise BuildError(
                f"{self.where}:{sec.line}: %pre wrote into $APPTAINER_ROOTFS, which only the bootstrap fills"
            ) from None

    def setup(self) -> None:
        """Run ``%setup`` on the host with ``$APPTAINER_ROOTFS`` set to the tree."""
        sec = self.stage.sections.get("setup")
        if sec is not None and sec.body:  # blank lines are a body: Apptainer runs them
            self.host_script(sec)

    def host_script(self, sec: Section) -> None:
        """Run ``%pre`` or ``%setup`` on the host (``/bin/sh -e -x``, umask 0002)."""
        self.options.say(f"Running {sec.name} scriptlet")
        with tempfile.NamedTemporaryFile(suffix=".sh", dir=self.root.parent, delete=False) as f:
            f.write(md.raw(sec.body))
        env = {**os.environ, "APPTAINER_ROOTFS": str(self.root), "SINGULARITY_ROOTFS": str(self.root)}
        try:
            argv = [*sec.shell_argv(self.where), f.name]
            rc = subprocess.run(argv, env=env, check=False, umask=BUILD_UMASK)
        finally:
            os.unlink(f.name)
        if rc.returncode != 0:
            raise BuildError(f"{self.where}:{sec.line}: %{sec.name} failed with exit status {rc.returncode}")

    def copy_files(self, from_stage: bool) -> None:
        """Copy the ``%files from STAGE`` blocks' sources, or (``from_stage`` False) the host's."""
        for block in self.stage.files:
            if (block.stage is not None) != from_stage:
                continue
            src_root = None
            if block.stage is not None:
                line = block.copies[0].line if block.copies else self.stage.line
                index = self.definition.stage(block.stage, self.index, line)
                src_root = self.root if index == self.index else self.earlier[index].root
            for copy in block.copies:
                self.options.say(f"Copying {copy.src} to {copy.dst}")  # as Apptainer: blank dst too
                self._copy(copy, src_root, self.root)

    def _copy(self, copy: FileCopy, src_root: Path | None, dst_base: Path) -> None:
        """Copy one ``%files`` line into ``dst_base``, each match of a glob on its own, as
        Apptainer does: a blank destination is the match's own path, and a destination that does
        not exist is made (``dir/`` as a directory, else only its parent), so two matches
        copied to ``/opt/x`` leave the last one there, and ``*.cfg`` alone lands each file at
        its own path, not at one named ``*.cfg``."""
        if src_root is None:
            matches = sorted(glob.glob(copy.src)) if glob.has_magic(copy.src) else [copy.src]
            pairs = [(m, Path(m)) for m in matches if os.path.lexists(m)]
        else:
            pattern = str(src_root) + "/" + copy.src.lstrip("/")
            inner = sorted(glob.glob(pattern)) if glob.has_magic(copy.src) else [pattern]
            rels = [m[len(str(src_root)) :] for m in inner]
            pairs = [(rel, s) for rel in rels if (s := resolve_inside(src_root, rel)).exists()]
        if not pairs:
            from hpcsif.refs import reason, stat_error

            error = stat_error(copy.src) if src_root is None else None  # why, if not only missing
            why = reason(error) if error else "no such file or directory"
            raise BuildError(f"{self.where}:{copy.line}: %files source {copy.src}: {why}")
        failed = []  # what cp said of each match it could not copy, for one FATAL line
        for name, source in pairs:
            dst = copy.dst or name
            target = resolve_inside(dst_base, dst)
            try:
                if not os.path.lexists(target):
                    (target if dst.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BuildError(f"{self.where}:{copy.line}: cannot create {dst}: {exc.strerror}") from None
            failed += self._cp(source, target, from_stage=src_root is not None, name=Path(name).name)
        if failed:
            raise BuildError(f"{self.where}:{copy.line}: copying {copy.src}: {'; '.join(failed)}")

    def _cp(self, source: Path, target: Path, *, from_stage: bool, name: str) -> list[str]:
        """``cp`` one source to ``target`` (into it when it is a directory); returns cp's
        complaint (at most 3 lines of it) when it failed."""
        # --remove-destination: a symlink already in the tree where a file lands is replaced, not
        # written through (Apptainer's plain cp -fLr writes through one pointing at a host file);
        # symlinks inside what is copied from a stage stay symlinks (as Apptainer copies them):
        # followed, one naming /etc/shadow would copy the host's into the image. From a stage,
        # Apptainer keeps owners, modes, times and hard links, but makes the directory it copies
        # anew (0755, now), named as the source was named, not as its symlink resolved
        flags = ["-fLr"] if not from_stage else ["-fr", "--preserve=mode,ownership,timestamps,links"]
        if from_stage and target.is_dir() and not target.is_symlink():
            target = target / name
        made = from_stage and source.is_dir() and not os.path.lexists(target)
        proc = subprocess.run(
            ["cp", *flags, "--remove-destination", "--", str(source), str(target)],
            capture_output=True,
            text=True,
            check=False,
            umask=BUILD_UMASK,
        )
        if proc.returncode != 0:
            return ["; ".join(proc.stderr.split("\n")[:3]).strip("; ")]
        if made and target.is_dir() and not target.is_symlink():
            os.chmod(target, 0o755)
            os.utime(target)
        return []

    # -- SCIF apps ----------------------------------------------------------------------------

    def make_apps(self) -> None:
        """Lay out ``/scif/apps/NAME`` and ``/scif/data/NAME`` with each app's metadata and files.

        Every image gets the apps' environment scripts, as Apptainer's do, so ``run --app`` of
        an app the image lacks says so in Apptainer's words; a base image's are kept.
        """
        if not self.stage.apps:
            for name, text in (("94-appsbase.sh", ""), ("95-apps.sh", md.APPS_ACTIVE_ENV)):
                if not os.path.lexists(resolve_inside(self.root, f"{SD}/env/{name}")):
                    self._write(f"{SD}/env/{name}", text, 0o755)
            return
        global_env = []
        for app in self.stage.apps.values():
            log.info("Adding app %s", app.name)
            global_env.append(self._make_app(app))
        self._write(f"{SD}/env/94-appsbase.sh", "".join(global_env), 0o755)
        self._write(f"{SD}/env/95-apps.sh", md.APPS_ACTIVE_ENV, 0o755)

    def _make_app(self, app: App) -> str:
        base, meta = f"/scif/apps/{app.name}", f"/scif/apps/{app.name}/scif"
        data = f"/scif/data/{app.name}"
        for d in (f"{meta}/env", f"{base}/bin", f"{base}/lib", f"{data}/input", f"{data}/output"):
            resolve_inside(self.root, d).mkdir(parents=True, exist_ok=True)
        self._write(f"{meta}/env/01-base.sh", APP_ENV_BASE.format(name=app.name), 0o755)
        var = "".join(c if c.isalnum() or c == "_" else "_" for c in app.name)
        global_env = APPS_GLOBAL_ENV.format(var=var, name=app.name)
        if app.body("env"):
            self._write(f"{meta}/env/90-environment.sh", app.body("env"), 0o755)
            global_env += f'export SCIF_APPENV_{var}="{meta}/env/90-environment.sh"\n'
        labels = {"SCIF_APP_NAME": app.name, **parse_labels(app.body("labels"))}
        self._write(f"{meta}/labels.json", md.labels_json(labels), 0o644)
        global_env += f'export SCIF_APPLABELS_{var}="{meta}/labels.json"\n'
        if app.body("run"):
            self._write(f"{meta}/runscript", _script(app.sections["run"], self.where), 0o755)
            global_env += f'export SCIF_APPRUN_{var}="{meta}/runscript"\n'
        if app.body("start"):
            self._write(f"{meta}/startscript", _script(app.sections["start"], self.where), 0o755)
            global_env += f'export SCIF_APPSTART_{var}="{meta}/startscript"\n'
        if app.body("test"):
            self._write(f"{meta}/test", _script(app.sections["test"], self.where), 0o755)
        if app.body("help"):
            self._write(f"{meta}/runscript.help", app.body("help"), 0o644)
        for copy in app_files(app, self.where):
            self._copy(copy, None, resolve_inside(self.root, base))
        return global_env

    # -- %post ------------------------------------------------------------------------------

    def post(self) -> None:
        """Run ``%post`` and then each ``%appinstall`` inside the tree as fake root (or real root)."""
        sec = self.stage.sections.get("post")
        installs = [a for a in self.stage.apps.values() if "install" in a.sections]
        script = (sec.body if sec else "") + "".join(
            APP_INSTALL.format(root=f"/scif/apps/{a.name}", body=a.body("install")) for a in installs
        )
        # as Apptainer: a %post of blank lines runs, and so does the apps' setup without one
        if not ((sec is not None and sec.body) or self.stage.apps):
            return
        line = sec.line if sec else min(s.line for a in self.stage.apps.values() for s in a.sections.values())
        argv = sec.shell_argv(self.where) if sec else ["/bin/sh", "-e", "-x"]
        self.options.say("Running post scriptlet")
        what = f"{self.where}:{line}: %post"
        labels = resolve_inside(self.root, _POST_LABELS)
        labels.unlink(missing_ok=True)
        try:
            label_env = {"APPTAINER_LABELS": _POST_LABELS, "SINGULARITY_LABELS": _POST_LABELS}
            rc = run_in_tree(
                self.root,
                script,
                argv,
                writable=True,
                what=what,
                binds=self.binds,
                extra_env=label_env,
                fakeroot=self.options.fakeroot,
            )
            if labels.is_file():
                self.post_labels = parse_labels(_text(labels))
        finally:
            labels.unlink(missing_ok=True)
        if rc != 0:
            raise BuildError(f"{what} failed with exit status {rc}")

    # -- /.singularity.d -------------------------------------------------------------------

    def write_metadata(self, bootstrapped: bool = True) -> None:
        """Environment, runscript, startscript, test, help, labels and the def file.

        ``--section`` leaves out the sections not named; a build over an existing sandbox
        (``bootstrapped`` False) keeps its bootstrap labels, as Apptainer does. As in Apptainer,
        a ``%help`` or ``%labels`` entry the base image already has is kept, with a warning,
        unless the build is forced (``-F``).
        """
        stage, where, runs, force = self.stage, self.where, self.options.runs, self.options.force
        labels = _read_json(resolve_inside(self.root, f"{SD}/labels.json"))
        labels.update(
            {
                "org.label-schema.build-arch": self.options.convert.arch
                or labels.get("org.label-schema.build-arch")
                or Platform().architecture,
                "org.label-schema.build-date": md.build_date(),
                "org.label-schema.schema-version": "1.0",
                "org.label-schema.usage.hpcsif.version": __version__,
            }
        )
        if bootstrapped:  # every header line, as Apptainer records them
            for key, value in stage.header.items():
                labels[f"org.label-schema.usage.singularity.deffile.{key}"] = value
            labels["org.label-schema.usage.singularity.deffile.bootstrap"] = stage.bootstrap
        labels.update(self.post_labels)  # $APPTAINER_LABELS lines come first (Apptainer)
        kept = [key for key in stage.labels if key in labels] if runs("labels") and not force else []
        write_help = bool(stage.body("help")) and runs("help")
        if write_help and not force and resolve_inside(self.root, f"{SD}/runscript.help").is_file():
            write_help = False
        # Apptainer's words and order (the files themselves do not depend on it)
        for name, step in (
            ("help", "Adding help info"),
            ("labels", "Adding labels"),
            ("environment", "Adding environment to container"),
            ("startscript", "Adding startscript"),
            ("runscript", "Adding runscript"),
            ("test", "Adding testscript"),
        ):
            if not ((stage.labels if name == "labels" else stage.body(name)) and runs(name)):
                continue
            if name == "help" and not write_help:
                log.warning("Help message already exists and force option is false, not overwriting")
                continue
            self.options.say(step)
            for key in kept if name == "labels" else ():
                log.warning("Label: %s already exists and force option is false, not overwriting", key)
        if stage.body("environment") and runs("environment"):
            path = resolve_inside(self.root, f"{SD}/env/90-environment.sh")
            old = _text(path) if path.is_file() else md.ENV_90
            self._write(f"{SD}/env/90-environment.sh", old + "\n" + stage.body("environment") + "\n", 0o755)
        for name, fname in (("runscript", "runscript"), ("startscript", "startscript"), ("test", "test")):
            if stage.body(name) and runs(name):
                self._write(f"{SD}/{fname}", _script(stage.sections[name], where, shebang=True), 0o755)
        if write_help:
            self._write(f"{SD}/runscript.help", stage.body("help") + "\n", 0o644)
            labels["org.label-schema.usage"] = f"{SD}/runscript.help"
            labels["org.label-schema.usage.apptainer.runscript.help"] = f"{SD}/runscript.help"
        if runs("labels"):
            labels.update({key: value for key, value in stage.labels.items() if key not in kept})
        self._write(f"{SD}/labels.json", md.labels_json(labels), 0o644)
        self._write(f"{SD}/Singularity", self.definition.raw, 0o644)

    def _write(self, inner: str, text: str, mode: int) -> None:
        """Write ``text`` to ``inner`` in the tree (symlinks resolved inside it)."""
        path = resolve_inside(self.root, inner)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise BuildError(f"cannot write {inner} in the image: it is a directory")
        path.unlink(missing_ok=True)
        path.write_bytes(md.raw(text))
        os.chmod(path, mode)


def _script(sec: Section, where: str, shebang: bool = False) -> str:
    """A section as an executable script, as Apptainer writes runscript, test and startscript.

    ``-c /bin/bash`` gives ``#!/bin/bash`` (Apptainer 1.4 writes ``#!/bin/sh -c /bin/bash``,
    which no shell runs). With ``shebang`` (``%runscript``, ``%startscript`` and ``%test``, not
    the apps' sections, as in Apptainer) a first line ``#!INTERPRETER`` is the script's own, the
    section's arguments added (``%runscript -x`` over ``#!/bin/bash``: ``#!/bin/bash -x``); with
    ``-c SHELL`` that line goes, as Apptainer leaves it out, and ``SHELL`` runs the script.
    """
    first, _, rest = sec.body.partition("\n")
    if shebang and first.strip().startswith("#!"):
        if sec.args.split()[:1] == ["-c"]:
            return f"#!{' '.join(sec.interpreter(where))}\n\n{rest}\n"
        return f"{first.strip()}{' ' + sec.args if sec.args else ''}\n\n{rest}\n"
    return f"#!{' '.join(sec.interpreter(where))}\n\n{sec.body}\n"


#: the most of one metadata file (labels, environment, runscript …) read back from a tree
MAX_METADATA = 16 << 20


def _text(path: Path) -> str:
    """A regular file of the tree as text, exactly: a CR stays a CR (``read_text`` makes it a
    newline) and bytes that are not UTF-8 are kept (:func:`hpcsif.sif.metadata.raw` gives them
    back). ``%post`` may have put anything there: a FIFO or a device is not read (it would
    block, or never end), nor are more than :data:`MAX_METADATA` bytes."""
    data = read_regular(path, MAX_METADATA)
    if data is None:
        raise BuildError(f"{path.name} in the image is not a regular file")
    if len(data) > MAX_METADATA:
        raise BuildError(f"{path.name} in the image is larger than {MAX_METADATA >> 20} MiB")
    return data.decode(errors="surrogateescape")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of string values from the tree ({} when missing or not one)."""
    with contextlib.suppress(OSError, ValueError, BuildError):
        value = json.loads(_text(path))
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    return {}


def run_in_tree(
    root: Path,
    script: str | None,
    argv: list[str],
    *,
    writable: bool,
    what: str,
    binds: list[Any] | None = None,
    extra_env: dict[str, str] | None = None,
    fakeroot: bool = False,
    command: str = "exec",
) -> int:
    """Run ``script`` with ``argv`` (interpreter and flags) inside ``root`` as uid 0; with no
    ``script``, run ``argv`` itself.

    As root the run is real root (every uid can own files, as ``apptainer build`` as root);
    otherwise, or with ``fakeroot``, it is fake root in a user namespace that maps only the
    caller's uid.

    The image's ``/.singularity.d/env`` scripts are sourced first; the network is the host's
    and ``/etc/resolv.conf``, ``/etc/hosts`` are bound from the host, then ``binds``
    (:class:`hpcsif.engine.binds.Bind`: ``-B``, ``--mount``, GPU files). A writable run gets
    empty throw-away ``/tmp`` and ``/var/tmp``; a read-only one a tmpfs ``/tmp``. Mount points the tree
    lacks are made for the run and removed after it. ``extra_env`` adds variables;
    ``command`` is ``$APPTAINER_COMMAND`` (``exec`` for ``%post``, ``test`` for ``%test``).
    The umask is Apptainer's :data:`BUILD_UMASK`. Returns the exit status.
    ``what`` (``FILE:LINE: %post``) starts error messages.
    """
    from hpcsif.engine.binds import check_sources
    from hpcsif.engine.environment import PROMPT
    from hpcsif.engine.gpu import LIBS_DIR

    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise MissingToolError("bwrap", "bubblewrap")
    if not resolve_inside(root, "/bin/sh").exists():
        raise BuildError(f"{what}: the image has no /bin/sh to run the section with")
    binds = check_sources(binds or [])
    # the tree's own paths (its symlinks resolved inside it), never the host's
    created = [resolve_inside(root, h) for h in _HOST_BINDS if os.path.exists(h)]
    created = [p for p in created if not os.path.lexists(p)]
    script_path = root / _SCRIPT_NAME
    if script is not None:
        # a new file: whatever the image put at that name (a symlink to a host file) is not followed
        script_path.unlink(missing_ok=True)
        fd = os.open(script_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as f:
            f.write(md.raw(script))
    env = {
        "PATH": POST_PATH,
        "HOME": "/root",
        "TERM": "xterm",
        "APPTAINER_ENVIRONMENT": f"{SD}/env/91-environment.sh",
        "SINGULARITY_ENVIRONMENT": f"{SD}/env/91-environment.sh",
    }
    # what Apptainer's %post and %test see of the container they run in (scripts test
    # $APPTAINER_CONTAINER or $SINGULARITY_NAME to know they run in one); APPNAME and
    # COMMAND have no SINGULARITY_ twins there
    env["APPTAINER_CONTAINER"] = env["SINGULARITY_CONTAINER"] = str(root)
    env["APPTAINER_NAME"] = env["SINGULARITY_NAME"] = root.name
    bound = [h for h in _HOST_BINDS if os.path.exists(h)] + [b.dst for b in binds]
    env["APPTAINER_BIND"] = env["SINGULARITY_BIND"] = ",".join(bound)
    env.update(PS1=PROMPT, PROMPT_COMMAND=f'PS1="{PROMPT}"; unset PROMPT_COMMAND')
    env.update({"APPTAINER_APPNAME": "", "APPTAINER_COMMAND": command, **(extra_env or {})})
    if any(b.dst.startswith(LIBS_DIR + "/") for b in binds):  # --nv/--rocm libraries, as at run time
        env["LD_LIBRARY_PATH"] = LIBS_DIR
    cmd = [bwrap, "--cap-add", "ALL", "--unshare-pid"]
    if fakeroot or os.geteuid() != 0:
        # fake root maps one uid: chown to other users fails (useradd, dpkg); real root needs no map
        cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
    cmd += ["--die-with-parent", "--bind" if writable else "--ro-bind", str(root), "/"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for host in _HOST_BINDS:  # a read-only tree cannot get new mount points
        if os.path.exists(host) and (writable or os.path.lexists(resolve_inside(root, host))):
            cmd += ["--ro-bind", host, host]
    if not writable and resolve_inside(root, "/tmp").is_dir():
        cmd += ["--tmpfs", "/tmp"]
    made: list[Path] = []
    scratch: list[Path] = []
    try:
        # Apptainer's %post sees the host's /tmp and /var/tmp, so nothing written there ends in
        # the image (sources unpacked and built in /tmp); here each run gets throw-away ones
        for inner in ("/tmp", "/var/tmp") if writable else ():
            if resolve_inside(root, inner).is_dir():
                scratch.append(Path(tempfile.mkdtemp(prefix=".hpcsif-tmp-", dir=root.parent)))
                scratch[-1].chmod(0o1777)
                cmd += ["--bind", str(scratch[-1]), inner]
        for b in binds:
            if not b.dst.startswith("/dev/"):  # bwrap's /dev is its own tmpfs
                made += _mount_point(root, b.dst, os.path.isdir(b.src))
            kind = "--dev-bind" if b.dev else "--ro-bind" if b.readonly else "--bind"
            cmd += [kind, b.src, b.dst]
        cmd += ["--chdir", "/", "--clearenv"]
        for key, value in env.items():
            cmd += ["--setenv", key, value]
        cmd += ["/bin/sh", "-c", _WITH_ENV, "hpcsif-build", *argv]
        cmd += [f"/{_SCRIPT_NAME}"] if script is not None else []
        return subprocess.run(cmd, check=False, umask=BUILD_UMASK).returncode
    finally:
        if script is not None:
            script_path.unlink(missing_ok=True)
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
        # the mount points bwrap or the binds needed are not part of the image
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


def _mount_point(root: Path, dst: str, directory: bool) -> list[Path]:
    """Create ``dst`` (a directory or an empty file) and missing parents in ``root``; returns them."""
    path = resolve_inside(root, dst)
    missing = []
    here = path
    while not os.path.lexists(here) and here != root:
        missing.append(here)
        here = here.parent
    missing.reverse()
    for p in missing:
        if p == path and not directory:
            p.touch()
        else:
            p.mkdir()
    return missing


def _run_test(root: Path, sec: Section, where: str, binds: list[Any], options: BuildOptions) -> None:
    """Run the finished image's ``%test`` (read-only tree; with ``options.writable_tmpfs`` on a
    throw-away overlay, as Apptainer's ``--writable-tmpfs``); a failure stops the build.

    As Apptainer's, the test sees the caller's environment (``LANG`` …; not ``PATH``, which
    becomes ``USER_PATH``), under the image's own, as ``hpcsif test`` would."""
    from hpcsif.engine.environment import NOT_FROM_HOST, host_environ

    options.say("Running testscript")
    what = f"{where}:{sec.line}: %test"
    host = host_environ()
    env = {
        key: value
        for key, value in host.items()
        if key not in (*NOT_FROM_HOST, "HOME", "TERM")
        and not key.startswith(("APPTAINER", "SINGULARITY", "__HPCSIF"))
    }
    if "PATH" in host:
        env["USER_PATH"] = host["PATH"]
    test = {"what": what, "binds": binds, "fakeroot": options.fakeroot, "command": "test", "extra_env": env}
    if options.writable_tmpfs:
        from hpcsif.engine.mounts import overlay_mount

        if shutil.which("fuse-overlayfs") is None:
            raise MissingToolError("fuse-overlayfs", "fuse-overlayfs", "needed for --writable-tmpfs")
        overlay = overlay_mount(root)
        try:
            rc = run_in_tree(overlay.acquire(), None, [f"{SD}/test"], writable=True, **test)
        finally:
            overlay.release()
    else:
        rc = run_in_tree(root, None, [f"{SD}/test"], writable=False, **test)
    if rc != 0:
        raise BuildError(f"{what} failed with exit status {rc}; no image was written")


def _pack(final: _Built, definition: Definition, dest: Path, options: ConvertOptions) -> Path:
    """Squash the finished tree into a SIF whose metadata objects match its ``/.singularity.d``.

    Texts in ``inspect-metadata.json`` lose trailing whitespace, as Apptainer stores them.
    """
    from hpcsif.convert import sandbox_to_sif

    def read(inner: str) -> str | None:
        path = resolve_inside(final.root, inner)
        return _text(path).rstrip() if path.is_file() else None

    env_dir = resolve_inside(final.root, f"{SD}/env")
    environment = {
        f"{SD}/env/{p.name}": _text(p).rstrip()
        for p in sorted(env_dir.glob("*.sh"))
        if p.name.startswith(("10-", "90-", "91-")) and p.is_file()
    }
    apps: dict[str, dict[str, Any]] = {}
    app_dir = resolve_inside(final.root, "/scif/apps")
    # every app in the tree, also those a localimage base brought along
    for name in sorted(p.name for p in app_dir.iterdir() if p.is_dir()) if app_dir.is_dir() else []:
        meta_dir = f"/scif/apps/{name}/scif"
        env = read(f"{meta_dir}/env/90-environment.sh")
        texts = {
            "runscript": "runscript",
            "startscript": "startscript",
            "test": "test",
            "helpfile": "runscript.help",
        }
        apps[name] = {
            "environment": {f"{meta_dir}/env/90-environment.sh": env} if env is not None else {},
            "labels": _read_json(resolve_inside(final.root, f"{meta_dir}/labels.json")),
            **{k: v for k, f in texts.items() if (v := read(f"{meta_dir}/{f}")) is not None},
        }
    meta = md.Metadata(
        deffile=definition.raw,
        labels=_read_json(resolve_inside(final.root, f"{SD}/labels.json")),
        runscript=read(f"{SD}/runscript") or "",
        environment=environment,
        oci_config=final.oci_config,
        startscript=read(f"{SD}/startscript") or "#!/bin/sh",
        test=read(f"{SD}/test"),
        helpfile=read(f"{SD}/runscript.help"),
        apps=apps,
    )
    return sandbox_to_sif(final.root, dest, options, meta=meta, arch=final.arch)
