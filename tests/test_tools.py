"""tools/: the Megatron-LM-style entry points are thin, and do exactly what ``nemo-lpo pack`` / ``convert`` do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_convert_roundtrip import hf_tensors, make_hf_model

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.parametrize(("script", "expected"), [("tools/preprocess_data.py", "--output-prefix"),
                                                 ("tools/checkpoint/convert.py", "--target-expert-parallel-size")])
def test_help(script, expected):
    done = _run(str(REPO / script), "--help")
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_preprocess_data_writes_what_pack_writes(tmp_path):
    """Megatron-LM's --tokenizer-model spelling, run from another folder; the same bytes as ``nemo-lpo pack``."""
    src = str(FIXTURES / "ultrafeedback_raw.jsonl")
    tool = _run(str(REPO / "tools" / "preprocess_data.py"), "--input", src, "--output-prefix", str(tmp_path / "tool"),
                "--tokenizer-model", "mistral", "--workers", "1", "--no-progress", cwd=tmp_path)
    assert tool.returncode == 0, tool.stderr
    pack = _run("-m", "nemo_lpo.cli", "pack", "--input", src, "--output-prefix", str(tmp_path / "pack"),
                "--tokenizer", "mistral", "--no-progress")
    assert pack.returncode == 0, pack.stderr
    written = sorted(p.name.removeprefix("tool") for p in tmp_path.glob("tool*") if p.suffix in (".bin", ".idx"))
    assert written and written == sorted(p.name.removeprefix("pack") for p in tmp_path.glob("pack*")
                                         if p.suffix in (".bin", ".idx"))
    for name in written:
        assert (tmp_path / f"tool{name}").read_bytes() == (tmp_path / f"pack{name}").read_bytes(), name


def test_checkpoint_convert_round_trip(tmp_path):
    """HF -> mcore -> HF through Megatron-LM's flags gives the HF tensors back bit for bit."""
    hf = make_hf_model(tmp_path / "hf", "MistralForCausalLM")
    tool = str(REPO / "tools" / "checkpoint" / "convert.py")
    to_mcore = _run(tool, "--model-type", "GPT", "--loader", "llama_mistral", "--saver", "mcore", "--load-dir",
                    str(hf), "--save-dir", str(tmp_path / "ckpt"), "--target-tensor-parallel-size", "2")
    assert to_mcore.returncode == 0, to_mcore.stderr
    assert "validated for tp=2 pp=1 ep=1" in to_mcore.stdout
    back = _run(tool, "--loader", "mcore", "--saver", "hf", "--load-dir", str(tmp_path / "ckpt"), "--save-dir",
                str(tmp_path / "out"))
    assert back.returncode == 0, back.stderr
    original, exported = hf_tensors(hf), hf_tensors(tmp_path / "out")
    assert list(original) == list(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)
    refused = _run(tool, "--loader", "mcore", "--saver", "mcore", "--load-dir", "a", "--save-dir", "b")
    assert refused.returncode == 2 and "HF <-> mcore only" in refused.stderr
