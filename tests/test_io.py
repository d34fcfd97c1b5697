"""The one atomic-write helper and the checkpoint-folder lookups (``nemo_lpo.io``)."""

from __future__ import annotations

import os
import stat

import pytest

from nemo_lpo.io import LATEST, SIDECAR_NAME, atomic_path, atomic_write, checkpoint_sidecar, resolve_checkpoint


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "sub" / "out.json", b"{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "out.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.jsonl"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_checkpoint_folder_lookups(tmp_path):
    run = tmp_path / "checkpoints"
    (run / "step_0000002").mkdir(parents=True)
    assert resolve_checkpoint(run) == run and checkpoint_sidecar(run) is None  # no marker yet: the folder itself
    atomic_write(run / LATEST, "step_0000002\n")
    assert resolve_checkpoint(run) == run / "step_0000002"
    atomic_write(run / "step_0000002" / SIDECAR_NAME, "{}")
    assert checkpoint_sidecar(run) == run / "step_0000002" / SIDECAR_NAME
    atomic_write(run / LATEST, "step_0000004\n")
    with pytest.raises(FileNotFoundError, match="names step_0000004, which does not exist"):
        resolve_checkpoint(run)
