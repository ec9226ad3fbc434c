"""Delegate to an installed Apptainer or Singularity, translating :class:`LaunchOptions`.

The flags are Apptainer's own, so the translation is one to one; ``--mpi`` profiles, which
Apptainer lacks, become ``--bind`` and ``--env`` options. The payload's exit status is
Apptainer's (it already forwards signals and reports 128+N).
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcsif.engine.base import Engine, LaunchOptions, mpi_profile_name, which
from hpcsif.errors import MissingToolError


class ApptainerEngine(Engine):
    """``apptainer``/``singularity`` (or the ``peer-apptainer`` wrapper) as the engine."""

    name = "apptainer"

    def __init__(self, program: str = "apptainer") -> None:
        self.program = program
        self.name = program

    @staticmethod
    def find_program(name: str) -> str | None:
        """The executable for *name* (``apptainer`` also accepts ``peer-apptainer``)."""
        return which(name) or (which("peer-apptainer") if name == "apptainer" else None)

    @classmethod
    def available(cls) -> bool:
        """True when apptainer or singularity is installed."""
        return bool(cls.find_program("apptainer") or cls.find_program("singularity"))

    def command_line(self, image: Path, opts: LaunchOptions) -> list[str]:
        """The full ``apptainer ACTION …`` command for *opts*."""
        exe = self.find_program(self.program)
        if not exe:
            pkg = (
                "apptainer (from the Apptainer releases)"
                if self.program == "apptainer"
                else "singularity-container"
            )
            raise MissingToolError(self.program, pkg)
        cmd = [exe, opts.action]
        for spec in opts.binds:
            cmd += ["--bind", spec]
        flags = {
            "--cleanenv": opts.cleanenv and not opts.containall,
            "--containall": opts.containall,
            "--contain": opts.contain and not opts.containall,
            "--writable-tmpfs": opts.writable_tmpfs,
            "--no-home": opts.no_home,
            "--nv": opts.nv,
            "--rocm": opts.rocm,
        }
        cmd += [flag for flag, on in flags.items() if on]
        for flag, value in (("--pwd", opts.pwd), ("--home", opts.home), ("--app", opts.app)):
            if value:
                cmd += [flag, value]
        if opts.no_mount:
            cmd += ["--no-mount", ",".join(opts.no_mount)]
        for item in opts.env:
            cmd += ["--env", item]
        for path in opts.env_files:
            cmd += ["--env-file", path]
        name = mpi_profile_name(opts.mpi)
        if name:
            from hpcsif.engine.mpi import load_profile

            contrib = load_profile(name).contribution()
            for b in contrib.binds:
                if os.path.exists(b.src):
                    cmd += ["--bind", f"{b.src}:{b.dst}:{'ro' if b.readonly else 'rw'}"]
            for key, value in contrib.env.items():
                cmd += ["--env", f"{key}={value}"]
            if contrib.ld_paths:
                cmd += ["--env", "LD_LIBRARY_PATH=" + ":".join([*contrib.ld_paths, "/.singularity.d/libs"])]
        return [*cmd, str(image), *opts.command]

    def launch(self, image: Path, opts: LaunchOptions) -> int:
        """Exec Apptainer in place of this process (it forwards signals and exit codes itself)."""
        cmd = self.command_line(image, opts)
        os.execv(cmd[0], cmd)
        return 0  # not reached
