"""Apptainer 1.4's ``build``/``pull``/``push`` flags through the CLI, with real bwrap and a real registry.

Each flag is either honoured (checked in the result), accepted as a documented no-op, or refused
with one ``FATAL:   --flag is not supported by hpcsif: …`` line. Where the peer Apptainer is
installed, messages that need no image are compared with its own.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from hpcsif.sif.reader import SIFImage
from tests.conftest import peer_apptainer, run_cli
from tests.services.httpd import FileServer, http_files  # noqa: F401 - fixture
from tests.services.images import TestImage
from tests.services.registry import PASSWORD, USER, Registry, registry_basic  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

DEF = """\
Bootstrap: oci
From: {layout}

%post
    mkdir -p /opt
    cat /hostdata/in.txt > /opt/fromhost.txt
    echo {{{{ A }}}} > /opt/a.txt

%test
    echo probe > /probe

%labels
    Stage first
"""

UPDATE_DEF = """\
Bootstrap: oci
From: {layout}

%post
    mkdir -p /opt
    cat /mounted/in.txt > /opt/updated.txt

%labels
    Stage second
"""


def _compression(sif: Path) -> str:
    """The compressor line of ``unsquashfs -s`` for the SIF's root file system."""
    with SIFImage.open(sif) as img:
        offset = img.primary_partition().offset
    stats = subprocess.run(["unsquashfs", "-s", "-o", str(offset), str(sif)], capture_output=True, text=True)
    return next(ln for ln in stats.stdout.splitlines() if ln.startswith("Compression "))


def _labels(sandbox: Path) -> dict[str, str]:
    return json.loads((sandbox / ".singularity.d/labels.json").read_text())


def test_build_sandbox_binds_args_tmpfs_update_section(busybox_image: TestImage, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "in.txt").write_text("from the host\n")
    deffile = tmp_path / "a.def"
    deffile.write_text(DEF.format(layout=busybox_image.layout))
    argfile = tmp_path / "args"
    argfile.write_text("A=from-file\nnot a pair\n")
    box = tmp_path / "box"
    base = ["build", "--build-arg-file", str(argfile), "-B", f"{host}:/hostdata:ro"]
    # %test writes to the image: refused on the read-only tree, allowed on a throw-away overlay
    proc = run_cli(*base, "-s", str(box), str(deffile), check=False)
    assert proc.returncode != 0 and "%test failed" in proc.stderr and not box.exists()
    proc = run_cli(*base, "-f", "--userns", "--writable-tmpfs", "-s", str(box), str(deffile))
    assert 'Skipping "not a pair" in build arg file: "not a pair" is not a key=value pair' in proc.stderr
    assert (box / "opt/fromhost.txt").read_text() == "from the host\n"
    assert (box / "opt/a.txt").read_text() == "from-file\n"
    # neither the bind's mount point nor what %test wrote is left in the image
    assert not (box / "hostdata").exists() and not (box / "probe").exists()
    assert _labels(box)["Stage"] == "first"

    # -u: run another definition over the sandbox, no bootstrap; --section post leaves labels alone
    update = tmp_path / "u.def"
    update.write_text(UPDATE_DEF.format(layout=busybox_image.layout))
    mount = f"type=bind,source={host},destination=/mounted,ro"
    run_cli("build", "-s", "-u", "--section", "post", "--mount", mount, str(box), str(update))
    assert (box / "opt/updated.txt").read_text() == "from the host\n"
    (host / "in.txt").write_text("bound by APPTAINER_BINDPATH\n")
    env = {"APPTAINER_BINDPATH": f"{host}:/mounted"}
    run_cli("build", "-s", "-u", "--section", "post", str(box), str(update), env=env)
    assert (box / "opt/updated.txt").read_text() == "bound by APPTAINER_BINDPATH\n"
    assert (box / "opt/a.txt").read_text() == "from-file\n"  # the old content stays
    assert _labels(box)["Stage"] == "first" and not (box / "mounted").exists()
    # the sandbox's own label stays, as Apptainer keeps an existing label unless forced
    proc = run_cli("build", "--sandbox", "--update", "--section", "labels", str(box), str(update))
    assert _labels(box)["Stage"] == "first"
    assert "WARNING: Label: Stage already exists and force option is false, not overwriting\n" in proc.stderr
    # -F with -u: a build from scratch, as in Apptainer
    run_cli("build", "-s", "-u", "-F", "--section", "none", str(box), str(update))
    assert not (box / "opt").exists() and "Stage" not in _labels(box)


@pytest.mark.parametrize(
    ("flags", "target", "why"),
    [
        (["-u"], "box", "only sandbox update is supported: --sandbox flag is missing"),
        (["-u", "-s"], "nobox", "could not update sandbox {tmp}/nobox: doesn't exist"),
        (["-u", "-s"], "file", "only sandbox update is supported: {tmp}/file is not a directory"),
    ],
)
def test_update_target_checks_as_apptainer(flags: list[str], target: str, why: str, tmp_path: Path) -> None:
    (tmp_path / "box").mkdir()
    (tmp_path / "file").write_text("")
    deffile = tmp_path / "s.def"
    deffile.write_text("Bootstrap: scratch\n")
    fatal = f"FATAL:   While checking build target: {why.format(tmp=tmp_path)}"
    proc = run_cli("build", *flags, str(tmp_path / target), str(deffile), check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == fatal
    exe = peer_apptainer()
    if exe is not None:
        peer = subprocess.run(
            [exe, "build", *flags, str(tmp_path / target), str(deffile)], capture_output=True, text=True
        )
        assert peer.returncode != 0 and peer.stderr.strip() == fatal


def test_unused_build_args_fatal_unless_warned(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "a.def"
    deffile.write_text(DEF.format(layout=busybox_image.layout))
    args = ["build", "--build-arg", "A=1", "--build-arg", "B=2"]
    proc = run_cli(*args, str(tmp_path / "x.sif"), str(deffile), check=False)
    fatal = (
        "FATAL:   unused build args: B. "
        "Use option --warn-unused-build-args to show a warning instead of a fatal message"
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == fatal
    exe = peer_apptainer()
    if exe is not None:  # the peer's check runs before it bootstraps: its line is the same
        peer = subprocess.run(
            [exe, *args, str(tmp_path / "p.sif"), str(deffile)], capture_output=True, text=True
        )
        assert peer.returncode != 0 and fatal in peer.stderr
    # warned: the build goes on (and fails in %post, which finds no /hostdata bound: no image)
    proc = run_cli(*args, "--warn-unused-build-args", "-s", str(tmp_path / "y"), str(deffile), check=False)
    assert "WARNING: Unused build args: B" in proc.stderr
    assert not (tmp_path / "y").exists()


def test_no_cleanup_keeps_the_build_directory(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "bad.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {busybox_image.layout}\n"
        "%post\n    mkdir /opt\n    touch /opt/mark\n    exit 3\n"
    )
    proc = run_cli("build", "--no-cleanup", str(tmp_path / "x.sif"), str(deffile), check=False)
    assert proc.returncode != 0 and "exit status 3" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "build directory left at" in ln)
    kept = Path(line.rsplit(" ", 1)[1])
    assert (kept / "stage0/opt/mark").exists() and not (tmp_path / "x.sif").exists()
    run_cli("build", str(tmp_path / "y.sif"), str(deffile), check=False)
    assert [p.name for p in tmp_path.glob(".hpcsif-build-*")] == [kept.name]  # without it: removed


def test_a_missing_tmpdir_is_apptainers_line(busybox_image: TestImage, tmp_path: Path) -> None:
    """--tmpdir or APPTAINER_TMPDIR that is no directory: Apptainer's line, not our temporary file's
    name, and nothing written."""
    missing = tmp_path / "nonexist"
    why = f"stat {missing}: no such file or directory"
    want = f"FATAL:   Unable to create build: failed to create build parent dir: {why}\n"
    out = tmp_path / "x.sif"
    for flags, env in ((["--tmpdir", str(missing)], None), ([], {"APPTAINER_TMPDIR": str(missing)})):
        proc = run_cli("build", *flags, str(out), f"oci://{busybox_image.layout}", check=False, env=env)
        assert (proc.returncode, proc.stderr) == (255, want)
    assert list(tmp_path.iterdir()) == []


def test_mksquashfs_args_map_or_refuse(busybox_image: TestImage, tmp_path: Path) -> None:
    out = tmp_path / "g.sif"
    run_cli("build", "--mksquashfs-args", "-comp gzip -Xcompression-level 2", str(out), busybox_image.oci_ref)
    assert _compression(out) == "Compression gzip"
    proc = run_cli(
        "build", "--mksquashfs-args=-noappend", str(tmp_path / "n.sif"), busybox_image.oci_ref, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("FATAL:   --mksquashfs-args '-noappend' is not supported by hpcsif: ")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["build", "--json"], "--json"),
        (["build", "-e"], "--encrypt"),
        (["build", "--passphrase"], "--passphrase"),
        (["build", "--pem-path", "/k.pem"], "--pem-path"),
        (["build", "--library", "https://library.example"], "--library"),
        (["pull", "--library", "https://library.example"], "--library"),
    ],
)
def test_refused_flags_say_so_in_one_line(
    argv: list[str], flag: str, busybox_image: TestImage, tmp_path: Path
) -> None:
    proc = run_cli(*argv, str(tmp_path / "x.sif"), busybox_image.oci_ref, check=False)
    assert proc.returncode == 2 and not (tmp_path / "x.sif").exists()
    assert proc.stderr.startswith(f"FATAL:   {flag} is not supported by hpcsif: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_push_library_refused(tmp_path: Path) -> None:
    proc = run_cli("push", "--library", "https://l.example", "x.sif", "oras://h/r:t", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("FATAL:   --library is not supported by hpcsif: ")


def _authfile(path: Path, registry: Registry) -> Path:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    return path


def test_authfile_pull_push_and_sandbox(
    registry_basic: Registry,  # noqa: F811 - the fixture
    busybox_image: TestImage,
    tmp_path: Path,
) -> None:
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    env = {"HPCSIF_CACHEDIR": str(tmp_path / "cache"), "DOCKER_CONFIG": str(tmp_path / "none")}
    ref = registry_basic.ref("private/busybox:1")
    proc = run_cli("pull", str(tmp_path / "anon.sif"), ref, env=env, check=False)
    assert proc.returncode != 0 and "authentication required" in proc.stderr
    auth = _authfile(tmp_path / "auth.json", registry_basic)
    # --sandbox writes a directory tree
    box = tmp_path / "box"
    proc = run_cli("pull", "--authfile", str(auth), "--sandbox", str(box), ref, env=env)
    assert (box / "bin/busybox").is_file() and (box / ".singularity.d/runscript").is_file()
    assert PASSWORD not in proc.stdout + proc.stderr
    # push and pull a SIF as an oras artifact, the auth file named by $APPTAINER_AUTH_FILE
    sif = tmp_path / "b.sif"
    run_cli("pull", "--authfile", str(auth), str(sif), ref, env=env)
    # a definition file's Bootstrap: docker from the private registry
    deffile = tmp_path / "p.def"
    deffile.write_text(f"Bootstrap: docker\nFrom: {ref.removeprefix('docker://')}\n")
    run_cli("build", "--authfile", str(auth), "-s", str(tmp_path / "dbox"), str(deffile), env=env)
    assert (tmp_path / "dbox/bin/busybox").is_file()
    oras = registry_basic.ref("private/sif:1", transport="oras")
    proc = run_cli("push", "-U", "-D", "words", str(sif), oras, env={**env, "APPTAINER_AUTH_FILE": str(auth)})
    assert "Description is not supported for push to oras. Ignoring it." in proc.stderr
    run_cli("pull", "--authfile", str(auth), "--no-cleanup", "-U", str(tmp_path / "o.sif"), oras, env=env)
    assert (tmp_path / "o.sif").read_bytes() == sif.read_bytes()
    run_cli("pull", "--authfile", str(auth), "--sandbox", str(tmp_path / "obox"), oras, env=env)
    assert (tmp_path / "obox/bin/busybox").is_file()
    # Apptainer's hidden --docker-username/--docker-password, for scripts
    creds = ["--docker-username", USER, "--docker-password", PASSWORD]
    proc = run_cli("pull", *creds, str(tmp_path / "p.sif"), oras, env=env)
    assert (tmp_path / "p.sif").read_bytes() == sif.read_bytes() and PASSWORD not in proc.stderr


def test_nv_binds_host_gpu_files_during_post_and_test(busybox_image: TestImage, tmp_path: Path) -> None:
    # a fake driver tree, found the way the engine finds it (gpu.driver_root / gpu.dev_dir)
    root, dev = tmp_path / "driver", tmp_path / "dev"
    (root / "usr/bin").mkdir(parents=True)
    smi = root / "usr/bin/nvidia-smi"
    smi.write_text("#!/bin/sh\necho fake nvidia-smi\n")
    smi.chmod(0o755)
    dev.mkdir()
    for name in ("nvidia0", "nvidiactl", "unrelated"):
        (dev / name).write_text(name)
    conf = tmp_path / "hpcsif.toml"
    conf.write_text(f'[gpu]\ndriver_root = "{root}"\ndev_dir = "{dev}"\n')
    deffile = tmp_path / "gpu.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {busybox_image.layout}\n"
        "%post\n    mkdir -p /opt\n    nvidia-smi > /opt/smi.txt\n    cat /dev/nvidia0 > /opt/dev.txt\n"
        "%test\n    test -e /dev/nvidiactl && test ! -e /dev/unrelated && nvidia-smi\n"
    )
    box = tmp_path / "box"
    proc = run_cli("build", "--nv", "-s", str(box), str(deffile), env={"HPCSIF_CONFIG": str(conf)})
    assert "fake nvidia-smi" in proc.stdout  # from %test
    assert (box / "opt/smi.txt").read_text() == "fake nvidia-smi\n"
    assert (box / "opt/dev.txt").read_text() == "nvidia0"
    # the GPU files were bound for the build only: the image does not keep them or their mount points
    assert not (box / "usr/local/bin/nvidia-smi").exists() and not (box / "usr/local").exists()
    proc = run_cli("build", "-s", str(tmp_path / "plain"), str(deffile), check=False)
    assert proc.returncode != 0 and "%post failed" in proc.stderr


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            "none,post",
            "Could not check build sections: section specification error: cannot have none and any",
        ),
        ("all,post", "Could not check build sections: section specification error: cannot have all and any"),
        ("bogus", "--section bogus: unknown section"),
    ],
)
def test_section_errors(sections: str, message: str, tmp_path: Path) -> None:
    deffile = tmp_path / "s.def"
    deffile.write_text("Bootstrap: scratch\n")
    proc = run_cli("build", "--section", sections, str(tmp_path / "x.sif"), str(deffile), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"FATAL:   {message}")
    exe = peer_apptainer()
    if exe is not None and "," in sections:  # the peer checks before it reads the definition
        peer = subprocess.run(
            [exe, "build", "--section", sections, "/tmp/x.sif", str(deffile)], capture_output=True, text=True
        )
        assert peer.stderr.startswith(f"FATAL:   {message}")


def test_arch_variant_picks_the_platform(busybox_image: TestImage, tmp_path: Path) -> None:
    from tests.sources.test_registry_source import multi_arch_layout

    layout, _ = multi_arch_layout(busybox_image, tmp_path / "multi", (("arm", "v6"), ("arm", "v7")))
    src = f"oci:{layout}:multi"

    def platform(sif: Path) -> str:
        return json.loads(run_cli("inspect", "--json", "--labels", str(sif)).stdout)["data"]["attributes"][
            "labels"
        ]["org.test.platform"]

    run_cli("build", "--arch", "arm", "--arch-variant", "6", str(tmp_path / "v6.sif"), src)
    assert platform(tmp_path / "v6.sif") == "arm/v6"
    env = {"HPCSIF_CACHEDIR": str(tmp_path / "cache"), "APPTAINER_PULL_ARCH": "arm"}
    run_cli("pull", "--arch-variant", "v7", str(tmp_path / "v7.sif"), src, env=env)
    assert platform(tmp_path / "v7.sif") == "arm/v7"
    env["APPTAINER_PULL_ARCH_VARIANT"] = "6"  # Apptainer's variable for the flag, through the cache
    run_cli("pull", str(tmp_path / "e6.sif"), src, env=env)
    assert platform(tmp_path / "e6.sif") == "arm/v6"
    proc = run_cli(
        "build", "--arch", "arm", "--arch-variant", "5", str(tmp_path / "v5.sif"), src, check=False
    )
    assert proc.returncode != 0 and "no image for platform linux/arm/v5" in proc.stderr


@pytest.mark.parametrize("variable", ["APPTAINER_NOHTTPS", "SINGULARITY_NO_HTTPS", None])
def test_nohttps_environment_forms(variable: str | None, tmp_path: Path) -> None:
    conf = tmp_path / "hpcsif.toml"
    conf.write_text("[registry]\nretries = 0\n")  # the name does not resolve: fail at once
    env = {"HPCSIF_CONFIG": str(conf), "HPCSIF_CACHEDIR": str(tmp_path / "cache")}
    if variable:
        env[variable] = "1"
    proc = run_cli("pull", str(tmp_path / "x.sif"), "docker://example.invalid/x", env=env, check=False)
    scheme = "http" if variable else "https"
    assert proc.returncode != 0 and f"cannot reach {scheme}://example.invalid/v2/" in proc.stderr


def test_build_environment_forms(busybox_image: TestImage, tmp_path: Path) -> None:
    env = {"APPTAINER_SANDBOX": "1", "APPTAINER_FAKEROOT": "true", "SINGULARITY_USERNS": "1"}
    run_cli("build", str(tmp_path / "box"), busybox_image.oci_ref, env=env)
    assert (tmp_path / "box/bin/busybox").is_file()
    env = {"APPTAINER_MKSQUASHFS_ARGS": "-comp lz4"}
    run_cli("build", str(tmp_path / "l.sif"), busybox_image.oci_ref, env=env)
    assert _compression(tmp_path / "l.sif") == "Compression lz4"


def test_pull_sandbox_of_a_sif_over_https_style_urls(
    http_files: FileServer,  # noqa: F811 - the fixture
    busybox_image: TestImage,
    tmp_path: Path,
) -> None:
    run_cli("build", str(http_files.root / "served.sif"), busybox_image.oci_ref)
    box = tmp_path / "box"
    proc = run_cli("pull", "--sandbox", str(box), f"{http_files.url}/served.sif")
    assert (box / "bin/busybox").is_file() and (box / ".singularity.d/runscript").is_file()
    assert proc.stderr.splitlines() == [  # Apptainer's lines for the download, then the unpacking
        "INFO:    Downloading network image",
        "INFO:    Starting build...",
        "INFO:    Extracting local image...",
        "INFO:    Creating sandbox directory...",
        f"INFO:    Build complete: {box}",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["box"]  # the downloaded SIF is gone
