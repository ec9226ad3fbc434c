"""Node-local SIF cache: content-addressed store, exactly-once conversion, leases, eviction.

The public entry points are :func:`hpcsif.cache.api.ensure_image` and
:func:`hpcsif.cache.api.leased_image`; the other modules are the parts they are built from.
"""
