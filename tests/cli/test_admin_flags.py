"""Apptainer 1.4's flags and subcommands of run-help, sif, cache, key, sign and verify, through the CLI.

Each test runs ``hpcsif`` as a user would (a separate process) on real SIFs, squashfs and gpg;
where Apptainer (or the sid peer) is installed the same command runs there and the outputs
are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.writer import ObjectSpec, write_sif
from tests.conftest import peer_apptainer, run_cli

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
HELP = '    Some help for this container\n  with "quotes" and a\ttab\n\n\n'
APP_HELP = "    Help for app foo\n"


def peer(
    *args: str | Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the Apptainer peer with *args* (the caller skips when there is none)."""
    cmd = [str(peer_apptainer()), *map(str, args)]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=environ, input=stdin)


needs_peer = pytest.mark.skipif(
    peer_apptainer() is None, reason="neither apptainer nor peer-apptainer on PATH"
)


@pytest.fixture(scope="module")
def help_sif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SIF with a busybox, a %help text, an app with %apphelp and an app without."""
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs (squashfs-tools) is not installed")
    work = tmp_path_factory.mktemp("run-help")
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp", "etc", "root", "home"):  # what Apptainer mounts over
        (root / d).mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / ".singularity.d").mkdir()
    (root / ".singularity.d" / "runscript.help").write_text(HELP)
    (root / "scif" / "apps" / "foo" / "scif").mkdir(parents=True)
    (root / "scif" / "apps" / "foo" / "scif" / "runscript.help").write_text(APP_HELP)
    (root / "scif" / "apps" / "bar" / "scif").mkdir(parents=True)
    fs = work / "rootfs.sqfs"
    cmd = ["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress", "-all-root"]
    subprocess.run(cmd, check=True)
    return write_sif(
        work / "help.sif",
        [ObjectSpec(DataType.PARTITION, path=fs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)],
    )


NO_HELP = "No help sections were defined for this image\n"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], HELP.rstrip("\n") + "\n"),
        (["--app", "foo"], APP_HELP),
        (["--app", "bar"], NO_HELP),  # an app without %apphelp
        (["--app", "nope"], NO_HELP),  # no such app: Apptainer says the same
    ],
)
def test_run_help_prints_the_help_text(help_sif: Path, flags: list[str], expected: str) -> None:
    out = run_cli("run-help", *flags, str(help_sif))
    assert out.stdout == expected
    if peer_apptainer():
        theirs = peer("run-help", *flags, help_sif)
        assert (theirs.returncode, theirs.stdout) == (0, out.stdout)


def test_run_help_without_help_and_without_image(tmp_path: Path, help_sif: Path) -> None:
    bare = tmp_path / "bare"
    (bare / "bin").mkdir(parents=True)  # a sandbox without /.singularity.d/runscript.help
    assert run_cli("run-help", str(bare)).stdout == NO_HELP
    missing = run_cli("run-help", str(tmp_path / "nope.sif"), check=False)
    assert missing.returncode == 255
    assert (
        missing.stderr
        == f"FATAL:   container not found: stat {tmp_path / 'nope.sif'}: no such file or directory\n"
    )


# -- sign / verify / key ------------------------------------------------------------------------

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg (Debian package gnupg) not installed")


@pytest.fixture
def image(help_sif: Path, tmp_path: Path) -> Path:
    """A fresh unsigned copy of the test SIF."""
    return Path(shutil.copy(help_sif, tmp_path / "app.sif"))


@pytest.fixture
def keys_env(tmp_path: Path) -> dict[str, str]:
    """An empty keyring of our own."""
    return {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}


def _pem_pair(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    run_cli("key", "newpair", "-N", "pem", env=env)
    priv, pub = tmp_path / "pem.key.pem", tmp_path / "pem.pub.pem"
    run_cli("key", "export", "--secret", "pem", str(priv), env=env)
    run_cli("key", "export", "pem", str(pub), env=env)
    return priv, pub


@needs_gpg
def test_apptainer_newpair_flags_keyidx_and_json(
    image: Path, tmp_path: Path, keys_env: dict[str, str]
) -> None:
    # Apptainer's documented non-interactive newpair line makes an OpenPGP key
    run_cli(
        "key", "newpair", "--password=psk", "--name=Jane Doe", "--comment=test key",
        "--email=jane@example.org", "--push=false", env=keys_env,
    )  # fmt: skip
    run_cli("key", "newpair", "-N", "pemkey", env=keys_env)  # a second private key: index 1
    listing = run_cli("key", "list", "--secret", env=keys_env).stdout
    assert listing.startswith("Private key listing (")
    assert "0)  User:              Jane Doe (test key) <jane@example.org>\n" in listing
    assert "1)  User:              pemkey\n" in listing
    signed = run_cli("sign", "-k", "0", str(image), env=keys_env)
    assert signed.stderr == (
        "INFO:    Signing image with PGP key material\n"
        f"INFO:    Signature created and applied to image '{image}'\n"
    )
    out = run_cli("verify", str(image), env=keys_env).stdout
    assert out.startswith("[LOCAL]            Signing entity: Jane Doe (test key) <jane@example.org>\n")
    fpr = out.splitlines()[1].split()[-1]
    report = run_cli("verify", "-j", "-a", "-l", str(image), env=keys_env).stdout
    assert report == (
        '{\n  "Signatures": 1,\n  "SignerKeys": [\n    {\n      "Signer": {\n'
        '        "Partition": "FS",\n'
        '        "Name": "Jane Doe (test key) \\u003cjane@example.org\\u003e",\n'
        f'        "Fingerprint": "{fpr.lower()}",\n'
        '        "KeyLocal": true,\n        "KeyCheck": true,\n        "DataCheck": true\n'
        "      }\n    }\n  ]\n}\n"
    )
    bad = run_cli("sign", "-k", "2", str(image), env=keys_env, check=False)
    assert bad.returncode != 0 and "--keyidx 2: index out of range" in bad.stderr
    if peer_apptainer():  # Apptainer prints the same report for our signature
        pub = tmp_path / "jane.asc"
        run_cli("key", "export", "Jane-Doe", str(pub), env=keys_env)
        penv = {"APPTAINER_KEYSDIR": str(tmp_path / "peer-keys")}
        assert peer("key", "import", pub, env=penv).returncode == 0
        assert peer("verify", "-j", image, env=penv).stdout == report


def test_sign_and_verify_one_object_or_group(
    image: Path, help_sif: Path, tmp_path: Path, keys_env: dict[str, str]
) -> None:
    priv, pub = _pem_pair(tmp_path, keys_env)
    missing = run_cli("sign", "--key", str(priv), "-g", "2", str(image), check=False)
    assert missing.returncode == 255 and "group 2 not found" in missing.stderr
    run_cli("sign", "--key", str(priv), "-i", "1", str(image))
    one = run_cli("verify", "--key", str(pub), "-i", "1", str(image))
    assert one.stdout.endswith("1   |1       |NONE    |FS\n")
    assert run_cli("verify", "--key", str(pub), "-g", "1", str(image)).returncode == 0
    assert run_cli("verify", "--key", str(pub), "-g", "1", "--json", str(image)).stdout.startswith(
        '{\n  "Signatures": 1,\n  "SignerKeys": [\n    {\n      "Signer": {\n        "Partition": "FS",\n'
        '        "Name": "unknown",\n        "Fingerprint": "",\n        "KeyLocal": false,'
    )
    bare = Path(shutil.copy(help_sif, tmp_path / "unsigned.sif"))
    unsigned = run_cli("verify", "--key", str(pub), "-j", str(bare), check=False)
    assert (unsigned.returncode, unsigned.stdout) == (255, '{\n  "Signatures": 0,\n  "SignerKeys": null\n}\n')
    assert "signature not found for object group 1" in unsigned.stderr
    if peer_apptainer():
        theirs = peer("verify", "--key", pub, "-i", "1", image)
        assert (theirs.returncode, theirs.stdout) == (0, one.stdout)
        theirs = peer("verify", "--key", pub, "-j", bare)
        assert (theirs.returncode, theirs.stdout) == (unsigned.returncode, unsigned.stdout)


def _certificates(tmp_path: Path) -> dict[str, Path]:
    """A root CA, an intermediate CA and a code-signing leaf (with its key), as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("root", "inter", "leaf")}

    def cert(subject: str, issuer: str, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(keys[subject].public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(keys[subject].public_key()), critical=False
            )
            .add_extension(
                x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True
            )
        )
        if subject != issuer:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(keys[issuer].public_key())
            builder = builder.add_extension(aki, critical=False)
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        return builder.sign(keys[issuer], hashes.SHA256())

    files = {}
    for subject, issuer, ca in (("root", "root", True), ("inter", "root", True), ("leaf", "inter", False)):
        files[subject] = tmp_path / f"{subject}.pem"
        files[subject].write_bytes(cert(subject, issuer, ca).public_bytes(serialization.Encoding.PEM))
    files["key"] = tmp_path / "leaf.key"
    files["key"].write_bytes(
        keys["leaf"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def test_verify_with_a_certificate_chain(image: Path, tmp_path: Path) -> None:
    pem = _certificates(tmp_path)
    run_cli("sign", "--key", str(pem["key"]), str(image))
    cases = [
        (["--certificate-intermediates", str(pem["inter"]), "--certificate-roots", str(pem["root"])], 0),
        (["--certificate-roots", str(pem["root"])], 255),  # the intermediate is missing
        (["--certificate-roots", str(pem["inter"])], 0),  # the intermediate itself is trusted
    ]
    for flags, code in cases:
        ours = run_cli("verify", "--certificate", str(pem["leaf"]), *flags, str(image), check=False)
        assert ours.returncode == code, ours.stderr
        if code:
            assert "FATAL:   certificate" in ours.stderr and "is not trusted" in ours.stderr
        if peer_apptainer():
            theirs = peer("verify", "--certificate", pem["leaf"], *flags, image)
            assert (theirs.returncode, theirs.stdout) == (code, ours.stdout)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["verify", "-u", "https://keys.example.org"], "--url"),
        (["verify", "--legacy-insecure"], "--legacy-insecure"),
        (["verify", "--ocsp-verify"], "--ocsp-verify"),
        (["key", "pull", "8883491F4268F173C6E5DC49EDECE4F3F38D871E"], "key pull"),
        (["key", "push", "8883491F4268F173C6E5DC49EDECE4F3F38D871E"], "key push"),
        (["key", "search", "-l", "apptainer.org"], "key search"),
        (["key", "newpair", "-N", "x", "--push"], "--push"),
        (["key", "list", "--global"], "--global"),
    ],
)
def test_keyserver_and_legacy_flags_are_refused_in_one_line(
    image: Path, keys_env: dict[str, str], args: list[str], flag: str
) -> None:
    extra = [str(image)] if args[0] == "verify" else []
    proc = run_cli(*args, *extra, env=keys_env, check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith(f"FATAL:   {flag} is not supported by hpcsif: ")
    assert proc.stderr.count("\n") == 1


def test_key_export_without_a_name_and_remove_flags(tmp_path: Path, keys_env: dict[str, str]) -> None:
    run_cli("key", "newpair", "-N", "solo", "-d", str(tmp_path / "elsewhere"))  # -d: another keyring
    assert (tmp_path / "elsewhere" / "solo.pub").is_file()
    run_cli("key", "newpair", "-N", "solo", env=keys_env)
    run_cli("key", "export", "--armor", str(tmp_path / "pub.pem"), env=keys_env)  # Apptainer's: FILE only
    assert b"PUBLIC KEY" in (tmp_path / "pub.pem").read_bytes()
    run_cli("key", "remove", "--secret", "solo", env=keys_env)
    assert "public key" in run_cli("key", "list", env=keys_env).stdout
    assert "No keys" in run_cli("key", "list", "-s", env=keys_env).stdout
    run_cli("key", "remove", "-p", "solo", env=keys_env)
    assert "No keys" in run_cli("key", "list", env=keys_env).stdout
    run_cli("key", "newpair", "-N", "pair", env=keys_env)
    run_cli("key", "remove", "--both", "pair", env=keys_env)
    assert "No keys" in run_cli("key", "list", "-s", env=keys_env).stdout


# -- cache ---------------------------------------------------------------------------------------

OCI_ARCHIVE = Path("/work/bench-images/busybox.oci-archive.tar")


def test_cache_types_and_days(tmp_path: Path) -> None:
    if not OCI_ARCHIVE.is_file():
        pytest.skip(f"{OCI_ARCHIVE} not built")
    env = {"HPCSIF_CACHEDIR": str(tmp_path / "cache"), "HPCSIF_SYSTEM_CACHEDIR": ""}
    run_cli("pull", str(tmp_path / "bb.sif"), f"oci-archive:{OCI_ARCHIVE}", env=env)
    one = "There are 1 container file(s) using "
    assert run_cli("cache", "list", "-T", "oci", env=env).stdout.startswith(one)
    assert run_cli("cache", "list", "-T", "oras,library", "-T", "net", env=env).stdout.startswith(
        "There are 0 container file(s) using 0.00 KiB of space\n"
    )
    blobs = run_cli("cache", "list", "-T", "blob", env=env).stdout
    assert blobs.startswith("There are ") and " oci blob file(s) using " in blobs and "0 oci" not in blobs
    table = run_cli("cache", "list", "-v", "-T", "oci-tmp", env=env).stdout.splitlines()
    assert table[0].startswith("NAME                     DATE CREATED           SIZE             TYPE")
    assert table[1].split()[5] == "oci-tmp" and table[1].endswith(f"oci-archive://{OCI_ARCHIVE}")
    if (
        peer_apptainer()
    ):  # Apptainer's columns come first, as it lays them out (it prints its header even empty)
        theirs = peer("cache", "list", "-v", env={"APPTAINER_CACHEDIR": str(tmp_path / "peer-cache")})
        assert table[0].startswith(theirs.stdout.splitlines()[0] + " ")
    cancelled = run_cli("cache", "clean", input="n\n", env=env)
    assert cancelled.stdout == (
        "This will delete everything in your cache (containers from all sources and OCI blobs).\n"
        "Hint: You can see exactly what would be deleted by canceling and using the --dry-run option.\n"
        "Do you want to continue? [y/N] "
    )
    assert cancelled.stderr == "INFO:    Handle cleanup canceled\n"
    if peer_apptainer():
        theirs = peer("cache", "clean", env={"APPTAINER_CACHEDIR": str(tmp_path / "peer-cache")}, stdin="n\n")
        assert (theirs.stdout, theirs.stderr) == (cancelled.stdout, cancelled.stderr)
    # nothing is older than a day, and no image came from oras://
    for flags in (["-D", "1"], ["-T", "oras"]):
        kept = run_cli("cache", "clean", "-f", *flags, env=env)
        assert kept.stdout == "" and "Removing" not in kept.stderr
        assert f"INFO:    No cached files to remove at {tmp_path / 'cache/sif'}\n" in kept.stderr
    assert run_cli("cache", "list", "-T", "sif", env=env).stdout.startswith(one)
    (meta,) = (tmp_path / "cache" / "sif").glob("*/meta.json")
    record = json.loads(meta.read_text())
    record["created"] -= 2 * 86400  # as if converted two days ago
    meta.write_text(json.dumps(record))
    # Apptainer's lines, on stderr, for a dry run too; the image's name is its digest
    removing = (
        f"INFO:    Removing oci-tmp cache entry: {record['digest'][7:]} (oci-archive://{OCI_ARCHIVE})\n"
    )
    dry = run_cli("cache", "clean", "-n", "--days", "1", env=env)
    assert dry.stdout == "User requested a dry run. Not actually deleting any data!\n"
    # the blobs are newer than a day: they stay
    assert dry.stderr == f"INFO:    No cached files to remove at {tmp_path / 'cache/oci'}\n" + removing
    out = run_cli("cache", "clean", "--force", "--days=1", "--type=oci", env=env)
    assert (out.stdout, out.stderr) == ("", removing)
    assert run_cli("cache", "list", "-T", "blob", env=env).stdout == blobs  # -T oci kept the blobs
    out = run_cli("cache", "clean", "-f", "-T", "blob", env=env)
    assert out.stderr.splitlines() == [
        f"INFO:    Removing blob cache entry: {name}" for name in ("blobs", "index.json", "oci-layout")
    ]
    assert run_cli("-q", "cache", "clean", "-f", env=env).stderr == ""
    assert run_cli("cache", "list", "-T", "blob", env=env).stdout.startswith("There are 0 oci blob file(s)")
    bad = run_cli("cache", "clean", "-f", "-T", "oci,nope", env=env, check=False)
    known = "library, oci, shub, blob, net, oras, all"
    assert (bad.returncode, bad.stderr) == (
        2,
        f"FATAL:   --type nope: unknown cache type (possible values: {known})\n",
    )


# -- sif new/add/del/setprim ------------------------------------------------------------------

ADDS = [
    ["--datatype", "7"],
    ["--datatype", "7", "--groupid", "3", "--link", "1", "--alignment", "16", "--filename", "named"],
    ["--datatype", "9", "--sbomformat", "spdx-json"],
    ["--datatype", "11"],
    ["--datatype", "5", "--signentity", "433FE984155206BD962725E20E8713472A879943", "--signhash", "1"],
]


def _untimed(text: str) -> str:
    """``sif info``/``header`` output without its time lines and UUID (they differ between two runs)."""
    return "".join(
        line for line in text.splitlines(True) if " At:" not in line and not line.startswith("ID:")
    )


def test_sif_add_writes_what_apptainer_writes(help_sif: Path, tmp_path: Path) -> None:
    payload = tmp_path / "object.txt"
    payload.write_text("hello\n")
    ours = Path(shutil.copy(help_sif, tmp_path / "ours.sif"))
    for flags in ADDS:
        run_cli("sif", "add", str(ours), str(payload), *flags)
    listing = run_cli("sif", "list", str(ours)).stdout
    rows = [[c.strip() for c in line.split("|")] for line in listing.splitlines()[-5:]]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("2", "NONE", "NONE", "Generic/Raw"),
        ("3", "3", "1", "Generic/Raw"),
        ("4", "NONE", "NONE", "SBOM (spdx-json)"),
        ("5", "NONE", "NONE", "OCI.Blob"),
        ("6", "NONE", "NONE", "Signature (SHA-256)"),
    ]
    spans = [tuple(map(int, r[3].split("-"))) for r in rows]
    assert all(end - start == 6 for start, end in spans)
    assert spans[1][0] % 16 == 0 and spans[2][0] == spans[1][1]  # --alignment 16 applies to that object only
    digest = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"  # of "hello\n"
    assert run_cli("sif", "info", "5", str(ours)).stdout.endswith(f"  Digest:       {digest}\n")
    missing = run_cli("sif", "add", str(ours), str(payload), check=False)
    assert (missing.returncode, missing.stderr.count("\n")) == (
        2,
        1,
    ) and "--datatype is needed" in missing.stderr
    part = run_cli("sif", "add", str(ours), str(payload), "--datatype", "4", check=False)
    assert part.returncode == 2 and "--partfs, --parttype and --partarch must be passed" in part.stderr
    if peer_apptainer():
        theirs = Path(shutil.copy(help_sif, tmp_path / "theirs.sif"))
        for flags in ADDS:
            assert peer("sif", "add", theirs, payload, *flags).returncode == 0
        assert peer("sif", "list", theirs).stdout == peer("sif", "list", ours).stdout == listing
        for obj in ("2", "3", "4", "5", "6"):
            mine = run_cli("sif", "info", obj, str(ours)).stdout
            assert _untimed(peer("sif", "info", obj, theirs).stdout) == _untimed(mine)


def test_sif_new_setprim_and_del_keep_the_image_runnable(help_sif: Path, tmp_path: Path) -> None:
    partition = tmp_path / "rootfs.sqfs"
    with partition.open("wb") as out:  # the raw squashfs of the test image, as `sif dump` writes it
        dump = [sys.executable, "-m", "hpcsif.cli.main", "sif", "dump", "1", str(help_sif)]
        subprocess.run(dump, stdout=out, check=True)
    image = tmp_path / "new.sif"
    run_cli("sif", "new", str(image))
    empty = run_cli("sif", "header", str(image)).stdout
    assert "Launch Script" not in empty and "Primary Architecture" not in empty
    system = ["--datatype", "4", "--parttype", "1", "--partfs", "1", "--partarch", "2"]
    run_cli("sif", "add", str(image), str(partition), *system)
    run_cli("sif", "add", str(image), str(partition), *system)
    run_cli("sif", "setprim", "2", str(image))
    run_cli("sif", "setprim", "1", str(image))  # the former primary becomes a system partition
    listing = run_cli("sif", "list", str(image)).stdout
    assert "|FS (Squashfs/*System/amd64)\n" in listing and "|FS (Squashfs/System/amd64)\n" in listing
    assert "Primary Architecture: amd64" in run_cli("sif", "header", str(image)).stdout
    run_cli("sif", "del", "1", str(image))
    assert "Primary Architecture" not in run_cli("sif", "header", str(image)).stdout
    run_cli("sif", "setprim", "2", str(image))
    assert run_cli("sif", "list", str(image)).stdout.endswith("|FS (Squashfs/*System/amd64)\n")
    assert not list(tmp_path.glob(".new.sif.*"))  # atomic: no temp file left behind
    for bad, why in (("9", "no data object with id 9"), ("0", "no data object with id 0")):
        proc = run_cli("sif", "setprim", bad, str(image), check=False)
        assert proc.returncode == 255 and why in proc.stderr
    if peer_apptainer():
        assert peer("sif", "list", image).stdout == run_cli("sif", "list", str(image)).stdout
        ran = peer("exec", image, "/bin/sh", "-c", "echo runs")
        assert (ran.returncode, ran.stdout) == (0, "runs\n"), ran.stderr
