"""Definition files built by ``hpcsif build`` behave as Apptainer 1.4 builds them.

Each test pins a behaviour observed with Apptainer 1.4.5 (umask 0002 during the build,
``$APPTAINER_LABELS``, ``%post -c SHELL`` without ``-e -x``, ``%arguments`` values kept
with their quotes, the stored definition starting at ``Bootstrap:`` with its line endings,
header labels, scratch images, Apptainer's error phrases) through the CLI. Where Apptainer
(or the peer) is installed, the same definition is also built by it and what a user sees
is compared: ``inspect`` output byte for byte, labels, file modes, ``run``/``exec`` output,
exit codes and FATAL lines. The peer builds with ``--fakeroot`` (it may lack the
capabilities to run ``%post`` as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer, run_cli
from tests.convert.test_build_cli import unpack
from tests.services.images import TestImage

pytestmark = pytest.mark.slow

COMMON = """\
# a comment before the header: Apptainer does not keep it
Bootstrap: localimage
From: {base}
Stage: final
IncludeCmd: yes

%arguments
    VERSION="1.2"
    WHO=world

%setup
    touch "$APPTAINER_ROOTFS/setup-made"

%files
    {data}/shared.txt /opt/shared.txt
    "{data}/with space.txt" "/opt/dir with space/"

%post
    mkdir -p /opt/made
    echo {{{{ WHO }}}} > /opt/made/who
    echo "FromPost yes" >> "$APPTAINER_LABELS"
    echo 'export POSTVAR="p q"' >> "$APPTAINER_ENVIRONMENT"
    echo scratch > /tmp/scratch && echo scratch > /var/tmp/scratch

%environment
    export GREETING="hello {{{{ WHO }}}}"
    PLAIN='single $quoted'
    export PLAIN

%runscript
    echo "run {{{{ VERSION }}}} $GREETING $*"

%startscript
    echo start

%test
    test -f /opt/made/who

%labels
    Maintainer Jane Doe
    Version {{{{ VERSION }}}}

%help
    Usage: run it.

%apprun tool
    echo "tool $TOOLVAR $*"

%appenv tool
    export TOOLVAR=t

%applabels tool
    Kind helper

%apphelp tool
    Tool help.

%appinstall tool
    echo installed > installed.txt
"""
#: paths whose modes (umask 0002 during the build) and presence are compared
MODES = "/setup-made /opt/made /opt/made/who /opt/shared.txt /opt/dir*/* /scif/apps/tool/installed.txt"


def apptainer() -> str:
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer on PATH")
    return exe


@pytest.fixture(scope="module")
def work(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory (under /tmp, which the peer sees) with data files and an OCI archive."""
    d = tmp_path_factory.mktemp("defpeer")
    (d / "shared.txt").write_text("shared\n")
    (d / "shared.txt").chmod(0o666)  # cp under umask 0002 keeps group write, drops other write
    (d / "with space.txt").write_text("spaced\n")
    with tarfile.open(d / "busybox.oci-archive.tar", "w") as tar:
        for child in sorted(busybox_image.layout.iterdir()):
            tar.add(child, child.name)
    return d


@pytest.fixture(scope="module")
def base(work: Path) -> Path:
    """A busybox SIF built by hpcsif."""
    sif = work / "base.sif"
    run_cli("build", str(sif), f"oci-archive://{work / 'busybox.oci-archive.tar'}")
    return sif


def build(
    exe: str | None, target: Path, deffile: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``build`` by hpcsif (``exe`` None) or by Apptainer; no check of the exit status."""
    if exe is None:
        return run_cli("build", *flags, str(target), str(deffile), check=False, env=env)
    cmd = [exe, "build", "--fakeroot", *flags, str(target), str(deffile)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=deffile.parent)


def fatal(proc: subprocess.CompletedProcess) -> str:
    return "\n".join(line for line in proc.stderr.splitlines() if line.startswith("FATAL"))


def cli(exe: str | None, *args: str) -> str:
    """stdout of ``hpcsif ARGS`` (``exe`` None) or ``apptainer ARGS``, which must succeed."""
    if exe is None:
        return run_cli(*args).stdout
    proc = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def labels(exe: str | None, sif: Path) -> dict[str, str]:
    """Labels without the build date and the builder's version."""
    data = json.loads(cli(exe, "inspect", "--json", "--labels", str(sif)))["data"]["attributes"]["labels"]
    return {k: v for k, v in data.items() if "build-date" not in k and not k.endswith(".version")}


def user_view(exe: str | None, sif: Path) -> dict[str, object]:
    """What a user of the image sees: inspect output, labels, run/exec output, file modes."""
    out: dict[str, object] = {}
    for flag in ("--deffile", "--runscript", "--environment", "--startscript", "--test", "--helpfile"):
        out[flag] = cli(exe, "inspect", flag, str(sif))
    out["--list-apps"] = cli(exe, "inspect", "--list-apps", str(sif))
    for flag in ("--labels", "--runscript", "--helpfile", "--environment"):
        out[f"tool {flag}"] = cli(exe, "inspect", "--app", "tool", flag, str(sif))
    out["labels"] = labels(exe, sif)
    out["run"] = cli(exe, "run", str(sif), "a", "b c")
    out["run --app"] = cli(exe, "run", "--app", "tool", str(sif), "x")
    out["env"] = cli(exe, "exec", str(sif), "sh", "-c", 'echo "$GREETING|$PLAIN|$POSTVAR"')
    out["modes"] = cli(exe, "exec", str(sif), "sh", "-c", f"stat -c '%a %n' {MODES}; ls -a /")
    return out


def write_common(work: Path, base: Path, name: str) -> Path:
    deffile = work / name
    deffile.write_text(COMMON.format(base=base, data=work))
    return deffile


def test_common_definition_as_apptainer_builds_it(work: Path, base: Path) -> None:
    deffile = write_common(work, base, "common.def")
    sif = work / "common.sif"
    proc = build(None, sif, deffile)
    assert proc.returncode == 0, proc.stderr
    view = user_view(None, sif)
    text = COMMON.format(base=base, data=work)
    expected_def = text[text.index("Bootstrap:") :]
    expected_def = expected_def.replace("{{ VERSION }}", '"1.2"').replace("{{ WHO }}", "world")
    assert view["--deffile"] == expected_def
    assert view["run"] == "run 1.2 hello world a b c\n"
    assert view["env"] == "hello world|single $quoted|p q\n"
    assert view["labels"] == {
        "FromPost": "yes",  # $APPTAINER_LABELS
        "Maintainer": "Jane Doe",
        "Version": '"1.2"',  # %arguments keep quotes
        "org.label-schema.build-arch": labels(None, base)["org.label-schema.build-arch"],
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.usage": "/.singularity.d/runscript.help",
        "org.label-schema.usage.apptainer.runscript.help": "/.singularity.d/runscript.help",
        "org.label-schema.usage.singularity.deffile.bootstrap": "localimage",
        "org.label-schema.usage.singularity.deffile.from": str(base),
        "org.label-schema.usage.singularity.deffile.includecmd": "yes",
        "org.label-schema.usage.singularity.deffile.stage": "final",
    }
    modes = str(view["modes"]).splitlines()
    assert modes[:6] == [
        "664 /setup-made",
        "775 /opt/made",
        "664 /opt/made/who",
        "664 /opt/shared.txt",
        "644 /opt/dir with space/with space.txt",
        "664 /scif/apps/tool/installed.txt",
    ]
    assert ".build.labels" not in modes
    # %post's /tmp and /var/tmp are not the image's (Apptainer binds the host's there)
    root = unpack(sif, work / "common-root")
    assert list((root / "tmp").iterdir()) == [] and list((root / "var/tmp").iterdir()) == []


def test_common_definition_same_as_apptainer(work: Path, base: Path) -> None:
    exe = apptainer()
    # both build on the peer's own base, so the environment files they inherit are the same
    peer_base = work / "peer-base.sif"
    if not peer_base.exists():
        base_def = work / "base.def"
        base_def.write_text(f"Bootstrap: oci-archive\nFrom: {work / 'busybox.oci-archive.tar'}\n")
        proc = build(exe, peer_base, base_def)
        assert proc.returncode == 0, proc.stderr
    deffile = write_common(work, peer_base, "same.def")
    ours, theirs = work / "same-ours.sif", work / "same-theirs.sif"
    for tool, sif in ((None, ours), (exe, theirs)):
        proc = build(tool, sif, deffile)
        assert proc.returncode == 0, proc.stderr
    a, b = user_view(None, ours), user_view(exe, theirs)
    assert a == b


@pytest.mark.parametrize(
    ("body", "ok", "marker"),
    [
        ("%post -c /bin/sh\n    false\n    touch /after\n", True, True),  # no -e with -c
        ("%post -c /bin/sh -e\n    false\n    touch /after\n", False, False),
        ("%post\n    false\n    touch /after\n", False, False),
        ("%post -x\n    touch /after\n", True, True),  # other arguments go to /bin/sh
    ],
)
def test_post_shell_errexit_as_apptainer(work: Path, base: Path, body: str, ok: bool, marker: bool) -> None:
    deffile = work / "shell.def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {base}\n{body}")
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"shell-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        assert (proc.returncode == 0) == ok, (tool, proc.stderr)
        if ok:
            found = cli(tool, "exec", str(sif), "sh", "-c", "test -f /after && echo yes || echo no")
            assert found == ("yes\n" if marker else "no\n")
        else:
            assert proc.returncode == 255 and "exit status 1" in fatal(proc)


def test_post_labels_win_over_labels_section(work: Path, base: Path) -> None:
    deffile = work / "labels.def"
    deffile.write_text(
        f"Bootstrap: localimage\nFrom: {base}\n%labels\n    A from-labels\n    B b\n%post\n"
        '    echo "A from-post" >> "$SINGULARITY_LABELS"\n'
    )
    sif = work / "labels.sif"
    proc = build(None, sif, deffile)
    assert proc.returncode == 0, proc.stderr
    found = labels(None, sif)
    assert (found["A"], found["B"]) == ("from-post", "b")


@pytest.mark.parametrize(("status", "ok"), [(0, True), (7, False)])
def test_every_stage_runs_its_test_as_apptainer(work: Path, base: Path, status: int, ok: bool) -> None:
    deffile = work / "stages.def"
    deffile.write_text(
        f"Bootstrap: localimage\nFrom: {base}\nStage: one\n%test\n    echo TEST-ONE; exit {status}\n\n"
        f"Bootstrap: localimage\nFrom: {base}\n%test\n    echo TEST-TWO\n"
    )
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"stages-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        tests = [line for line in proc.stdout.splitlines() if line.startswith("TEST-")]
        assert tests == (["TEST-ONE", "TEST-TWO"] if ok else ["TEST-ONE"]), (tool, proc.stdout)
        assert (proc.returncode == 0) == ok and sif.exists() == ok, (tool, proc.stderr)
        if not ok:
            assert f"exit status {status}" in fatal(proc)


def test_post_lang_comes_from_the_image(work: Path, base: Path) -> None:
    """``%post`` has LANG=C unless the base image's environment sets it (Apptainer 1.4).

    The base sets it as an OCI image's ``Env`` does: only where LANG is not set yet.
    """
    with_lang = work / "with-lang.sif"
    if not with_lang.exists():
        (work / "with-lang.def").write_text(
            f'Bootstrap: localimage\nFrom: {base}\n%environment\n    export LANG="${{LANG:-en_US.UTF-8}}"\n'
        )
        assert build(None, with_lang, work / "with-lang.def").returncode == 0
    for image, lang in ((base, "C"), (with_lang, "en_US.UTF-8")):
        deffile = work / "lang.def"
        deffile.write_text(f'Bootstrap: localimage\nFrom: {image}\n%post\n    echo "LANG=$LANG"\n')
        for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
            sif = work / f"lang-{'peer' if tool else 'ours'}.sif"
            sif.unlink(missing_ok=True)
            proc = build(tool, sif, deffile)
            assert proc.returncode == 0, proc.stderr
            assert f"LANG={lang}\n" in proc.stdout, (tool, proc.stdout)


def test_script_section_arguments_as_apptainer(work: Path, base: Path) -> None:
    """``%runscript -x`` gives ``#!/bin/sh -x``, as Apptainer writes it."""
    deffile = work / "script-args.def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {base}\n%runscript -x\n    echo run\n")
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"script-args-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        assert proc.returncode == 0, proc.stderr
        assert cli(tool, "inspect", "--runscript", str(sif)) == "#!/bin/sh -x\n\n    echo run\n"
        cmd = [tool] if tool else [sys.executable, "-m", "hpcsif.cli.main"]
        ran = subprocess.run([*cmd, "run", str(sif)], capture_output=True, text=True)
        assert ran.stdout == "run\n" and ran.stderr.endswith("+ echo run\n")  # peer: passwd warnings


ERRORS = [
    ("From: {base}\n%post\n  true\n", "no bootstrap specification found"),
    ("# only a comment\n", "no stages found in definition file"),
    ("Bootstrap: nosuch\nFrom: x\n", "invalid build source nosuch"),
    ("Bootstrap: localimage\nFrom: {base}\nColour: red\n", "invalid header keyword found: colour"),
    ("Bootstrap: localimage\nFrom: {base}\n%nosuch\n  x\n", "invalid section(s) specified: nosuch"),
    (
        "Bootstrap: localimage\nFrom: {base}\n%runscript\n  echo {{{{ X }}}}\n",
        "build var X is not defined through either --build-arg (--build-arg-file) or 'arguments' section",
    ),
    ("Bootstrap: localimage\nFrom: {base}\n%post\n  exit 3\n", "exit status 3"),
    ("Bootstrap: localimage\nFrom: {base}\n%setup\n  exit 5\n", "exit status 5"),
    ("Bootstrap: localimage\nFrom: {base}\n%test\n  exit 4\n", "exit status 4"),
    ("Bootstrap: localimage\nFrom: {base}\n%files\n  /no/such/src /opt/x\n", "no such file or directory"),
    ("Bootstrap: localimage\nFrom: /no/such.sif\n", "no such file or directory"),
]


@pytest.mark.parametrize(("text", "phrase"), ERRORS)
def test_errors_as_apptainer(work: Path, base: Path, text: str, phrase: str) -> None:
    """Exit status 255, no image, and the phrase Apptainer's FATAL line has (case aside)."""
    deffile = work / "bad.def"
    deffile.write_text(text.format(base=base))
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / "bad.sif"
        proc = build(tool, sif, deffile)
        assert proc.returncode == 255, (tool, proc.stderr)
        assert phrase.lower() in fatal(proc).lower(), (tool, proc.stderr)
        assert not sif.exists()


def test_crlf_definition_kept_as_written(work: Path, base: Path) -> None:
    text = (
        f"\r\n# leading comment\r\nBootstrap: localimage\r\nFrom: {base}\r\n\r\n%post\r\n"
        "    echo crlf > /crlf\r\n%runscript\r\n    echo ran\r\n%labels\r\n    K V\r\n"
    )
    deffile = work / "crlf.def"
    deffile.write_bytes(text.encode())
    kept = text[text.index("Bootstrap:") :]
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"crlf-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        assert proc.returncode == 0, proc.stderr
        cmd = [tool] if tool else [sys.executable, "-m", "hpcsif.cli.main"]
        deffile_out = subprocess.run([*cmd, "inspect", "--deffile", str(sif)], capture_output=True).stdout
        assert deffile_out == kept.encode()  # bytes: text mode would hide the CRs
        assert cli(tool, "run", str(sif)) == "ran\n"
        assert cli(tool, "exec", str(sif), "cat", "/crlf") == "crlf\n"
        assert labels(tool, sif)["K"] == "V"


def test_indented_header_as_apptainer(work: Path, base: Path) -> None:
    """An indented first header is the whole file's stage, and the whole file is kept."""
    text = f"\n  # note\n  Bootstrap: localimage\n  From: {base}\n%runscript\n    echo indented\n"
    deffile = work / "indented.def"
    deffile.write_text(text)
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"indented-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        assert proc.returncode == 0, proc.stderr
        assert cli(tool, "inspect", "--deffile", str(sif)) == text
        assert cli(tool, "run", str(sif)) == "indented\n"


def test_scratch_image_as_apptainer(work: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, work / "busybox")  # the peer sees /tmp, not the host's /bin
    deffile = work / "scratch.def"
    deffile.write_text(
        "Bootstrap: scratch\n%setup\n    mkdir -p $APPTAINER_ROOTFS/bin\n"
        f"    cp {work / 'busybox'} $APPTAINER_ROOTFS/bin/busybox\n"
        "    ln -s busybox $APPTAINER_ROOTFS/bin/sh\n"
    )
    for tool in [None] + ([exe] if (exe := peer_apptainer()) else []):
        sif = work / f"scratch-{'peer' if tool else 'ours'}.sif"
        sif.unlink(missing_ok=True)
        proc = build(tool, sif, deffile)
        assert proc.returncode == 0, proc.stderr
        assert cli(tool, "inspect", "--runscript", str(sif)) == "#!/bin/sh\n"
        assert "10-docker2singularity" not in cli(tool, "inspect", "--environment", str(sif))
        assert cli(tool, "run", str(sif)) == ""


def test_fingerprints_header_verifies_the_base(work: Path, base: Path, tmp_path: Path) -> None:
    """As Apptainer: the localimage SIF must be signed by every key ``Fingerprints:`` lists."""
    env = {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}
    run_cli("key", "newpair", "-N", "signer", "-t", "pgp", "-E", "s@example.org", env=env)
    listing = run_cli("key", "list", env=env).stdout
    fpr = next(line.split()[-1] for line in listing.splitlines() if "Fingerprint:" in line)
    signed = Path(shutil.copy(base, tmp_path / "signed.sif"))
    run_cli("sign", str(signed), env=env)
    other = "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"
    cases = [
        (signed, fpr, None),
        (base, fpr, "signature not found for object group 1"),
        (signed, f"{fpr}, {other}", f"image not signed by required entities: {other}"),
    ]
    for image, fingerprints, error in cases:
        deffile = tmp_path / "fpr.def"
        deffile.write_text(f"Bootstrap: localimage\nFrom: {image}\nFingerprints: {fingerprints}\n")
        sif = tmp_path / "fpr.sif"
        proc = build(None, sif, deffile, env=env)
        if error is None:
            assert proc.returncode == 0, proc.stderr
            sif.unlink()
        else:
            assert proc.returncode == 255 and error in fatal(proc), proc.stderr
            assert fatal(proc).startswith(f"FATAL:   {deffile}:3: while checking fingerprint: ")
            assert not sif.exists()


def test_fingerprints_header_checks_every_signer_against_the_keyring(
    work: Path, base: Path, tmp_path: Path
) -> None:
    """As Apptainer: a second signer the keyring knows is fine; one it does not know fails the build."""
    env = {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}
    for name in ("first", "second"):
        run_cli("key", "newpair", "-N", name, "-t", "pgp", "-E", f"{name}@example.org", env=env)
    listing = run_cli("key", "list", env=env).stdout
    first, second = [line.split()[-1] for line in listing.splitlines() if "Fingerprint:" in line]
    signed = Path(shutil.copy(base, tmp_path / "signed-twice.sif"))
    for fpr in (first, second):
        run_cli("sign", "--keyname", fpr, str(signed), env=env)
    deffile = tmp_path / "fpr.def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {signed}\nFingerprints: {first}\n")
    sif = tmp_path / "fpr.sif"
    proc = build(None, sif, deffile, env=env)
    assert proc.returncode == 0, proc.stderr
    sif.unlink()
    run_cli("key", "remove", second, env=env)
    proc = build(None, sif, deffile, env=env)
    assert proc.returncode == 255, proc.stderr
    assert fatal(proc).startswith(f"FATAL:   {deffile}:3: while checking fingerprint: "), proc.stderr
    assert not sif.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="real root only: fake root maps one uid")
def test_post_as_root_can_give_files_to_other_users(work: Path, base: Path, tmp_path: Path) -> None:
    deffile = work / "chown.def"
    deffile.write_text(
        f"Bootstrap: localimage\nFrom: {base}\n%post\n"
        "    echo 'alice:x:1234:1234::/home/alice:/bin/sh' >> /etc/passwd\n"
        "    mkdir -p /home/alice && chown 1234:1234 /home/alice\n"
    )
    sif = work / "chown.sif"
    proc = build(None, sif, deffile)
    assert proc.returncode == 0, proc.stderr
    st = (unpack(sif, tmp_path / "root") / "home/alice").stat()
    assert (st.st_uid, st.st_gid) == (1234, 1234)


@pytest.mark.skipif(os.geteuid() != 0, reason="real root only")
@pytest.mark.parametrize(("flags", "uid_map"), [((), "0 0 4294967295"), (("-f",), "0 0 1")])
def test_fakeroot_flag_when_root(work: Path, base: Path, flags: tuple[str, ...], uid_map: str) -> None:
    """Root builds as real root; ``-f`` asks for fake root in a user namespace instead."""
    deffile = work / "uidmap.def"
    deffile.write_text(f"Bootstrap: localimage\nFrom: {base}\n%post\n    cat /proc/self/uid_map > /uidmap\n")
    sif = work / "uidmap.sif"
    sif.unlink(missing_ok=True)
    proc = build(None, sif, deffile, *flags)
    assert proc.returncode == 0, proc.stderr
    assert cli(None, "exec", str(sif), "cat", "/uidmap").split() == uid_map.split()
