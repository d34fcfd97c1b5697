"""tools/te_gpu/parts.py: the split / join of the TE wheel and the built extension for the GPU machine.

Its transfers are limited per command. EXECUTED ON CPU on a small file; the GPU-side script itself has not run.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.dist.train_common import REPO
from tools.te_gpu.parts import join, split


def test_split_into_folders_and_join_back_checked(tmp_path):
    data = os.urandom(3 * 1024 + 100)
    (tmp_path / "lib.whl").write_bytes(data)
    parts = split(tmp_path / "lib.whl", tmp_path / "out", 1024, folders=True)
    assert [p.parent.name for p in parts] == ["part000", "part001", "part002", "part003"]
    assert all(p.stat().st_size <= 1024 for p in parts)
    assert all((p.parent / "lib.whl.manifest.json").is_file() for p in parts)  # each command carries its manifest
    assert join([tmp_path / "out"], tmp_path / "back.whl").read_bytes() == data
    with pytest.raises(ValueError, match="part000 is corrupt"):
        (parts[0]).write_bytes(b"x" + data[1:1024])
        join([tmp_path / "out"], tmp_path / "bad.whl")
    assert not (tmp_path / "bad.whl").exists()
    parts[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"part lib.whl.part000 of lib.whl is missing"):
        join([tmp_path / "out"], tmp_path / "bad.whl")


def test_join_picks_the_named_file_where_several_lie_together(tmp_path):
    for name, size in (("a.so", 2500), ("b.whl", 700)):
        (tmp_path / name).write_bytes(os.urandom(size))
        split(tmp_path / name, tmp_path / "fetched", 1000)
    with pytest.raises(ValueError, match="name one with --name"):
        join([tmp_path / "fetched"], tmp_path / "x")
    for name in ("a.so", "b.whl"):
        assert join([tmp_path / "fetched"], tmp_path / "joined" / name, name).read_bytes() == \
            (tmp_path / name).read_bytes()


def test_te_gpu_script_is_valid_bash_and_prints_its_steps():
    script = REPO / "tools" / "te_gpu" / "te_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "receive N" in proc.stdout and "fetch N" in proc.stdout
