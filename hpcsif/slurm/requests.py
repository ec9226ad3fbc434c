"""What images a Slurm job asks for, found in three places, in this order.

1. The SPANK plugin's options (``--sif-image``, ``--sif-mounts``, ``--sif-nv``, ``--sif-mpi``),
   which reach the prolog through the job control environment as ``SPANK_HPCSIF_*`` variables.
2. ``#HPCSIF --image=REF [--nv] [--mpi NAME] [-B SRC:DST]`` directives in the batch script,
   read like ``#SBATCH`` lines: only in the comment block before the first command.
3. ``hpcsif:REF`` words in the job's comment (``sbatch --comment=hpcsif:docker://app:1.2``),
   the fallback that needs no plugin and no batch script.

Every source is read; a reference named twice is staged once (the first request wins).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hpcsif.errors import UsageError

log = logging.getLogger(__name__)

#: the prefix Slurm puts in front of job control variables set by spank_job_control_setenv
SPANK_PREFIX = "SPANK_HPCSIF_"
#: where Slurm itself passes the plugin's option values to the prolog (a fallback)
SPANK_OPTION_PREFIX = "SPANK__SLURM_SPANK_OPTION_hpcsif_sif_"
DIRECTIVE = "#HPCSIF"
COMMENT_PREFIX = "hpcsif:"


@dataclass(frozen=True)
class ImageRequest:
    """One image a job wants staged, and how it wants it run."""

    ref: str
    source: str  # "spank", "directive" or "comment"
    mounts: tuple[str, ...] = ()
    nv: bool = False
    mpi: str | None = None
    digest: str | None = None  # set when the tag was resolved at submit time


def _split_mounts(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def from_spank_env(env: Mapping[str, str]) -> list[ImageRequest]:
    """The request the SPANK plugin recorded in the job control environment, if any.

    Slurm also hands the prolog the raw option values (``SPANK__SLURM_SPANK_OPTION_hpcsif_sif_*``,
    ``(null)`` for flags); they count when the plugin's own variables are missing.
    """

    def get(name: str) -> str:
        value = env.get(SPANK_PREFIX + name.upper())
        if value is None:
            value = env.get(SPANK_OPTION_PREFIX + name)
            if value is not None and name == "nv":
                value = "1"  # a flag: present means given
        return (value or "").strip()

    ref = get("image")
    if not ref:
        return []
    return [
        ImageRequest(
            ref=ref,
            source="spank",
            mounts=_split_mounts(get("mounts")),
            nv=get("nv") not in ("", "0"),
            mpi=get("mpi") or None,
            digest=env.get(SPANK_PREFIX + "DIGEST") or None,
        )
    ]


class _DirectiveParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, for one ``#HPCSIF`` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _directive_parser() -> _DirectiveParser:
    p = _DirectiveParser(prog=DIRECTIVE, add_help=False)
    p.add_argument("--image", "-i")
    p.add_argument("--nv", action="store_true")
    p.add_argument("--mpi")
    p.add_argument("--bind", "-B", "--mounts", action="append", default=[])
    p.add_argument("refs", nargs="*")
    return p


def parse_directive(line: str) -> list[ImageRequest]:
    """The requests on one ``#HPCSIF`` line (``--image=REF`` or bare references)."""
    words = shlex.split(line[len(DIRECTIVE) :], comments=False)
    args = _directive_parser().parse_args(words)
    refs = ([args.image] if args.image else []) + list(args.refs)
    if not refs:
        raise UsageError(f"{line.strip()!r}: no image (expected #HPCSIF --image=REF)")
    mounts = tuple(m for group in args.bind for m in _split_mounts(group))
    return [ImageRequest(ref=r, source="directive", mounts=mounts, nv=args.nv, mpi=args.mpi) for r in refs]


def from_batch_script(script: str) -> list[ImageRequest]:
    """Requests from ``#HPCSIF`` lines in the leading comment block of a batch script.

    As with ``#SBATCH``, parsing stops at the first line that is neither blank nor a comment.
    A malformed directive is logged and skipped, so one typo does not hide the others.
    """
    found: list[ImageRequest] = []
    for number, raw in enumerate(script.splitlines(), 1):
        line = raw.strip()
        if not line or (line.startswith("#") and not line.startswith(DIRECTIVE)):
            continue
        if not line.startswith(DIRECTIVE):
            break
        if line[len(DIRECTIVE) : len(DIRECTIVE) + 1] not in ("", " ", "\t"):
            continue  # e.g. "#HPCSIFX": some other tool's directive
        try:
            found.extend(parse_directive(line))
        except (UsageError, ValueError) as exc:
            log.warning("batch script line %d: ignoring malformed directive: %s", number, exc)
    return found


def from_comment(comment: str | None) -> list[ImageRequest]:
    """Requests from ``hpcsif:REF`` words in a job comment (several may be given)."""
    words = (comment or "").replace(";", " ").split()
    return [
        ImageRequest(ref=w[len(COMMENT_PREFIX) :], source="comment")
        for w in words
        if w.startswith(COMMENT_PREFIX) and len(w) > len(COMMENT_PREFIX)
    ]


def _unique(requests: Iterable[ImageRequest]) -> list[ImageRequest]:
    seen: set[str] = set()
    out = []
    for req in requests:
        if req.ref not in seen:
            seen.add(req.ref)
            out.append(req)
    return out


METHODS = ("spank", "directive", "comment")


def discover(
    env: Mapping[str, str],
    *,
    batch_script: Callable[[], str | None],
    comment: Callable[[], str | None],
    methods: Iterable[str] = METHODS,
) -> list[ImageRequest]:
    """Every image the job asks for: SPANK variables, then directives, then the comment.

    ``batch_script`` and ``comment`` are called lazily (each is a Slurm query, made only when
    its method is in ``methods``); a failure to read one source is logged and the others count.
    """
    methods = set(methods)
    if unknown := methods - set(METHODS):
        raise UsageError(f"unknown discovery method(s) {sorted(unknown)}: expected {', '.join(METHODS)}")
    requests = from_spank_env(env) if "spank" in methods else []
    for method, name, read, parse_one in (
        ("directive", "batch script", batch_script, from_batch_script),
        ("comment", "comment", comment, from_comment),
    ):
        if method not in methods:
            continue
        try:
            text = read()
        except Exception as exc:  # a Slurm hiccup on one source must not lose the others
            log.warning("cannot read the job's %s: %s", name, exc)
            continue
        if text:
            requests.extend(parse_one(text))
    return _unique(requests)
