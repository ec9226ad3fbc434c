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
        cmd = [exe, opts.action, *self.flags(opts)]
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

    @staticmethod
    def flags(opts: LaunchOptions) -> list[str]:
        """Apptainer's own flags for *opts*, one to one (``--mpi`` aside, see :meth:`command_line`)."""
        cmd = []
        for spec in opts.binds:
            cmd += ["--bind", spec]
        for spec in opts.mounts:
            cmd += ["--mount", spec]
        switches = {
            "--compat": opts.compat,
            "--cleanenv": opts.cleanenv and not opts.containall,
            "--containall": opts.containall and not opts.compat,
            "--contain": opts.contain and not opts.containall,
            "--writable-tmpfs": opts.writable_tmpfs and not opts.compat,
            "--writable": opts.writable,
            "--no-home": opts.no_home,
            "--nv": opts.nv and not opts.nvccli,
            "--nvccli": opts.nvccli,
            "--rocm": opts.rocm,
            "--fakeroot": opts.fakeroot,
            "--pid": opts.pid,
            "--no-pid": opts.no_pid,
            "--ipc": opts.ipc,
            "--uts": opts.uts and not opts.hostname,
            "--net": opts.net and not opts.network,
            "--no-init": opts.no_init and not opts.compat,
            "--no-umask": opts.no_umask and not opts.compat,
            "--no-eval": opts.no_eval and not opts.compat,
            "--no-privs": opts.no_privs,
            "--unsquash": opts.unsquash,
        }
        cmd += [flag for flag, on in switches.items() if on]
        values = {
            "--pwd": opts.pwd,
            "--home": opts.home,
            "--app": opts.app,
            "--hostname": opts.hostname,
            "--network": opts.network,
            "--dns": opts.dns,
            "--workdir": opts.workdir,
            "--add-caps": opts.add_caps,
            "--drop-caps": opts.drop_caps,
            "--shell": opts.shell,
        }
        for flag, value in values.items():
            if value:
                cmd += [flag, value]
        if opts.no_mount:
            cmd += ["--no-mount", ",".join(opts.no_mount)]
        for flag, items in (("--env", opts.env), ("--env-file", opts.env_files), ("--scratch", opts.scratch)):
            for item in items:
                cmd += [flag, item]
        for spec in opts.overlay:
            cmd += ["--overlay", spec]
        for flag, value in [*opts.passthrough, *opts.apptainer_only]:
            cmd += [flag] if value is None else [flag, value]
        return cmd

    def launch(self, image: Path, opts: LaunchOptions) -> int:
        """Exec Apptainer in place of this process (it forwards signals and exit codes itself)."""
        cmd = self.command_line(image, opts)
        os.execv(cmd[0], cmd)
        return 0  # not reached
