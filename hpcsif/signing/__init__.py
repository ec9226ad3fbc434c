"""Signing and verifying SIF images the way Apptainer 1.4 does.

* :mod:`hpcsif.signing.metadata` — what a signature covers (header, descriptors, objects);
* :mod:`hpcsif.signing.dsse` — DSSE envelopes with PEM keys (``apptainer sign --key``);
* :mod:`hpcsif.signing.pgp` — OpenPGP clear signatures through GnuPG (``apptainer sign``);
* :mod:`hpcsif.signing.keys` — the user's keyring;
* :mod:`hpcsif.signing.sign` and :mod:`hpcsif.signing.verify` — whole-image operations;
* :mod:`hpcsif.signing.policy` — :func:`~hpcsif.signing.policy.require_trusted` (also exported by
  :mod:`hpcsif.signing.verify`), the cheap ``cache.require_signed`` gate the cache and exec call.
"""
