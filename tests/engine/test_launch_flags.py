"""Apptainer 1.4's launch flags through the CLI with the bwrap engine (root and an unprivileged user).

Where the Apptainer peer is installed, outputs that do not depend on privileges are compared
with it directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcsif.engine.apptainer import ApptainerEngine
from hpcsif.engine.base import LaunchOptions
from tests.conftest import CONVERSION_INFO, peer_apptainer
from tests.engine.conftest import as_user, hpcsif_cmd
from tests.services.registry import PASSWORD, USER, Registry

pytestmark = pytest.mark.slow


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def peer(*args: str) -> str | None:
    """stdout of ``apptainer ARGS…`` (None when the peer is not installed)."""
    exe = peer_apptainer()
    if exe is None:
        return None
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def peer_sif(images) -> Path:
    """The test SIF under /tmp, where the peer (a chroot that sees only /tmp) can open it too."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="hpcsif-flags-", dir="/tmp"))
    d.chmod(0o755)
    yield Path(shutil.copy2(images.sif, d / "busybox.sif"))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def user_sandbox(images, unpriv_user, tmp_path) -> Path:
    """A copy of the test sandbox owned by the unprivileged user (it may write into it)."""
    box = Path(shutil.copytree(images.sandbox, images.base / f"box-{tmp_path.name}", symlinks=True))
    subprocess.run(["chown", "-R", f"{unpriv_user.uid}:{unpriv_user.gid}", str(box)], check=True)
    yield box
    shutil.rmtree(box, ignore_errors=True)


def user_run(user, *args: str, cwd: str | None = None, **kw) -> subprocess.CompletedProcess:
    cmd, env = as_user(user, hpcsif_cmd(*args))
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=cwd or user.home, timeout=60, **kw
    )


def test_fakeroot(run, images):
    """-f: uid 0 and the image's root entry inside, home bound at /root, full capabilities there."""
    script = (
        "id -u; id -g; whoami; echo $HOME; grep CapEff /proc/self/status; touch $HOME/.fk && rm $HOME/.fk"
    )
    lines = ok(run("exec", "-f", str(images.sif), "sh", "-c", script)).splitlines()
    assert lines[:4] == ["0", "0", "root", "/root"]
    assert lines[4].split()[1] != "0000000000000000"  # as Apptainer's fakeroot (in the namespace only)
    env = ok(run("exec", str(images.sif), "id", "-u", env={"APPTAINER_FAKEROOT": "1"}))
    assert env == "0\n"


def test_fakeroot_as_the_peer(peer_sif):
    """As root, -f gives the same identity and home as Apptainer's."""
    args = ["exec", "-f", str(peer_sif), "sh", "-c", "id; whoami; echo $HOME"]
    out = ok(subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, timeout=60))
    assert peer(*args) in (None, out)
    assert out.splitlines()[1:] == ["root", "/root"]


def test_fakeroot_gives_no_real_privilege(images, unpriv_user):
    """The fake root changes the image only in its own overlay (as Apptainer's, where the image's
    files are the user's), never a host directory the user could not write."""
    script = "touch /opt/x && ls -l /opt/x && touch /host/x"
    args = ["-f", "--writable-tmpfs", "-B", f"{images.base}:/host", str(images.sif), "sh", "-c", script]
    res = user_run(unpriv_user, "exec", *args)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    assert res.stdout.split()[2:4] == ["root", "root"]
    assert not (images.base / "x").exists()


def test_writable_sandbox_persists(unpriv_user, user_sandbox):
    out = user_run(
        unpriv_user, "exec", "-w", "--no-home", str(user_sandbox), "sh", "-c", "echo kept > /opt/new; pwd"
    )
    assert ok(out).splitlines()[-1] == "/"
    assert (user_sandbox / "opt/new").read_text() == "kept\n"
    assert not (user_sandbox / "home" / unpriv_user.name).exists()  # nothing else left behind
    # as Apptainer: a home directory the sandbox lacks cannot be created there
    res = user_run(unpriv_user, "exec", "-w", str(user_sandbox), "true")
    assert res.returncode != 0
    assert res.stderr.splitlines()[-1] == (
        f"FATAL:   destination {unpriv_user.home} doesn't exist in container (--writable cannot create it)"
    )


def test_writable_sif_is_refused(run, images):
    res = run("exec", "-w", str(images.sif), "true")
    assert res.returncode != 0
    assert res.stderr.strip() == f"FATAL:   no SIF writable overlay partition found in {images.sif}"


def test_namespaces(run, images):
    ns = "for n in ipc uts net; do readlink /proc/self/ns/$n; done"
    host = subprocess.run(["sh", "-c", ns], capture_output=True, text=True).stdout.splitlines()
    assert ok(run("exec", "--hostname", "inside", str(images.sif), "hostname")) == "inside\n"
    assert ok(run("exec", str(images.sif), "hostname", env={"APPTAINER_HOSTNAME": "viaenv"})) == "viaenv\n"
    assert ok(run("exec", "--uts", str(images.sif), "hostname")) == f"{os.uname().nodename}\n"
    assert ok(run("exec", "-p", str(images.sif), "sh", "-c", "echo $$")) == "2\n"  # bwrap's init is 1
    assert ok(run("exec", "-p", "--no-init", str(images.sif), "sh", "-c", "echo $$")) == "1\n"
    assert int(ok(run("exec", "-C", "--no-pid", str(images.sif), "sh", "-c", "echo $$"))) > 2
    inside = ok(run("exec", "-i", "--uts", "-n", str(images.sif), "sh", "-c", ns)).splitlines()
    assert all(a != b for a, b in zip(inside, host, strict=True))
    assert ok(run("exec", str(images.sif), "sh", "-c", ns)).splitlines() == host
    links = ok(run("exec", "--net", "--network", "none", str(images.sif), "cat", "/proc/net/dev"))
    assert [ln.split(":")[0].strip() for ln in links.splitlines()[2:]] == ["lo"]
    # --network alone sets --net, saying so as Apptainer does
    res = run("exec", "--network", "none", str(images.sif), "cat", "/proc/net/dev")
    assert (res.returncode, res.stderr) == (0, "INFO:    Setting --net (required by --network)\n")
    assert [ln.split(":")[0].strip() for ln in res.stdout.splitlines()[2:]] == ["lo"]
    res = run("exec", "--network", "bridge", str(images.sif), "true")
    assert res.returncode != 0 and res.stderr.startswith(
        "FATAL:   --network bridge is not supported by hpcsif:"
    )


def test_dns(run, peer_sif):
    args = ["exec", "--dns", "1.2.3.4,5.6.7.8", str(peer_sif), "cat", "/etc/resolv.conf"]
    out = ok(run(*args))
    assert out == "nameserver 1.2.3.4\nnameserver 5.6.7.8\n"
    assert peer(*args) in (None, out)


def umask_run(images, *flags: str, **env: str) -> str:
    """``sh -c umask`` inside, started with umask 077."""
    cmd = hpcsif_cmd("exec", *flags, str(images.sif), "sh", "-c", "umask")
    res = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077), env={**os.environ, **env}
    )
    return ok(res).strip()


def test_umask(images):
    """The caller's umask goes in; --no-umask (and --compat) sets 0022, as Apptainer."""
    assert umask_run(images) == "0077"
    assert umask_run(images, "--no-umask") == "0022"
    assert umask_run(images, "--compat") == "0022"
    assert umask_run(images, APPTAINER_NO_UMASK="1") == "0022"


def test_no_eval_and_compat(run, images):
    script = 'echo "[$A][$B][${APPTAINER_NO_EVAL-}][${HOSTVAR-}]"'
    env = {"APPTAINERENV_B": "$HOSTVAR", "HOSTVAR": "host"}
    evaluated = ok(run("exec", "--env", "A=$HOSTVAR", str(images.sif), "sh", "-c", script, env=env))
    assert evaluated == "[host][host][][host]\n"
    literal = ok(
        run("exec", "--no-eval", "--env", "A=$HOSTVAR", str(images.sif), "sh", "-c", script, env=env)
    )
    assert literal == "[$HOSTVAR][$HOSTVAR][1][host]\n"
    # --compat: --containall (clean environment, PID namespace), --no-init, --no-eval, --writable-tmpfs
    compat = ok(
        run("exec", "--compat", str(images.sif), "sh", "-c", script + "; echo $$; touch /new", env=env)
    )
    assert compat == "[][$HOSTVAR][1][]\n1\n"


# Apptainer 1.4.5's output for each --env value
EXPECTED_ENV = {
    "A=1,B=2": "A=[1] B=[2]\n",
    "A=1,2": "A=[1,2] B=[]\n",
    '"A=1,2"': "A=[1,2] B=[]\n",
    "A=it's": "A=[it's] B=[]\n",
    'A=x"y': 'A=[x"y] B=[]\n',
    "A=b=c,B=d": "A=[b=c] B=[d]\n",
    '"A=x,y",B=2': "A=[x,y] B=[2]\n",
}


@pytest.mark.parametrize("value", EXPECTED_ENV)
def test_env_comma_lists(peer_sif, value):
    """--env values split as Apptainer's stringToString flag splits them (compared with the peer)."""
    args = ["exec", "--env", value, str(peer_sif), "sh", "-c", 'echo "A=[$A] B=[${B-}]"']
    out = ok(subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, timeout=60))
    expected = peer(*args)
    if expected is not None:
        assert out == expected
    assert out == EXPECTED_ENV[value]


def test_env_bad_quote_is_one_line(run, images):
    res = run("exec", "--env", 'A="x y",B=3', str(images.sif), "true")
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("FATAL:   invalid --env value")


def test_scratch_and_workdir(run, images, pub_tmp):
    script = "touch /scr/a /x/y/b /s3/c && ls -d /scr /x/y /s3"
    out = ok(run("exec", "-S", "/scr,/x/y", "--scratch", "/s3", str(images.sif), "sh", "-c", script))
    assert sorted(out.split()) == ["/s3", "/scr", "/x/y"]
    work = pub_tmp / "work"
    work.mkdir()
    work.chmod(0o777)
    ok(run("exec", "-W", str(work), "-S", "/scr,/x/y", str(images.sif), "touch", "/scr/a", "/x/y/b"))
    assert (work / "scratch/scr/a").exists() and (work / "scratch/x/y/b").exists()
    home = ok(
        run("exec", "-c", "-W", str(work), str(images.sif), "sh", "-c", "touch /tmp/t /var/tmp/v $HOME/h")
    )
    assert home == ""
    assert {p.name for p in (work / "tmp").iterdir()} == {"t"}
    assert (work / "var_tmp/v").exists() and (work / "home/h").exists()
    assert oct((work / "tmp").stat().st_mode & 0o7777) == "0o1777"
    res = run("exec", "-S", "relative", str(images.sif), "true")
    assert res.returncode != 0 and "destination must be an absolute path" in res.stderr


def test_mount_flag(run, images, pub_tmp):
    (pub_tmp / "f").write_text("mounted\n")
    spec = f"source={pub_tmp},destination=/m1"  # (type=bind is the default, as in Apptainer)
    alias = f"type=bind,src={pub_tmp},dst=/m2,ro"
    out = ok(run("exec", "--mount", spec, "--mount", alias, str(images.sif), "sh", "-c", "cat /m1/f /m2/f"))
    assert out == "mounted\nmounted\n"
    res = run("exec", "--mount", alias, str(images.sif), "touch", "/m2/g")
    assert res.returncode != 0 and not (pub_tmp / "g").exists()
    ok(
        run(
            "exec",
            str(images.sif),
            "touch",
            "/m3/g",
            env={"APPTAINER_MOUNT": f"type=bind,target=/m3,src={pub_tmp}"},
        )
    )
    assert (pub_tmp / "g").exists()
    res = run("exec", "--mount", "type=volume,src=x,dst=/y", str(images.sif), "true")
    assert (res.returncode, res.stderr.strip()) == (
        255,
        "FATAL:   While setting bind mount configuration: while parsing mount "
        '"type=volume,src=x,dst=/y": unsupported mount type "volume", only \'bind\' is supported',
    )
    res = run("exec", "--mount", f"src={pub_tmp},dst=/y,image-src=/", str(images.sif), "true")
    why = "not supported image format"
    want = f"FATAL:   container creation failed: could not use {pub_tmp} for image binding: {why}"
    assert (res.returncode, res.stderr.strip()) == (255, want)


def test_overlay_directory(unpriv_user, user_sandbox, images, pub_tmp):
    """A writable overlay directory keeps the changes in upper/ (as Apptainer's); :ro layers them."""
    ov = pub_tmp / "ov"
    ov.mkdir()
    os.chown(ov, unpriv_user.uid, unpriv_user.gid)
    ok(user_run(unpriv_user, "exec", "-o", str(ov), str(user_sandbox), "sh", "-c", "echo hi > /opt/added"))
    assert (ov / "upper/opt/added").read_text() == "hi\n"
    assert not (user_sandbox / "opt/added").exists()
    assert (
        ok(user_run(unpriv_user, "exec", "-o", f"{ov}:ro", str(user_sandbox), "cat", "/opt/added")) == "hi\n"
    )
    res = user_run(unpriv_user, "exec", "-o", f"{ov}:ro", str(user_sandbox), "touch", "/opt/x")
    assert res.returncode != 0
    img = pub_tmp / "overlay.img"
    img.write_bytes(b"\0" * 4096)
    res = user_run(unpriv_user, "exec", "-o", str(img), str(images.sif), "true")
    assert res.returncode != 0
    assert res.stderr.strip() == (
        f"FATAL:   while loading overlay images: failed to open overlay image {img}: "
        "image format not recognized"
    )


REFUSED = [
    ["--apply-cgroups", "/x.toml"],
    ["--blkio-weight", "100"],
    ["--blkio-weight-device", "/dev/vda:100"],
    ["--cpu-shares", "512"],
    ["--cpus", "1"],
    ["--cpuset-cpus", "0"],
    ["--cpuset-mems", "0"],
    ["--memory", "1G"],
    ["--memory-reservation", "1G"],
    ["--memory-swap", "1G"],
    ["--oom-kill-disable"],
    ["--pids-limit", "10"],
    ["--security", "seccomp:x.json"],
    ["--allow-setuid"],
    ["--fusemount", "container:sshfs x: /y"],
    ["--pem-path", "/k.pem"],
    ["--passphrase"],
    ["--sharens"],
    ["--netns-path", "/run/netns/x"],
    ["--network-args", "portmap=80:80/tcp"],
]


def test_refused_flags_say_so_in_one_line(images):
    for flags in REFUSED:
        res = subprocess.run(
            hpcsif_cmd("exec", *flags, str(images.sif), "true"), capture_output=True, text=True
        )
        assert res.returncode != 0 and "usage:" not in res.stderr, flags  # not argparse's usage dump
        assert res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith(f"FATAL:   {flags[0]} is not supported by hpcsif: "), res.stderr
        assert "--engine apptainer" in res.stderr


def test_accepted_toggles(run, images):
    """Flags with nothing to do here run the container normally (caps as asked)."""
    flags = ["-u", "--userns", "--keep-privs", "--unsquash", "--no-init"]
    assert ok(run("exec", *flags, str(images.sif), "echo", "ran")) == "ran\n"
    caps = "grep CapEff /proc/self/status"
    assert ok(run("exec", "-f", "--no-privs", str(images.sif), "sh", "-c", caps)).split()[1] == "0" * 16
    raw = ok(
        run("exec", "--add-caps", "net_raw", "--drop-caps", "CAP_CHOWN", str(images.sif), "sh", "-c", caps)
    )
    eff = int(raw.split()[1], 16)
    assert eff & (1 << 13) and not eff & 1  # CAP_NET_RAW (13) in, CAP_CHOWN (0) out
    assert ok(run("run", "--runscript-timeout", "5m", str(images.sif), "x")) == "<x>\n"


def test_shell_program(run, images):
    args = ["shell", "-s", "/bin/env", str(images.sif)]
    out = ok(run(*args, stdin=""))
    assert "APPTAINER_SHELL=/bin/env" in out.splitlines() and "SINGULARITY_SHELL=/bin/env" in out.splitlines()
    via_env = ok(run("shell", str(images.sif), stdin="", env={"APPTAINER_SHELL": "/bin/env"}))
    assert "SINGULARITY_SHELL=/bin/env" in via_env.splitlines()


def test_environment_forms(run, images):
    env = {"APPTAINER_UNSHARE_PID": "true", "SINGULARITY_NOSHIMINIT": "1", "APPTAINER_SCRATCH": "/s1,/s2"}
    assert ok(run("exec", str(images.sif), "sh", "-c", "echo $$; ls -d /s1 /s2", env=env)).split() == [
        "1",
        "/s1",
        "/s2",
    ]


def test_disable_cache_runs_without_caching(busybox_image, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "HPCSIF_CACHEDIR": str(cache)}

    def exec_(*flags: str, level: str = "") -> subprocess.CompletedProcess:
        image = f"oci://{busybox_image.layout}:latest"
        cmd = hpcsif_cmd(*([level] if level else []), "exec", *flags, image, "echo", "ran")
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    assert ok(exec_("--disable-cache")) == "ran\n"
    assert not [p for p in cache.rglob("*.sif")]  # nothing converted into the cache
    # through the cache, Apptainer's INFO lines: the conversion, then each cache hit (not with -q)
    assert exec_().stderr.splitlines() == CONVERSION_INFO
    assert exec_().stderr == "INFO:    Using cached SIF image\n"
    assert exec_(level="-q").stderr == ""


def test_registry_flags_for_uri_images(registry_basic: Registry, busybox_image, tmp_path):
    """exec docker://… from a registry that needs a login, with the registry flags of pull.

    --authfile works through the cache and with --disable-cache (which leaves the cache empty).
    """
    import base64
    import json

    registry_basic.push(busybox_image.oci_ref, "private/flags:1")
    ref = registry_basic.ref("private/flags:1")
    auth = tmp_path / "auth.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth.write_text(json.dumps({"auths": {registry_basic.host: {"auth": token}}}))
    env = {**os.environ, "HPCSIF_CACHEDIR": str(tmp_path / "cache"), "DOCKER_CONFIG": str(tmp_path / "none")}

    def exec_(*flags: str) -> subprocess.CompletedProcess:
        cmd = hpcsif_cmd("exec", *flags, ref, "echo", "ran")
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    res = exec_("--disable-cache")
    assert res.returncode != 0 and "authentication required" in res.stderr
    assert ok(exec_("--disable-cache", "--authfile", str(auth))) == "ran\n"
    assert not list((tmp_path / "cache").rglob("*.sif"))
    assert ok(exec_("--docker-username", USER, "--docker-password", PASSWORD)) == "ran\n"
    assert list((tmp_path / "cache").rglob("*.sif"))
    assert ok(exec_("--nohttps", "--authfile", str(auth))) == "ran\n"  # a cache hit


def test_apptainer_engine_gets_every_flag(images, tmp_path):
    """The delegation engine passes Apptainer's flags on unchanged (refused ones included)."""
    opts = LaunchOptions(
        action="exec",
        command=["true"],
        fakeroot=True,
        pid=True,
        hostname="h",
        dns="1.1.1.1",
        scratch=["/s"],
        workdir="/w",
        mounts=["type=bind,src=/a,dst=/b"],
        overlay=["/o:ro"],
        env=["A=1,B=2"],
        no_umask=True,
        passthrough=[("--userns", None)],
        apptainer_only=[("--memory", "1G"), ("--oom-kill-disable", None)],
    )
    fake = tmp_path / "apptainer"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    cmd = ApptainerEngine(str(fake)).command_line(images.sif, opts)
    line = " ".join(cmd[2:])
    for part in (
        "--fakeroot",
        "--pid",
        "--hostname h",
        "--dns 1.1.1.1",
        "--scratch /s",
        "--workdir /w",
        "--mount type=bind,src=/a,dst=/b",
        "--overlay /o:ro",
        "--env A=1,B=2",
        "--no-umask",
        "--userns",
        "--memory 1G",
        "--oom-kill-disable",
    ):
        assert part in line
    assert cmd[-2:] == [str(images.sif), "true"]


def test_apptainer_engine_runs_the_flags(peer_sif):
    """End to end through the peer: the same outputs as the built-in engine."""
    if peer_apptainer() is None:
        pytest.skip("Apptainer is not installed")
    script = "hostname; cat /etc/resolv.conf; ls -d /scr; echo $A$B"
    flags = ["--hostname", "hn", "--dns", "9.9.9.9", "-S", "/scr", "--env", "A=1,B=2"]
    outs = []
    for engine in ("apptainer", "bwrap"):
        cmd = hpcsif_cmd("exec", "--engine", engine, *flags, str(peer_sif), "sh", "-c", script)
        outs.append(
            ok(subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ)))
        )
    assert outs[0] == outs[1] == "hn\nnameserver 9.9.9.9\n/scr\n12\n"


def test_help_lists_apptainer_short_options():
    out = subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", "exec", "--help"], capture_output=True, text=True
    ).stdout
    for short in ("-f, --fakeroot", "-w, --writable", "-p, --pid", "-i, --ipc", "-n, --net", "-u, --userns"):
        assert short in out
    for short in ("-S DIR, --scratch DIR", "-W DIR, --workdir DIR", "-o DIR[:ro], --overlay DIR[:ro]"):
        assert short in out
