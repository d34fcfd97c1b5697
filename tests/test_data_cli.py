"""``nemo-lpo pack`` / ``nemo-lpo inspect`` end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from nemo_lpo.cli import main
from nemo_lpo.data import ListwiseDataset

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parents[1]


def test_pack_subprocess_two_workers_then_inspect(tmp_path, capsys):
    prefix = tmp_path / "cli" / "uf"
    cmd = [sys.executable, "-m", "nemo_lpo.cli", "pack", "--input", str(FIXTURES / "ultrafeedback_raw.jsonl"),
           str(FIXTURES / "h4_binarized.jsonl"), "--tokenizer", "mistral", "--output-prefix", str(prefix),
           "--workers", "2", "--reward-transform", "affine", "--reward-scale", "0.1", "--max-length", "64"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert "detected format ultrafeedback (" in done.stderr and "detected format ultrafeedback_binarized" in done.stderr
    assert "wrote 6 lists (6 of 6 read)" in done.stderr
    ds = ListwiseDataset(prefix)
    np.testing.assert_array_equal(ds[0]["rewards"], np.float32([0.85, 0.3, 0.7, 0.2]))
    assert main(["inspect", str(prefix), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 lists" in out and "K=4: 1" in out and "prompt + response tokens:" in out
    assert "[INST] Name three primary colours. [/INST]" in out and "Red, yellow and blue.</s>" in out


def test_cli_errors_exit_non_zero(tmp_path, capsys):
    src = str(FIXTURES / "nemo_dpo.jsonl")
    assert main(["pack", "--input", src, "--output-prefix", str(tmp_path / "x"), "--pairs", "all",
                 "--max-k", "2"]) == 1
    assert "exclusive" in capsys.readouterr().err
    assert main(["pack", "--input", src, "--output-prefix", str(tmp_path / "x"), "--tokenizer",
                 str(tmp_path / "no-such-dir")]) == 1
    assert "not 'mistral'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "x")]) == 1
    assert "no manifest" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
