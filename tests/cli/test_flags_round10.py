"""Session 10's flag-by-flag comparison with Apptainer 1.4.5: what differed, through the CLI.

``pull -F --sandbox`` over a file, ``push`` of a directory, ``verify`` of an unsigned image and
``verify --json``, credentials piped to ``--docker-login``, ``-q cache clean``, ``help help`` and
``--build-config``. Where the peer is installed the same command runs there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer, run_cli
from tests.services.images import TestImage
from tests.services.registry import PASSWORD, USER, Registry, registry_basic  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def sif(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image as a SIF, built once through the CLI."""
    path = tmp_path_factory.mktemp("round10") / "busybox.sif"
    run_cli("build", str(path), f"oci://{busybox_image.layout}")
    return path


def _peer(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None):
    exe = peer_apptainer()
    assert exe is not None
    environ = {**os.environ, **(env or {})}
    cmd = [exe, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=environ)


def test_pull_force_sandbox_replaces_a_file(busybox_image: TestImage, tmp_path: Path) -> None:
    """As Apptainer's: ``pull -F --sandbox X`` where X is a file makes X the sandbox (it failed,
    "X exists and is not a directory", after saying the build had started)."""
    target = tmp_path / "x.sif"
    target.write_text("old")
    ref = f"oci://{busybox_image.layout}"
    proc = run_cli("pull", "-F", "--sandbox", str(target), ref)
    assert (target / "bin/busybox").read_bytes() == busybox_image.files["bin/busybox"]
    assert proc.stderr.splitlines()[-1] == f"INFO:    Build complete: {target}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sif"]  # nothing left aside
    if peer_apptainer() is not None and str(tmp_path).startswith("/tmp/"):
        theirs = tmp_path / "p.sif"
        theirs.write_text("old")
        peer = _peer(
            "pull", "-F", "--sandbox", theirs, f"oci-archive:{_archive(busybox_image, tmp_path)}",
            env={"APPTAINER_CACHEDIR": str(tmp_path / "peer-cache")},
        )  # fmt: skip
        assert peer.returncode == 0 and (theirs / "bin/busybox").is_file(), peer.stderr


def _archive(image: TestImage, tmp_path: Path) -> Path:
    """The layout as an oci-archive without ``./`` prefixes, which the peer reads (not oci:DIR)."""
    out = tmp_path / "img.tar"
    names = sorted(os.listdir(image.layout))
    subprocess.run(["tar", "-cf", str(out), "-C", str(image.layout), *names], check=True)
    return out


def test_push_of_a_directory_says_it_is_no_sif(tmp_path: Path) -> None:
    (tmp_path / "box").mkdir()
    proc = run_cli("push", str(tmp_path / "box"), "oras://127.0.0.1:9/ns/x:1", check=False)
    assert (proc.returncode, proc.stderr) == (255, f"FATAL:   {tmp_path / 'box'}: not a SIF file\n")
    proc = run_cli("push", str(tmp_path / "none.sif"), "oras://127.0.0.1:9/ns/x:1", check=False)
    assert proc.stderr == f"FATAL:   {tmp_path / 'none.sif'}: no such SIF file\n"


def test_verify_of_an_unsigned_image_as_apptainer(sif: Path, tmp_path: Path) -> None:
    """No "Error encountered" report on stdout (Apptainer prints one only for a signature that
    failed), and Apptainer's FATAL words."""
    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    pub = tmp_path / "k.pub.pem"
    subprocess.run(["openssl", "rsa", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    fatal = "FATAL:   Failed to verify container: integrity: signature not found for object group 1"
    for flags in ([], ["-q"]):
        proc = run_cli(*flags, "verify", "--key", str(pub), str(sif), check=False)
        assert (proc.returncode, proc.stdout) == (255, "")
        assert proc.stderr.splitlines()[-1].startswith(fatal), proc.stderr
    exe = peer_apptainer()
    if exe is not None and str(sif).startswith("/tmp/"):
        peer = _peer("verify", "--key", pub, sif)
        assert (peer.returncode, peer.stdout) == (255, "")
        assert peer.stderr.splitlines()[-1] == fatal
    # signed: with --json the document says it all, no INFO verdict (as Apptainer's)
    signed = tmp_path / "s.sif"
    signed.write_bytes(sif.read_bytes())
    run_cli("sign", "--key", str(key), str(signed))
    doc = run_cli("verify", "--key", str(pub), "--json", str(signed))
    assert doc.stderr == f"INFO:    Verifying image with key material from '{pub}'\n"
    assert doc.stdout.startswith('{\n  "Signatures": 1,\n')
    if exe is not None and str(sif).startswith("/tmp/"):
        peer = _peer("verify", "--key", pub, "--json", signed)
        assert (peer.returncode, peer.stdout, peer.stderr) == (0, doc.stdout, doc.stderr)


def test_docker_login_reads_piped_credentials(
    registry_basic: Registry,  # noqa: F811 - the fixture
    sif: Path,
) -> None:
    """``printf 'user\\npass\\n' | hpcsif push --docker-login``: the password line is read as
    Apptainer reads it, without getpass's "Can not control echo" warning and its source line."""
    ref = registry_basic.ref("login/piped:1", transport="oras")
    proc = run_cli("push", "--docker-login", str(sif), ref, input=f"{USER}\n{PASSWORD}\n")
    assert "Warning" not in proc.stderr and "getpass" not in proc.stderr and PASSWORD not in proc.stderr
    assert proc.stderr.startswith("Enter Docker Username: Enter Docker Password: \n"), proc.stderr
    wrong = run_cli("push", "--docker-login", str(sif), ref, input=f"{USER}\nnope\n", check=False)
    assert wrong.returncode != 0


def test_quiet_cache_clean_prints_nothing(busybox_image: TestImage, tmp_path: Path) -> None:
    """Apptainer's -q/-s silence what ``cache clean`` reports removing (ours printed it anyway)."""
    env = {"HPCSIF_CACHEDIR": str(tmp_path / "cache")}
    run_cli("pull", str(tmp_path / "a.sif"), f"oci://{busybox_image.layout}", env=env)
    dry = run_cli("-q", "cache", "clean", "-n", env=env)
    assert (dry.stdout, dry.stderr) == ("User requested a dry run. Not actually deleting any data!\n", "")
    for flag in ("-q", "-s"):
        proc = run_cli(flag, "cache", "clean", "-f", env=env)
        assert (proc.stdout, proc.stderr) == ("", "")
    assert run_cli("cache", "list", env=env).stdout.startswith("There are 0 container file(s)")


def test_help_of_help_and_build_config() -> None:
    """``help help`` and the global ``--build-config`` (Apptainer's) are accepted."""
    assert run_cli("help", "help").stdout == run_cli("--help").stdout
    assert run_cli("--build-config", "version").returncode == 0


def test_debug_says_something_for_every_command(sif: Path) -> None:
    """``-d`` prints DEBUG lines (Apptainer's first is its version), even for a command that
    has nothing to log at that level; without it, none."""
    for argv in (["version"], ["inspect", str(sif)]):
        proc = run_cli("-d", *argv)
        assert proc.stderr.startswith("DEBUG:   hpcsif version: "), proc.stderr
        assert "DEBUG" not in run_cli(*argv).stderr


def test_pull_of_a_local_image_says_so_before_the_target(sif: Path, tmp_path: Path) -> None:
    """``pull busybox.sif`` next to that file: not "Image file already exists" (the name made
    from it), but that a local image is no URI to pull, as Apptainer says."""
    proc = run_cli("pull", sif.name, check=False, cwd=sif.parent)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert (
        proc.stderr
        == f"FATAL:   {sif.name} is a local image; pull needs a URI (docker://, oras://, https:// …)\n"
    )
    if peer_apptainer() is not None and str(sif).startswith("/tmp/"):
        peer = _peer("pull", sif.name, cwd=sif.parent)
        assert (peer.returncode, peer.stderr) == (255, "FATAL:   No transport type URI supplied\n")


def test_key_import_adds_a_key_once(tmp_path: Path) -> None:
    """Importing a key the keyring holds is refused in Apptainer's words (it was added again under
    another name: ``key list`` showed it twice and ``sign -k`` indices moved); its private half,
    imported after the public one, makes that entry a key pair."""
    source = {"HPCSIF_KEYSDIR": str(tmp_path / "source")}
    run_cli("key", "newpair", "-N", "Jane", "-E", "jane@example.org", env=source)
    run_cli("key", "export", "Jane", str(tmp_path / "jane.pub.asc"), env=source)
    run_cli("key", "export", "--secret", "Jane", str(tmp_path / "jane.key.asc"), env=source)
    env = {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}
    run_cli("key", "import", str(tmp_path / "jane.pub.asc"), env=env)
    again = run_cli("key", "import", str(tmp_path / "jane.pub.asc"), env=env, check=False)
    fpr = run_cli("key", "list", env=env).stdout.split("Fingerprint:")[1].split()[0]
    belongs = f"FATAL:   the key with fingerprint {fpr} already belongs to the keyring (as jane)\n"
    assert (again.returncode, again.stderr) == (255, belongs)
    pair = run_cli("key", "import", str(tmp_path / "jane.key.asc"), env=env)
    assert pair.stdout.startswith("Imported key pair jane (")
    assert run_cli("key", "import", str(tmp_path / "jane.key.asc"), env=env, check=False).stderr == belongs
    listing = run_cli("key", "list", "--secret", env=env).stdout
    assert listing.count("Fingerprint:") == 1 and "1)" not in listing
    if peer_apptainer() is not None:  # Apptainer refuses the second import too
        peer_env = {"APPTAINER_KEYSDIR": str(tmp_path / "peer-keys")}
        assert _peer("key", "import", tmp_path / "jane.pub.asc", env=peer_env).returncode == 0
        peer = _peer("key", "import", tmp_path / "jane.pub.asc", env=peer_env)
        assert peer.returncode != 0 and f"the key with fingerprint {fpr} already belongs" in peer.stderr


ALL_ARCHS = "supported archs are: [arm arm64 amd64 386 ppc64le s390x riscv64]"


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--arch", "x86_64"], f"x86_64 is not valid, {ALL_ARCHS}"),
        (
            ["--arch", "arm"],
            "arm needs variant specification, supported variants are [5, 6, 7], "
            "please set --arch-variant option",
        ),
        (
            ["--arch", "arm", "--arch-variant", "v9"],
            f"arm32v9 is not valid, {ALL_ARCHS}, supported variants are [5, 6, 7]",
        ),
        (
            ["--arch", "arm64", "--arch-variant", "9"],
            f"arm64v9 is not valid, {ALL_ARCHS}, supported variants are [8], "
            "please remove --arch-variant option",
        ),
    ],
)
def test_a_mistyped_arch_is_refused_before_anything_is_built(
    flags: list[str], why: str, sif: Path, busybox_image: TestImage, tmp_path: Path
) -> None:
    """As Apptainer's pull and build: not an image labelled with the typo (after a warning)."""
    fatal = f"FATAL:   While processing the arch and arch variant: arch: {why}\n"
    for argv in (
        ["build", *flags, str(tmp_path / "b.sif"), str(sif)],
        ["pull", *flags, str(tmp_path / "p.sif"), f"oci://{busybox_image.layout}"],
    ):
        proc = run_cli(*argv, check=False, env={"GOARM": ""})
        assert (proc.returncode, proc.stdout, proc.stderr) == (255, "", fatal), argv
        if peer_apptainer() is not None and argv[0] == "build" and str(sif).startswith("/tmp/"):
            peer = _peer(*argv)
            assert (peer.returncode, peer.stderr) == (255, fatal)
    assert list(tmp_path.iterdir()) == []
    if flags == ["--arch", "arm"]:  # $GOARM names the variant, as there
        proc = run_cli("build", *flags, str(tmp_path / "b.sif"), str(sif), env={"GOARM": "7"})
        from hpcsif.image.model import host_arch

        assert f"WARNING: Architecture {host_arch()} does not match build arch arm32v7" in proc.stderr


def test_an_output_under_a_file_names_the_file(sif: Path, tmp_path: Path) -> None:
    """``build FILE/x.sif``: the part of the path that is a file is named as one (it was
    "directory FILE does not exist", which it does); nothing is fetched or written."""
    (tmp_path / "f").write_text("")
    want = f"FATAL:   cannot write {tmp_path}/f/x.sif: {tmp_path}/f is not a directory\n"
    for argv in (
        ["build", f"{tmp_path}/f/x.sif", str(sif)],
        ["pull", f"{tmp_path}/f/x.sif", "docker://127.0.0.1:9/x"],
    ):
        proc = run_cli(*argv, check=False)
        assert (proc.returncode, proc.stderr) == (255, want), argv


def test_key_remove_keeps_the_private_key_by_default(sif: Path, tmp_path: Path) -> None:
    """As Apptainer's: ``key remove FPR`` removes the public key only (it removed the private
    key too, for good); the private key still signs and is listed by ``key list -s``, nothing
    verifies with it until its public key is imported again; ``-b`` removes both."""
    env = {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}
    run_cli("key", "newpair", "-N", "Jane", "-E", "jane@example.org", env=env)
    run_cli("key", "export", "Jane", str(tmp_path / "jane.asc"), env=env)
    fpr = run_cli("key", "list", env=env).stdout.split("Fingerprint:")[1].split()[0]
    assert run_cli("key", "remove", fpr, env=env).stdout == f"Removed the public key of Jane ({fpr})\n"
    assert fpr not in run_cli("key", "list", env=env).stdout
    assert f"Fingerprint:       {fpr}" in run_cli("key", "list", "-s", env=env).stdout
    image = tmp_path / "s.sif"
    image.write_bytes(sif.read_bytes())
    run_cli("sign", "-k", "0", str(image), env=env)
    assert run_cli("verify", str(image), env=env, check=False).returncode == 255
    run_cli("key", "import", str(tmp_path / "jane.asc"), env=env)
    assert "key pair" in run_cli("key", "list", env=env).stdout
    assert run_cli("verify", str(image), env=env).returncode == 0
    run_cli("key", "remove", "-b", fpr, env=env)
    assert "No keys" in run_cli("key", "list", "-s", env=env).stdout
    if peer_apptainer() is not None:  # the peer's default is the same
        peer_env = {"APPTAINER_KEYSDIR": str(tmp_path / "peer-keys")}
        run_cli("key", "newpair", "-N", "Jane", "-E", "jane@example.org", env=env)
        run_cli("key", "export", "--secret", "Jane", str(tmp_path / "jane.key.asc"), env=env)
        assert _peer("key", "import", tmp_path / "jane.key.asc", env=peer_env).returncode == 0
        fpr = run_cli("key", "list", env=env).stdout.split("Fingerprint:")[1].split()[0]
        assert _peer("key", "remove", fpr, env=peer_env).returncode == 0
        assert fpr not in _peer("key", "list", env=peer_env).stdout
        assert fpr in _peer("key", "list", "-s", env=peer_env).stdout


def test_the_arch_warning_comes_once_the_sif_is_made(
    busybox_image: TestImage, sif: Path, tmp_path: Path
) -> None:
    """Apptainer warns that the image is not of ``--arch``'s architecture as it writes the SIF:
    after "Creating SIF file...", and never for a sandbox (ours said it first, and for sandboxes)."""
    from hpcsif.image.model import host_arch

    other = "arm64" if host_arch() != "arm64" else "amd64"
    warning = f"WARNING: Architecture {host_arch()} does not match build arch {other}"
    env = {"HPCSIF_CACHEDIR": str(tmp_path / "cache")}
    pull = run_cli("pull", "--arch", other, str(tmp_path / "p.sif"), f"oci://{busybox_image.layout}", env=env)
    assert pull.stderr.splitlines()[-2:] == ["INFO:    Creating SIF file...", warning]
    build = run_cli("build", "--arch", other, str(tmp_path / "b.sif"), str(sif))
    assert build.stderr.splitlines()[-3:] == [
        "INFO:    Creating SIF file...",
        warning,
        f"INFO:    Build complete: {tmp_path / 'b.sif'}",
    ]
    for source in (str(sif), f"oci://{busybox_image.layout}"):
        box = run_cli("build", "--arch", other, "--sandbox", str(tmp_path / "box"), source, env=env)
        assert "WARNING" not in box.stderr
        shutil.rmtree(tmp_path / "box")


def test_an_existing_pull_target_is_named_as_typed(tmp_path: Path) -> None:
    """Apptainer's "Image file already exists" names the output as typed (``sub/``, ``./x.sif``)
    or joined to --dir; nothing is fetched (the registry is unreachable)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.sif").write_text("")
    ref = "docker://127.0.0.1:9/ns/busybox:1.36"
    for args, shown in ((["sub/"], "sub/"), (["./x.sif"], "./x.sif"), (["--dir", "./", "x.sif"], "x.sif")):
        proc = run_cli("pull", *args, ref, check=False, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (
            255,
            f'FATAL:   Image file already exists: "{shown}" - will not overwrite\n',
        )


def test_a_uri_given_to_sif_is_named_as_typed() -> None:
    """``sif list docker://…``: the URI as typed (it read ``docker:/…``, a path's spelling)."""
    proc = run_cli("sif", "list", "docker://127.0.0.1:9/x:1", check=False)
    assert (proc.returncode, proc.stderr) == (
        255,
        "FATAL:   docker://127.0.0.1:9/x:1: cannot open: No such file or directory\n",
    )


def test_verify_of_a_group_and_an_object_checks_both(sif: Path, tmp_path: Path) -> None:
    """``verify -g 1 -i 1``: the group's signature, then the object's, as Apptainer (it
    verified only the object)."""
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    image = tmp_path / "s.sif"
    image.write_bytes(sif.read_bytes())
    run_cli("sign", "--key", str(key), str(image))
    out = run_cli("verify", "--key", str(pub), "-g", "1", "-i", "1", str(image)).stdout
    assert out.count("Objects verified:") == 2 and out.endswith("\n1   |1       |NONE    |Def.FILE\n")
    doc = run_cli("verify", "--json", "--key", str(pub), "-g", "1", "-i", "1", str(image)).stdout
    assert doc.count('"Partition"') == 5  # the group's four objects, then the object
    if peer_apptainer() is not None and str(tmp_path).startswith("/tmp/"):
        for flags in ([], ["--json"]):
            peer = _peer("verify", *flags, "--key", pub, "-g", "1", "-i", "1", image)
            assert (peer.returncode, peer.stdout) == (0, doc if flags else out)


def test_hpcsif_alone_lists_the_commands() -> None:
    """``hpcsif`` with no command: the command list on stdout, status 1, as Apptainer's usage
    (it was one FATAL line saying a COMMAND is required)."""
    for argv in ([], ["-q"]):
        proc = run_cli(*argv, check=False)
        assert (proc.returncode, proc.stderr) == (1, "")
        assert proc.stdout == run_cli("--help").stdout
