"""The train / ref-logps commands (cheap paths: no megatron), SLURM env mapping, metrics JSONL, checkpoint marker."""

from __future__ import annotations

import json
import sys

import pytest

from nemo_lpo.cli import main
from nemo_lpo.io import latest_checkpoint
from nemo_lpo.train.cli import setup_distributed_env
from nemo_lpo.train.metrics import MetricsLogger
from tests.dist.train_common import TINY_CONF


def test_commands_are_registered(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "key=value overrides" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ref-logps", "--help"])
    assert "--checkpoint" in capsys.readouterr().out


def test_cli_module_is_cheap_to_import():
    import subprocess

    code = "import sys, nemo_lpo.train.cli; print('megatron' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("command", ["train", "ref-logps"])
def test_config_error_exits_2_naming_the_key(command, capsys):
    assert main([command, str(TINY_CONF), "optim.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err


def test_slurm_env_mapping():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node7"}
    setup_distributed_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "8", "1", "node7", "29500")
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5"}
    assert setup_distributed_env(dict(torchrun)) == torchrun  # torchrun inside an allocation wins


def test_metrics_jsonl_and_truncate(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=3, rank=0, tensorboard=False)
    rec = {"loss": 0.7, "rewards/accuracies": 0.5, "grad_norm": 1.0, "lr": 1e-4, "tokens_per_s": 10.0,
           "step_time": 0.1, "bad": float("nan")}
    for step in (1, 2, 3):
        logger.log(step, rec)
    assert "step 3/3 | loss 0.7000 | acc 0.500" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[0]["bad"] is None
    logger.truncate_after(1)  # what a resume from step 1 does
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    MetricsLogger(tmp_path / "other", total_steps=3, rank=1).log(1, rec)  # non-zero ranks write nothing
    assert not (tmp_path / "other").exists()


def test_latest_marker(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_0000002").mkdir()
    (tmp_path / "latest").write_text("step_0000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000002"
    (tmp_path / "latest").write_text("step_0000009\n")
    with pytest.raises(FileNotFoundError, match="step_0000009"):
        latest_checkpoint(tmp_path)
