"""hpcsif: Docker/OCI images as Apptainer-compatible SIF files on HPC clusters.

The package imports nothing heavy at import time so that ``hpcsif exec`` starts
fast; the public helpers below import their modules on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without loading typing (layer inflaters start from here)
if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path
    from typing import Any


def ensure_image(ref: str, **opts: Any) -> Path:
    """Return the path of a cached SIF for ``ref``, converting it exactly once.

    See :func:`hpcsif.cache.api.ensure_image` for the options.
    """
    from hpcsif.cache.api import ensure_image as _ensure

    return _ensure(ref, **opts)
