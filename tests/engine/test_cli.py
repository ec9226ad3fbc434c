"""run/exec/shell/test through the CLI with the bwrap engine, as root and as an unprivileged user."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.engine.conftest import ROOT, as_user, fuse_mounts, hpcsif_cmd, hpcsif_processes

pytestmark = pytest.mark.slow


def test_exec_identity_and_files(run, images):
    res = run(
        "exec", str(images.sif), "sh", "-c", "id -u; whoami; hostname; md5sum /etc/resolv.conf /etc/hosts"
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == str(os.getuid() if run.user is None else run.user.uid)
    assert lines[1] == ("root" if run.user is None else run.user.name)
    assert lines[2] == os.uname().nodename
    host = subprocess.run(["md5sum", "/etc/resolv.conf", "/etc/hosts"], capture_output=True, text=True).stdout
    assert lines[3:] == host.splitlines()  # the host's files, not the image's empty ones


def test_exec_args_with_spaces_and_quotes(run, images):
    args = ["a b", "it's", 'say "hi"', "$HOME", "", "*"]
    res = run("exec", str(images.sif), "printf", "<%s>\\n", *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "".join(f"<{a}>\n" for a in args)


def test_env_precedence_and_spaces(run, images, pub_tmp):
    envfile = pub_tmp / "env"
    envfile.write_text("# comment\nexport FROMFILE='file value'\nGREETING='from file'\n")
    envfile.chmod(0o644)
    names = ("GREETING", "IMGVAR", "HOSTVAR", "FROMFILE", "SPACED", "APPTAINER_CONTAINER", "SINGULARITY_NAME")
    script = 'printf "%s|" ' + " ".join(f'"${n}"' for n in names)
    res = run(
        "exec",
        "--env",
        "SPACED=x  y  z",
        "--env-file",
        str(envfile),
        str(images.sif),
        "sh",
        "-c",
        script,
        env={"HOSTVAR": "host value with spaces", "IMGVAR": "host wins"},
    )
    assert res.returncode == 0, res.stderr
    greeting, imgvar, hostvar, fromfile, spaced, container, name = res.stdout.split("|")[:7]
    assert greeting == "from file"  # --env-file beats the image
    assert imgvar == "image default"  # Apptainer 1.4: the image's value wins over the host's
    assert hostvar == "host value with spaces"
    assert fromfile == "file value"
    assert spaced == "x  y  z"
    assert container == str(images.sif)
    assert name == images.sif.name
    res = run(
        "exec",
        "--cleanenv",
        str(images.sif),
        "sh",
        "-c",
        'echo "[$HOSTVAR][$GREETING][$PATH][$LANG]"',
        env={"HOSTVAR": "x", "LANG": "de_DE.UTF-8"},
    )
    # the default PATH directories the image's PATH lacks are appended, as Apptainer does
    assert (
        res.stdout.strip()
        == "[][hello world][/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin][C]"
    )


def test_apptainer_variables_and_prompt(run, images, pub_tmp):
    """APPTAINER_BIND/APPTAINER_CLEANENV act as -B/--cleanenv; PS1 and in-container values as Apptainer's."""
    script = 'ls /mnt9; echo "[$HOSTVAR][$APPTAINER_BIND][$APPTAINER_APPNAME][$PS1]"'
    (pub_tmp / "marker").write_text("")
    env = {"APPTAINER_BIND": f"{pub_tmp}:/mnt9", "APPTAINER_CLEANENV": "1", "HOSTVAR": "x"}
    res = run("exec", str(images.sif), "sh", "-c", script, env=env)
    assert res.returncode == 0, res.stderr
    assert "marker" in res.stdout
    assert res.stdout.splitlines()[-1] == "[][/mnt9][][Apptainer> ]"
    # -B and APPTAINER_BIND to one destination: -B's wins, as in Apptainer (the variable's comes after)
    (pub_tmp / "other").mkdir(exist_ok=True)
    res = run("exec", "-B", f"{pub_tmp}/other:/mnt9", str(images.sif), "ls", "/mnt9", env=env)
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    assert "destination is already in the mount point list" in res.stderr


def test_no_coerced_locale_inside(images):
    """Python's C-locale coercion sets LC_CTYPE in hpcsif's environment; the container must not get it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    cmd = hpcsif_cmd("exec", str(images.sif), "sh", "-c", 'echo "${LC_CTYPE-unset}"')
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "unset\n"


def test_oldpwd_is_the_hosts(images):
    """The launcher's return to the working directory must not set OLDPWD (Apptainer passes the host's)."""
    env = {k: v for k, v in os.environ.items() if k != "OLDPWD"}
    cmd = hpcsif_cmd("exec", str(images.sif), "sh", "-c", 'echo "${OLDPWD-unset}"')
    for oldpwd, want in ((None, "unset\n"), ("/tmp", "/tmp\n")):
        res = subprocess.run(
            cmd, capture_output=True, text=True, env={**env, "OLDPWD": oldpwd} if oldpwd else env
        )
        assert (res.returncode, res.stdout) == (0, want), res.stderr


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(run, images, code):
    assert run("exec", str(images.sif), "sh", "-c", f"exit {code}").returncode == code


def test_exit_code_of_signal(run, images):
    assert run("exec", str(images.sif), "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("nosuchcmd", '"nosuchcmd": executable file not found in $PATH'),
        ("/no/such", "stat /no/such: no such file or directory"),
        ("/etc/passwd", "permission denied"),
        ("/etc", "is a directory"),
    ],
)
def test_exec_of_what_cannot_run(run, images, command, message):
    """Apptainer's one-line messages and exit status 255 for a command that cannot be started."""
    res = run("exec", str(images.sif), command)
    assert (res.returncode, res.stderr) == (255, f"FATAL:   {message}\n")


def test_exec_resolves_the_command_on_path(run, images):
    assert run("exec", str(images.sif), "sh", "-c", 'echo "$0"').stdout == "/bin/sh\n"


def test_stdin(run, images):
    res = run("exec", str(images.sif), "wc", "-l", stdin="one\ntwo\nthree\n")
    assert res.stdout.strip() == "3"


def test_run_runscript_precedence(run, images):
    # ENTRYPOINT printf '<%s>\n', CMD "default cmd": run args replace CMD, append to ENTRYPOINT
    assert run("run", str(images.sif)).stdout == "<default cmd>\n"
    assert run("run", str(images.sif), "a b", "c").stdout == "<a b>\n<c>\n"
    res = run("test", str(images.sif))
    assert res.returncode == 3 and "image test ran" in res.stdout


def test_scif_app(run, images):
    res = run("run", "--app", "hello", str(images.sif), "x y")
    assert res.stdout == "app hello: app value x y\n", res.stderr
    res = run("exec", "--app", "hello", str(images.sif), "sh", "-c", 'echo "$APPVAR|$SINGULARITY_APPNAME"')
    assert res.stdout == "app value|hello\n", res.stderr
    # an app the image lacks: as in an image Apptainer converts (its 95-apps.sh), one line on
    # standard output and status 1, not the image's own runscript or the command
    for action in (("run",), ("test",), ("exec", "true")):
        res = run(action[0], "--app", "nosuch", str(images.sif), *action[1:])
        assert (res.returncode, res.stdout, res.stderr) == (
            1,
            "Could not locate the container application: nosuch\n",
            "",
        )


def test_shell_noninteractive(run, images):
    res = run("shell", str(images.sif), stdin="echo in-shell $APPTAINER_COMMAND; exit 5\n")
    assert res.returncode == 5
    assert "in-shell shell" in res.stdout


def test_sandbox_and_pwd_and_binds(run, images, pub_tmp):
    data = pub_tmp / "data"
    data.mkdir()
    (data / "f.txt").write_text("bound file\n")
    for p in (data, data / "f.txt"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    res = run(
        "exec",
        "-B",
        f"{data}:/data:ro",
        "--pwd",
        "/data",
        str(images.sandbox),
        "sh",
        "-c",
        "pwd; cat f.txt; touch x 2>/dev/null || echo ro",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["/data", "bound file", "ro"]
    # a destination missing in the image (/new/deep) is made possible by an underlay
    res = run("exec", "-B", f"{data}:/new/deep", str(images.sif), "cat", "/new/deep/f.txt")
    assert res.stdout == "bound file\n", res.stderr


def test_setup_failure_is_an_error_and_leaves_no_mount(run, images, pub_tmp):
    # a directory bound onto a file of a bound host directory: bwrap itself fails
    share = pub_tmp / "share"
    share.mkdir()
    (share / "file").write_text("")
    binds = ["-B", f"{share}:/opt/share:ro", "-B", f"{pub_tmp}:/opt/share/file"]
    res = run("exec", *binds, str(images.sif), "/bin/sh", "-c", "true")
    assert res.returncode == 255
    assert "bwrap could not set up the container" in res.stderr
    # the run fixture checks that nothing stayed mounted


def test_mount_points_inside_binds_the_host_does_not_get(run, images, pub_tmp):
    ro, other = pub_tmp / "ro", pub_tmp / "other"
    (ro / "keep").mkdir(parents=True)
    (ro / "keep/old").write_text("old\n")
    other.mkdir()
    (other / "f").write_text("bound\n")
    before = sorted(ro.rglob("*"))
    # a read-only bind keeps its host directory as it is: the mount points go on a tmpfs
    # (Apptainer makes them on the host, writing into a directory bound read-only)
    binds = ["-B", f"{ro}:/data:ro", "-B", f"{other}:/data/sub/deeper", "-B", f"{other}/f:/data/keep/new"]
    script = "cat /data/sub/deeper/f /data/keep/new /data/keep/old; for d in /data /data/keep; do "
    script += "touch $d/x || echo ro; done"
    res = run("exec", *binds, str(images.sif), "sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, "bound\nbound\nold\nro\nro\n"), res.stderr
    assert sorted(ro.rglob("*")) == before
    # a writable bind of a directory the caller may not write: the same; one it may write (root
    # may) gets the mount point, as with Apptainer
    ro.chmod(0o555)
    res = run("exec", "-B", f"{ro}:/data", "-B", f"{other}:/data/new", str(images.sif), "cat", "/data/new/f")
    assert (res.returncode, res.stdout) == (0, "bound\n"), res.stderr
    assert sorted(ro.rglob("*")) == (before if run.user else sorted([*before, ro / "new"]))
    # inside a bound file: one line
    res = run("exec", "-B", f"{other}/f:/opt/f", "-B", f"{other}:/opt/f/sub", str(images.sif), "true")
    assert res.returncode == 255
    why = f"destination /opt/f/sub is inside /opt/f, where the file {other}/f is bound"
    assert res.stderr == f"FATAL:   mount {other}->/opt/f/sub error: {why}\n"


def test_default_files_inside_a_bound_directory_are_skipped(run, images, pub_tmp):
    # as Apptainer: /etc/hosts, /etc/localtime, passwd … are not added to a directory bound at
    # /etc (bwrap would leave empty mount points in it on the host)
    (pub_tmp / "f").write_text("")
    res = run("exec", "-B", f"{pub_tmp}:/etc", str(images.sif), "ls", "/etc")
    assert (res.returncode, res.stdout) == (0, "f\n"), res.stderr
    assert [p.name for p in pub_tmp.iterdir()] == ["f"]
    skipped = "WARNING: Skipping mount /etc/{0} [binds]: /etc/{0} doesn't exist in container"
    assert res.stderr.splitlines() == [skipped.format("hosts"), skipped.format("localtime")]


def test_scratch_inside_binds(run, images, pub_tmp):
    # mounted after the binds it lies in (it was hidden by them, or made in the read-only image)
    (pub_tmp / "ro").mkdir()
    binds = ["-B", f"{pub_tmp}/ro:/data:ro", "-S", f"/data/scr,{pub_tmp}/scr"]
    script = f"touch /data/scr/x {pub_tmp}/scr/y && ls /data/scr {pub_tmp}/scr"
    res = run("exec", *binds, str(images.sif), "sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, f"/data/scr:\nx\n\n{pub_tmp}/scr:\ny\n"), res.stderr
    # the writable bind (/var/tmp) got the mount point, as with Apptainer; the read-only one nothing
    assert (list((pub_tmp / "ro").iterdir()), list((pub_tmp / "scr").iterdir())) == ([], [])


def test_destinations_through_links_in_bound_directories(run, images, pub_tmp):
    # links in a bound host directory are followed as the container sees them (bwrap cannot
    # follow an absolute one); a mount point still never goes into a read-only bind
    tree, other = pub_tmp / "tree", pub_tmp / "other"
    for d in (tree / "real", tree / "real2", other):
        d.mkdir(parents=True)
    (other / "f").write_text("other\n")
    (tree / "abs").symlink_to("/data/real")
    (tree / "rel").symlink_to("real2")
    before = sorted(tree.rglob("*"))
    binds = ["-B", f"{tree}:/data:ro", "-B", f"{other}:/data/abs", "-B", f"{other}:/data/rel/sub"]
    res = run("exec", *binds, str(images.sif), "cat", "/data/real/f", "/data/real2/sub/f")
    assert (res.returncode, res.stdout) == (0, "other\nother\n"), res.stderr
    assert sorted(tree.rglob("*")) == before


def test_background_jobs_of_env_scripts_end_with_the_launch(run, images):
    # as in Apptainer, whose interpreter never runs them: nothing outlives the launch, and the
    # output is not held open (capturing it would wait for the job)
    sandbox = Path(tempfile.mkdtemp(dir=images.base)) / "bg"  # (no directory others may write)
    sandbox.parent.chmod(0o755)
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    tag = f"{os.getpid() % 1000 + 7000}"
    (sandbox / ".singularity.d/env/95-bg.sh").write_text(f"sleep {tag} &\n(sleep 3{tag}; echo late) &\n")
    for flags in ([], ["--pid"]):
        res = run("exec", *flags, str(sandbox), "echo", "hi", timeout=20)
        assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert f"sleep {tag}" not in ps and f"sleep 3{tag}" not in ps


def test_bind_escapes_and_repeated_destinations(run, images, pub_tmp):
    odd, other = pub_tmp / "a,b:c", pub_tmp / "other"
    for d in (odd, other):
        d.mkdir()
        (d / "f").write_text(f"{d.name}\n")
    # as in Apptainer: \, and \: in a path; the first bind of a destination wins, with its warning
    spec = str(odd).replace(",", "\\,").replace(":", "\\:") + ":/mnt:ro,rw"
    res = run(
        "exec", "-B", spec, "-B", f"{other}:/mnt", str(images.sif), "sh", "-c", "cat /mnt/f; touch /mnt/x"
    )
    assert (res.returncode, res.stdout) == (1, "a,b:c\n"), res.stderr
    assert res.stderr.splitlines() == [
        f"WARNING: While bind mounting '{other}:/mnt': destination is already in the mount point list",
        "touch: /mnt/x: Read-only file system",
    ]


def test_relative_bind_alone_is_refused(run, images):
    """-B rel: the destination is the source as given, relative, and refused (as Apptainer does)."""
    res = run("exec", "-B", "rel-dir", str(images.sif), "true")
    src = os.path.join(run.user.home if run.user else os.getcwd(), "rel-dir")
    assert (res.returncode, res.stderr) == (
        255,
        f"FATAL:   container creation failed: unable to add {src} to mount list: "
        "destination must be an absolute path\n",
    )


def test_missing_bind_source(run, images):
    res = run("exec", "-B", "/does/not/exist:/x", str(images.sif), "true")
    assert res.returncode != 0
    assert "mount source /does/not/exist doesn't exist" in res.stderr


def test_contain_and_writable_tmpfs(run, images):
    res = run(
        "exec",
        "--containall",
        str(images.sif),
        "sh",
        "-c",
        'ls /tmp | wc -l; echo "$HOME"; pwd; touch /newfile 2>/dev/null || echo rofs; ps | wc -l',
    )
    assert res.returncode == 0, res.stderr
    count, home, pwd, rofs, nproc = res.stdout.split()
    assert count == "0" and pwd == home and rofs == "rofs"
    assert int(nproc) < 6  # private PID namespace: only the shell and ps (+ header)
    # a user's too: in the overlay the image's files are the user's, as in Apptainer
    res = run("exec", "--writable-tmpfs", str(images.sif), "sh", "-c", "echo hi > /opt/new && cat /opt/new")
    assert res.stdout == "hi\n", res.stderr
    res = run("exec", str(images.sif), "sh", "-c", "cat /opt/new || touch /opt/new")
    assert "Read-only file system" in res.stderr and res.returncode != 0  # changes were discarded


def test_not_a_sif(run, images):
    bad = images.base / "bad.sif"  # in a directory only root can write: the trust check passes
    bad.write_bytes(b"#!/bin/sh\n" + b"\0" * 200)
    bad.chmod(0o644)
    res = run("exec", str(bad), "true")
    assert res.returncode != 0
    assert "FATAL" in res.stderr and "SIF" in res.stderr
    pub = images.base / "pub"
    pub.mkdir(mode=0o777, exist_ok=True)
    pub.chmod(0o777)
    (pub / "x.sif").write_bytes(images.sif.read_bytes())
    res = run("exec", str(pub / "x.sif"), "true")
    assert res.returncode != 0 and "writable by every user" in res.stderr


def _wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("flags", [[], ["--containall"]], ids=["shared-pid", "pid-namespace"])
def test_sigterm_reaches_payload(images, pub_tmp, flags):
    ready, got = pub_tmp / "ready", pub_tmp / "got"
    script = f'trap "echo TERM > {got}; exit 7" TERM; touch {ready}; while :; do sleep 0.1; done'
    proc = subprocess.Popen(
        hpcsif_cmd("exec", *flags, "-B", str(pub_tmp), str(images.sif), "sh", "-c", script)
    )
    assert _wait_for(ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 7
    assert got.read_text() == "TERM\n"
    assert not fuse_mounts()
    # a payload that does not catch it dies of it, and we exit 143 at once (scancel, `timeout`)
    got.unlink()
    script = f"touch {got}; exec sleep 100"
    plain = subprocess.Popen(
        hpcsif_cmd("exec", *flags, "-B", str(pub_tmp), str(images.sif), "sh", "-c", script)
    )
    assert _wait_for(got)
    started = time.monotonic()
    plain.send_signal(signal.SIGTERM)
    assert plain.wait(timeout=20) == 143 and time.monotonic() - started < 2
    assert not fuse_mounts()


def test_sigterm_during_start_up(images, pub_tmp):
    """SIGTERM while the image is being mounted: no payload ever starts, 143, nothing left mounted."""
    from hpcsif.engine.mounts import squashfuse_program

    mounting, ran = pub_tmp / "mounting", pub_tmp / "ran"
    sif = images.base / f"{pub_tmp.name}.sif"  # its own mount; beside the image: a trusted directory
    shutil.copy(images.sif, sif)
    slow = pub_tmp / "slow-squashfuse"
    slow.write_text(f'#!/bin/sh\ntouch {mounting}\nsleep 1\nexec {squashfuse_program()} "$@"\n')
    slow.chmod(0o755)
    config = pub_tmp / "config.toml"
    config.write_text(f'[engine]\nsquashfuse = "{slow}"\n')
    env = {**os.environ, "HPCSIF_CONFIG": str(config)}
    proc = subprocess.Popen(hpcsif_cmd("exec", str(sif), "sh", "-c", f"touch {ran}"), env=env)
    assert _wait_for(mounting)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert not ran.exists() and not fuse_mounts()
    sif.unlink()


def test_sigkilled_exec_leaves_nothing(images, pub_tmp):
    ready = pub_tmp / "ready"
    proc = subprocess.Popen(hpcsif_cmd("exec", str(images.sif), "sh", "-c", f"touch {ready}; sleep 600"))
    assert _wait_for(ready)
    assert fuse_mounts()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while (fuse_mounts() or hpcsif_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fuse_mounts()
    assert not hpcsif_processes()
    out = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    assert "sleep 600" not in "\n".join(ln for ln in out.splitlines() if not ln.startswith("Z"))


def test_32_concurrent_execs_share_one_mount(images, pub_tmp):
    gate = pub_tmp / "go"
    script = (
        f'while [ ! -e {gate} ]; do sleep 0.05; done; grep -c " / " /proc/self/mounts >/dev/null; echo ok'
    )
    procs = [
        subprocess.Popen(
            hpcsif_cmd("exec", str(images.sif), "sh", "-c", script), stdout=subprocess.PIPE, text=True
        )
        for _ in range(32)
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        holders = _holders_dir(images.sif)
        if holders is not None and len(os.listdir(holders)) >= 32:
            break
        time.sleep(0.1)
    assert len(fuse_mounts()) == 1
    gate.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 32
    assert all(o == "ok\n" for o in outs)
    deadline = time.monotonic() + 10
    while hpcsif_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fuse_mounts()
    assert not hpcsif_processes()


def _holders_dir(sif):
    from hpcsif.engine.bwrap import squashfs_offset
    from hpcsif.engine.mounts import squashfs_mount

    holders = squashfs_mount(str(sif), squashfs_offset(sif)).dir / "holders"
    return holders if holders.is_dir() else None


def test_launch_line(images, pub_tmp):
    """``./image.sif ARGS`` runs through ``#!/usr/bin/env run-singularity`` like ``hpcsif run``."""
    bindir = pub_tmp / "bin"
    bindir.mkdir()
    wrapper = bindir / "run-singularity"
    code = "import sys; from hpcsif.cli.main import run_singularity_main; sys.exit(run_singularity_main())"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{code}' \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([str(images.sif), "a b", "c"], capture_output=True, text=True, env=env, timeout=60)
    assert res.stdout == "<a b>\n<c>\n", res.stderr


def test_missing_tools_name_the_package(images, pub_tmp):
    for key, tool, package in (("bwrap", "bwrap", "bubblewrap"), ("squashfuse", "squashfuse", "squashfuse")):
        conf = pub_tmp / f"{key}.toml"
        conf.write_text(f'[engine]\n{key} = "/nonexistent/{tool}"\n')
        env = {**os.environ, "HPCSIF_CONFIG": str(conf)}
        res = subprocess.run(
            hpcsif_cmd("exec", "--engine", "bwrap", str(images.sif), "true"),
            capture_output=True,
            text=True,
            env=env,
        )
        assert res.returncode != 0
        assert f"install the Debian package '{package}'" in res.stderr


def test_exec_image_reference_through_the_cache(busybox_oci_layout):
    """A URI goes through the cache (converted once, leased for the run)."""
    ref = f"oci:{busybox_oci_layout}:latest"
    res = subprocess.run(
        hpcsif_cmd("exec", ref, "cat", "/etc/hello.txt"), capture_output=True, text=True, timeout=300
    )
    assert res.stdout == "hello from the etc layer\n", res.stderr
    assert not fuse_mounts()


def test_root_sees_image_passwd(run, images):
    """As Apptainer, root's /etc/passwd is the image's own; /etc/group keeps root's line and adds one."""
    if run.user is not None:
        pytest.skip("root only")
    res = run("exec", str(images.sif), "sh", "-c", "cat /etc/passwd; echo ---; cat /etc/group")
    passwd, group = res.stdout.split("---\n")
    assert passwd == "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    assert group.splitlines() == ["root:x:0:", "nogroup:x:65534:", "root:x:0:root"]


def test_home_is_the_user_databases_and_home_flag_checks(run, images, pub_tmp):
    """As Apptainer: $HOME does not choose the home; root's entry gets --home's; bad --home is one line."""
    home = run.user.home if run.user else "/root"
    res = run("exec", str(images.sif), "sh", "-c", 'echo "$HOME"', env={"HOME": str(pub_tmp)})
    assert (res.returncode, res.stdout) == (0, f"{home}\n"), res.stderr
    script = 'echo "$HOME"; ls ~; grep "^$(id -un):" /etc/passwd | cut -d: -f6'
    (pub_tmp / "mine").write_text("")
    res = run("exec", "--home", f"{pub_tmp}:/home/me", str(images.sif), "sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, "/home/me\nmine\n/home/me\n"), res.stderr
    for spec, why in (
        (f"{pub_tmp}:/home/me:ro", "home argument has incorrect number of elements: 3"),
        (f"{pub_tmp}:rel", "the container's home rel is not an absolute path"),
        ("rel", "the container's home rel is not an absolute path"),  # (the host's ./rel, as given)
    ):
        res = run("exec", "--home", spec, str(images.sif), "true")
        assert (res.returncode, res.stderr) == (2, f"FATAL:   --home {spec}: {why}\n")


def test_no_mount(run, images, pub_tmp):
    """--no-mount tmp,bind-paths: the image's /tmp and /etc/hosts; unknown names only warn."""
    (pub_tmp / "marker").write_text("")
    script = f"ls {pub_tmp}/marker 2>/dev/null || echo no-host-tmp; wc -c < /etc/hosts"
    res = run(
        "exec", "--no-mount", "tmp", "--no-mount", "bind-paths,bogus", str(images.sif), "sh", "-c", script
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["no-host-tmp", "0"]  # the test image's /etc/hosts is empty
    assert "Ignoring unknown mount type 'bogus'" in res.stderr


def test_no_mount_cwd_falls_back_to_home(images, pub_tmp):
    """Apptainer: a working directory the container lacks gives a warning and $HOME instead."""
    cmd = hpcsif_cmd("exec", "--no-mount", "cwd,tmp", "--home", f"{pub_tmp}:/hh", str(images.sif), "pwd")
    work = pub_tmp / "work"
    work.mkdir()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=60)
    assert (res.returncode, res.stdout) == (0, "/hh\n"), res.stderr
    assert f"Using '/hh' instead: chdir {work}: no such file or directory" in res.stderr


def test_missing_runscript_and_test_messages(images, tmp_path):
    """Apptainer's INFO lines when the image has no runscript or no test script."""
    sandbox = tmp_path / "bare"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    (sandbox / ".singularity.d/runscript").unlink()
    (sandbox / ".singularity.d/test").unlink()
    res = subprocess.run(hpcsif_cmd("run", str(sandbox), "-c", "echo ran"), capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (0, "ran\n")
    assert res.stderr == "INFO:    No runscript found in container, executing /bin/sh\n"
    res = subprocess.run(hpcsif_cmd("test", str(sandbox)), capture_output=True, text=True)
    assert (res.returncode, res.stderr) == (0, "INFO:    No test script found in container, exiting\n")


def test_unenterable_cwd_falls_back_to_home(images, unpriv_user, tmp_path):
    """A user started in a directory they may not enter gets $HOME and a warning, not a failure."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    cmd, env = as_user(unpriv_user, hpcsif_cmd("exec", str(images.sif), "pwd"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=locked, timeout=60)
    assert (res.returncode, res.stdout) == (0, f"{unpriv_user.home}\n"), res.stderr
    assert f"chdir {locked}: permission denied" in res.stderr


def test_env_values_are_evaluated_inside(run, images):
    """As Apptainer, --env and APPTAINERENV_ values expand inside, after the image's environment."""
    res = run(
        "exec",
        "--env",
        "A=$PATH:/x",
        "--env",
        'B=$(echo sub) "q" a\\b',
        str(images.sif),
        "sh",
        "-c",
        'echo "$A|$B|$C"',
        env={"APPTAINERENV_C": "${GREETING}!"},
    )
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout
        == '/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin:/x|sub "q" a\\b|hello world!\n'
    )


def test_pwd_missing_in_container(run, images):
    """--pwd to a directory the container lacks: Apptainer's one line, status 255, not a bwrap error."""
    res = run("exec", "--pwd", "/nonexistent", str(images.sif), "pwd")
    assert (res.returncode, res.stderr) == (
        255,
        "FATAL:   failed to set working directory: chdir /nonexistent: no such file or directory\n",
    )
    # a file of the image, not a directory (it was bwrap's message and a generic line)
    res = run("exec", "--pwd", "/bin/busybox", str(images.sif), "pwd")
    assert (res.returncode, res.stderr) == (
        255,
        "FATAL:   failed to set working directory: chdir /bin/busybox: not a directory\n",
    )
    home = run("exec", "--contain", "--cwd", "/tmp", str(images.sif), "pwd")
    assert (home.returncode, home.stdout) == (0, "/tmp\n"), home.stderr


def test_contain_temp_dirs_are_sticky(run, images):
    """--contain: private /tmp, /var/tmp and /dev/shm with mode 1777, as in Apptainer."""
    res = run("exec", "--contain", str(images.sif), "stat", "-c", "%a", "/tmp", "/var/tmp", "/dev/shm")
    assert (res.returncode, res.stdout.split()) == (0, ["1777"] * 3), res.stderr
