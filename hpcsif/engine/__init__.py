"""Container engines: the built-in squashfuse + bubblewrap engine and Apptainer/Singularity delegation.

Import :mod:`hpcsif.engine.base` for :class:`LaunchOptions` and :func:`select_engine`; the engine
modules themselves are imported lazily so that ``hpcsif exec`` stays fast.
"""
