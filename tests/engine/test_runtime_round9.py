"""What a container run looks like from inside, compared with Apptainer 1.4 (round 9).

Root is the host's root (no user namespace of its own unless ``-u``/``--fakeroot``), root's
``/etc/passwd`` entry as Apptainer writes it, and the current directory when it is a system
directory. Expectations are Apptainer 1.4.5's outputs for the same commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer
from tests.engine.conftest import Images, as_user, fuse_mounts, hpcsif_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(params=["root", "user"])
def hpcsif(request, images: Images):
    """``hpcsif(*args, cwd=…, env=…)``: hpcsif as root or as the test user, from directory *cwd*."""
    user = request.getfixturevalue("unpriv_user") if request.param == "user" else None

    def _run(*args: str, cwd: str | Path = "/tmp", env: dict | None = None) -> subprocess.CompletedProcess:
        cmd, base = hpcsif_cmd(*args), {**os.environ}
        if user is not None:
            cmd, base = as_user(user, cmd)
        base.pop("PWD", None)
        return subprocess.run(
            cmd, capture_output=True, text=True, env={**base, **(env or {})}, cwd=cwd, timeout=60
        )

    def _shell(script: str) -> subprocess.CompletedProcess:
        """*script* run by the host's sh, as root or as the test user."""
        cmd, env = ["sh", "-c", script], {**os.environ}
        if user is not None:
            cmd, env = as_user(user, cmd)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp", timeout=60)

    _run.user = user
    _run.shell = _shell
    yield _run
    assert not fuse_mounts(), "a mount was left behind"


def test_root_is_the_hosts_root(hpcsif, images: Images, pub_tmp: Path, unpriv_user) -> None:
    """As Apptainer, root sees other users' files as theirs and may read and write them; with
    ``-u``/``--userns`` (a namespace of root alone) they are nobody's and closed to it."""
    if hpcsif.user is not None:
        pytest.skip("root only")
    private = pub_tmp / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("only theirs\n")
    for p in (private, private / "secret"):
        os.chown(p, unpriv_user.uid, unpriv_user.gid)
    (private / "secret").chmod(0o600)
    script = f"stat -c %u:%g {private}; cat {private}/secret; touch {private}/made; cat /proc/self/uid_map"
    res = hpcsif("exec", str(images.sif), "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == [f"{unpriv_user.uid}:{unpriv_user.gid}", "only theirs"]
    assert lines[2].split() == ["0", "0", "4294967295"]
    assert (private / "made").stat().st_uid == 0
    res = hpcsif("exec", "--userns", str(images.sif), "sh", "-c", script)
    assert res.stdout.split() == ["65534:65534", "0", "0", "1"]
    assert res.stderr.count("Permission denied") == 2, res.stderr


def test_roots_passwd_entry_as_apptainer_writes_it(hpcsif, images: Images, pub_tmp: Path) -> None:
    """Root's entry keeps the image's name, gecos and shell; the password field is ``x`` and
    the home the container's (an image with ``root:*`` showed ``root:*`` before)."""
    if hpcsif.user is not None:
        pytest.skip("root only")
    pub_tmp.chmod(0o755)  # (a sandbox in a directory every user may write is refused)
    sandbox = pub_tmp / "sandbox"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    (sandbox / "etc/passwd").write_text(
        "root:*:0:0:Root Gecos:/rootdir:/bin/ash\nnobody:*:65534:65534::/:/bin/false\n"
    )
    res = hpcsif("exec", str(sandbox), "cat", "/etc/passwd")
    assert (res.returncode, res.stdout) == (
        0,
        "root:x:0:0:Root Gecos:/root:/bin/ash\nnobody:*:65534:65534::/:/bin/false\n",
    ), res.stderr


@pytest.mark.parametrize(
    ("cwd", "pwd", "script", "expected", "warns"),
    [
        # the host's /usr or /etc over the image's broke it (no /bin/sh) or showed the host's files
        ("/usr", None, "pwd; ls", "/usr\nbin\nlib\n", False),
        ("/etc", None, "pwd; ls hosts passwd; ls | wc -l", "/etc\nhosts\npasswd\nN\n", False),
        ("/var", None, "pwd; ls", "/var\ntmp\n", False),
        # a nodev bind of the host's /dev over the container's: no /dev/null, no start at all
        ("/dev", None, "pwd; echo x > /dev/null && echo ok", "/dev\nok\n", False),
        # the image has no /mnt: Apptainer's warning and the home directory
        ("/mnt", None, "pwd", "HOME\n", True),
        # $PWD names the system directory through the host's merged-/usr link: the image's /bin
        ("/usr/bin", "/bin", "pwd; ls busybox", "/bin\nbusybox\n", False),
    ],
)
def test_current_directory_that_is_a_system_directory(hpcsif, images, cwd, pwd, script, expected, warns):
    """As Apptainer, /, /etc, /usr, /var, /opt, /mnt, /bin, /sbin, /lib, /lib64 and what lies in
    /sys, /proc or /dev are not bound from the host: the payload starts in the image's own."""
    if not os.path.isdir(cwd) or (pwd and os.path.realpath(pwd) != cwd):
        pytest.skip(f"this host has no {cwd} (or {pwd} is not a link to it)")
    home = hpcsif.user.home if hpcsif.user else "/root"
    res = hpcsif("exec", str(images.sif), "sh", "-c", script, cwd=cwd, env={"PWD": pwd} if pwd else None)
    # the image's /etc: its files and the host's /etc/localtime, /etc/hosts and resolv.conf
    in_etc = 4 + os.path.exists("/etc/localtime")
    assert res.stdout == expected.replace("HOME", home).replace("N", str(in_etc)), res.stderr
    if warns:
        assert res.stderr == (
            f"WARNING: Error changing the container working directory. Using '{home}' instead: "
            f"chdir {cwd}: no such file or directory\n"
        )


def test_parents_of_a_bind_the_image_lacks_are_0755(hpcsif, images: Images, pub_tmp: Path) -> None:
    """``-B file:/data/y/x`` and ``--scratch /s/t``: the directories made on the way are
    0755, as Apptainer makes them (bwrap alone made them 0700)."""
    (pub_tmp / "hostfile").write_text("from the host\n")
    (pub_tmp / "hostfile").chmod(0o644)
    res = hpcsif(
        "exec",
        "-B",
        f"{pub_tmp}/hostfile:/data/y/x",
        "--scratch",
        "/s/t",
        str(images.sif),
        "sh",
        "-c",
        "stat -c '%A %n' /data /data/y /s; cat /data/y/x",
    )
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == "drwxr-xr-x /data\ndrwxr-xr-x /data/y\ndrwxr-xr-x /s\nfrom the host\n"


def test_pwd_through_links_is_where_they_lead(hpcsif, images: Images, pub_tmp: Path) -> None:
    """``--pwd`` to an image's link (a merged-/usr ``/lib``) started nowhere ("bwrap: Can't chdir");
    as in Apptainer the container starts where the link leads, inside the image or through a
    host link in a bound directory, and ``$PWD`` says so."""
    pub_tmp.chmod(0o755)  # (a sandbox in a directory every user may write is refused)
    sandbox = pub_tmp / "merged"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    (sandbox / "usr/lib/tools").mkdir()
    (sandbox / "lib").symlink_to("usr/lib")
    (pub_tmp / "real").mkdir()
    (pub_tmp / "link").symlink_to("real")
    for pwd, expected in (("/lib/tools", "/usr/lib/tools"), (f"{pub_tmp}/link", f"{pub_tmp}/real")):
        res = hpcsif("exec", "-B", str(pub_tmp), "--pwd", pwd, str(sandbox), "sh", "-c", 'pwd; echo "$PWD"')
        assert (res.returncode, res.stdout, res.stderr) == (0, f"{expected}\n{expected}\n", "")


def test_home_the_host_lacks_is_an_empty_private_directory(hpcsif, images: Images, pub_tmp: Path) -> None:
    """As Apptainer (its issue #4208), ``--home`` to a directory the host lacks gives an empty
    writable home there, not a failure; nothing is made on the host. A file is refused."""
    missing = Path("/nonexistent/hpcsif-home")  # (Debian's home of users without one)
    assert not missing.parent.exists()
    script = 'echo "$HOME"; ls -A ~; touch ~/made && echo written'
    for spec, home in ((str(missing), str(missing)), (f"{missing}:/home/elsewhere", "/home/elsewhere")):
        res = hpcsif("exec", "--home", spec, str(images.sif), "sh", "-c", script)
        assert (res.returncode, res.stdout, res.stderr) == (0, f"{home}\nwritten\n", "")
    assert not missing.exists()
    (pub_tmp / "file").write_text("")
    res = hpcsif("exec", "--home", f"{pub_tmp}/file", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        f"FATAL:   container creation failed: mount hook function failure: mount {pub_tmp}/file->"
        f"{pub_tmp}/file error: while mounting {pub_tmp}/file: could not mount {pub_tmp}/file: "
        "not a directory\n",
    )


def test_payload_inherits_only_the_callers_descriptors(hpcsif, images: Images) -> None:
    """The launcher's start-up pipe was still open in the payload (an extra ``/proc/self/fd``
    entry that Apptainer's has not); a descriptor the caller passes (3 here) stays."""
    script = "exec 3>/dev/null; " + " ".join(
        hpcsif_cmd("exec", str(images.sif), "sh", "-c", "'ls /proc/$$/fd; exit 0'")
    )
    if hpcsif.user is not None:
        script = script.replace(hpcsif_cmd()[0], "/usr/bin/python3")
    res = hpcsif.shell(script)
    assert (res.returncode, res.stdout.split(), res.stderr) == (0, ["0", "1", "2", "3"], "")


def test_the_callers_shell_underscore_stays_outside(hpcsif, images: Images) -> None:
    """A calling shell exports ``_`` (the command's path, hpcsif's interpreter here); as in
    Apptainer the container does not get it."""
    res = hpcsif(
        "exec", str(images.sif), "sh", "-c", 'echo "[$_]"; env | grep -c "^_=" || :', env={"_": "/x/hpcsif"}
    )
    assert (res.returncode, res.stdout) == (0, "[]\n0\n"), res.stderr


def test_env_file_as_apptainer_reads_it(hpcsif, images: Images, pub_tmp: Path) -> None:
    """An env file whose last line is a test that fails (``[ -d X ] && A=…``) is read, as in
    Apptainer (it was "status 1"); one that cannot be read is Apptainer's line, status 255."""
    env_file = pub_tmp / "vars"
    env_file.write_text('A="one two"\n[ -d /nonexistent/dir ] && B=set\n')
    env_file.chmod(0o644)
    res = hpcsif("exec", "--env-file", str(env_file), str(images.sif), "sh", "-c", 'echo "$A|${B-unset}"')
    assert (res.returncode, res.stdout, res.stderr) == (0, "one two|unset\n", "")
    res = hpcsif("exec", "--env-file", f"{pub_tmp}/missing", str(images.sif), "true")
    assert (res.returncode, res.stdout, res.stderr) == (
        255,
        "",
        f"FATAL:   while setting environment: while processing {pub_tmp}/missing: could not read "
        f'environment file "{pub_tmp}/missing": open {pub_tmp}/missing: no such file or directory\n',
    )
    res = hpcsif("exec", "--env-file", str(pub_tmp), str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        f"FATAL:   while setting environment: while processing {pub_tmp}: could not read "
        f'environment file "{pub_tmp}": read {pub_tmp}: is a directory\n',
    )


def test_hostname_file_and_made_files_readable_by_all(hpcsif, images: Images) -> None:
    """``--hostname`` writes the container's /etc/hostname as Apptainer does (a name it refuses
    is its one line); the files made for the container are 0644 there, not bwrap's 0600."""
    script = (
        "hostname; cat /etc/hostname; stat -c '%a %n' /etc/hostname /etc/passwd /etc/group /etc/resolv.conf"
    )
    res = hpcsif(
        "exec", "--hostname", "box-9.example", "--dns", "192.0.2.1", str(images.sif), "sh", "-c", script
    )
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines() == [
        "box-9.example",
        "box-9.example",
        "644 /etc/hostname",
        "644 /etc/passwd",
        "644 /etc/group",
        "644 /etc/resolv.conf",
    ]
    res = hpcsif("exec", "--hostname", "bad_name", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        "FATAL:   container creation failed: unable to add bad_name to hostname file: "
        "bad_name is not a valid hostname\n",
    )


def test_closed_standard_descriptors_are_dev_null(hpcsif, images: Images) -> None:
    """Started with stdin or stdout closed, the payload gets /dev/null there, as under Apptainer
    (a Go program), rather than failing with "Bad file descriptor"."""
    python = "/usr/bin/python3" if hpcsif.user else hpcsif_cmd()[0]
    exe = " ".join([python, *hpcsif_cmd("exec", str(images.sif))[1:]])
    res = hpcsif.shell(f"{exe} cat <&- && {exe} echo lost >&- && {exe} sh -c 'readlink /proc/$$/fd/0' <&-")
    assert (res.returncode, res.stdout, res.stderr) == (0, "/dev/null\n", "")


def test_users_bind_over_made_files_wins(hpcsif, images: Images, pub_tmp: Path) -> None:
    """``-B mine:/etc/passwd`` (or ``/etc/group``, ``/etc/hostname``): the user's file, as in
    Apptainer, whose user binds come after the files it makes (ours hid the user's)."""
    uid = hpcsif.user.uid if hpcsif.user else 0
    for name, text in (
        ("passwd", f"me:x:{uid}:0::/home/me:/bin/sh\n"),
        ("group", "mine:x:0:\n"),
        ("hostname", "h\n"),
    ):
        (pub_tmp / name).write_text(text)
        (pub_tmp / name).chmod(0o644)
    binds = ",".join(f"{pub_tmp}/{n}:/etc/{n}" for n in ("passwd", "group", "hostname"))
    script = "cat /etc/passwd /etc/group /etc/hostname; id -un"
    res = hpcsif("exec", "-B", binds, "--hostname", "other", str(images.sif), "sh", "-c", script)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == f"me:x:{uid}:0::/home/me:/bin/sh\nmine:x:0:\nh\nme\n"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("type=bind,src=/tmp,dst=/d,foo=bar", 'invalid key "foo" in mount specification'),
        ("type=bind,src=,dst=/d", "mount source cannot be empty"),
        ("type=bind,source=/tmp", "mounts must specify a source and a destination"),
        (
            'type=bind,src="/tmp',
            'error parsing mount: parse error on line 1, column 15: bare " in non-quoted-field',
        ),
        (
            "type=bind,src=/tmp,dst=/d,bind-propagation=rprivate",
            "bind-propagation not supported for individual mounts, check apptainer.conf for global setting",
        ),
    ],
)
def test_mount_spec_errors_as_apptainer_words_them(hpcsif, images: Images, spec: str, why: str) -> None:
    """A ``--mount`` that Apptainer refuses: its line, word for word, and its status 255."""
    res = hpcsif("exec", "--mount", spec, str(images.sif), "true")
    quoted = spec.replace('"', '\\"')
    want = f'FATAL:   While setting bind mount configuration: while parsing mount "{quoted}": {why}\n'
    assert (res.returncode, res.stdout, res.stderr) == (255, "", want)


def test_mount_ro_with_any_value_and_relative_destination(hpcsif, images: Images, pub_tmp: Path) -> None:
    """``ro=false`` still mounts read-only (Apptainer looks at the key alone); a relative
    destination is Apptainer's line."""
    res = hpcsif("exec", "--mount", f"src={pub_tmp},dst=/d,ro=false", str(images.sif), "touch", "/d/x")
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    res = hpcsif("exec", "--mount", f"src={pub_tmp},dst=rel", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        f"FATAL:   container creation failed: unable to add {pub_tmp} to mount list: "
        "destination must be an absolute path\n",
    )


@pytest.mark.parametrize(
    ("bind", "fatal"),
    [
        (
            "{d}:/x:rx",
            "While setting bind mount configuration: while parsing bind path: while getting bind path: "
            "rx is not a valid bind option",
        ),
        (
            "{d}:/x:ro:more",
            "While setting bind mount configuration: while parsing bind path: while getting bind "
            'path: bad bind syntax "{d}:/x:ro:": should be {d}:/x:ro',
        ),
        (
            "{d}:",
            "container creation failed: unable to add {d} to mount list: "
            "mount point must contain a destination",
        ),
        (
            "{d}/gone:/x",
            "container creation failed: mount hook function failure: mount {d}/gone->/x error: "
            "while mounting {d}/gone: mount source {d}/gone doesn't exist",
        ),
        (
            "{d}:/proc/x",
            "container creation failed: mount hook function failure: mount {d}->/proc/x error: "
            "while mounting {d}: destination /proc/x doesn't exist in container",
        ),
    ],
)
def test_bind_errors_as_apptainer_words_them(
    hpcsif, images: Images, pub_tmp: Path, bind: str, fatal: str
) -> None:
    """A ``-B`` that Apptainer refuses: its line, word for word, and its status 255."""
    res = hpcsif("exec", "-B", bind.format(d=pub_tmp), str(images.sif), "true")
    # (a source that is not there gets Apptainer's warning first)
    gone = f"{pub_tmp}/gone"
    warning = f"WARNING: skipping mount of {gone}: stat {gone}: no such file or directory\n"
    first = warning if bind.startswith("{d}/gone:") else ""
    expected = f"{first}FATAL:   {fatal.format(d=pub_tmp)}\n"
    assert (res.returncode, res.stdout, res.stderr) == (255, "", expected)


@pytest.mark.parametrize(
    ("flags", "fatal"),
    [
        (["--dns", "1.1.1"], "container creation failed: dns ip 1.1.1 is not a valid IP address"),
        (
            ["-S", "/proc/x"],
            "container creation failed: could not bind scratch directory /proc/x into container: "
            "destination /proc/x doesn't exist in container",
        ),
        (
            ["-S", "rel"],
            "container creation failed: could not bind scratch directory rel into container: "
            "destination must be an absolute path",
        ),
        (
            ["--overlay", "/nonexistent/o"],
            "while loading overlay images: failed to open overlay image /nonexistent/o: "
            "failed to retrieve path for /nonexistent/o: lstat /nonexistent/o: no such file or directory",
        ),
    ],
)
def test_launch_errors_as_apptainer_words_them(hpcsif, images: Images, flags: list[str], fatal: str) -> None:
    """What Apptainer refuses at start-up: its line and status 255 (``-S /proc/x`` was bwrap's
    own "Can't mkdir" and a generic line; ``--dns`` a usage error, status 2)."""
    res = hpcsif("exec", *flags, str(images.sif), "true")
    assert (res.returncode, res.stdout, res.stderr) == (255, "", f"FATAL:   {fatal}\n")


def test_unreachable_user_bind_is_skipped_not_an_internal_error(
    hpcsif, images: Images, pub_tmp: Path
) -> None:
    """A user's bind below an image file (``/etc/passwd/x``) is skipped with the warning; the
    check for user binds over the made files must not trip over it."""
    res = hpcsif("exec", "-B", f"{pub_tmp}:/etc/passwd/x", str(images.sif), "/bin/true")
    assert (res.returncode, res.stderr) == (
        0,
        "WARNING: Skipping mount /etc/passwd/x [binds]: /etc/passwd/x doesn't exist in container\n",
    )


def test_root_view_as_the_peer_shows_it(images: Images, unpriv_user) -> None:
    """Root from /usr, reading a user's private file: the same output from Apptainer 1.4."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer on PATH")
    base = Path(tempfile.mkdtemp(prefix="hpcsif-round9-", dir="/tmp"))  # (the peer sees /tmp)
    try:
        base.chmod(0o755)
        sif = Path(shutil.copy(images.sif, base / "bb.sif"))
        private = base / "private"
        private.write_text("only theirs\n")
        private.chmod(0o600)
        os.chown(private, unpriv_user.uid, unpriv_user.gid)
        script = f"pwd; ls; stat -c %u:%g {private}; cat {private}; id -u"
        outs = []
        for cmd in (
            hpcsif_cmd("exec", str(sif), "sh", "-c", script),
            [exe, "exec", str(sif), "sh", "-c", script],
        ):
            res = subprocess.run(cmd, capture_output=True, text=True, cwd="/usr", timeout=120)
            outs.append((res.returncode, res.stdout))
        assert (
            outs[0]
            == outs[1]
            == (0, f"/usr\nbin\nlib\n{unpriv_user.uid}:{unpriv_user.gid}\nonly theirs\n0\n")
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_writable_sandbox_from_a_directory_in_the_hosts_tmp(hpcsif, images: Images, pub_tmp: Path) -> None:
    """``-w`` on a sandbox, started in a directory of the host's /tmp (bound, so there already):
    no "Skipping mount" warning for it, as in Apptainer; ``--writable-tmpfs`` with ``-w`` is
    Apptainer's warning, and ``-w`` wins."""
    pub_tmp.chmod(0o755)  # (a sandbox in a directory every user may write is refused)
    sandbox = pub_tmp / "rw"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    if hpcsif.user:
        for p in [sandbox, *sandbox.rglob("*")]:
            os.lchown(p, hpcsif.user.uid, hpcsif.user.gid)
    work = Path(tempfile.mkdtemp(dir="/tmp"))
    work.chmod(0o777)
    try:
        flags = ["-w", "--writable-tmpfs", "--no-home"]  # (the sandbox has no home for the user)
        res = hpcsif("exec", *flags, str(sandbox), "sh", "-c", "pwd; touch /made", cwd=work)
        assert (res.returncode, res.stdout) == (0, f"{work}\n"), res.stderr
        lines = [ln for ln in res.stderr.splitlines() if "/etc/localtime" not in ln]  # (the image has none)
        assert lines == ["WARNING: Disabling --writable-tmpfs flag, mutually exclusive with --writable"]
        assert (sandbox / "made").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_working_directory_by_its_pwd_name_through_a_host_link(hpcsif, images: Images, pub_tmp: Path) -> None:
    """Started in ``/scratch/me`` where ``/scratch`` is a host link (to ``/lustre/scratch``):
    as Apptainer (Go's ``os.Getwd`` takes ``$PWD``), the directory is bound and entered as
    ``/scratch/me``, so paths named that way work inside (ours bound it at the link's target)."""
    real = pub_tmp / "real"
    (real / "me").mkdir(parents=True)
    os.chmod(real / "me", 0o777)
    link = Path(f"/hpcsif-round9-{os.getpid()}")  # (outside every directory bound by default)
    link.symlink_to(real)
    try:
        script = f'pwd; echo "$PWD"; echo data > {link}/me/out; ls {link}/me'
        res = hpcsif("exec", str(images.sif), "sh", "-c", script, cwd=link / "me", env={"PWD": f"{link}/me"})
        assert (res.returncode, res.stdout) == (0, f"{link}/me\n{link}/me\nout\n"), res.stderr
        assert (real / "me/out").read_text() == "data\n"
    finally:
        link.unlink()
