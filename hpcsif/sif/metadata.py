"""The ``/.singularity.d`` tree and the SIF metadata objects for a converted image.

Apptainer reads ``/.singularity.d/env/*.sh`` (in order), ``runscript``, ``labels.json`` and
the SIF's ``inspect-metadata.json``/``oci-config.json`` objects; hpcsif's own engine uses the
``actions/`` scripts. Everything here is generated from the image config alone.

Runscript semantics follow Apptainer's OCI behaviour: ``run`` arguments replace CMD and are
appended to ENTRYPOINT; with neither, the arguments are the command (as in Apptainer and
Docker), and without arguments a shell runs. Unlike Apptainer's default we never
``eval`` the command line, so arguments with spaces, quotes and ``$`` reach the program
unchanged (Apptainer's ``SINGULARITY_NO_EVAL`` behaviour).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpcsif import __version__
from hpcsif.engine.environment import EXEC_RESOLVED
from hpcsif.errors import IntegrityError
from hpcsif.image.layers import ExtraFile

log = logging.getLogger(__name__)

SD = "/.singularity.d"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # (fullmatch: "$" would let "F\n" through)
_SURROGATE = re.compile("[\ud800-\udfff]")

_SOURCE_ENV = f"""for _hpcsif_env in {SD}/env/*.sh; do
    [ -f "$_hpcsif_env" ] && . "$_hpcsif_env"
done
unset _hpcsif_env
"""

ACTIONS: dict[str, str] = {
    "exec": f'#!/bin/sh\n{_SOURCE_ENV}exec "$@"\n',
    "run": f"""#!/bin/sh
{_SOURCE_ENV}app="${{APPTAINER_APPNAME:-${{SINGULARITY_APPNAME:-}}}}"
if [ -n "$app" ]; then
    if [ -x "/scif/apps/$app/scif/runscript" ]; then
        exec "/scif/apps/$app/scif/runscript" "$@"
    fi
    echo "no runscript for app $app in this container" >&2
    exit 1
fi
if [ -x {SD}/runscript ]; then
    exec {SD}/runscript "$@"
fi
echo "no runscript in this container, starting /bin/sh" >&2
exec /bin/sh "$@"
""",
    "shell": f"""#!/bin/sh
{_SOURCE_ENV}shell="${{APPTAINER_SHELL:-${{SINGULARITY_SHELL:-}}}}"
if [ -n "$shell" ] && [ -x "$shell" ]; then
    exec "$shell" "$@"
fi
if [ -x /bin/bash ]; then
    SHELL=/bin/bash PS1="Apptainer> "
    export SHELL PS1
    exec /bin/bash --norc "$@"
fi
SHELL=/bin/sh
export SHELL
exec /bin/sh "$@"
""",
    "start": f'#!/bin/sh\n{_SOURCE_ENV}[ -x {SD}/startscript ] && exec {SD}/startscript "$@"\nexit 0\n',
    "test": f"""#!/bin/sh
{_SOURCE_ENV}if [ -x {SD}/test ]; then
    exec {SD}/test "$@"
fi
# Apptainer's line, on stdout, so that `apptainer test` prints the same for our images
echo "No test found in container, executing /bin/sh -c true"
exit 0
""",
}

ENV_BASE = "#!/bin/sh\n# base environment, sourced first\n"
ENV_90 = "#!/bin/sh\n# custom environment (%environment of a definition file) follows\n"
ENV_99 = f"""#!/bin/sh
# driver and MPI libraries bound by the runtime live in {SD}/libs
if [ -z "${{LD_LIBRARY_PATH:-}}" ]; then
    LD_LIBRARY_PATH="{SD}/libs"
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:{SD}/libs"
fi
if [ -z "${{PS1:-}}" ]; then
    PS1="Apptainer> "
fi
export LD_LIBRARY_PATH PS1
"""
# APPTAINERENV_PREPEND_PATH / APPEND_PATH / PATH as Apptainer's runtime variables file applies them
ENV_99_RUNTIME = """#!/bin/sh
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PREPEND_PATH:$PATH"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="$PATH:$SING_USER_DEFINED_APPEND_PATH"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PATH"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
"""

#: what Apptainer adds under every image where the image has nothing: mount points for
#: the runtime (without /var/tmp, ``apptainer exec`` warns that it cannot mount it); its
#: empty /etc/hosts and /etc/resolv.conf are left out (the runtimes bind them without)
BASE_TREE = [
    *(ExtraFile(p, None, 0o755, under=True) for p in ("dev", "etc", "home", "proc", "root", "sys", "tmp")),
    ExtraFile("var", None, 0o755, under=True),
    ExtraFile("var/tmp", None, 0o755, under=True),
    # empty, as Apptainer's build leaves them: the engine binds the host's over them, so no image
    # needs a tmpfs underlay of /etc (one bind per entry) to make room for them
    *(ExtraFile(f"etc/{name}", b"", 0o644, under=True) for name in ("hosts", "resolv.conf")),
    # Singularity 2's entry points, which Apptainer still adds
    *(
        ExtraFile(f".{a}", symlink=f".singularity.d/actions/{a}", under=True)
        for a in ("exec", "run", "shell", "test")
    ),
    ExtraFile("environment", symlink=".singularity.d/env/90-environment.sh", under=True),
    ExtraFile("singularity", symlink=".singularity.d/runscript", under=True),
]

# sourced by every action, as Apptainer's 95-apps.sh in every image: with --app NAME, put the
# app's bin/lib first and source its env; an app the image lacks is Apptainer's line and status 1
APPS_ACTIVE_ENV = """#!/bin/sh
# the environment of the app chosen with --app (APPTAINER_APPNAME / SINGULARITY_APPNAME)
_hpcsif_app="${APPTAINER_APPNAME:-${SINGULARITY_APPNAME:-}}"
if [ -n "$_hpcsif_app" ]; then
    if [ ! -d "/scif/apps/$_hpcsif_app" ]; then
        # Apptainer's words, and on standard output as Apptainer prints them
        echo "Could not locate the container application: $_hpcsif_app"
        exit 1
    fi
    SCIF_APPS=/scif/apps
    SCIF_APPROOT="/scif/apps/$_hpcsif_app"
    PATH="/scif/apps/$_hpcsif_app/bin:/scif/apps/$_hpcsif_app:$PATH"
    LD_LIBRARY_PATH="/scif/apps/$_hpcsif_app/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SCIF_APPS SCIF_APPROOT PATH LD_LIBRARY_PATH
    for _hpcsif_env in "/scif/apps/$_hpcsif_app/scif/env/01-base.sh" \\
        "/scif/apps/$_hpcsif_app/scif/env/90-environment.sh"; do
        if [ -f "$_hpcsif_env" ]; then . "$_hpcsif_env"; fi
    done
    unset _hpcsif_env
fi
unset _hpcsif_app
"""

# env scripts every image gets; not part of what `inspect --environment` shows
BASE_ENV = {
    f"{SD}/env/01-base.sh": ENV_BASE,
    f"{SD}/env/95-apps.sh": APPS_ACTIVE_ENV,
    f"{SD}/env/99-base.sh": ENV_99,
    f"{SD}/env/99-runtimevars.sh": ENV_99_RUNTIME,
}


def quote(word: str) -> str:
    """POSIX-shell single quoting that keeps every byte (``'`` becomes ``'"'"'``)."""
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # Docker allows a string; it means the shell form
        return ["/bin/sh", "-c", value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IntegrityError(f"image config: Entrypoint/Cmd is not a string or string list: {value!r:.80}")
    return value


def _dquote(word: str) -> str:
    """``word`` double-quoted with ``\\``, ``"``, ``$`` and backticks escaped: read literally."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", word) + '"'


def _dquote_words(words: Sequence[str]) -> str:
    """Words as Apptainer writes ``OCI_ENTRYPOINT``/``OCI_CMD``: each double-quoted, so that
    ``eval "set -- $OCI_CMD"`` gives them back."""
    return " ".join(map(_dquote, words))


def runscript_for(entrypoint: Sequence[str] | str | None, cmd: Sequence[str] | str | None) -> str:
    """The runscript for an image's ENTRYPOINT and CMD."""
    ep, cm = _words(entrypoint), _words(cmd)
    ep_q, cm_q = " ".join(map(quote, ep)), " ".join(map(quote, cm))
    lines = [
        "#!/bin/sh",
        "# generated by hpcsif from the image's ENTRYPOINT and CMD",
        f"OCI_ENTRYPOINT={quote(_dquote_words(ep))}",
        f"OCI_CMD={quote(_dquote_words(cm))}",
    ]
    if ep and cm:
        body = f'if [ $# -eq 0 ]; then\n    set -- {cm_q}\nfi\nset -- {ep_q} "$@"'
    elif ep:
        body = f'set -- {ep_q} "$@"'
    elif cm:
        body = f"if [ $# -eq 0 ]; then\n    set -- {cm_q}\nfi"
    else:
        body = "if [ $# -eq 0 ]; then\n    exec /bin/sh\nfi"
    # the command is resolved as Apptainer's runscript shell does: its FATAL lines, status 255
    return "\n".join([*lines, body, EXEC_RESOLVED])


def env_script(env: Sequence[str]) -> str:
    """``10-docker2singularity.sh``: the image's values, unless already set; PATH is set.

    Apptainer's lines (``export NAME="${NAME:-"value"}"``), but with every value escaped so that
    it is taken literally. Both engines hide the host's variables while the scripts run, so the
    image's value wins over the host's, and only a value set by an earlier script stays.
    """
    lines = ["#!/bin/sh"]
    if not isinstance(env, (list, tuple)) or not all(isinstance(item, str) for item in env):
        raise IntegrityError(f"image config: Env must be a list of strings, not {env!r:.80}")
    for item in env:
        name, equals, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            continue  # not a shell variable name; Apptainer skips these too
        if name == "PATH":
            lines.append(f"export PATH={_dquote(value)}")
        else:  # (a name without "=" has no value at all: Apptainer's line has none)
            lines.append(f'export {name}="${{{name}:-{_dquote(value) if equals else ""}}}"')
    return "\n".join(lines) + "\n"


def build_date(now: float | None = None) -> str:
    """The build date as Apptainer puts it in labels: Go's ``Monday_2_January_2006_15:4:5_MST``,
    whose day, hour, minute and second have no leading zeros (``Friday_7_May_2027_0:7:5_UTC``).
    """
    t = time.gmtime(now)
    return time.strftime(f"%A_{t.tm_mday}_%B_%Y_{t.tm_hour}:{t.tm_min}:{t.tm_sec}_UTC", t)


@dataclass
class Metadata:
    """Everything a converted image carries besides its root filesystem."""

    deffile: str
    labels: dict[str, str]
    runscript: str
    environment: dict[str, str]  # in-image path -> content of the image's own env scripts
    oci_config: dict[str, Any]
    startscript: str = "#!/bin/sh\n"
    test: str | None = None
    helpfile: str | None = None
    extra_files: list[ExtraFile] = field(default_factory=list)
    # SCIF app name -> its inspect attributes (labels, environment, runscript, test, helpfile)
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def files(self) -> list[ExtraFile]:
        """The ``/.singularity.d`` tree as files to lay over the image, and the base tree under it."""
        out = [*BASE_TREE, ExtraFile(SD, None, 0o755), ExtraFile(f"{SD}/env", None, 0o755)]
        out += [ExtraFile(f"{SD}/actions", None, 0o755), ExtraFile(f"{SD}/libs", None, 0o755)]
        out += [ExtraFile(f"{SD}/actions/{n}", s.encode(), 0o755) for n, s in sorted(ACTIONS.items())]
        env = {**BASE_ENV, **self.environment}
        out += [ExtraFile(p, raw(s), 0o755) for p, s in sorted(env.items())]
        out.append(ExtraFile(f"{SD}/runscript", raw(self.runscript), 0o755))
        out.append(ExtraFile(f"{SD}/startscript", raw(self.startscript), 0o755))
        out.append(ExtraFile(f"{SD}/Singularity", raw(self.deffile), 0o644))
        out.append(ExtraFile(f"{SD}/labels.json", labels_json(self.labels).encode(), 0o644))
        if self.test is not None:
            out.append(ExtraFile(f"{SD}/test", raw(self.test), 0o755))
        if self.helpfile is not None:
            out.append(ExtraFile(f"{SD}/runscript.help", raw(self.helpfile), 0o644))
        return out + self.extra_files

    def inspect_json(self) -> bytes:
        """The ``inspect-metadata.json`` SIF object ``apptainer inspect`` reads.

        Scripts and files lose their trailing newlines, as in Apptainer's own SIFs (its
        ``inspect`` prints them with one added).
        """
        attrs: dict[str, Any] = {
            "environment": trimmed(self.environment),
            "labels": dict(sorted(self.labels.items())),
            "runscript": trimmed(self.runscript),
            "deffile": trimmed(self.deffile),
            "startscript": trimmed(self.startscript),
        }
        if self.test is not None:
            attrs["test"] = trimmed(self.test)
        if self.helpfile is not None:
            attrs["helpfile"] = trimmed(self.helpfile)
        if self.apps:
            attrs["apps"] = trimmed(self.apps)
        return inspect_object(attrs)

    def oci_config_json(self) -> bytes:
        """The ``oci-config.json`` SIF object (the image's runtime config)."""
        return go_json(utf8(self.oci_config), separators=(",", ":")).encode()


def labels_json(labels: dict[str, Any]) -> str:
    """``labels.json`` as Apptainer writes it (sorted, tab indented, valid UTF-8)."""
    return go_json(utf8(dict(sorted(labels.items()))), indent="\t")


def inspect_object(attrs: dict[str, Any]) -> bytes:
    """The ``inspect-metadata.json`` SIF object holding the attributes *attrs* (valid UTF-8), as
    Apptainer writes it: compact, the attributes in the order given (its struct's order)."""
    doc = {"data": {"attributes": utf8(attrs)}, "type": "container"}
    return go_json(doc, separators=(",", ":")).encode()


#: what Go's JSON encoder (Apptainer's) escapes that Python's leaves as it is
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json(value: Any, **kw: Any) -> str:
    """*value* as JSON text the way Go's ``json.Marshal`` writes it: characters beyond ASCII as
    UTF-8, and ``<``, ``>``, ``&``, U+2028 and U+2029 escaped (they appear in strings only)."""
    text = json.dumps(value, ensure_ascii=False, **kw)
    return text.translate(str.maketrans(_GO_ESCAPES))


def raw(text: str) -> bytes:
    """``text`` as the bytes it was read from: definition files and files of the tree are read
    with ``surrogateescape``, so bytes that are not UTF-8 (Latin-1 text) reach the image's
    scripts and the ``%post`` shell unchanged, as in Apptainer."""
    return text.encode("utf-8", "surrogateescape")


def utf8(value: Any) -> Any:
    """``value`` with every string made valid UTF-8 for JSON: each byte that was not UTF-8 (and
    each lone surrogate escape of a JSON document) becomes U+FFFD, as Go's JSON coder has it."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {utf8(k): utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [utf8(v) for v in value]
    return value


def trimmed(value: Any) -> Any:
    """``value`` with the trailing newlines of every string in it removed."""
    if isinstance(value, str):
        return value.rstrip("\n")
    if isinstance(value, dict):
        return {k: trimmed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [trimmed(v) for v in value]
    return value


def _bool(value: Any) -> Any:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _words_or_shell(value: Any) -> Any:
    return value if isinstance(value, str) else _str_list(value)


def _str_list(value: Any) -> Any:
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# Go's JSON encoder writes a map's keys sorted (Labels, Volumes, ExposedPorts)
def _str_map(value: Any) -> Any:
    return {str(k): str(v) for k, v in sorted(value.items())} if isinstance(value, dict) else None


def _key_set(value: Any) -> Any:
    return {str(k): {} for k in sorted(value)} if isinstance(value, dict) else None


def _duration(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _health(value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    return _fields(value, _HEALTH_FIELDS, "Healthcheck.")


# go-containerregistry's v1.HealthConfig and v1.Config, in their order: Apptainer keeps the
# image config in oci-config.json by decoding it into v1.Config and encoding it again, so
# unknown keys go, empty values (false, "", [], {}) are left out and the values of Volumes
# and ExposedPorts become {}. Cmd/Entrypoint may be a string (shell form, see _words).
_HEALTH_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("Test", _str_list),
    ("Interval", _duration),
    ("Timeout", _duration),
    ("StartPeriod", _duration),
    ("Retries", _duration),
)
_CONFIG_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("AttachStderr", _bool),
    ("AttachStdin", _bool),
    ("AttachStdout", _bool),
    ("Cmd", _words_or_shell),
    ("Healthcheck", _health),
    ("Domainname", _str),
    ("Entrypoint", _words_or_shell),
    ("Env", _str_list),
    ("Hostname", _str),
    ("Image", _str),
    ("Labels", _str_map),
    ("OnBuild", _str_list),
    ("OpenStdin", _bool),
    ("StdinOnce", _bool),
    ("Tty", _bool),
    ("User", _str),
    ("Volumes", _key_set),
    ("WorkingDir", _str),
    ("ExposedPorts", _key_set),
    ("ArgsEscaped", _bool),
    ("NetworkDisabled", _bool),
    ("MacAddress", _str),
    ("StopSignal", _str),
    ("Shell", _str_list),
)


def _fields(
    obj: dict[str, Any], fields: Sequence[tuple[str, Callable[[Any], Any]]], where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, convert in fields:
        if obj.get(key) is None:
            continue
        value = convert(obj[key])
        if value is None:  # Apptainer refuses the whole image; nothing here reads the field
            log.warning("image config: ignoring %s%s of the wrong type: %.80r", where, key, obj[key])
        elif value not in (False, "", [], {}) or key == "Healthcheck":
            out[key] = value
    return out


def _nulls_as_go_reads_them(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the JSON nulls inside its string lists and its Labels as empty strings, as
    Apptainer's Go decoder reads them (``"Env": [null, "A=1"]`` is ``["", "A=1"]``)."""
    out = dict(cfg)
    for key in ("Cmd", "Entrypoint", "Env", "OnBuild", "Shell"):
        if isinstance(out.get(key), list):
            out[key] = ["" if v is None else v for v in out[key]]
    if isinstance(out.get("Labels"), dict):
        out["Labels"] = {k: "" if v is None else v for k, v in out["Labels"].items()}
    health = out.get("Healthcheck")
    if isinstance(health, dict) and isinstance(health.get("Test"), list):
        out["Healthcheck"] = {**health, "Test": ["" if v is None else v for v in health["Test"]]}
    return out


def runtime_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``oci-config.json`` object for an image config's ``config`` member, as Apptainer
    writes it: the fields of Docker's container config in its order, empty ones left out."""
    return _fields(cfg, _CONFIG_FIELDS, "")


def build_labels(*, bootstrap: str, source: str, arch: str, now: float | None = None) -> dict[str, str]:
    """The labels every build records: architecture, date, versions and where it came from."""
    return {
        "org.label-schema.build-arch": arch,
        "org.label-schema.build-date": build_date(now),
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.usage.hpcsif.version": __version__,
        "org.label-schema.usage.singularity.deffile.bootstrap": bootstrap,
        "org.label-schema.usage.singularity.deffile.from": source,
    }


def for_image(
    config: dict[str, Any], *, bootstrap: str, source: str, arch: str, now: float | None = None
) -> Metadata:
    """Metadata for an image converted from ``source`` (labels, env, runscript)."""
    cfg = utf8(config.get("config") or {})
    if not isinstance(cfg, dict):
        raise IntegrityError(f"image config: config must be a JSON object, not {cfg!r:.80}")
    cfg = _nulls_as_go_reads_them(cfg)
    image_labels = cfg.get("Labels") or {}
    if not isinstance(image_labels, dict):
        raise IntegrityError(f"image config: Labels must be a JSON object, not {image_labels!r:.80}")
    for key, value in image_labels.items():
        if not isinstance(value, str):  # Apptainer refuses the image too
            raise IntegrityError(f"image config: label {key!r} is not a string: {value!r:.80}")
    # the build's own labels win over the image's labels of the same name, as in Apptainer
    built = build_labels(bootstrap=bootstrap, source=source, arch=arch, now=now)
    labels = {**_str_map(image_labels), **built}
    environment = {
        f"{SD}/env/10-docker2singularity.sh": env_script(cfg.get("Env") or []),
        f"{SD}/env/90-environment.sh": ENV_90,
    }
    return Metadata(
        deffile=f"bootstrap: {bootstrap}\nfrom: {source}\n",
        labels=labels,
        runscript=runscript_for(cfg.get("Entrypoint"), cfg.get("Cmd")),
        environment=environment,
        oci_config=runtime_config(cfg),
    )
