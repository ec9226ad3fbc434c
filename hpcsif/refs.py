"""Parse image references for every transport hpcsif knows.

``docker://[registry[:port]/][namespace/]repo[:tag|@digest]`` and its relatives
(``docker-daemon://``, ``oras://``), file transports (``docker-archive://FILE``,
``oci-archive://FILE[:REF]``, ``oci://DIR[:REF]``), remote files (``http(s)://`` and
any fsspec protocol) and bare local paths (a SIF file or a sandbox directory).
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, replace

from hpcsif.errors import ReferenceError

DOCKER_HUB = "index.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

REGISTRY_TRANSPORTS = ("docker", "oras")
FILE_TRANSPORTS = ("docker-archive", "oci-archive", "oci")
DAEMON_TRANSPORTS = ("docker-daemon",)
URL_TRANSPORTS = ("http", "https")
KNOWN = (*REGISTRY_TRANSPORTS, *FILE_TRANSPORTS, *DAEMON_TRANSPORTS, *URL_TRANSPORTS, "sif", "sandbox")

# repository path components and tags, per the distribution spec
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})$")  # go-digest's
# a registry: host name, IPv4 address or [IPv6 address], and an optional port
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[([0-9a-fA-F:.]+)\])(?::([0-9]+))?$")
MAX_NAME = 255  # registry/repository, as Docker's reference grammar limits it


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. Which fields are set depends on ``transport``."""

    transport: str
    raw: str  # as given; for URLs with a password in them (user:PASSWORD@host) shown as ***
    path: str | None = None  # file transports, sif, sandbox; the URL for http(s)/fsspec
    name: str | None = None  # the ref inside an OCI layout/archive or docker archive
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None

    @property
    def is_registry(self) -> bool:
        """True for references resolved against a registry (docker://, oras://)."""
        return self.transport in REGISTRY_TRANSPORTS

    @property
    def reference(self) -> str:
        """The tag or digest part (``latest`` if neither was given)."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """The same reference pinned to ``digest`` (the tag is kept for naming)."""
        return replace(self, digest=digest)

    def short_name(self) -> str:
        """The file name Apptainer's ``pull`` gives this reference, without ``.sif``.

        Apptainer takes the reference's last path component and turns its ``:`` into ``_``,
        adding ``_latest`` when there is none: ``lolcow_latest``, ``busybox_1.36``,
        ``app@sha256_<hex>`` for a digest, ``img.oci-archive.tar_latest`` for an archive.
        Scripts rely on these names, so they are kept even where they look odd.
        """
        if self.repository:
            base = self.repository.rsplit("/", 1)[-1]
            if self.digest and not self.tag:
                return f"{base}@{self.digest.replace(':', '_', 1)}"
            return f"{base}_{self.tag or 'latest'}"
        if self.path:
            base = os.path.basename(self.path.rstrip("/")) or "image"
            if self.transport in FILE_TRANSPORTS:
                # a docker-archive's NAME:TAG as a registry's: its last component, ':' as '_'
                name = (self.name or "latest").rsplit("/", 1)[-1].replace(":", "_")
                return f"{base}_{name}"
            return base.removesuffix(".sif")
        return "image"

    def cache_name(self) -> str:
        """The image's file name in the SIF cache, without ``.sif``: short and readable.

        As :meth:`short_name` for tags (``lolcow_latest``); ``app_<12 hex>`` for a digest and
        the file's stem for an archive or SIF (``img``), where Apptainer's pull names are long.
        """
        if self.repository and self.digest and not self.tag:
            return f"{self.repository.rsplit('/', 1)[-1]}_{self.digest[7:19]}"
        if self.repository or not self.path:
            return self.short_name()
        base = os.path.basename(self.path.rstrip("/"))
        for ext in (".tar.gz", ".tgz", ".tar", ".sif"):
            base = base.removesuffix(ext)
        return base or "image"

    def __str__(self) -> str:
        if self.is_registry or self.transport == "docker-daemon":
            host = "" if self.transport == "docker-daemon" else f"{self.registry}/"
            tail = f":{self.tag}" if self.tag else ""
            tail += f"@{self.digest}" if self.digest else ""
            return f"{self.transport}://{host}{self.repository}{tail}"
        if self.transport in FILE_TRANSPORTS:
            return f"{self.transport}://{self.path}" + (f":{self.name}" if self.name else "")
        return self.raw


def _split_tag_digest(text: str, raw: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ReferenceError(f"invalid digest {digest!r} in {raw!r}")
    tag = None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ReferenceError(f"invalid tag {tag!r} in {raw!r}")
    return text, tag, digest


def parse_docker_name(
    text: str, raw: str, *, transport: str = "docker", default_tag: bool = True
) -> Reference:
    """Parse ``[registry[:port]/][namespace/]repo[:tag|@digest]``."""
    if not text or text.startswith("/") or text.endswith("/"):
        raise ReferenceError(f"invalid image reference {raw!r}: no repository name")
    name, tag, digest = _split_tag_digest(text, raw)
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, parts = first, parts[1:]
    else:
        registry = DOCKER_HUB
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    elif not _valid_registry(registry):
        raise ReferenceError(f"invalid registry {registry!r} in {raw!r} (expected HOST[:PORT])")
    if registry == DOCKER_HUB and len(parts) == 1:
        parts = ["library", *parts]
    for comp in parts:
        if not _COMPONENT.fullmatch(comp):
            why = " (repository names must be lowercase)" if _COMPONENT.fullmatch(comp.lower()) else ""
            raise ReferenceError(f"invalid repository name component {comp!r} in {raw!r}{why}")
    if len(name) > MAX_NAME:
        raise ReferenceError(
            f"invalid image reference {raw[:80]!r}…: the name is longer than {MAX_NAME} characters"
        )
    if tag is None and digest is None and default_tag:
        tag = "latest"
    return Reference(
        transport=transport, raw=raw, registry=registry, repository="/".join(parts), tag=tag, digest=digest
    )


def _valid_registry(registry: str) -> bool:
    match = _DOMAIN.fullmatch(registry)
    if not match:
        return False
    ipv6, port = match.groups()
    if port is not None and not 0 < int(port) < 65536:
        return False
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return False
    return True


def _split_path_ref(body: str) -> tuple[str, str | None]:
    """Split ``PATH[:REF]`` where REF may itself hold colons (``file.tar:team/app:1.2``).

    The shortest prefix that exists on disk is the path; when none exists, the text after
    the last colon is the ref unless it looks like part of a path.
    """
    if os.path.exists(body) or ":" not in body:
        return body, None
    # Apptainer's oci:DIR@sha256:HEX (its own error for a layout of several images asks for it)
    at = re.fullmatch(r"(.+)@(sha256:[0-9a-f]{64})", body)
    if at and os.path.exists(at[1]):
        return at[1], at[2]
    for i, ch in enumerate(body):
        if ch == ":" and os.path.exists(body[:i]):
            return body[:i], body[i + 1 :] or None
    path, ref = body.rsplit(":", 1)
    if "/" in ref or not ref:
        return body, None
    return path, ref


def parse(text: str) -> Reference:
    """Parse any reference string; raise :class:`ReferenceError` naming the problem."""
    if not text:
        raise ReferenceError("empty image reference")
    if "://" in text:
        scheme, body = text.split("://", 1)
        scheme = scheme.lower()
    elif re.match(r"^(docker|oras|oci|oci-archive|docker-archive|docker-daemon):", text):
        # the single-colon spellings Apptainer also accepts (oci:DIR:TAG, docker-archive:FILE)
        scheme, body = text.split(":", 1)
    else:
        return _parse_local(text)
    if scheme in REGISTRY_TRANSPORTS:
        return parse_docker_name(body, text, transport=scheme)
    if scheme == "docker-daemon":
        ref = parse_docker_name(body, text, transport=scheme, default_tag=False)
        if not ref.tag and not ref.digest:
            raise ReferenceError(f"{text!r}: docker-daemon references need a tag (e.g. {text}:latest)")
        return ref
    if scheme in FILE_TRANSPORTS:
        if not body:
            raise ReferenceError(f"{text!r}: missing path")
        path, name = _split_path_ref(body)
        _check_reachable(text, path)
        return Reference(transport=scheme, raw=text, path=path, name=name)
    if scheme in URL_TRANSPORTS:
        try:
            host = urllib.parse.urlsplit(text).hostname
        except ValueError:  # an unclosed [IPv6 address
            host = None
        if not host:
            raise ReferenceError(f"invalid URL {redact_url(text)!r}: no host name")
        return Reference(transport=scheme, raw=redact_url(text), path=text)
    if scheme in ("library", "shub"):
        raise ReferenceError(f"{scheme}:// is not supported by hpcsif (use docker://, oras:// or https://)")
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        raise ReferenceError(f"unknown transport {scheme!r} in {text!r}") from None
    return Reference(transport="fsspec", raw=redact_url(text), path=text)


def redact_url(url: str) -> str:
    """``url`` with the password in its user info (``scheme://user:PASSWORD@host/…``) replaced by
    ``***``: what messages, logs and cache records show. Only ``path`` keeps the password."""
    scheme, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    userinfo, at, host = netloc.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{rest[len(netloc) :]}"


def _parse_local(text: str) -> Reference:
    _check_reachable(text, text)
    if os.path.isdir(text):
        return Reference(transport="sandbox", raw=text, path=text)
    if os.path.exists(text):
        return Reference(transport="sif", raw=text, path=text)
    if os.path.islink(text):
        raise ReferenceError(f"{text!r}: symbolic link to {os.readlink(text)!r}, which does not exist")
    raise ReferenceError(f"{text!r}: no such file or directory, and not a URI (docker://, oci-archive://, …)")


def _check_reachable(text: str, path: str) -> None:
    """Refuse *path* when it cannot be reached for a reason other than not existing.

    A symbolic link loop, a file used as a directory or a directory that may not be searched
    would otherwise read as "no such file" wherever ``exists()`` is asked; a missing path is
    left to the reader, which names what it expected there.
    """
    error = stat_error(path)
    if error is not None and not isinstance(error, FileNotFoundError):
        raise ReferenceError(f"{text!r}: {reason(error)}")


def stat_error(path: str | os.PathLike[str]) -> OSError | None:
    """The error ``stat`` gives for *path*, or None when it can be reached."""
    try:
        os.stat(path)
    except OSError as e:
        return e
    return None


def reason(error: OSError) -> str:
    """An OSError's reason in lower case, as Apptainer's messages spell it ("not a directory")."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]
