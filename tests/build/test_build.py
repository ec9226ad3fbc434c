"""``hpcsif build X.sif X.def`` end to end, one definition per bootstrap agent, checked through the CLI.

Every image source is local: OCI layouts and archives written here, a real ``docker-registry``
on loopback (``docker``), Podman's Docker API (``docker-daemon``), SIFs and sandboxes built
before (``localimage``). Results are read back with ``hpcsif inspect``, the real
``unsquashfs`` and ``hpcsif run/exec``; where Apptainer is installed the same definition is
built by it and the two images are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from hpcsif.image.compose import write_docker_archive
from hpcsif.sif.reader import SIFImage
from tests.conftest import peer_apptainer, run_cli
from tests.convert.test_build_cli import unpack
from tests.services.images import TestImage
from tests.services.podman import podman_service  # noqa: F401 - fixture
from tests.services.registry import Registry, registry_open  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

FULL = """\
Bootstrap: {bootstrap}
From: {source}
{header}
%setup
    echo "setup ran" > "$SINGULARITY_ROOTFS/setup.txt"
    test "$APPTAINER_ROOTFS" = "$SINGULARITY_ROOTFS"

%files
    {data}/data.txt /opt/data.txt
    {data}/*.dat /opt/glob/

%environment
    export MYVAR="a b"

%post
    echo built > /opt/built.txt
    id -u > /opt/uid.txt
    echo "MYVAR=${{MYVAR:-unset}}" > /opt/post-env.txt
    echo 'export FROM_POST=yes' >> "$APPTAINER_ENVIRONMENT"

%runscript
    echo "run $MYVAR $*"

%startscript
    echo start

%test
    test -f /opt/built.txt

%labels
    Author someone
    Version 1.0

%help
    Usage text

%apprun foo
    echo "foo $FOO $*"

%appenv foo
    export FOO=bar

%applabels foo
    Maint me

%apphelp foo
    foo help

%appinstall foo
    echo installed > installed.txt

%apptest foo
    true

%appfiles foo
    {data}/data.txt data.txt
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "data.txt").write_text("hello data\n")
    (d / "one.dat").write_text("1\n")
    (d / "two.dat").write_text("2\n")
    return d


@pytest.fixture(scope="module")
def sources(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``From:`` values of the busybox image for each file-based agent, and base SIF/sandbox."""
    d = tmp_path_factory.mktemp("sources")
    oci_archive = d / "busybox.oci-archive.tar"
    with tarfile.open(oci_archive, "w") as tar:  # an OCI archive is a tar of the layout
        for child in sorted(busybox_image.layout.iterdir()):
            tar.add(child, child.name)
    docker_archive = d / "busybox.docker-archive.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", busybox_image.oci_ref, f"docker-archive:{docker_archive}:test/busybox:1"],
        check=True,
        capture_output=True,
    )
    run_cli("build", str(d / "base.sif"), f"oci://{busybox_image.layout}:latest")
    run_cli("build", "--sandbox", str(d / "base-sandbox"), f"oci://{busybox_image.layout}:latest")
    return {
        "oci": f"{busybox_image.layout}:latest",
        "oci-archive": str(oci_archive),
        "docker-archive": str(docker_archive),
        "localimage-sif": str(d / "base.sif"),
        "localimage-sandbox": str(d / "base-sandbox"),
    }


def bootstrap_of(agent: str) -> str:
    """The ``Bootstrap:`` value of a test case (``localimage-sif`` -> ``localimage``)."""
    return "localimage" if agent.startswith("localimage") else agent


def write_def(path: Path, bootstrap: str, source: str, data: Path, header: str = "") -> Path:
    path.write_text(FULL.format(bootstrap=bootstrap, source=source, header=header, data=data))
    return path


def inspect(image: Path, *flags: str) -> str:
    return run_cli("inspect", *flags, str(image)).stdout


def check_full_build(sif: Path, bootstrap: str, source: str, image: TestImage, tmp_path: Path) -> None:
    """Every section of FULL, checked in the built SIF."""
    labels = inspect(sif, "--labels")
    for line in (
        "Author: someone",
        "Version: 1.0",
        f"org.label-schema.usage.singularity.deffile.bootstrap: {bootstrap}",
        f"org.label-schema.usage.singularity.deffile.from: {source}",
        "org.label-schema.schema-version: 1.0",
        "org.label-schema.usage.hpcsif.version: ",
        "org.label-schema.build-date: ",
    ):
        assert line in labels, (line, labels)
    assert inspect(sif, "--runscript") == '#!/bin/sh\n\n    echo "run $MYVAR $*"\n'
    assert inspect(sif, "--startscript") == "#!/bin/sh\n\n    echo start\n"
    assert inspect(sif, "--test") == "#!/bin/sh\n\n    test -f /opt/built.txt\n"
    assert inspect(sif, "--helpfile") == "    Usage text\n"
    assert 'export MYVAR="a b"' in inspect(sif, "--environment")
    assert inspect(sif, "--deffile").startswith(f"Bootstrap: {bootstrap}\nFrom: {source}\n")
    assert inspect(sif, "--list-apps") == "foo\n"
    assert inspect(sif, "--app", "foo", "--labels") == "Maint: me\nSCIF_APP_NAME: foo\n"
    assert inspect(sif, "--app", "foo", "--helpfile").strip() == "foo help"
    assert inspect(sif, "--app", "foo", "--runscript") == '#!/bin/sh\n\n    echo "foo $FOO $*"\n'
    assert "export FOO=bar" in inspect(sif, "--app", "foo", "--environment")
    with SIFImage.open(sif) as img:
        from hpcsif.sif.format import DataType

        deffile = img.read_object(img.find(DataType.DEFFILE)[0]).decode()
    assert deffile.startswith(f"Bootstrap: {bootstrap}\n") and "%appfiles foo" in deffile

    root = unpack(sif, tmp_path / "unpacked")
    assert (root / "bin/busybox").read_bytes() == image.files["bin/busybox"]  # the base image
    assert (root / "opt/data.txt").read_text() == "hello data\n"
    assert sorted(p.name for p in (root / "opt/glob").iterdir()) == ["one.dat", "two.dat"]
    assert (root / "opt/built.txt").read_text() == "built\n"
    assert (root / "opt/uid.txt").read_text() == "0\n"  # fake root
    assert (root / "opt/post-env.txt").read_text() == "MYVAR=unset\n"  # %environment is for runtime
    assert (root / "setup.txt").read_text() == "setup ran\n"
    assert (root / ".singularity.d/Singularity").read_text() == deffile
    assert (root / "scif/apps/foo/installed.txt").read_text() == "installed\n"  # %appinstall ran there
    assert (root / "scif/apps/foo/data.txt").read_text() == "hello data\n"
    assert (root / "scif/apps/foo/scif/test").is_file()
    assert (root / "scif/data/foo/input").is_dir() and (root / "scif/data/foo/output").is_dir()
    assert "SCIF_APPRUN_foo" in (root / ".singularity.d/env/94-appsbase.sh").read_text()
    assert not (root / ".hpcsif-build-script").exists()
    # bwrap's mount point is not part of the image: no file, or Apptainer's empty one (no host's)
    resolv = root / "etc/resolv.conf"
    assert not resolv.exists() or (not resolv.is_symlink() and resolv.read_bytes() == b"")

    # the runtime: hpcsif run/exec with and without --app
    assert run_cli("run", str(sif), "x", "y").stdout == "run a b x y\n"
    assert run_cli("run", "--app", "foo", str(sif), "1").stdout == "foo bar 1\n"
    out = run_cli("exec", str(sif), "sh", "-c", "echo $FROM_POST").stdout
    assert out == "yes\n"  # what %post appended to $APPTAINER_ENVIRONMENT


@pytest.mark.parametrize(
    "agent", ["oci", "oci-archive", "docker-archive", "localimage-sif", "localimage-sandbox"]
)
def test_full_definition_per_local_agent(
    agent: str, sources: dict[str, str], data_dir: Path, busybox_image: TestImage, tmp_path: Path
) -> None:
    bootstrap = bootstrap_of(agent)
    deffile = write_def(tmp_path / "app.def", bootstrap, sources[agent], data_dir)
    sif = tmp_path / "app.sif"
    run_cli("build", str(sif), str(deffile))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.def", "app.sif"]  # no temp leftovers
    check_full_build(sif, bootstrap, sources[agent], busybox_image, tmp_path)


def test_localimage_keeps_base_apps_and_history(
    sources: dict[str, str], data_dir: Path, busybox_image: TestImage, tmp_path: Path
) -> None:
    base_def = write_def(tmp_path / "base.def", "oci", sources["oci"], data_dir)
    base = tmp_path / "base.sif"
    run_cli("build", str(base), str(base_def))
    top_def = tmp_path / "top.def"
    top_def.write_text(f"Bootstrap: localimage\nFrom: {base}\n%labels\n    Author other\n")
    top = tmp_path / "top.sif"
    run_cli("build", "-F", str(top), str(top_def))  # (without -F the base's Author would stay)
    assert inspect(top, "--list-apps") == "foo\n"
    assert "Author: other\n" in inspect(top, "--labels")
    assert inspect(top, "--runscript") == inspect(base, "--runscript")  # inherited
    root = unpack(top, tmp_path / "root")
    assert (root / ".singularity.d/bootstrap_history/Apptainer0").read_text() == base_def.read_text()
    assert (root / ".singularity.d/Singularity").read_text() == top_def.read_text()
    exe = peer_apptainer()
    if exe is not None:  # Apptainer finds the base's app in our inspect metadata too
        out = subprocess.run([exe, "inspect", "--list-apps", str(top)], capture_output=True, text=True)
        assert out.stdout.split() == ["foo"]


def test_docker_bootstrap_from_registry(
    registry_open: Registry,  # noqa: F811
    busybox_image: TestImage,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    registry_open.push(busybox_image.oci_ref, "test/busybox:1")
    header = f"Registry: {registry_open.host}\nNamespace: test\n"
    deffile = write_def(tmp_path / "app.def", "docker", "busybox:1", data_dir, header)
    sif = tmp_path / "app.sif"
    run_cli("build", str(sif), str(deffile))
    check_full_build(sif, "docker", "busybox:1", busybox_image, tmp_path)


def test_docker_daemon_bootstrap(
    podman_service,  # noqa: F811
    busybox_image: TestImage,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    deffile = write_def(tmp_path / "app.def", "docker-daemon", podman_service.image, data_dir)
    sif = tmp_path / "app.sif"
    run_cli("build", str(sif), str(deffile), env={"DOCKER_HOST": podman_service.docker_host})
    check_full_build(sif, "docker-daemon", podman_service.image, busybox_image, tmp_path)


def test_scratch_bootstrap_and_sandbox_output(busybox_image: TestImage, tmp_path: Path) -> None:
    """From nothing: %files brings a shell, %post then runs with it; --sandbox writes a tree."""
    busybox = busybox_image.layout.parent / "busybox-bin"
    busybox.write_bytes(busybox_image.files["bin/busybox"])
    busybox.chmod(0o755)
    deffile = tmp_path / "scratch.def"
    deffile.write_text(
        f"Bootstrap: scratch\n%files\n    {busybox} /bin/busybox\n    {busybox} /bin/sh\n"
        "%post\n    /bin/busybox --install -s /bin\n    echo made > /made.txt\n"
        "%runscript\n    echo scratch run\n%test\n    grep -q made /made.txt\n"
    )
    out = tmp_path / "tree"
    run_cli("build", "--sandbox", str(out), str(deffile))
    assert (out / "made.txt").read_text() == "made\n"
    assert (out / "bin/ls").is_symlink()
    assert "deffile.bootstrap: scratch" in inspect(out, "--labels")
    assert run_cli("run", str(out)).stdout == "scratch run\n"
    # an existing sandbox needs --force, and is then replaced
    proc = run_cli("build", "--sandbox", str(out), str(deffile), check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    (out / "marker").write_text("old tree")
    run_cli("build", "--force", "--sandbox", str(out), str(deffile))
    assert not (out / "marker").exists()


def test_runscript_precedence(busybox_image: TestImage, tmp_path: Path) -> None:
    """No %runscript: ENTRYPOINT+CMD (also with IncludeCmd); with it, %runscript wins."""
    src = f"{busybox_image.layout}:latest"
    for name, extra, expected in (
        ("plain", "", "hello from busybox\n"),
        ("includecmd", "IncludeCmd: yes\n", "hello from busybox\n"),
        ("runscript", "%runscript\n    echo mine\n", "mine\n"),
    ):
        deffile = tmp_path / f"{name}.def"
        deffile.write_text(f"Bootstrap: oci\nFrom: {src}\n{extra}")
        sif = tmp_path / f"{name}.sif"
        run_cli("build", str(sif), str(deffile))
        assert run_cli("run", str(sif)).stdout == expected, name


def test_arguments_and_build_arg(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "args.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {busybox_image.layout}:{{{{ tag }}}}\n%arguments\n    tag=latest\n"
        "    greeting=hello\n%runscript\n    echo {{ greeting }}\n"
    )
    run_cli("build", str(tmp_path / "a.sif"), str(deffile))
    assert run_cli("run", str(tmp_path / "a.sif")).stdout == "hello\n"
    run_cli("build", "--build-arg", "greeting=bonjour", str(tmp_path / "b.sif"), str(deffile))
    assert run_cli("run", str(tmp_path / "b.sif")).stdout == "bonjour\n"
    proc = run_cli("build", "--build-arg", "oops", str(tmp_path / "c.sif"), str(deffile), check=False)
    assert proc.returncode == 255
    assert 'FATAL:   While processing the definition file: "oops" is not a key=value pair' in proc.stderr


def test_failing_test_leaves_no_image(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "bad.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {busybox_image.layout}:latest\n\n%post\n    true\n\n%test\n    exit 3\n"
    )
    sif = tmp_path / "bad.sif"
    proc = run_cli("build", str(sif), str(deffile), check=False)
    assert proc.returncode != 0
    assert f"{deffile}:7: %test failed with exit status 3" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.def"]
    proc = run_cli("build", "--sandbox", str(tmp_path / "tree"), str(deffile), check=False)
    assert proc.returncode != 0 and not (tmp_path / "tree").exists()
    run_cli("build", "--notest", str(sif), str(deffile))
    assert sif.is_file()
    # --force is needed over an existing image; a failed rebuild keeps the old one
    sif_bytes = sif.read_bytes()
    proc = run_cli("build", str(sif), str(deffile), check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    proc = run_cli("build", "--force", str(sif), str(deffile), check=False)
    assert proc.returncode != 0 and sif.read_bytes() == sif_bytes


def test_failing_post_and_setup(busybox_image: TestImage, tmp_path: Path) -> None:
    src = f"{busybox_image.layout}:latest"
    for section, line in (("post", 4), ("setup", 4)):
        deffile = tmp_path / f"{section}.def"
        deffile.write_text(
            f"Bootstrap: oci\nFrom: {src}\n\n%{section}\n    echo going\n    false\n    echo not\n"
        )
        proc = run_cli("build", str(tmp_path / "x.sif"), str(deffile), check=False)
        assert f"{deffile}:{line}: %{section} failed with exit status 1" in proc.stderr
        assert "not" not in proc.stdout.split()  # sh -e stopped at the failure
        assert not (tmp_path / "x.sif").exists()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Bootstrap: oci\nFrom: /x\n%post\n  true\n%nosuch\n", 5, "invalid section(s) specified: nosuch"),
        ("Bootstrap: oci\n\n%post\n  true\n", 1, "needs a 'From:' header"),
        ("Bootstrap: yum2\nFrom: x\n", 1, "invalid build source yum2"),
        ("Bootstrap: oci\nFrom: /x\n%files\n  a b c\n", 4, "bad %files line"),
    ],
)
def test_cli_errors_carry_line_numbers(text: str, line: int, message: str, tmp_path: Path) -> None:
    deffile = tmp_path / "e.def"
    deffile.write_text(text)
    proc = run_cli("build", str(tmp_path / "e.sif"), str(deffile), check=False)
    assert proc.returncode != 0
    assert f"FATAL:   {deffile}:{line}: " in proc.stderr and message in proc.stderr, proc.stderr


def test_scratch_without_shell_names_line(tmp_path: Path) -> None:
    deffile = tmp_path / "s.def"
    deffile.write_text("Bootstrap: scratch\n\n%post\n    true\n")
    proc = run_cli("build", str(tmp_path / "s.sif"), str(deffile), check=False)
    assert f"{deffile}:3: %post: the image has no /bin/sh" in proc.stderr


def test_files_source_missing_names_line(busybox_image: TestImage, tmp_path: Path) -> None:
    deffile = tmp_path / "m.def"
    deffile.write_text(f"Bootstrap: oci\nFrom: {busybox_image.layout}:latest\n%files\n  /no/such/file /x\n")
    proc = run_cli("build", str(tmp_path / "m.sif"), str(deffile), check=False)
    assert f"{deffile}:4: %files source /no/such/file: no such file or directory" in proc.stderr


def test_multi_stage_files_from(busybox_image: TestImage, tmp_path: Path) -> None:
    src = f"{busybox_image.layout}:latest"
    deffile = tmp_path / "multi.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {src}\nStage: build\n%post\n    mkdir -p /out\n"
        "    echo artefact > /out/app.txt\n    echo only-in-build > /build-only.txt\n\n"
        f"Bootstrap: oci\nFrom: {src}\nStage: final\n%files from build\n    /out/app.txt /opt/app.txt\n"
        "    /out/*.txt /opt/globbed/\n%runscript\n    cat /opt/app.txt\n"
    )
    sif = tmp_path / "multi.sif"
    run_cli("build", str(sif), str(deffile))
    root = unpack(sif, tmp_path / "root")
    assert (root / "opt/app.txt").read_text() == "artefact\n"
    assert (root / "opt/globbed/app.txt").read_text() == "artefact\n"
    assert not (root / "build-only.txt").exists()
    assert (root / ".singularity.d/Singularity").read_text() == deffile.read_text()
    assert run_cli("run", str(sif)).stdout == "artefact\n"


def test_docker_archive_made_by_compose(tmp_path: Path, busybox_image: TestImage) -> None:
    """A docker-archive written by hpcsif.image.compose (several images; the def picks one)."""
    from hpcsif.image.compose import Entry, ImageSpec, layer_tar

    busybox = busybox_image.files["bin/busybox"]
    base = layer_tar(
        [Entry("bin", mode=0o755), Entry("bin/busybox", busybox, 0o755), Entry("bin/sh", symlink="busybox")]
    )
    spec_a = ImageSpec(
        [base, layer_tar([Entry("which.txt", b"a\n")])], cmd=["/bin/busybox", "cat", "/which.txt"]
    )
    spec_b = ImageSpec([base, layer_tar([Entry("which.txt", b"b\n")])])
    archive = write_docker_archive(tmp_path / "two.tar", [("img/a:1", spec_a), ("img/b:1", spec_b)])
    deffile = tmp_path / "c.def"
    deffile.write_text(f"Bootstrap: docker-archive\nFrom: {archive}:img/a:1\n%post\n    /bin/busybox true\n")
    sif = tmp_path / "c.sif"
    run_cli("build", str(sif), str(deffile))
    assert run_cli("run", str(sif)).stdout == "a\n"


# -- Apptainer beside us --------------------------------------------------------------------

APPTAINER_ONLY = {
    ".exec",
    ".run",
    ".shell",
    ".test",
    "environment",
    "singularity",
    "etc/hosts",
    "etc/resolv.conf",
}
DIFFERENT_BY_DESIGN = {  # our own engine scripts and env headers
    ".singularity.d/actions",
    ".singularity.d/env/01-base.sh",
    ".singularity.d/env/10-docker2singularity.sh",
    ".singularity.d/env/90-environment.sh",
    ".singularity.d/env/95-apps.sh",
    ".singularity.d/env/99-base.sh",
    ".singularity.d/env/99-runtimevars.sh",
    ".singularity.d/labels.json",
}


def tree(root: Path) -> dict[str, bytes | str]:
    """Relative path -> file content, symlink target (``-> T``) or ``dir``."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in APPTAINER_ONLY or any(rel == d or rel.startswith(d + "/") for d in DIFFERENT_BY_DESIGN):
                continue
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def comparable_labels(text: str) -> str:
    """``inspect --labels`` output without dates, versions and tool-specific keys."""
    skip = ("date", "version", "apptainer", "hpcsif")
    return "\n".join(line for line in text.splitlines() if not any(s in line for s in skip))


def apptainer_inspect(exe: str, sif: Path) -> dict:
    proc = subprocess.run(
        [exe, "inspect", "--json", "--all", str(sif)], capture_output=True, text=True, check=True
    )
    attrs = json.loads(proc.stdout)["data"]["attributes"]
    attrs["labels"] = {
        k: v
        for k, v in attrs["labels"].items()
        if "date" not in k and "version" not in k and "apptainer" not in k and "hpcsif" not in k
    }
    attrs["deffile"] = attrs["deffile"].rstrip()
    env90 = attrs.pop("environment")["/.singularity.d/env/90-environment.sh"]
    attrs["environment-body"] = env90.split("\n\n", 1)[-1] if "MYVAR" in env90 else env90
    return attrs


@pytest.mark.peer
@pytest.mark.parametrize("agent", ["oci-archive", "localimage-sif"])
def test_same_result_as_apptainer(
    agent: str, sources: dict[str, str], data_dir: Path, busybox_image: TestImage, tmp_path: Path
) -> None:
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("Apptainer is not installed")
    bootstrap = bootstrap_of(agent)
    deffile = write_def(tmp_path / "app.def", bootstrap, sources[agent], data_dir)
    ours, theirs = tmp_path / "ours.sif", tmp_path / "theirs.sif"
    run_cli("build", str(ours), str(deffile))
    peer = subprocess.run(
        [exe, "build", "--fakeroot", str(theirs), str(deffile)], capture_output=True, text=True, cwd=tmp_path
    )
    if peer.returncode != 0:
        pytest.fail(f"apptainer build failed:\n{peer.stderr[-2000:]}")
    a, b = apptainer_inspect(exe, ours), apptainer_inspect(exe, theirs)
    a_env, b_env = a.pop("environment-body"), b.pop("environment-body")
    assert 'export MYVAR="a b"' in a_env and 'export MYVAR="a b"' in b_env
    assert a == b
    flags = ["--labels", "--deffile", "--runscript", "--test", "--helpfile", "--startscript", "--list-apps"]
    app_flags = ["--labels", "--runscript", "--test", "--helpfile", "--environment"]
    for args in [[f] for f in flags] + [["--app", "foo", f] for f in app_flags]:
        ours_out, theirs_out = inspect(ours, *args), inspect(theirs, *args)
        if args == ["--labels"]:
            ours_out, theirs_out = comparable_labels(ours_out), comparable_labels(theirs_out)
        assert ours_out == theirs_out, args
    for image in (ours, theirs):  # env scripts differ by design; both carry %environment
        assert 'export MYVAR="a b"' in inspect(image, "--environment")
    ta, tb = tree(unpack(ours, tmp_path / "a")), tree(unpack(theirs, tmp_path / "b"))
    assert sorted(ta) == sorted(tb)
    assert ta == tb


def test_metadata_json_is_written_as_go_writes_it(busybox_image: TestImage, tmp_path: Path) -> None:
    """labels.json and inspect-metadata.json as Apptainer's Go encoder writes them: text beyond
    ASCII as UTF-8, ``<``, ``>`` and ``&`` escaped, inspect-metadata.json compact (Apptainer
    reads either; bytes are what a comparison of images sees)."""
    from hpcsif.sif.format import DataType

    deffile = tmp_path / "labels.def"
    deffile.write_text(
        f"Bootstrap: oci\nFrom: {busybox_image.layout}\n%labels\n    NOTE grüße <b> & co\n"
        "%help\n    Hilfe <hier>\n",
        encoding="utf-8",
    )
    sif = tmp_path / "labels.sif"
    run_cli("build", str(sif), str(deffile))
    labels = run_cli("exec", str(sif), "cat", "/.singularity.d/labels.json").stdout
    assert '\t"NOTE": "grüße \\u003cb\\u003e \\u0026 co",\n' in labels
    with SIFImage.open(sif) as image:
        text = image.read_object(image.find(DataType.GENERIC_JSON, "inspect-metadata.json")[0]).decode()
    assert text.startswith('{"data":{"attributes":{') and "Hilfe \\u003chier\\u003e" in text
    assert text.endswith('},"type":"container"}')
