"""Exactly-once conversion across separate processes, and recovery from a killed converter."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import pytest

from hpcsif.cache.api import ensure_image
from hpcsif.cache.locking import key_lock
from hpcsif.cache.store import validate_sif
from hpcsif.errors import CacheBusy
from tests.cache.conftest import CacheEnv, wait_until

pytestmark = pytest.mark.slow

# each child imports everything first, reports ready, then waits for the gate: a real stampede
CHILD = """
import os, sys, time
from hpcsif.cache.api import ensure_image
from hpcsif.cache.locking import key_lock
ref, ready, gate = sys.argv[1:4]
open(ready, "w").close()
while not os.path.exists(gate):
    time.sleep(0.002)
print(ensure_image(ref))
"""


@pytest.mark.parametrize(("n", "lock_mode"), [(64, "fcntl"), (16, "excl")])
def test_many_processes_one_conversion(
    cache_env: CacheEnv, busybox_ref: str, tmp_path: Path, n: int, lock_mode: str
) -> None:
    # the image's key, learnt from a first conversion (the cache is emptied again)
    key = ensure_image(busybox_ref).parent.name
    shutil.rmtree(cache_env.cache)
    gate = tmp_path / "go"
    procs = [
        cache_env.spawn(
            CHILD, busybox_ref, str(tmp_path / f"ready{i}"), str(gate), HPCSIF_LOCK_MODE=lock_mode
        )
        for i in range(n)
    ]
    wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)), 120, "children to start")
    # the key's lock is held a moment while the stampede starts, as a slow conversion would hold
    # it (a busybox conversion alone may end before a loaded machine has woken the others)
    root = cache_env.root.ensure()
    with key_lock(root.lock_path(key), "the test's stand-in conversion", mode=lock_mode):
        gate.touch()
        time.sleep(1.5)
    results = [p.communicate(timeout=300) for p in procs]
    failed = [(p.returncode, err) for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert not failed, failed[0]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert path.is_file() and path.is_relative_to(cache_env.cache)
    validate_sif(path)
    assert len(cache_env.conversions()) == 1
    # they waited visibly (those that reached the lock late found the image published)
    assert sum("waiting for conversion of" in err and "held by pid" in err for _, err in results) >= n // 2
    assert not list((cache_env.cache / "tmp").iterdir())


def test_sigkilled_converter_leaves_nothing(cache_env: CacheEnv, blocking_ref, caplog) -> None:
    ref, gate = blocking_ref
    child = cache_env.spawn(
        "import sys; from hpcsif.cache.api import ensure_image; ensure_image(sys.argv[1])", ref
    )
    tmp = cache_env.cache / "tmp"
    # the child is blocked downloading the held layer, inside its build directory
    wait_until(lambda: gate.waiting.is_set() and tmp.is_dir() and any(tmp.iterdir()), 60, "the conversion")
    time.sleep(0.2)
    assert child.poll() is None

    # meanwhile another requester waits for it, says so, and gives up at the timeout
    cache_env.configure(lock_timeout=1)
    caplog.set_level(logging.WARNING, logger="hpcsif")
    with pytest.raises(CacheBusy, match=f"held by pid {child.pid}"):
        ensure_image(ref)
    assert f"waiting for conversion of {ref} (held by pid {child.pid}" in caplog.text

    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not any((cache_env.cache / "sif").iterdir()), "a killed conversion must publish nothing"
    assert any(tmp.iterdir()), "the killed converter's work directory is expected as garbage"

    gate.open()
    cache_env.configure()
    path = ensure_image(ref)
    validate_sif(path)
    assert len(cache_env.conversions()) == 1
    assert not list(tmp.iterdir()), "the next lock holder removes the leftovers"


@pytest.mark.parametrize("command", ["build", "pull"])
def test_sigterm_unwinds_and_leaves_nothing(
    cache_env: CacheEnv, blocking_ref, tmp_path: Path, command: str
) -> None:
    """As scancel or a job's time limit stops a conversion: exit 143, no output, no leftovers."""
    ref, gate = blocking_ref
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--disable-cache"] if command == "build" else []
    child = cache_env.spawn(
        "import sys; from hpcsif.cli.main import main; sys.exit(main(sys.argv[1:]))",
        command, *extra, str(out / "x.sif"), ref,
    )  # fmt: skip
    tmp = out if command == "build" else cache_env.cache / "tmp"
    # the conversion is under way: blocked downloading the held layer (a pull inside its work
    # directory in the cache; a build without the cache fetches into a temporary one)
    wait_until(
        lambda: gate.waiting.is_set() and (command == "build" or any(tmp.iterdir())), 60, "the conversion"
    )
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 143 and err.strip().endswith("FATAL:   terminated"), err
    assert not any(out.iterdir()) and not any(tmp.iterdir())
    published = cache_env.cache / "sif"
    assert not published.exists() or not any(published.iterdir())


def test_concurrent_cold_registry_requests_resolve_the_tag_once(
    cache_env: CacheEnv, busybox_image, registry_open, tmp_path: Path
) -> None:
    registry_open.push(busybox_image.oci_ref, "cache/stampede:1")
    ref = registry_open.ref("cache/stampede:1")
    n = 12
    gate = tmp_path / "go"
    code = "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n" + CHILD
    procs = [cache_env.spawn(code, ref, str(tmp_path / f"ready{i}"), str(gate)) for i in range(n)]
    wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)), 60, "children to start")
    gate.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sum(err.count(f"resolving {ref}") for _, err in results) == 1
    assert len(cache_env.conversions()) == 1


def test_threads_of_one_process_share_one_conversion(cache_env: CacheEnv, busybox_ref: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: ensure_image(busybox_ref), range(8)))
    assert len(paths) == 1
    assert len(cache_env.conversions()) == 1
