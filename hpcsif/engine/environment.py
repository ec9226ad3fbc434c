"""The container's environment with Apptainer's semantics, and the in-container launcher.

The host environment is passed in (all of it, or only a few safe keys with ``--cleanenv``),
minus ``PATH``/``LD_LIBRARY_PATH``/``PS1``, which the image decides. Inside, :data:`LAUNCHER`
runs under the image's ``/bin/sh``: it sources ``/.singularity.d/env/*.sh`` in order with the
host's variables hidden, so that, as in Apptainer 1.4, a value the image sets wins over the
host's (the host's fill in only what the image leaves unset); the default ``PATH`` directories
the image's ``PATH`` lacks are appended. Then it applies the explicit overrides (``--env``,
``--env-file``, ``APPTAINERENV_*``/``SINGULARITYENV_*``), which win over the image, and finally
execs the action: the command, the runscript, the test or a shell.
"""

from __future__ import annotations

import logging
import os
import re

from hpcsif.errors import EngineError, UsageError

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: kept by --cleanenv, as Apptainer does (the proxies in either case)
_PROXIES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy")
CLEANENV_KEEP = ("TERM", *_PROXIES, *(p.upper() for p in _PROXIES))
#: never taken from the host: the image (or the launcher) sets them
NOT_FROM_HOST = ("PATH", "LD_LIBRARY_PATH", "PS1", "PROMPT_COMMAND")
_PREFIXES = ("APPTAINERENV_", "SINGULARITYENV_")
_OVERRIDE = "__HPCSIF_SET"
_HOST = "__HPCSIF_HOST"
#: Apptainer's prompt, in every action (its PROMPT_COMMAND re-sets it after a shell's rc files)
PROMPT = "Apptainer> "

# Execs "$@" after resolving the command first, as Apptainer's exec does: its FATAL messages,
# exit status 255, the full path as argv[0]. Shared by the launcher's exec and OCI runscripts.
EXEC_RESOLVED = r"""__c=$1
case $__c in
*/*) ;;
*)
  __o=$IFS; IFS=:; set -f  # (a PATH entry is a directory's name, never a pattern)
  for __d in $PATH; do
    if [ -f "${__d:-.}/$1" ] && [ -x "${__d:-.}/$1" ]; then __c=${__d:-.}/$1; break; fi
  done
  IFS=$__o; set +f
  case $__c in
  */*) ;;
  *) echo "FATAL:   \"$1\": executable file not found in \$PATH" >&2; exit 255 ;;
  esac ;;
esac
# a relative path is run (and named) as Go's filepath.Abs makes it: joined to $PWD and cleaned
case $__c in
/*) ;;
*)
  __c=$PWD/$__c __p= __o=$IFS; IFS=/; set -f
  for __s in $__c; do
    case $__s in ''|.) ;; ..) __p=${__p%/*} ;; *) __p=$__p/$__s ;; esac
  done
  __c=${__p:-/}; IFS=$__o; set +f ;;
esac
if [ ! -e "$__c" ]; then echo "FATAL:   stat $__c: no such file or directory" >&2; exit 255; fi
if [ -d "$__c" ]; then echo "FATAL:   is a directory" >&2; exit 255; fi
if [ ! -x "$__c" ]; then echo "FATAL:   permission denied" >&2; exit 255; fi
shift; exec "$__c" "$@"
"""

# Runs as `/bin/sh -c LAUNCHER hpcsif ARGS…` inside the container. Override values are passed
# in variables named __HPCSIF_SET_<KEY> and only ever expanded inside double quotes, so spaces,
# quotes and `$` in them survive untouched; the key names are checked by Python beforehand.
# Values of --env and APPTAINERENV_* are, as in Apptainer, evaluated like a double-quoted shell
# word after the image's scripts ran (`--env 'PATH=$PATH:/x'`): those come as __HPCSIF_EXP_<KEY>
# with `"` and `\` escaped, so only `$…` and command substitution take effect.
LAUNCHER = (
    r"""
# tell hpcsif that bwrap's set-up is over (a failure before this line is an engine error); with
# hpcsif gone (the pipe broken: killed while bwrap set up, before bwrap had bound the container's
# life to its own) the container ends here rather than run on unowned
if [ -n "$__HPCSIF_READY" ]; then printf x 2>&- > "/proc/self/fd/$__HPCSIF_READY" || exit 255; fi
# and the payload does not inherit it (a shell such as dash names descriptors 0-9 only)
case $__HPCSIF_READY in [3-9]) eval "exec $__HPCSIF_READY>&-" ;; esac
unset __HPCSIF_READY
# Apptainer's prompt is the default: a PS1 the image sets wins (PROMPT_COMMAND is made below);
# SHLVL as this launcher found it (bash and busybox sh count themselves in; Apptainer's has none)
__ps1=$PS1; unset PS1 PROMPT_COMMAND SHLVL
# the image's scripts must not change how the rest runs (set -eu, IFS, cd: Apptainer's interpreter
# keeps them apart), so the shell's options, IFS and directory are put back after them (and
# OLDPWD is the host's, as there)
__pwd=$PWD; __ifs=$IFS
for __f in /.singularity.d/env/*.sh; do [ -f "$__f" ] && . "$__f"; done
set +efuvx; IFS=$__ifs; [ "$PWD" = "$__pwd" ] || { cd "$__pwd" 2>&-; unset OLDPWD; }
if [ -n "$__HPCSIF_APP" ]; then
  for __f in "/scif/apps/$__HPCSIF_APP/scif/env/"*.sh; do [ -f "$__f" ] && . "$__f"; done
  set +efuvx; IFS=$__ifs; [ "$PWD" = "$__pwd" ] || { cd "$__pwd" 2>&-; unset OLDPWD; }
fi
unset __pwd __ifs
# what the scripts started in the background ends here, as in Apptainer (whose interpreter never
# runs it): it would outlive the container and hold its output open. Its processes are stopped
# while the tree is walked (no new forks), then killed and reaped; builtins only.
__k=$$ __all=
while :; do
  __n=
  for __p in $__k; do
    [ "$__p" = $$ ] || { kill -STOP "$__p" 2>&-; __all="$__all $__p"; }
    __c=; [ -r "/proc/$__p/task/$__p/children" ] && read -r __c < "/proc/$__p/task/$__p/children"
    __n="$__n $__c"
  done
  case $__n in *[0-9]*) __k=$__n ;; *) break ;; esac
done
if [ -n "$__all" ]; then kill -KILL $__all 2>&-; wait; fi
unset __k __all __n __p __c
[ -n "${PS1+x}" ] || PS1=$__ps1; unset __ps1
for __k in $__HPCSIF_HOST; do
  eval "[ -n \"\${$__k+x}\" ] || export $__k=\"\${__HPCSIF_HOST_$__k}\""; unset "__HPCSIF_HOST_$__k"
done
__o=$IFS; IFS=:
for __k in @DEFAULT_DIRS@; do
  case ":$PATH:" in *":$__k:"*) ;; *) PATH="${PATH:+$PATH:}$__k" ;; esac
done
IFS=$__o; unset __o
__nolibs= __path=
for __k in $__HPCSIF_SET; do
  if eval "[ -n \"\${__HPCSIF_EXP_$__k+x}\" ]"; then
    eval "__v=\${__HPCSIF_EXP_$__k}"; eval "__v=\"$__v\""
  else
    eval "__v=\${__HPCSIF_SET_$__k}"
  fi
  # as Apptainer: an empty PATH or PS1 leaves the one there was; with an empty LD_LIBRARY_PATH,
  # /.singularity.d/libs is not added; a PATH is set after the others are expanded (the
  # container's PATH finds the commands of --env 'A=$(cmd)', and is their $PATH)
  case $__k${__v:+=} in
  PATH | PS1) ;;
  PATH=) __path=$__v ;;
  LD_LIBRARY_PATH) __nolibs=1; export LD_LIBRARY_PATH= ;;
  *) eval "export $__k=\"\$__v\"" ;;
  esac
  unset "__HPCSIF_SET_$__k" "__HPCSIF_EXP_$__k" __v
done
# (as Apptainer's: given by --env or APPTAINERENV_, they are expanded too: PREPEND_PATH='$HOME/bin')
[ -z "${__HPCSIF_EXP_PREPEND_PATH+x}" ] || eval "__HPCSIF_PREPEND_PATH=\"$__HPCSIF_EXP_PREPEND_PATH\""
[ -z "${__HPCSIF_EXP_APPEND_PATH+x}" ] || eval "__HPCSIF_APPEND_PATH=\"$__HPCSIF_EXP_APPEND_PATH\""
[ -z "$__path" ] || PATH=$__path
[ -n "$__HPCSIF_PREPEND_PATH" ] && PATH="$__HPCSIF_PREPEND_PATH:$PATH"
[ -n "$__HPCSIF_APPEND_PATH" ] && PATH="$PATH:$__HPCSIF_APPEND_PATH"
[ -n "$__HPCSIF_LD_PATH" ] && LD_LIBRARY_PATH="$__HPCSIF_LD_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
case $__nolibs:$LD_LIBRARY_PATH: in
1:* | *:/.singularity.d/libs:*) ;;
*) LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/.singularity.d/libs" ;;
esac
# as Apptainer's: PS1 re-set after a shell's rc files, after the user's own PROMPT_COMMAND if any
if [ -n "${PROMPT_COMMAND:-}" ]; then
  PROMPT_COMMAND="$PROMPT_COMMAND; PROMPT_COMMAND=\"\${PROMPT_COMMAND%%; PROMPT_COMMAND=*}\"; PS1=\"$PS1\""
else
  PROMPT_COMMAND="PS1=\"$PS1\"; unset PROMPT_COMMAND"
fi
export PATH LD_LIBRARY_PATH PS1 PROMPT_COMMAND
__a=$__HPCSIF_ACTION; __app=$__HPCSIF_APP; __ok=$__HPCSIF_RUNS
unset __f __k __nolibs __path __HPCSIF_SET __HPCSIF_HOST __HPCSIF_ACTION __HPCSIF_APP __HPCSIF_RUNS
unset __HPCSIF_PREPEND_PATH __HPCSIF_APPEND_PATH __HPCSIF_LD_PATH
unset __HPCSIF_EXP_PREPEND_PATH __HPCSIF_EXP_APPEND_PATH
# a script whose #! interpreter the image lacks, or a program whose ELF loader it lacks, fails
# with Apptainer's line, not the shell's "not found" (the program hpcsif found runnable in the
# image beforehand, __HPCSIF_RUNS, is not read again). The file is read as bytes: bash in a UTF-8
# locale stops such a line short (and where that locale is missing, setting LC_ALL would warn).
__interp() {
  __l=@E_ACUTE@ __m=
  if [ ${#__l} = 1 ]; then __rd() { LC_ALL=C IFS= read -r __l; }; else __rd() { IFS= read -r __l; }; fi
  {
    __l=; __rd
    case $__l in
    '#!'*)
      set -f; set -- "$1" ${__l#??}; set +f
      [ -z "${2:-}" ] || [ -x "$2" ] || __m=1 ;;
    @DEL@ELF*)
      # the loader's path (PT_INTERP) lies in the first lines, read without their NUL bytes, in
      # a run of path characters that other bytes may go on: each run from a / that names a
      # loader (.so, then dots and digits) is a candidate; one that exists (or none) lets it run.
      # It starts in the first 256 bytes (NULs aside), which bounds what a static program costs.
      __k=0
      while :; do
        __k=$((__k + ${#__l}))
        while :; do
          case $__l in */*) __l=${__l#*/} ;; *) break ;; esac
          __t=/${__l%%[!A-Za-z0-9._/+-]*}
          case $__t in
          /*/ld*.so*)
            __d=${__t%/*} __b=${__t##*/}; __r=${__b#*.so}; __b=${__b%"$__r"}
            while :; do
              if [ -e "$__d/$__b" ]; then __m=0; break 3; fi
              case $__r in [.0-9]*) __b=$__b${__r%"${__r#?}"} __r=${__r#?} ;; *) break ;; esac
            done
            __m=1 ;;
          esac
        done
        [ -z "$__m" ] && [ $__k -lt 256 ] && __rd || break
      done ;;
    esac
  } 2>&- < "$1"
  if [ "$__m" = 1 ]; then
    echo "FATAL:   exec $1 failed: a shared library is likely missing in the image" >&2; exit 255
  fi
}
case $__a in
exec)
  unset __a __app
@EXEC_CHECKED@ ;;
run)
  __r=/.singularity.d/runscript
  if [ -n "$__app" ]; then
    __r="/scif/apps/$__app/scif/runscript"
    if [ ! -f "$__r" ]; then echo "ERROR:   no runscript for contained app: $__app" >&2; exit 1; fi
  fi
  unset __a __app
  # as Apptainer: a directory is an error, a runscript that is not executable is none at all
  if [ -d "$__r" ]; then echo "FATAL:   is a directory" >&2; exit 255; fi
  if [ -x "$__r" ]; then __interp "$__r"; exec "$__r" "$@"; fi
  echo "INFO:    No runscript found in container, executing /bin/sh" >&2
  exec /bin/sh "$@" ;;
test)
  __r=/.singularity.d/test
  if [ -n "$__app" ]; then
    __r="/scif/apps/$__app/scif/test"
    if [ ! -f "$__r" ]; then echo "ERROR:   No tests for contained app: $__app" >&2; exit 1; fi
  fi
  unset __a __app
  if [ -d "$__r" ]; then echo "FATAL:   is a directory" >&2; exit 255; fi
  # (run by its own #! line, as Apptainer runs it)
  if [ -f "$__r" ] && [ -x "$__r" ]; then __interp "$__r"; exec "$__r" "$@"; fi
  # both lines, as Apptainer 1.4 prints them (its own, then its action script's on stdout)
  echo "INFO:    No test script found in container, exiting" >&2
  echo "No test found in container, executing /bin/sh -c true"; exit 0 ;;
shell)
  unset __a __app
  if [ -n "$SINGULARITY_SHELL" ] && [ -x "$SINGULARITY_SHELL" ]; then exec "$SINGULARITY_SHELL" "$@"; fi
  # SHELL names the shell started, as Apptainer's shell action sets it (not with -s)
  if [ -x /bin/bash ]; then export SHELL=/bin/bash; exec /bin/bash --norc "$@"; fi
  export SHELL=/bin/sh; exec /bin/sh "$@" ;;
esac
""".replace("@DEFAULT_DIRS@", DEFAULT_PATH.replace(":", " "))
    .replace("@DEL@", "\x7f")
    .replace("@E_ACUTE@", "\u00e9")
    .replace(
        "@EXEC_CHECKED@",
        EXEC_RESOLVED.replace(
            'shift; exec "$__c"', '[ "$__c" = "$__ok" ] || __interp "$__c"; shift; exec "$__c"'
        ),
    )
)


def initial_environ() -> list[bytes]:
    """The environment this process was started with (``KEY=VALUE`` entries), from ``/proc``."""
    with open("/proc/self/environ", "rb") as f:
        return [e for e in f.read().split(b"\0") if e]


def host_environ() -> dict[str, str]:
    """This process's environment, less the ``LC_CTYPE`` Python's C-locale coercion (PEP 538) added
    and the ``_`` a calling shell sets to the command's path.

    The coercion sets ``LC_CTYPE=C.UTF-8`` in ``os.environ`` when the caller's locale is C or
    unset; the container must not see it, since the caller never set it. ``/proc/self/environ``
    still holds the environment the process was started with. ``$_`` in Apptainer's container
    is the container's shell's own, never hpcsif's path.
    """
    env = dict(os.environ)
    env.pop("_", None)
    if "LC_CTYPE" in env:
        try:
            initial = initial_environ()
        except OSError:
            return env
        if not any(item.startswith(b"LC_CTYPE=") for item in initial):
            del env["LC_CTYPE"]
    return env


def parse_assignments(items: list[str], what: str = "--env", *, quiet: bool = False) -> dict[str, str]:
    """``--env`` values into a dict (later ones win), names checked.

    Each value is read as Apptainer's ``stringToString`` flag does: with a single ``=`` it is
    one ``KEY=VALUE`` (commas stay in the value, ``"`` at either end are dropped); with more,
    it is a CSV line of ``KEY=VALUE`` fields (``A=1,B=2``; quote a field holding a comma).
    One without a name (``=x``) is left out with Apptainer's warning (none if *quiet*).
    """
    out: dict[str, str] = {}
    for item in items:
        for pair in _env_pairs(item, what):
            key, sep, value = pair.partition("=")
            if sep and not key:
                if not quiet:
                    log.warning("Ignore environment variable %s: variable name missing", pair)
                continue
            if not sep or not _NAME.match(key):
                raise UsageError(f"invalid {what} value {pair!r} (expected NAME=VALUE)")
            out[key] = value
    return out


def _env_pairs(item: str, what: str) -> list[str]:
    """One ``--env`` value split into its ``KEY=VALUE`` fields (see :func:`parse_assignments`).

    More than one ``=``: a CSV line read as Go's strict reader (Apptainer's) reads it, where a
    ``"`` is allowed only around a whole field (and doubled inside it).
    """
    if item.count("=") <= 1:
        return [item.strip('"')]
    fields, i = [], 0
    while True:
        if item.startswith('"', i):
            m = re.compile(r'"((?:[^"]|"")*)"(?:,|\Z)').match(item, i)
            if not m:
                raise UsageError(f"invalid {what} value {item!r}: unterminated or misplaced quote")
            fields.append(m.group(1).replace('""', '"'))
            i = m.end()
            if i == len(item) and not item.endswith(","):
                return fields
        else:
            end = item.find(",", i)
            field = item[i:] if end < 0 else item[i:end]
            if '"' in field:
                raise UsageError(f'invalid {what} value {item!r}: bare " in a non-quoted field')
            fields.append(field)
            if end < 0:
                return fields
            i = end + 1


def parse_env_file(path: str) -> dict[str, str]:
    """Evaluate ``--env-file`` as Apptainer does: a shell script run in the caller's environment.

    Quoting, ``$VAR`` and ``$(…)`` work as in a shell (the host's ``/bin/sh``, with ``set -e``;
    the status of the file's last line does not count, so that ``[ -d X ] && A=…`` ends a file,
    as there); returns the variables the file sets or changes. A file that cannot be read, or a
    failing line, is an :class:`EngineError` (status 255, as Apptainer's).
    """
    import shutil
    import subprocess

    given, path = path, os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        # (Apptainer's words: Go's open or read error, the path as given)
        if os.path.isdir(path):
            why = f"read {given}: is a directory"
        else:
            why = f"open {given}: " + (exc.strerror or str(exc)).lower()
        raise EngineError(
            f"while setting environment: while processing {given}: "
            f'could not read environment file "{given}": {why}'
        ) from None
    marker = b"\0__HPCSIF_ENV_FILE__\0"
    # (eval of the text and then `:`, where `. FILE` would fail on the last line's status; env
    # by its full path, which neither the file's PATH nor its `set --` changes)
    script = '__hpcsif_env=$2; readonly __hpcsif_env; "$__hpcsif_env" -0; printf "\\0__HPCSIF_ENV_FILE__\\0"'
    script += '; set -ae; eval "$(cat -- "$1")\n:" >/dev/null; "$__hpcsif_env" -0'
    env = shutil.which("env") or "/usr/bin/env"
    proc = subprocess.run(
        ["/bin/sh", "-c", script, "sh", path, env], capture_output=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0 or marker not in proc.stdout:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or [f"status {proc.returncode}"]
        raise EngineError(f"while processing environment file {given}: {lines[-1]}")

    def parse(block: bytes) -> dict[str, str]:
        items = (item.decode(errors="surrogateescape").partition("=") for item in block.split(b"\0") if item)
        return {k: v for k, _, v in items}

    before_raw, _, after_raw = proc.stdout.partition(marker)
    before, after = parse(before_raw), parse(after_raw)
    return {
        k: v
        for k, v in after.items()
        if _NAME.match(k) and k not in ("_", "SHLVL", "PWD", "OLDPWD") and before.get(k) != v
    }


def build_env(
    host: dict[str, str],
    *,
    action: str,
    cleanenv: bool,
    env: list[str],
    env_files: list[str],
    image: str,
    home: str,
    app: str | None = None,
    pass_prefixes: tuple[str, ...] = (),
    extra: dict[str, str] | None = None,
    ld_paths: list[str] | None = None,
    bind_dests: list[str] | None = None,
    no_eval: bool = False,
) -> dict[str, str]:
    """The environment the launcher starts with (see the module docstring for precedence).

    *pass_prefixes* are kept even with ``--cleanenv`` (MPI profiles: ``SLURM_``, ``PMIX_``…);
    *extra* are engine-provided values (GPU, MPI) that the image may not override;
    *ld_paths* go on ``LD_LIBRARY_PATH`` before ``/.singularity.d/libs``;
    *bind_dests* (the user's ``-B`` destinations) become ``APPTAINER_BIND`` inside.
    *no_eval* (``--no-eval``): ``--env`` and ``APPTAINERENV_*`` values are taken literally.
    Host variables travel as ``__HPCSIF_HOST_<NAME>`` (listed in ``__HPCSIF_HOST``) so that
    the image's scripts cannot see them, as in Apptainer.
    """
    result: dict[str, str] = {}
    hidden: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for key, value in host.items():
        if key.startswith(_PREFIXES):
            continue
        # Apptainer's own settings (APPTAINER_BIND, SINGULARITY_CACHEDIR …) stay outside, as in Apptainer
        if key.startswith(("__HPCSIF", "APPTAINER_", "SINGULARITY_")) or key in NOT_FROM_HOST:
            continue
        if not cleanenv or key in CLEANENV_KEEP or key.startswith(pass_prefixes):
            # a name the shell cannot hold cannot be set by the image either: pass it as is
            (hidden if _NAME.match(key) else result)[key] = value
    if not cleanenv and "PATH" in host:
        hidden["USER_PATH"] = host["PATH"]  # Apptainer's copy of the caller's PATH
    if cleanenv:
        hidden["LANG"] = "C"  # Apptainer's --cleanenv default, under the image's value
    flags = parse_assignments(env)
    files: dict[str, str] = {}
    for path in env_files:
        from_file = parse_env_file(path)
        from_file.pop("HOME", None)  # Apptainer ignores it there without a word
        for name in (n for n in from_file if n in flags):
            log.warning("Ignored environment file variable %s: override from --env", name)
        files.update(from_file)
    # (--env and --env-file values are APPTAINERENV_ ones to Apptainer, also against SINGULARITYENV_)
    overrides.update(prefixed_overrides(host, {**files, **flags}))
    expand = set(overrides) - set(files)
    flags.pop("HOME", None)  # (refused with a warning, as APPTAINERENV_HOME)
    overrides.update(files)
    overrides.update(flags)
    expand = set() if no_eval else (expand | set(flags)) - set(extra or {})
    overrides.update(extra or {})
    base = os.path.basename(image)
    result.update(
        PATH=DEFAULT_PATH,
        HOME=home,
        APPTAINER_CONTAINER=image,
        SINGULARITY_CONTAINER=image,
        APPTAINER_NAME=base,
        SINGULARITY_NAME=base,
        APPTAINER_COMMAND=action,
        APPTAINER_APPNAME=app or "",
        APPTAINER_BIND=",".join(bind_dests or []),
        SINGULARITY_BIND=",".join(bind_dests or []),
        PS1=PROMPT,
        PROMPT_COMMAND=f'PS1="{PROMPT}"; unset PROMPT_COMMAND',
        APPTAINER_ENVIRONMENT="/.singularity.d/env/91-environment.sh",
        SINGULARITY_ENVIRONMENT="/.singularity.d/env/91-environment.sh",
        __HPCSIF_ACTION=action,
    )
    if app:
        result["__HPCSIF_APP"] = result["SINGULARITY_APPNAME"] = app
    if no_eval:
        result["APPTAINER_NO_EVAL"] = result["SINGULARITY_NO_EVAL"] = "1"
    hidden = {k: v for k, v in hidden.items() if k not in result}
    if hidden:
        result[_HOST] = " ".join(hidden)
        result.update((f"{_HOST}_{k}", v) for k, v in hidden.items())
    for special in ("PREPEND_PATH", "APPEND_PATH"):
        value = overrides.pop(special, None)
        # a PATH of the user's own is the whole PATH, as in Apptainer (its 99-runtimevars.sh);
        # an empty one leaves the container's, to which they are added
        if value is not None and not overrides.get("PATH"):
            result[f"__HPCSIF_{special}"] = value
            if special in expand:
                result[f"__HPCSIF_EXP_{special}"] = _quoted(value)
    if ld_paths:
        result["__HPCSIF_LD_PATH"] = ":".join(ld_paths)
    if overrides:
        result[_OVERRIDE] = " ".join(overrides)
        for key, value in overrides.items():
            result[f"{_OVERRIDE}_{key}"] = value
            if key in expand:
                result[f"__HPCSIF_EXP_{key}"] = _quoted(value)
    return result


def _quoted(value: str) -> str:
    """*value* for the launcher's ``eval "v=\"…\""``: expanded as Apptainer expands ``--env``
    values (``$VAR``, ``$(…)``), its backslashes and double quotes kept."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def prefixed_overrides(host: dict[str, str], given: dict[str, str] | None = None) -> dict[str, str]:
    """The host's ``APPTAINERENV_*``/``SINGULARITYENV_*`` values by name, as Apptainer takes them:
    ``APPTAINERENV_`` wins where both are set (with its two warnings when they differ), and
    ``HOME`` is refused with a warning (``--home`` sets it). *given*: the values of ``--env`` and
    ``--env-file``, which are ``APPTAINERENV_`` ones there (they win over the host's). The
    warnings come in Apptainer's order: values that differ, HOME refused, values skipped.
    """
    out: dict[str, str] = {}
    given = given or {}
    homes: list[str] = []
    skipped: list[tuple[str, str, str, str]] = []
    for key, value in host.items():
        prefix, _, name = key.partition("ENV_")
        if f"{prefix}ENV_" not in _PREFIXES or not _NAME.match(name):
            continue
        newer = given.get(name, host.get(f"APPTAINERENV_{name}"))
        if name == "HOME":
            if prefix == "SINGULARITY" and newer is not None and newer != value:
                log.warning("%s and APPTAINERENV_%s have different values, using the latter", key, name)
            homes.append(key)
            continue
        if prefix == "SINGULARITY" and newer is not None:
            if newer != value:
                log.warning("%s and APPTAINERENV_%s have different values, using the latter", key, name)
                skipped.append((key, value, name, newer))
            continue
        out[name] = value
    if "HOME" in given:  # (--env HOME= is APPTAINERENV_HOME there, in place of the host's)
        homes = [k for k in homes if k != "APPTAINERENV_HOME"] + ["APPTAINERENV_HOME"]
    for key in homes:
        log.warning("Overriding HOME environment variable with %s is not permitted", key)
    for key, value, name, newer in skipped:
        log.warning(
            "Skipping environment variable [%s=%s], %s is already overridden with different value [%s]",
            key,
            value,
            # (Apptainer's names for the PATH settings, in its message too)
            f"SING_USER_DEFINED_{name}" if name in ("PATH", "PREPEND_PATH", "APPEND_PATH") else name,
            newer,
        )
    return out


def direct_env(launcher_env: dict[str, str], image_env: list[str]) -> dict[str, str]:
    """What :data:`LAUNCHER` would compute, for an image with no shell to run it.

    ``launcher_env`` is :func:`build_env`'s result; ``image_env`` the image's ``Env`` (from the
    SIF's ``oci-config.json``). Same precedence: image values win over the host's, the default
    ``PATH`` directories are appended to the image's, explicit overrides win over both.
    The variables are in name order, as Apptainer's ``env`` shows them.
    """
    env = {k: v for k, v in launcher_env.items() if not k.startswith("__HPCSIF")}
    for item in image_env:
        key, _, value = item.partition("=")
        if _NAME.match(key):
            env[key] = value
    for key in launcher_env.get(_HOST, "").split():
        env.setdefault(key, launcher_env[f"{_HOST}_{key}"])
    path = [p for p in env["PATH"].split(":") if p]
    env["PATH"] = ":".join(path + [p for p in DEFAULT_PATH.split(":") if p not in path])
    nolibs = False
    for key in launcher_env.get(_OVERRIDE, "").split():
        value = launcher_env[f"{_OVERRIDE}_{key}"]
        if value or key not in ("PATH", "PS1"):  # (an empty one leaves the container's, as there)
            env[key] = value
        nolibs = nolibs or (key, value) == ("LD_LIBRARY_PATH", "")
    if launcher_env.get("__HPCSIF_PREPEND_PATH"):
        env["PATH"] = f"{launcher_env['__HPCSIF_PREPEND_PATH']}:{env['PATH']}"
    if launcher_env.get("__HPCSIF_APPEND_PATH"):
        env["PATH"] = f"{env['PATH']}:{launcher_env['__HPCSIF_APPEND_PATH']}"
    # as the launcher: the engine's libraries first, /.singularity.d/libs last (not after an
    # LD_LIBRARY_PATH given empty)
    ld = [*(p for p in launcher_env.get("__HPCSIF_LD_PATH", "").split(":") if p)]
    ld += [env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []
    if not nolibs and "/.singularity.d/libs" not in ":".join(ld).split(":"):
        ld.append("/.singularity.d/libs")
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    return dict(sorted(env.items()))  # in name order, as Apptainer's interpreter passes it on


def direct_argv(action: str, command: list[str], config: dict, image: str) -> list[str]:
    """The command to exec without a shell: exec's command, or ENTRYPOINT + (args or CMD) for run."""
    from hpcsif.errors import EngineError

    if action == "exec":
        return command
    if action == "run":
        argv = list(config.get("Entrypoint") or []) + (command or list(config.get("Cmd") or []))
        if argv:
            return argv
        raise EngineError(f"{image}: nothing to run (no ENTRYPOINT or CMD, and no /bin/sh in the image)")
    raise EngineError(f"{image}: `{action}` needs a shell and the image has no /bin/sh")
