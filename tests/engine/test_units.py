"""Unit tests of the engine's parsers and planners (no containers started)."""

from __future__ import annotations

import os

import pytest

from hpcsif.engine.base import LaunchOptions, mpi_profile_name
from hpcsif.engine.binds import Bind, check_sources, parse_bind, parse_home
from hpcsif.engine.bwrap import check_user_namespaces
from hpcsif.engine.environment import build_env, parse_env_file
from hpcsif.engine.gpu import read_liblist
from hpcsif.engine.image_paths import missing_parent
from hpcsif.engine.mpi import load_profile
from hpcsif.errors import ConfigError, EngineError, UsageError


def test_parse_bind():
    assert parse_bind("/a") == [Bind("/a", "/a")]
    assert parse_bind("/a:/b:ro,/c:/d") == [Bind("/a", "/b", True), Bind("/c", "/d")]
    assert parse_bind("rel:/x:rw")[0].src == os.path.abspath("rel")
    # Apptainer's escapes and option lists
    assert parse_bind(r"/a\,b:/c\:d:rw,ro,/e") == [Bind("/a,b", "/c:d", True), Bind("/e", "/e")]
    assert parse_bind("/a:/b:ro,/rootdir")[1] == Bind("/rootdir", "/rootdir")
    # a relative source alone is the destination too, as given: refused, as in Apptainer
    for bad in ("/a:b", "/a:/b:rx", "/a:/b:ro:x", ":/b", "rel", "rel::rw"):
        with pytest.raises(EngineError):  # Apptainer's lines, status 255
            parse_bind(bad)
    # an image bind: the path in the image (from its root), the SIF object id
    assert parse_bind("/a:/b:image-src=x,id=2,ro") == [
        Bind("/a", "/b", readonly=True, image_src="/x", image_id=2)
    ]
    assert parse_bind("/a:/b:id=1")[0].image_src == "/"
    with pytest.raises(EngineError, match="while parsing id bind option"):
        parse_bind("/a:/b:id=x")


def test_missing_bind_source_is_an_engine_error():
    with pytest.raises(EngineError, match="mount source /nonexistent-x doesn't exist"):
        check_sources([Bind("/nonexistent-x", "/x")])
    assert check_sources([Bind("/nonexistent-x", "/x", optional=True)]) == []


def test_parse_home():
    assert parse_home(None, "/home/u") == ("/home/u", "/home/u")
    assert parse_home("/scratch/u:/home/u", "/x") == ("/scratch/u", "/home/u")


def test_env_file(tmp_path):
    f = tmp_path / "e"
    f.write_text('# c\nexport A=\'x y\'\nB="q\\"uote"\nC=plain # trailing\n\nD=\n')
    assert parse_env_file(str(f)) == {"A": "x y", "B": 'q"uote', "C": "plain", "D": ""}
    # a shell script, as in Apptainer: expansions and command substitution work
    f.write_text('X=$HOME/a\nY="$(echo sub) z"\n')
    assert parse_env_file(str(f)) == {"X": os.environ["HOME"] + "/a", "Y": "sub z"}
    f.write_text("A=two words\n")
    with pytest.raises(EngineError, match="words"):
        parse_env_file(str(f))


def test_build_env_precedence():
    host = {
        "PATH": "/host/bin",
        "LD_LIBRARY_PATH": "/host/lib",
        "KEEP": "1",
        "SINGULARITYENV_FOO": "s",
        "TERM": "xterm",
        "SLURM_PROCID": "2",
    }
    env = build_env(
        host, action="exec", cleanenv=False, env=["FOO=cli value"], env_files=[], image="/x/a.sif", home="/h"
    )
    assert env["PATH"] != "/host/bin" and "LD_LIBRARY_PATH" not in env and env["__HPCSIF_HOST_KEEP"] == "1"
    assert env["__HPCSIF_SET"] == "FOO" and env["__HPCSIF_SET_FOO"] == "cli value"  # --env beats *ENV_
    assert env["SINGULARITY_NAME"] == "a.sif" and env["HOME"] == "/h"
    clean = build_env(
        host,
        action="shell",
        cleanenv=True,
        env=[],
        env_files=[],
        image="/x/a.sif",
        home="/h",
        pass_prefixes=("SLURM_",),
    )
    # host values are hidden from the image's scripts: the launcher restores those left unset
    assert "KEEP" not in clean and clean["__HPCSIF_HOST_TERM"] == "xterm"
    assert clean["__HPCSIF_HOST_SLURM_PROCID"] == "2" and "TERM" in clean["__HPCSIF_HOST"].split()
    assert clean["__HPCSIF_SET_FOO"] == "s" and clean["PS1"] == "Apptainer> "
    outside = build_env(
        {"APPTAINER_CACHEDIR": "/c", "SINGULARITY_BIND": "/b"},
        action="exec",
        cleanenv=False,
        env=[],
        env_files=[],
        image="/x/a.sif",
        home="/h",
    )
    assert "__HPCSIF_HOST" not in outside and outside["SINGULARITY_BIND"] == ""
    with pytest.raises(UsageError):
        build_env({}, action="exec", cleanenv=False, env=["1BAD=x"], env_files=[], image="/a", home="/h")


def test_missing_parent(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("")
    (tmp_path / "home").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var/run").symlink_to("/run")
    (tmp_path / "run").mkdir()
    root = str(tmp_path)
    assert missing_parent(root, "/etc/passwd") is None
    assert missing_parent(root, "/etc/resolv.conf") == "/etc"
    assert missing_parent(root, "/home/user/x") == "/home"
    assert missing_parent(root, "/work/dir") == "/"
    assert missing_parent(root, "/var/run/x") == "/run"  # followed inside the image
    (tmp_path / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    assert missing_parent(root, "/etc/localtime") == "/etc"  # a link as the destination itself


def test_liblist(tmp_path):
    f = tmp_path / "l.conf"
    f.write_text("# comment\nnvidia-smi\nlibcuda.so  # driver\n\nlibnvidia-ml.so\n")
    assert read_liblist(f) == (["nvidia-smi"], ["libcuda.so", "libnvidia-ml.so"])


def test_shipped_mpi_profiles_load():
    for name in ("openmpi", "openmpi-bind", "mpich", "intelmpi"):
        prof = load_profile(name)
        assert prof.model in ("hybrid", "bind") and "SLURM_" in prof.env_prefixes
    with pytest.raises(ConfigError, match="unknown MPI profile"):
        load_profile("nope")


def test_abi_rule(tmp_path):
    host, cont = tmp_path / "host", tmp_path / "cont"
    (cont / "lib").mkdir(parents=True)
    host.mkdir()
    prof = load_profile("openmpi")
    prof.abi = {"mpi_host": [f"{host}/libmpi.so.*"], "mpi_container": ["/lib/libmpi.so.*"]}
    (cont / "lib/libmpi.so.40.30.2").write_text("")
    for host_version, ok in (("40.30.2", True), ("40.31.0", True), ("40.20.0", False), ("12.1.0", False)):
        for old in host.iterdir():
            old.unlink()
        (host / f"libmpi.so.{host_version}").write_text("")
        assert (prof.abi_warnings(str(cont)) == []) is ok, host_version


def test_mpi_profile_name(monkeypatch):
    from hpcsif.config import Config, set_config

    cfg = Config.load()
    cfg.override("mpi.partition_defaults", {"gpu": "openmpi"})
    cfg.override("mpi.default", "mpich")
    set_config(cfg)
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    assert mpi_profile_name(None) == "openmpi"
    assert mpi_profile_name("none") is None
    monkeypatch.setenv("SLURM_JOB_PARTITION", "cpu")
    assert mpi_profile_name(None) == "mpich"


def test_launch_options():
    opts = LaunchOptions(action="run", containall=True)
    assert opts.contain and opts.cleanenv
    with pytest.raises(UsageError):
        LaunchOptions(action="exec")
    with pytest.raises(UsageError):
        LaunchOptions(action="start")


@pytest.mark.parametrize(
    ("files", "uid", "refused"),
    [
        ({"user/max_user_namespaces": "15000", "kernel/unprivileged_userns_clone": "1"}, 1000, False),
        ({"user/max_user_namespaces": "0"}, 0, True),
        ({"user/max_user_namespaces": "15000", "kernel/unprivileged_userns_clone": "0"}, 1000, True),
        ({"user/max_user_namespaces": "15000", "kernel/unprivileged_userns_clone": "0"}, 0, False),
        ({"kernel/apparmor_restrict_unprivileged_userns": "1"}, 1000, True),
        ({}, 1000, False),
    ],
)
def test_user_namespace_switches(tmp_path, files, uid, refused):
    for name, value in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(value + "\n")
    if refused:
        with pytest.raises(EngineError, match=r"user namespaces are disabled.*--engine apptainer"):
            check_user_namespaces(str(tmp_path), uid)
    else:
        check_user_namespaces(str(tmp_path), uid)


def test_launcher_ends_when_hpcsif_is_gone(tmp_path) -> None:
    """The launcher reports ready on hpcsif's pipe before the payload starts; a broken pipe (hpcsif
    killed while bwrap set up) ends the container there instead of running the payload unowned."""
    import subprocess

    from hpcsif.engine.environment import LAUNCHER

    mark = tmp_path / "ran"
    for reader_alive in (True, False):
        r, w = os.pipe()
        if not reader_alive:
            os.close(r)
        env = {"PATH": "/usr/bin:/bin", "__HPCSIF_READY": str(w), "__HPCSIF_ACTION": "exec"}
        cmd = ["/bin/sh", "-c", LAUNCHER, "hpcsif", "touch", str(mark)]
        # SIGPIPE ignored, as the engine's posix_spawn leaves it (Python ignores it): printf fails
        kw = {"pass_fds": (w,), "restore_signals": False, "capture_output": True, "text": True}
        proc = subprocess.run(cmd, env=env, timeout=30, **kw)
        os.close(w)
        if reader_alive:
            assert os.read(r, 1) == b"x" and proc.returncode == 0 and mark.exists(), proc.stderr
            os.close(r)
            mark.unlink()
        else:
            assert proc.returncode != 0 and not mark.exists(), proc.stderr
