"""Typed exceptions raised by library code.

Only :mod:`hpcsif.cli` turns these into ``FATAL: …`` lines and exit codes; every
other module raises one of these classes with a message that names the problem
(the file, the reference, the layer, the descriptor) in one line.
"""

from __future__ import annotations


class HpcsifError(Exception):
    """Base of every error hpcsif raises on purpose."""

    #: process exit status the CLI uses for this class of error
    exit_code = 255
    #: the word the CLI prints before the message (Apptainer says ERROR for some failures)
    level = "FATAL"


class UsageError(HpcsifError):
    """The command line or an argument combination is invalid."""

    exit_code = 2


class ConfigError(HpcsifError):
    """A configuration file or environment variable holds an invalid value."""


class ReferenceError(HpcsifError):
    """An image reference cannot be parsed or names an unknown transport."""


class SourceError(HpcsifError):
    """A source (archive, layout, registry, daemon) cannot provide the image."""


class NotFoundError(SourceError):
    """The named image, tag, file or blob does not exist."""


class AmbiguousImageError(SourceError):
    """A layout or archive holds several images and no reference chose one."""


class AuthError(SourceError):
    """The registry refused our credentials or asked for some we lack."""


class RegistryError(SourceError):
    """The registry answered with an error we cannot recover from."""


class NetworkError(SourceError):
    """A connection failed after the configured retries."""


class IntegrityError(HpcsifError):
    """Content does not match its digest, size or declared format."""


class LayerError(HpcsifError):
    """A layer is malformed or tries to escape the root filesystem."""


class SIFError(HpcsifError):
    """A file is not a SIF, or its header or descriptors are corrupt."""


class SquashfsError(HpcsifError):
    """Creating or reading a squashfs image failed."""


class BuildError(HpcsifError):
    """Building an image (conversion or definition file) failed."""


class DefinitionError(BuildError):
    """A definition file is malformed; the message carries the line number."""


class CacheError(HpcsifError):
    """The cache is unusable (permissions, corrupt entry, quota)."""


class CacheBusy(CacheError):
    """Waiting for another process's conversion timed out."""


class OfflineError(CacheError):
    """The image is not cached and offline mode forbids the network."""


class TrustError(HpcsifError):
    """An image or directory is not trusted (writable by others, unsigned)."""


class SignatureError(TrustError):
    """Signing or verification failed."""


class EngineError(HpcsifError):
    """The container engine cannot start the container."""


class NoShellError(EngineError):
    """The image has nothing to run for ``run``/``shell``: Apptainer's ERROR line and status 1."""

    exit_code = 1
    level = "ERROR"


class MissingToolError(EngineError):
    """A required host program is not installed; names the Debian package."""

    def __init__(self, tool: str, package: str, hint: str = "") -> None:
        msg = f"{tool} not found: install the Debian package '{package}'"
        super().__init__(msg + (f" ({hint})" if hint else ""))
        self.tool = tool
        self.package = package


class SlurmError(HpcsifError):
    """Talking to Slurm failed or a Slurm value could not be parsed."""


class JobNotFoundError(SlurmError):
    """Slurm does not know the job (any more): it ended and was purged, or never existed."""


class RemoteError(HpcsifError):
    """SSH fan-out or a remote transfer failed."""


class StagingError(SlurmError):
    """The Slurm prolog could not stage an image the job asked for (raised inside the job)."""


class MergeAgainError(LayerError):
    """The merge learnt something about the layers that only another pass can use.

    :func:`hpcsif.sif.squashfs.squashfs_from_tar` and :func:`hpcsif.image.layers.extract_tree`
    convert again by themselves, up to :data:`hpcsif.image.layers.MERGE_PASSES` passes in all.
    """


class DuplicateEntryError(MergeAgainError):
    """A layer repeats a file name after its content was streamed; converting again resolves it.

    hpcsif remembers the layer's repeated names, so the next pass writes only the last of each.
    """


class WriteThroughError(MergeAgainError):
    """Upper layers put entries below a lower layer's symlink (``bin/x`` over ``bin -> usr/bin``).

    hpcsif remembers the symlinks, so the next pass writes those entries through them.
    """


class DaskImageError(HpcsifError):
    """An image cannot run Dask workers for this client (no Python, no ``distributed``, or a mismatch)."""


class WideDirectoryError(LayerError):
    """A directory of the merged tree has more entries than ``tar2sqfs`` packs in reasonable time.

    ``tar2sqfs`` 1.2 looks each new name up among all its siblings (quadratic in the size of
    a directory); :func:`hpcsif.sif.squashfs.squashfs_from_tar` then packs with mksquashfs.
    """


class AppNotFoundError(EngineError):
    """``--app NAME`` names no app of an image without a shell to say so: Apptainer's line, which
    the CLI prints on standard output, as Apptainer does, and status 1."""

    exit_code = 1
