"""Registry credentials: where they come from, in Apptainer's order, and how they stay secret.

Order: explicit credentials (``--docker-login`` prompt, passed in by the CLI), then
``HPCSIF_DOCKER_USERNAME``/``HPCSIF_DOCKER_PASSWORD``, ``APPTAINER_DOCKER_*``,
``SINGULARITY_DOCKER_*``, then the ``auths`` of one Docker-style auth file for the registry:
``--authfile FILE`` (or ``$HPCSIF_AUTH_FILE``, ``$APPTAINER_AUTH_FILE``, ``$SINGULARITY_AUTH_FILE``)
when given, which replaces the default files, as Apptainer's ``--authfile`` does. The default
files are ``~/.apptainer/docker-config.json`` (where ``apptainer registry login`` stores
credentials, read first as Apptainer does), then ``$DOCKER_CONFIG/config.json``
(``~/.docker/config.json``). An ``identitytoken`` (what ``docker login`` saves for a registry
that speaks OAuth2) is kept as such: the registry client trades it for access tokens. Passwords
and identity tokens are never logged, printed or written:
:class:`Credentials` hides them from ``repr`` and log lines name only where the
credentials came from.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcsif.errors import AuthError
from hpcsif.refs import DOCKER_HUB

log = logging.getLogger(__name__)

ENV_PREFIXES = ("HPCSIF", "APPTAINER", "SINGULARITY")
#: Docker Hub's host names in auth files (docker.io first: containers/image's, for namespaces);
#: Docker's own key, https://index.docker.io/v1/, is one of them with a scheme and a path
_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
_HUB_SERVER = "https://index.docker.io/v1/"
#: the largest auth file read (real ones are a few KiB)
MAX_AUTH_FILE = 4 << 20
_warned: set[str] = set()


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity token, for one registry; ``source`` says where from.

    ``identity_token``: an OAuth2 refresh token (``docker login``'s ``identitytoken``), which the
    registry's token server exchanges for access tokens; there is no password then.
    """

    username: str
    password: str = field(repr=False)
    source: str = "explicit"
    identity_token: str = field(default="", repr=False)

    def __str__(self) -> str:
        if self.identity_token:
            return f"the identity token from {self.source}"
        return f"user {self.username!r} from {self.source}"


def from_env(environ: dict[str, str] | None = None) -> Credentials | None:
    """Credentials from ``{HPCSIF,APPTAINER,SINGULARITY}_DOCKER_USERNAME`` and ``…_PASSWORD``.

    As in Apptainer, each of the two is taken from the first prefix that sets it (so an
    ``APPTAINER_DOCKER_USERNAME`` goes with a legacy ``SINGULARITY_DOCKER_PASSWORD``), and
    ``SINGULARITY_X`` differing from ``APPTAINER_X`` is warned about.
    """
    env = os.environ if environ is None else environ
    user_var, user = _first_set(env, "DOCKER_USERNAME")
    password_var, password = _first_set(env, "DOCKER_PASSWORD")
    if user_var and password_var:
        same = password_var == user_var.replace("USERNAME", "PASSWORD")
        source = f"${user_var}/PASSWORD" if same else f"${user_var} and ${password_var}"
        return Credentials(user, password, source)
    if user_var or password_var:
        _warn_once(
            f"{user_var or password_var} is set without a DOCKER_{'PASSWORD' if user_var else 'USERNAME'}"
            " (HPCSIF_, APPTAINER_ or SINGULARITY_); ignoring: both must be set"
        )
    return None


def _first_set(env: Mapping[str, str], name: str) -> tuple[str | None, str]:
    """``(VARIABLE, value)`` of the first of ``{HPCSIF,APPTAINER,SINGULARITY}_name`` set and not
    empty, else ``(None, "")``."""
    names = [f"{prefix}_{name}" for prefix in ENV_PREFIXES]
    legacy, current = env.get(names[2]), env.get(names[1])
    if legacy and current and legacy != current and not env.get(names[0]):
        _warn_once(f"{names[2]} and {names[1]} have different values, using the latter")
    return next(((n, env[n]) for n in names if env.get(n)), (None, ""))


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def apptainer_config_path() -> Path:
    """``~/.apptainer/docker-config.json``: where ``apptainer registry login`` keeps credentials."""
    return Path.home() / ".apptainer" / "docker-config.json"


def _config_keys(registry: str, repository: str | None, auths: dict[str, object]) -> list[str]:
    """The ``auths`` keys that hold credentials for ``registry`` (and ``repository``), best
    first, as containers/image (Apptainer, Podman, skopeo) looks them up: the repository and
    its namespaces (``host/ns/repo``, ``host/ns``), the host, then keys spelled with a scheme
    and a path (Docker's ``https://host/v1/``)."""
    hosts = _HUB_HOSTS if registry == DOCKER_HUB else (registry,)
    parts = repository.split("/") if repository else []
    keys = [f"{hosts[0]}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    keys += hosts
    keys += [k for k in auths if "://" in k and k.split("://", 1)[1].split("/", 1)[0] in hosts]
    return [k for k in keys if k in auths]


def from_docker_config(
    registry: str, path: Path | None = None, repository: str | None = None
) -> Credentials | None:
    """Credentials for ``registry`` from the ``auths`` of the Docker-style auth file ``path``, or
    without one of Apptainer's ``registry login`` file, else Docker's ``config.json``.

    Apptainer reads only its own file when that exists; Docker's is read after it here too, so
    that a ``docker login`` to another registry also works. A default file that cannot be read
    is skipped with a warning; a requested one (``path``) is an :class:`AuthError`, as in
    Apptainer. Malformed entries are skipped with a warning. Docker's credential helpers are
    asked as Docker asks them: ``credHelpers`` for the registry first, ``credsStore`` last.
    """
    if path is None:
        for default in (apptainer_config_path(), docker_config_path()):
            if creds := _from_config(registry, repository, default, _read_config(default, requested=False)):
                return creds
        return None
    return _from_config(registry, repository, path, _read_config(path, requested=True))


def _from_config(
    registry: str, repository: str | None, path: Path, config: dict[str, Any]
) -> Credentials | None:
    server = _HUB_SERVER if registry == DOCKER_HUB else registry  # what Docker asks helpers for
    helpers = config.get("credHelpers") or {}
    names = (*_HUB_HOSTS, _HUB_SERVER) if registry == DOCKER_HUB else (registry,)
    helper = next((helpers[name] for name in names if name in helpers), None)
    if helper and (creds := _from_helper(helper, server, path)):
        return creds
    if creds := _from_auths(registry, repository, path, config.get("auths") or {}):
        return creds
    store = config.get("credsStore")
    return _from_helper(store, server, path) if store else None


def _from_helper(helper: object, server: str, path: Path) -> Credentials | None:
    """``docker-credential-HELPER get`` for ``server`` (Docker's credential helper protocol)."""
    if not isinstance(helper, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        _warn_once(f"ignoring credential helper {helper!r} in {path}")
        return None
    name = f"docker-credential-{helper}"
    exe = shutil.which(name)
    if exe is None:
        _warn_once(f"{path} names the credential helper {name}, which is not on PATH")
        return None
    try:
        proc = subprocess.run([exe, "get"], input=server, capture_output=True, text=True, timeout=60)
        answer = json.loads(proc.stdout) if proc.returncode == 0 else None
        user, secret = (answer["Username"], answer["Secret"]) if answer else (None, None)
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError, KeyError) as exc:
        _warn_once(f"credential helper {name} failed for {server}: {type(exc).__name__}")
        return None
    if answer is None:  # "credentials not found in native keychain": nothing stored for it
        return None
    if not (isinstance(user, str) and user and isinstance(secret, str)):
        _warn_once(f"credential helper {name} gave no user name and password for {server}")
        return None
    if user == "<token>":  # Docker's mark of an identity token (docker login via OAuth)
        return Credentials(user, "", f"{path} ({name})", identity_token=secret) if secret else None
    return Credentials(user, secret, f"{path} ({name})")


def _read_config(path: Path, *, requested: bool) -> dict[str, Any]:
    """The Docker-style auth file at ``path`` (empty when there is no file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_FILE + 1)  # bounded: the file may be /dev/zero
        if len(data) > MAX_AUTH_FILE:
            raise ValueError(f"larger than {MAX_AUTH_FILE >> 20} MiB")
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key, kind in (("auths", dict), ("credHelpers", dict), ("credsStore", str)):
            if doc.get(key) is not None and not isinstance(doc[key], kind):
                raise ValueError(f'"{key}" is not {"an object" if kind is dict else "a string"}')
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        why = (exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc))[:200]
        if requested:
            raise AuthError(f"cannot read auth file {path}: {why}") from None
        _warn_once(f"ignoring unreadable Docker config {path}: {why}")
        return {}
    return doc


def _from_auths(
    registry: str, repository: str | None, path: Path, auths: dict[str, object]
) -> Credentials | None:
    for key in _config_keys(registry, repository, auths):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        token = entry.get("identitytoken")
        if token:  # an OAuth2 refresh token: it replaces the user name and password Docker leaves out
            if isinstance(token, str) and token.isprintable():
                return Credentials("<token>", "", str(path), identity_token=token)
            _warn_once(f"ignoring malformed identity token for {key} in {path}")
            continue
        auth, user, password = entry.get("auth"), entry.get("username"), entry.get("password")
        if auth:
            try:
                user, colon, password = base64.b64decode(auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
                colon = ""
            if not colon:  # Apptainer too ignores an entry that is not base64("user:password")
                _warn_once(f"ignoring malformed auth entry for {key} in {path}")
                continue
        if isinstance(user, str) and user and isinstance(password, str):
            return Credentials(user, password, str(path))
    return None


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only: credentials are looked up for each
    request of a pull (its resolve, its fetch), and one line is enough."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def authfile_from_env(environ: dict[str, str] | None = None) -> Path | None:
    """The auth file named by ``{HPCSIF,APPTAINER,SINGULARITY}_AUTH_FILE`` (first set), else None."""
    env = os.environ if environ is None else environ
    for prefix in ENV_PREFIXES:
        if value := env.get(f"{prefix}_AUTH_FILE"):
            return Path(value)
    return None


def find_credentials(
    registry: str,
    explicit: Credentials | None = None,
    authfile: str | os.PathLike[str] | None = None,
    repository: str | None = None,
) -> Credentials | None:
    """The credentials to use for ``repository`` on ``registry``, in the documented order (None:
    anonymous).

    ``authfile`` (``--authfile FILE``: a Docker-style ``{"auths": {"host:port": {"auth":
    base64("user:password")}}}`` JSON file, as Docker, Podman, skopeo and Apptainer write it)
    replaces the default files (see :func:`from_docker_config`); without it ``*_AUTH_FILE`` in the
    environment may name one. Explicit and ``*_DOCKER_USERNAME/PASSWORD`` credentials still
    come first. A requested file that is missing or holds no entry for ``registry`` gives a
    warning and anonymous access, as in Apptainer. Nothing read from the file is logged.
    """
    creds = explicit or from_env()
    if creds is None:
        path = Path(authfile) if authfile is not None else authfile_from_env()
        creds = from_docker_config(registry, path, repository)
        if creds is None and path is not None:
            where = f"{registry}/{repository}" if repository else registry
            why = "does not exist" if not path.exists() else f"has no credentials for {where}"
            _warn_once(f"auth file {path} {why}; proceeding with anonymous access")
    if creds:
        log.debug("using registry credentials for %s: %s", registry, creds)
    return creds


def auth_hint() -> str:
    """How a user provides credentials (for 'authentication required' messages)."""
    return "set HPCSIF_DOCKER_USERNAME and HPCSIF_DOCKER_PASSWORD, use --docker-login or --authfile FILE"
