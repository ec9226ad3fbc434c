"""An unprivileged test user, for runs that must not be root (engine, Slurm jobs, caches).

``unpriv_user`` (session scope) creates ``hpcsif-test`` with a home directory once (``useradd``,
idempotent, safe when two test sessions race) and makes ``/dev/fuse`` usable by it (mode 0666, as
distributions ship it). :meth:`TestUser.run` runs a command as that user with ``setpriv``.
Root's own Python may live where the user cannot read it (pyenv under /root): use
:data:`USER_PYTHON` for Python commands run as the user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

NAME = "hpcsif-test"
#: (HPCSIF_TEST_USER_PYTHON: another interpreter the user may run, with hpcsif's dependencies)
USER_PYTHON = os.environ.get("HPCSIF_TEST_USER_PYTHON", "/usr/bin/python3")
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class TestUser:
    """A local user account, and how to run commands as it."""

    __test__ = False  # not a pytest test class

    name: str
    uid: int
    gid: int
    home: str

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A login-like environment for the user (``HOME``, ``USER``, ``LOGNAME``, ``PATH``)."""
        env = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": USER_PATH,
            "LANG": "C.UTF-8",
        }
        env.update(extra or {})
        return env

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` prefixed with the ``setpriv`` call that drops to this user."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *cmd,
        ]

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        **kw,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a list, or a string for ``sh -c``) as the user; text output captured.

        ``env`` adds to the user's environment (:meth:`env`); the caller's environment is not inherited.
        """
        args = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", self.home)
        return subprocess.run(self.command(args), env=self.env(env), check=check, **kw)


def ensure_user(name: str = NAME) -> TestUser:
    """Create ``name`` (home under /home, shell /bin/sh) unless it exists; needs root."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
            capture_output=True,
            text=True,
        )
        try:  # another test session may have created it at the same moment
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}") from None
    if not os.path.isdir(entry.pw_dir):
        os.makedirs(entry.pw_dir, mode=0o755)
        os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)
    return TestUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def open_dev_fuse() -> None:
    """Make /dev/fuse mode 0666 (the usual distribution setting) so non-root users can mount."""
    if os.path.exists("/dev/fuse") and stat.S_IMODE(os.stat("/dev/fuse").st_mode) != 0o666:
        os.chmod("/dev/fuse", 0o666)


@pytest.fixture(scope="session")
def unpriv_user() -> TestUser:
    """The unprivileged test user; skipped unless the tests run as root with setpriv and useradd."""
    if os.geteuid() != 0:
        pytest.skip("creating the unprivileged test user needs root")
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    user = ensure_user()
    open_dev_fuse()
    return user
