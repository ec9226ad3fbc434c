"""Add signatures to a SIF image: one Signature object per object group, as Apptainer does."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from hpcsif.errors import SignatureError
from hpcsif.sif.format import DataType, Descriptor, HashType
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, add_objects
from hpcsif.signing import dsse, pgp
from hpcsif.signing.keys import KeyInfo, load_pem_private
from hpcsif.signing.metadata import group_ids, image_metadata

log = logging.getLogger(__name__)


def _signature(key: KeyInfo, payload: bytes, passphrase: str) -> tuple[bytes, bytes]:
    """(signature object content, signer entity for the descriptor) of *payload* signed by *key*."""
    if key.private_path is None:
        raise SignatureError(f"key {key.label} has no private key: it cannot sign")
    secret = key.private_path.read_bytes()
    if key.scheme == "pgp":
        return pgp.clearsign(secret, key.fingerprint, payload, passphrase), bytes.fromhex(key.fingerprint)
    # DSSE descriptors carry no entity: the key id lives in the envelope
    return dsse.sign_envelope(load_pem_private(secret, str(key.private_path)), payload), b""


def _selection(img: SIFImage, group_id: int | None, object_id: int | None) -> list[tuple[int, list | None]]:
    """(group, objects to cover or None for all) per signature to make, as Apptainer chooses them."""
    groups = group_ids(img)
    selection: list[tuple[int, list | None]] = []
    if group_id is not None:
        if group_id not in groups:
            raise SignatureError(f"{img.path}: integrity: group {group_id} not found")
        selection.append((group_id, None))
    if object_id is not None:
        desc = next((d for d in img.descriptors if d.id == object_id), None)
        if desc is None:
            raise SignatureError(f"{img.path}: integrity: object {object_id} not found")
        if not desc.group_id:
            raise SignatureError(f"{img.path}: integrity: object {object_id} is in no object group")
        selection.append((desc.group_id, [desc]))
    if not selection:
        if not groups:
            raise SignatureError(f"{img.path}: the image has no object group to sign")
        selection = [(group, None) for group in groups]
    return selection


def _passphrase(key: KeyInfo, ask: Callable[[], str] | None) -> str:
    """The passphrase that unlocks *key*'s private key: none, or what *ask* returns."""
    if key.scheme != "pgp" or key.private_path is None or not pgp.is_protected(key.private_path.read_bytes()):
        return ""
    if ask is None:
        raise SignatureError(f"key {key.label} is protected by a passphrase and none can be asked for")
    return ask()


def sign_image(
    path: str | os.PathLike,
    key: KeyInfo,
    group_id: int | None = None,
    object_id: int | None = None,
    ask_passphrase: Callable[[], str] | None = None,
) -> list[Descriptor]:
    """Sign the SIF at *path* with *key*; returns the new Signature descriptors.

    By default every object group gets a signature covering the group's metadata (header,
    descriptors, object digests), linked to the group; *group_id* signs only that group and
    *object_id* only that object (a signature linked to its group), as Apptainer's
    ``sign --group-id/--sif-id``. The image is rewritten atomically. A passphrase-protected
    OpenPGP key (as ``apptainer key newpair`` makes them) is unlocked with what
    *ask_passphrase* returns, asked once.
    """
    path = Path(path)
    with SIFImage.open(path) as img:
        specs = []
        selection = _selection(img, group_id, object_id)
        passphrase = _passphrase(key, ask_passphrase)  # asked once the image is known to be signable
        for group, objects in selection:
            content, entity = _signature(key, image_metadata(img, group, objects=objects), passphrase)
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
    log.info("%s: added %d signature(s) with %s", path, len(added), key.label)
    return added
