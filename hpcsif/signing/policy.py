"""The admin policy "run and stage only images signed by a trusted key".

This module is cheap to import (no cryptography until the policy is on), so the cache and
``hpcsif exec`` can call :func:`require_trusted` on every image without slowing startup.
"""

from __future__ import annotations

import os

from hpcsif.config import Config, get_config


def require_trusted(sif_path: str | os.PathLike, config: Config | None = None) -> None:
    """Raise :class:`~hpcsif.errors.SignatureError` unless *sif_path* is signed by a trusted key.

    Only when ``cache.require_signed = true``: then every object group of the image must carry
    a valid signature by one of ``cache.trusted_keys`` (key files, directories of them, or
    fingerprints of keyring keys) covering the unchanged image; sandboxes are refused. With
    the policy off this returns at once. The cache calls it before handing out an image (so
    the prolog refuses to stage), the engine before it runs one.
    """
    config = config or get_config()
    if not config.get("cache.require_signed"):
        return
    from hpcsif.signing.verify import verify_trusted  # cryptography loads only under the policy

    verify_trusted(sif_path, config)
