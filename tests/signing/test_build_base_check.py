"""A build from a local SIF checks the base's signatures as Apptainer does: one that does not
verify against the local keyring is built from anyway, with Apptainer's two warnings."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import run_cli

WARNING = "WARNING: Bootstrap image could not be verified, but build will continue."


def test_build_from_a_signed_base_warns_only_when_it_cannot_verify(
    template_sif: Path, tmp_path: Path
) -> None:
    keys = {"HPCSIF_KEYSDIR": str(tmp_path / "keys")}
    nokeys = {"HPCSIF_KEYSDIR": str(tmp_path / "empty")}
    run_cli("key", "newpair", "-N", "signer", "-t", "pgp", "-E", "s@example.org", env=keys)
    signed = Path(shutil.copy(template_sif, tmp_path / "signed.sif"))
    run_cli("sign", str(signed), env=keys)
    deffile = tmp_path / "local.def"
    for through_def in (False, True):  # build OUT BASE.sif, and Bootstrap: localimage
        for env, base, warned in (
            (nokeys, signed, True),
            (keys, signed, False),
            (nokeys, template_sif, False),
        ):
            deffile.write_text(f"Bootstrap: localimage\nFrom: {base}\n")
            out = tmp_path / "out.sif"
            proc = run_cli("build", "-F", str(out), str(deffile if through_def else base), env=env)
            assert proc.returncode == 0 and out.is_file(), proc.stderr
            lines = proc.stderr.splitlines()
            assert (WARNING in lines) == warned, (through_def, base, proc.stderr)
            if warned:  # after "Verifying bootstrap image", the reason first, as Apptainer orders them
                at = lines.index(WARNING)
                assert lines[at - 1].startswith("WARNING: integrity: signature object "), proc.stderr
                assert "signature made by unknown entity" in lines[at - 1]
                assert lines[at - 2].startswith("INFO:    Verifying bootstrap image "), proc.stderr
