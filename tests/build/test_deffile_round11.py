"""Definition files as Apptainer 1.4.5 builds them: causes found by a seeded differential fuzzer.

Each test pins one behaviour seen with the peer (``apptainer build --fakeroot``) where hpcsif
built something else: a comment after a section name, a ``%files`` glob copied match by
match, ``%files from STAGE`` done before ``%setup``, a spaced ``Bootstrap :`` line after the
first stage, scratch images' labels, the variables ``%post`` and ``%test`` see.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.services.images import TestImage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(busybox_image: TestImage) -> Iterator[Path]:
    """A busybox SIF to bootstrap from."""
    with tempfile.TemporaryDirectory(prefix="hpcsif-round11-") as d:
        sif = Path(d) / "base.sif"
        run_cli("build", str(sif), f"oci://{busybox_image.layout}:latest")
        yield sif


def build(tmp_path: Path, text: str, *flags: str) -> Path:
    """Build ``text`` into a sandbox under ``tmp_path`` (the working directory); return it."""
    (tmp_path / "t.def").write_text(text)
    run_cli("build", "--sandbox", *flags, "out", "t.def", cwd=tmp_path, timeout=120)
    return tmp_path / "out"


def test_comment_after_a_section_name_is_no_argument(base: Path, tmp_path: Path) -> None:
    """``%files # from the host`` copied from the host (hpcsif refused the line as ``from``
    arguments) and ``%runscript -e # why`` runs /bin/sh -e (hpcsif wrote ``#!/bin/sh -e # why``,
    and /bin/sh then tried to run a file named ``# why``)."""
    (tmp_path / "a.txt").write_text("a\n")
    out = build(
        tmp_path,
        f"Bootstrap: localimage\nFrom: {base}\n"
        "%files # from the host\n    a.txt /a.txt\n"
        "%post # build it\n    echo $- > /post-flags\n"
        '%runscript -e # run it\n    echo "ran $*"\n'
        "%startscript # start it\n    echo started\n"
        "%apprun tool # the tool\n    echo tool\n",
    )
    assert (out / "a.txt").read_text() == "a\n"
    assert (out / "post-flags").read_text() == "xe\n"  # -e -x, as without the comment
    assert (out / ".singularity.d/runscript").read_text().splitlines()[0] == "#!/bin/sh -e"
    assert (out / ".singularity.d/startscript").read_text().splitlines()[0] == "#!/bin/sh"
    assert (out / "scif/apps/tool/scif/runscript").is_file()
    assert run_cli("run", str(out), "x").stdout == "ran x\n"


def test_files_glob_copies_each_match_on_its_own(base: Path, tmp_path: Path) -> None:
    """A glob without a destination puts each match at its own path (hpcsif made a directory
    named ``…/x*.cfg``); one to a destination that does not exist and has no trailing slash
    leaves the last match there as a file, as Apptainer's cp of each match does."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("x1.cfg", "x2.cfg"):
        (data / name).write_text(name)
    out = build(
        tmp_path,
        f"Bootstrap: localimage\nFrom: {base}\n%files\n"
        f"    {data}/x*.cfg\n    data/x*.cfg\n"
        f"    {data}/x*.cfg /opt/cfgfile\n    {data}/x*.cfg /opt/cfgdir/\n",
    )
    for name in ("x1.cfg", "x2.cfg"):
        assert (out / str(data).lstrip("/") / name).read_text() == name
        assert (out / "data" / name).read_text() == name
        assert (out / "opt/cfgdir" / name).read_text() == name
    assert not list(out.rglob("x[*].cfg"))
    assert (out / "opt/cfgfile").read_text() == "x2.cfg"


def test_files_from_a_stage_are_there_for_setup(base: Path, tmp_path: Path) -> None:
    """Apptainer copies ``%files from STAGE`` before ``%setup`` runs, the host's ``%files``
    after it; a stage directory copied onto a path that exists goes into it by its own name."""
    (tmp_path / "a.txt").write_text("a\n")
    out = build(
        tmp_path,
        f"Bootstrap: localimage\nFrom: {base}\nStage: one\n"
        "%post\n    mkdir -p /built/d1 && echo 1 > /built/d1/f && ln -s /built/d1 /built/link\n"
        f"Bootstrap: localimage\nFrom: {base}\n"
        '%setup\n    ls -R "$APPTAINER_ROOTFS/opt" > "$APPTAINER_ROOTFS/setup-saw"\n'
        "%files\n    a.txt /opt/host.txt\n"
        "%files from one\n    /built/d1 /opt/exists\n    /built/link /opt/exists\n",
    )
    saw = (out / "setup-saw").read_text()
    assert "link" in saw and "host.txt" not in saw
    assert (out / "opt/exists/f").read_text() == "1\n"
    assert (out / "opt/exists/link/f").read_text() == "1\n"
    assert (out / "opt/host.txt").is_file()


def test_spaced_bootstrap_after_the_first_stage_is_section_text(base: Path, tmp_path: Path) -> None:
    """Apptainer starts a stage only at ``Bootstrap:`` with no space before the colon; a first
    header may be spaced, a later ``Bootstrap : x`` line is text of the section above it. The
    image keeps the whole file when its first header is spaced (comments before it too)."""
    text = (
        f"# lead\n Bootstrap : localimage\nFrom: {base}\nStage: one\n%post\n    echo 1 > /one\n\n"
        f"Bootstrap: localimage\nFrom: {base}\n%files from one\n    /one\n"
        "%help\nBootstrap : scratch\n    more help\n"
    )
    out = build(tmp_path, text)
    assert (out / ".singularity.d/runscript.help").read_text() == "Bootstrap : scratch\n    more help\n\n"
    assert (out / "bin/busybox").is_file()  # not a scratch image
    assert (out / "one").read_text() == "1\n"
    assert (out / ".singularity.d/Singularity").read_text() == text


def test_scratch_image_has_no_from_label(tmp_path: Path) -> None:
    """Without a ``From:`` header a scratch image gets no ``deffile.from`` label (hpcsif wrote "")."""
    out = build(tmp_path, "Bootstrap: scratch\n%labels\n    Kind empty\n")
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "scratch"
    assert "org.label-schema.usage.singularity.deffile.from" not in labels
    assert labels["Kind"] == "empty"


def test_post_and_test_see_the_container_variables(base: Path, tmp_path: Path) -> None:
    """``%post`` and ``%test`` see ``APPTAINER_CONTAINER``/``NAME``/``COMMAND``/``APPNAME``,
    the first two with ``SINGULARITY_`` twins, as in Apptainer (``COMMAND`` is exec, then test)."""
    keys = "CONTAINER NAME COMMAND APPNAME"
    show = f'for k in {keys}; do eval echo "$k=\\${{APPTAINER_$k-unset}}:\\${{SINGULARITY_$k-unset}}"; done'
    (tmp_path / "t.def").write_text(
        f"Bootstrap: localimage\nFrom: {base}\n%post\n    {show} > /post-env\n%test\n    {show}\n"
    )
    proc = run_cli("build", "--sandbox", "out", "t.def", cwd=tmp_path, timeout=120)
    post = dict(line.split("=", 1) for line in (tmp_path / "out/post-env").read_text().splitlines())
    test = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for seen, command in ((post, "exec"), (test, "test")):
        assert seen["COMMAND"] == f"{command}:unset" and seen["APPNAME"] == ":unset"
        container, twin = seen["CONTAINER"].split(":")
        assert container == twin and os.path.isabs(container)
        assert seen["NAME"] == f"{Path(container).name}:{Path(container).name}"


def test_arguments_defaults_belong_to_their_stage(base: Path, tmp_path: Path) -> None:
    """Each stage's ``{{ NAME }}`` takes its own ``%arguments`` defaults (hpcsif let the last
    stage's default win in every stage, and a later stage use an earlier stage's names)."""
    stage = "Bootstrap: localimage\nFrom: {base}\n{extra}%arguments\n    X={x}\n"
    stage += "%post\n    echo {{{{ X }}}} > /x\n"
    one = stage.format(base=base, extra="Stage: one\n", x=1)
    two = stage.format(base=base, extra="%files from one\n    /x /x1\n", x=2)
    out = build(tmp_path, one + "\n" + two)
    assert (out / "x1").read_text() == "1\n" and (out / "x").read_text() == "2\n"
    last = f"Bootstrap: localimage\nFrom: {base}\n%post\n    echo {{{{ X }}}} > /y\n"
    (tmp_path / "t.def").write_text(f"{one}\n{last}")
    proc = run_cli("build", "--sandbox", "out2", "t.def", cwd=tmp_path, check=False)
    assert proc.returncode == 255 and not (tmp_path / "out2").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "FATAL:   t.def:12: build var X is not defined through either --build-arg (--build-arg-file) "
        "or 'arguments' section"
    )
    run_cli("build", "--sandbox", "--build-arg", "X=9", "out3", "t.def", cwd=tmp_path)
    assert (tmp_path / "out3/y").read_text() == "9\n"


def test_sections_of_blank_lines_run_as_in_apptainer(base: Path, tmp_path: Path) -> None:
    """A ``%setup``, ``%post`` or ``%test`` of blank lines runs (hpcsif skipped them), and
    apps without a ``%post`` still have their post step: Apptainer's build says so."""
    blank = "".join(f"%{name}\n\n" for name in ("setup", "post", "test", "runscript", "help"))
    (tmp_path / "t.def").write_text(f"Bootstrap: localimage\nFrom: {base}\n{blank}")
    proc = run_cli("build", "--sandbox", "out", "t.def", cwd=tmp_path, timeout=120)
    assert [line for line in proc.stderr.splitlines() if line.startswith("INFO")] == [
        "INFO:    Starting build...",
        f"INFO:    Verifying bootstrap image {base}",
        "INFO:    Extracting local image...",
        "INFO:    Running setup scriptlet",
        "INFO:    Running post scriptlet",
        "INFO:    Adding help info",
        "INFO:    Adding runscript",
        "INFO:    Adding testscript",
        "INFO:    Running testscript",
        "INFO:    Creating sandbox directory...",
        "INFO:    Build complete: out",
    ]
    (tmp_path / "app.def").write_text(f"Bootstrap: localimage\nFrom: {base}\n%apprun tool\n    echo tool\n")
    proc = run_cli("build", "--sandbox", "app", "app.def", cwd=tmp_path, timeout=120)
    assert "INFO:    Running post scriptlet" in proc.stderr.splitlines()


def test_build_arg_values_are_trimmed(base: Path, tmp_path: Path) -> None:
    """``--build-arg`` and ``--build-arg-file`` values lose the blanks around them (and a
    file's CR line ends), as in Apptainer."""
    (tmp_path / "args.txt").write_bytes(b" A = spaced \r\nB=\t tab\n")
    post = 'echo "[{{ A }}][{{ B }}][{{ C }}]" > /a'
    text = f"Bootstrap: localimage\nFrom: {base}\n%post\n    {post}\n"
    out = build(tmp_path, text, "--build-arg-file", "args.txt", "--build-arg", "C= x y ")
    assert (out / "a").read_text() == "[spaced][tab][x y]\n"


def test_test_section_sees_the_callers_environment(base: Path, tmp_path: Path) -> None:
    """``%test`` runs as ``apptainer test`` would: with the caller's variables (not its PATH,
    which is ``USER_PATH``), while ``%post`` starts from a clean environment; no build script of
    hpcsif's lies at the root of the tree while the test runs."""
    show = 'echo "[$ROUND11_VAR] [$LANG] [$USER_PATH] [$APPTAINER_BIND] $PATH"'
    text = f"Bootstrap: localimage\nFrom: {base}\n%post\n    {show} > /post-saw\n%test\n    {show}; ls -A /\n"
    (tmp_path / "t.def").write_text(text)
    env = {"ROUND11_VAR": "from host", "LANG": "C.UTF-8", "PATH": f"/round11/bin:{os.environ['PATH']}"}
    proc = run_cli("build", "--sandbox", "out", "t.def", cwd=tmp_path, env=env, timeout=120)
    out = proc.stdout.splitlines()
    assert out[0].startswith(f"[from host] [C.UTF-8] [{env['PATH']}] [/etc/resolv.conf,/etc/hosts] /")
    assert "/round11" not in out[0].split("] ")[-1]  # the container's PATH, not the caller's
    assert not [name for name in out[1:] if "hpcsif" in name]
    post = (tmp_path / "out/post-saw").read_text()
    assert post.startswith("[] [C] [] [/etc/resolv.conf,/etc/hosts] /") and "/round11" not in post


def test_run_of_an_app_the_image_lacks(base: Path, tmp_path: Path) -> None:
    """Every built image has the apps' environment scripts, as Apptainer's have, so ``run --app``
    of an app it lacks answers in Apptainer's words, on standard output."""
    out = build(tmp_path, f"Bootstrap: localimage\nFrom: {base}\n%runscript\n    echo ran\n")
    assert (out / ".singularity.d/env/94-appsbase.sh").read_text() == ""
    proc = run_cli("run", "--app", "nope", str(out), check=False)
    assert (proc.returncode, proc.stdout) == (1, "Could not locate the container application: nope\n")


def test_shebang_line_goes_when_the_section_names_its_shell(base: Path, tmp_path: Path) -> None:
    """``%runscript -c SHELL`` over a body whose first line is ``#!…``: Apptainer leaves that
    line out of the script (hpcsif kept it under its own ``#!SHELL``)."""
    body = "#!/bin/busybox sh\n    echo run\n"
    text = f"Bootstrap: localimage\nFrom: {base}\n%runscript -c /bin/sh\n{body}%startscript -x\n{body}"
    out = build(tmp_path, text)
    assert (out / ".singularity.d/runscript").read_text() == "#!/bin/sh\n\n    echo run\n\n"
    assert (out / ".singularity.d/startscript").read_text() == "#!/bin/busybox sh -x\n\n    echo run\n\n"


def test_a_sandbox_base_is_not_verified(base: Path, tmp_path: Path) -> None:
    """``Bootstrap: localimage`` from a sandbox directory: Apptainer says nothing of verifying it."""
    sandbox = build(tmp_path, f"Bootstrap: localimage\nFrom: {base}\n")
    (tmp_path / "s.def").write_text(f"Bootstrap: localimage\nFrom: {sandbox}\n")
    proc = run_cli("build", "--sandbox", "out2", "s.def", cwd=tmp_path, timeout=120)
    assert [line for line in proc.stderr.splitlines() if line.startswith(("INFO", "WARNING"))] == [
        "INFO:    Starting build...",
        "INFO:    Extracting local image...",
        "INFO:    Creating sandbox directory...",
        "INFO:    Build complete: out2",
    ]


def test_pre_runs_on_the_host_before_the_bootstrap(base: Path, tmp_path: Path) -> None:
    """Apptainer 1.4 still runs ``%pre``: on the host, before the bootstrap, as ``%setup``
    (``/bin/sh -e -x``, ``$APPTAINER_ROOTFS`` naming the still empty tree)."""
    pre = 'ls -A "$APPTAINER_ROOTFS" > pre-saw; echo $- > pre-flags'
    text = f"Bootstrap: localimage\nFrom: {base}\n%pre\n    {pre}\n"
    (tmp_path / "t.def").write_text(text)
    proc = run_cli("build", "--sandbox", "out", "t.def", cwd=tmp_path, timeout=120)
    info = [line for line in proc.stderr.splitlines() if line.startswith("INFO")]
    assert info[:3] == [
        "INFO:    Starting build...",
        "INFO:    Running pre scriptlet",
        f"INFO:    Verifying bootstrap image {base}",
    ]
    assert (tmp_path / "pre-saw").read_text() == "" and (tmp_path / "pre-flags").read_text() == "xe\n"
    (tmp_path / "t.def").write_text(f"Bootstrap: localimage\nFrom: {base}\n%pre\n    exit 3\n")
    proc = run_cli("build", "--sandbox", "out2", "t.def", cwd=tmp_path, check=False)
    assert proc.returncode == 255 and not (tmp_path / "out2").exists()
    assert proc.stderr.strip().splitlines()[-1] == "FATAL:   t.def:3: %pre failed with exit status 3"
