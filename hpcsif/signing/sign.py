"""Add signatures to a SIF image: one Signature object per object group, as Apptainer does."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hpcsif.errors import SignatureError
from hpcsif.sif.format import DataType, Descriptor, HashType
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, add_objects
from hpcsif.signing import dsse, pgp
from hpcsif.signing.keys import KeyInfo, load_pem_private
from hpcsif.signing.metadata import group_ids, image_metadata

log = logging.getLogger(__name__)


def _signature(key: KeyInfo, payload: bytes) -> tuple[bytes, bytes]:
    """(signature object content, signer entity for the descriptor) of *payload* signed by *key*."""
    if key.private_path is None:
        raise SignatureError(f"key {key.label} has no private key: it cannot sign")
    secret = key.private_path.read_bytes()
    if key.scheme == "pgp":
        return pgp.clearsign(secret, key.fingerprint, payload), bytes.fromhex(key.fingerprint)
    # DSSE descriptors carry no entity: the key id lives in the envelope
    return dsse.sign_envelope(load_pem_private(secret, str(key.private_path)), payload), b""


def sign_image(path: str | os.PathLike, key: KeyInfo) -> list[Descriptor]:
    """Sign every object group of the SIF at *path* with *key*; returns the new Signature descriptors.

    Each signature covers the group's metadata (header, descriptors, object digests) and is
    linked to the group; the image is rewritten atomically.
    """
    path = Path(path)
    with SIFImage.open(path) as img:
        groups = group_ids(img)
        if not groups:
            raise SignatureError(f"{path}: the image has no object group to sign")
        specs = []
        for group in groups:
            content, entity = _signature(key, image_metadata(img, group))
            specs.append(
                ObjectSpec(
                    datatype=DataType.SIGNATURE,
                    data=content,
                    group_id=0,
                    link_id=group,
                    link_is_group=True,
                    hashtype=HashType.SHA256,
                    entity=entity,
                )
            )
    added = add_objects(path, specs)
    log.info("%s: signed %d object group(s) with %s", path, len(added), key.label)
    return added
