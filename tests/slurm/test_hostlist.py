"""Hostlist expansion and compression, compared with Slurm's own ``scontrol show hostnames|hostlist``.

``scontrol show hostnames`` needs a slurm.conf but no running cluster: a minimal one is written
to a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcsif.errors import SlurmError
from hpcsif.slurm.hostlist import compress, expand

VALID = [
    "node[01-04,07]",
    "n[1-010]",
    "n[01-100]",
    "n[001-5]",
    "n[09-11]",
    "n[010-012]",
    "n[01,1]",
    "n[99-101]",
    "n[007-8]",
    "n[0-0]",
    "n[00]",
    "n[1,2-3,5]",
    "n[2,1]",
    "n[1,1]",
    "n[1-3],n2",
    "r[1-2]n[01-02]",
    "n[1-2][3-4]",
    "r[1-3]-c[01-02]-n[8-10]",
    "a[1-2]b[1-2]c[1-3]d[0-1]",
    "n1 n2\tn3",
    "n,,m",
    ",n",
    "n[1-2],",
    "foo",
    "",
    "a-1",
    "n-[1-2]",
    "1[1-2]",
    "[1-2]",
    "rack1-node[1-4],rack2-node[09-12],login1,gpu[001-002]",
    "n[1-65536]",
]
# Slurm 22.05 answers "Invalid hostlist" for these (other malformed texts it reads leniently)
INVALID = ["n[5-3]", "n[1-4:2]", "n[]", "n[a-b]", "n[-1]", "n[1-2-3]", "n[1--2]", "n[1-2]-ib", "x[0-1]y",
           "n[1-2]x[3-4]y", "n[[1-2]]", "n[1-2]]", "n[1-65537]"]  # fmt: skip
COMPRESS = [
    "n3,n1,n2",
    "n1,n2,m1,n3",
    "n08,n09,n10",
    "n01,n1,n2",
    "n1,n1,n2",
    "a,b,a",
    "n1-ib,n2-ib",
    "r1n1,r1n2,r2n1",
    "n9,n10,n11",
    "n010,n011,n9",
    "x,n1,1,2",
    "n001,n002,n1000",
    "n0,n00,n000",
    "n7,n08,n09",
    "n98,n99,n100,n0101",
]


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory: pytest.TempPathFactory):
    """``scontrol show WHAT TEXT`` -> (lines, invalid?) with a throwaway slurm.conf."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol (slurm-client) is not installed")
    conf = tmp_path_factory.mktemp("hostlist") / "slurm.conf"
    conf.write_text("ClusterName=hl\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(what: str, text: str) -> tuple[list[str], bool]:
        proc = subprocess.run(["scontrol", "show", what, text], capture_output=True, text=True, env=env)
        out = proc.stdout + proc.stderr
        return proc.stdout.splitlines(), "Invalid hostlist" in out or "Invalid range" in out

    return run


@pytest.mark.parametrize("text", VALID)
def test_expand_matches_scontrol(scontrol, text: str) -> None:
    want, invalid = scontrol("hostnames", text)
    assert not invalid
    assert expand(text) == want


@pytest.mark.parametrize("text", INVALID)
def test_invalid_rejected_like_scontrol(scontrol, text: str) -> None:
    _, invalid = scontrol("hostnames", text)
    assert invalid, f"scontrol accepts {text!r}"
    with pytest.raises(SlurmError) as exc:
        expand(text)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize("text", ["n[1-2", "n1]", "n[1-]", "n[+1]", "n[ 1-2]"])
def test_malformed_rejected(text: str) -> None:
    """Texts Slurm reads leniently (``n[1-2`` -> ``n]``) are errors here, naming the text."""
    with pytest.raises(SlurmError, match=r"invalid hostlist"):
        expand(text)


@pytest.mark.parametrize("names", COMPRESS)
def test_compress_matches_scontrol(scontrol, names: str) -> None:
    (want,), _ = scontrol("hostlist", names)
    assert compress(names.split(",")) == want
    assert expand(want) == names.split(",")


def test_compress_sorted() -> None:
    assert compress(["n10", "n9", "m1", "n9", "n08"], sort=True) == "m1,n[08,9-10]"
    assert compress([]) == ""


@pytest.mark.parametrize("bad", ["", "n[1]", "a,b", "a b"])
def test_compress_rejects_non_names(bad: str) -> None:
    with pytest.raises(SlurmError, match="not a host name"):
        compress([bad])


_prefix = st.sampled_from(["n", "node", "r1n", "gpu-", "", "a.b", "x_"])
_number = st.integers(0, 120).flatmap(lambda n: st.sampled_from([str(n), f"{n:02d}", f"{n:03d}"]))
_host = st.one_of(
    st.builds(lambda p, d: p + d, _prefix, _number),
    st.sampled_from(["login", "n1-ib", "head"]),
).filter(bool)
_hosts = st.lists(_host, max_size=25)


@given(_hosts)
@settings(max_examples=150, deadline=None)
def test_round_trip(hosts: list[str]) -> None:
    assert expand(compress(hosts)) == hosts


@given(st.lists(st.builds(lambda p, d: p + d, st.sampled_from(["n", "r1n"]), _number), max_size=40))
@settings(max_examples=100, deadline=None)
def test_round_trip_sorted(hosts: list[str]) -> None:
    assert sorted(expand(compress(hosts, sort=True))) == sorted(set(hosts))


@given(_hosts.filter(bool))
@settings(max_examples=40, deadline=None)
def test_compress_matches_scontrol_random(scontrol, hosts: list[str]) -> None:
    lines, invalid = scontrol("hostlist", ",".join(hosts))
    assert not invalid
    assert compress(hosts) == lines[0]
