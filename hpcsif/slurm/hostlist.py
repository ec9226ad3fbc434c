"""Slurm hostlist syntax: ``node[01-04,07]``, ``r[1-2]n[01-02]``, ``a1,b[1-3],c``.

Follows Slurm 22.05's ``scontrol show hostnames`` / ``scontrol show hostlist`` (the tests compare
against both):

* items are separated by commas or whitespace outside brackets; empty items are skipped;
* a bracket holds comma-separated numbers or ``lo-hi`` ranges (``lo <= hi``); the zero padding
  of a range is the length of ``lo`` (``n[09-11]`` -> n09 n10 n11, ``n[1-010]`` -> n1 … n10);
* several brackets in one item expand as a product in Slurm's order (the last bracket varies
  fastest, then the first, the second …); text may sit between brackets but not after the
  last one (Slurm rejects ``n[1-2]-ib``);
* order and duplicates are kept.

:func:`compress` is the inverse: consecutive names that share a prefix before their trailing
digits are merged into one bracket, runs of consecutive numbers become ranges.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from hpcsif.errors import SlurmError

#: Slurm refuses ranges with more hosts than this (hostlist.c's MAX_RANGE)
MAX_RANGE = 64 * 1024

_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")
_TRAILING_DIGITS = re.compile(r"(.*?)([0-9]+)\Z", re.S)


def expand(hostlist: str) -> list[str]:
    """Every host name of ``hostlist`` in order, e.g. ``"n[1-3]"`` -> ``["n1", "n2", "n3"]``.

    Raises :class:`~hpcsif.errors.SlurmError` naming the offending text.
    """
    hosts: list[str] = []
    for item in _split_items(hostlist):
        hosts.extend(_expand_item(item, hostlist))
    return hosts


def compress(hosts: Iterable[str], *, sort: bool = False) -> str:
    """The hostlist expression for ``hosts``; ``expand(compress(h)) == list(h)``.

    With ``sort``, duplicates are dropped and names sorted by prefix and number first
    (``n10,n9`` -> ``n[9-10]``).
    """
    names = list(hosts)
    for name in names:
        if not name or any(c in name for c in "[], \t\n"):
            raise SlurmError(f"not a host name: {name!r}")
    if sort:
        names = sorted(set(names), key=_natural_key)
    items: list[str] = []
    for prefix, group in itertools.groupby(names, key=_prefix):
        members = list(group)
        if prefix is None or len(members) == 1:
            items.extend(members)
            continue
        ranges = _ranges([m[len(prefix) :] for m in members])
        items.append(f"{prefix}[{','.join(ranges)}]")
    return ",".join(items)


def _split_items(text: str) -> list[str]:
    """Split at commas and whitespace outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise SlurmError(f"invalid hostlist {text!r}: nested '['")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"invalid hostlist {text!r}: ']' without '['")
        elif depth == 0 and (c == "," or c.isspace()):
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"invalid hostlist {text!r}: '[' without ']'")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_item(item: str, whole: str) -> list[str]:
    """One item without separators: literal text and bracket groups, expanded as a product."""
    parts = re.split(r"\[([^\]]*)\]", item)
    literals, brackets = parts[0::2], parts[1::2]  # literal, bracket, literal, …, literal
    if not brackets:
        return [item]
    if literals[-1]:
        raise SlurmError(f"invalid hostlist {whole!r}: text {literals[-1]!r} after the last ']' in {item!r}")
    groups = [_expand_bracket(b, whole) for b in brackets]
    # Slurm's order: the last bracket varies fastest, then the first, the second, …
    nesting = [*range(len(groups) - 2, -1, -1), len(groups) - 1]
    hosts = []
    for combo in itertools.product(*(groups[i] for i in nesting)):
        chosen = dict(zip(nesting, combo, strict=True))
        hosts.append("".join(lit + chosen[i] for i, lit in enumerate(literals[:-1])))
    return hosts


def _expand_bracket(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise SlurmError(f"invalid hostlist {whole!r}: bad range {part!r}")
        lo_text, hi_text = m.group(1), m.group(2)
        lo = int(lo_text)
        hi = lo if hi_text is None else int(hi_text)
        if hi < lo:
            raise SlurmError(f"invalid hostlist {whole!r}: range {part!r} runs backwards")
        if hi - lo + 1 > MAX_RANGE:
            raise SlurmError(f"invalid hostlist {whole!r}: range {part!r} has more than {MAX_RANGE} hosts")
        width = len(lo_text)
        out.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return out


def _prefix(name: str) -> str | None:
    """The part before the trailing digits, or None when the name does not end in digits."""
    m = _TRAILING_DIGITS.match(name)
    return m.group(1) if m else None


def _natural_key(name: str) -> tuple[str, int, str]:
    m = _TRAILING_DIGITS.match(name)
    return (m.group(1), int(m.group(2)), m.group(2)) if m else (name, -1, "")


def _widths(digits: str) -> tuple[int, int]:
    """The zero-padding widths that print ``int(digits)`` as ``digits`` (an inclusive interval)."""
    if len(digits) > 1 and digits[0] == "0":
        return len(digits), len(digits)
    return 1, len(digits)


def _ranges(numbers: list[str]) -> list[str]:
    """Digit strings -> ``lo-hi`` / ``n`` terms; a run continues while one padding fits all."""
    terms: list[str] = []
    i = 0
    while i < len(numbers):
        lo_text = numbers[i]
        last = int(lo_text)
        low, high = _widths(lo_text)
        j = i + 1
        while j < len(numbers):
            w_lo, w_hi = _widths(numbers[j])
            if int(numbers[j]) != last + 1 or max(low, w_lo) > min(high, w_hi):
                break
            low, high = max(low, w_lo), min(high, w_hi)
            last += 1
            j += 1
        terms.append(lo_text if j == i + 1 else f"{lo_text}-{numbers[j - 1]}")
        i = j
    return terms
