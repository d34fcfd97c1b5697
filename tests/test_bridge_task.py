"""nemo_lpo.bridge without Megatron-Bridge: the LPOTask loss contract, the CLI's exit 2, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from nemo_lpo.batch.collate import ListwiseCollator
from nemo_lpo.bridge import INSTALL_COMMAND, NEMO_IMAGE, bridge_available
from nemo_lpo.bridge.task import LPOTask


def item(prompt, responses, rewards, ref):
    return {"prompt_ids": np.array(prompt, dtype=np.int32),
            "response_ids": [np.array(r, dtype=np.int32) for r in responses],
            "rewards": np.array(rewards, dtype=np.float32), "ref_logps": np.array(ref, dtype=np.float32),
            "index": 0}


def test_loss_func_returns_sum_valid_count_and_pairs():
    # list 0: two responses (valid); list 1: one response (not a valid list: no comparison)
    batch = ListwiseCollator(pad_id=0)([item([5, 6], [[7, 2], [8, 9, 2]], [1.0, 0.0], [-1.0, -2.0]),
                                        item([5], [[7, 2]], [1.0], [-0.5])])
    # the last stage's output is -log p(label) per token: 0.5 nats on every token
    output = torch.full(batch["tokens"].shape, 0.5)
    task = LPOTask(loss_type="dpo", beta=0.1)
    loss, count, pairs = task.loss_func(batch, output)
    # hand-worked: response log-probs -1.0 (2 tokens) and -1.5 (3 tokens); rewards β(π-μ) = 0.0 and 0.05;
    # DPO on (chosen 0, rejected 1): -log σ(0.0 - 0.05)
    want = -torch.nn.functional.logsigmoid(torch.tensor(-0.05)).item()
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert count.dtype == torch.int and count.item() == 1
    assert pairs["loss"].tolist() == pytest.approx([want, 1.0], abs=1e-6)
    assert pairs["rewards/margins"].tolist() == pytest.approx([-0.05, 1.0], abs=1e-6)
    assert pairs["logps/chosen"].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)
    assert "lists/valid" not in pairs and set(pairs) == set(task.metric_names)


def test_forward_step_refuses_a_batch_without_reference():
    batch = ListwiseCollator(pad_id=0)([item([5], [[7, 2], [8, 2]], [1.0, 0.0], [-1.0, -2.0])])
    batch.pop("ref_logps")
    with pytest.raises(ValueError, match="precomputed reference"):
        LPOTask()(iter([batch]), model=None)


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="loss_type: unknown loss 'lpoo'"):
        LPOTask(loss_type="lpoo")


@pytest.mark.skipif(bridge_available(), reason="Megatron-Bridge is installed here")
def test_bridge_train_without_megatron_bridge_exits_2():
    proc = subprocess.run([sys.executable, "-c", "from nemo_lpo.cli import main; raise SystemExit(main())",
                           "bridge-train", "mixtral-8x7b", "data.train_prefix=x"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert NEMO_IMAGE in proc.stderr and INSTALL_COMMAND in proc.stderr


def test_nemo_lpo_and_its_cli_do_not_import_megatron_bridge():
    code = ("import sys, nemo_lpo, nemo_lpo.bridge, nemo_lpo.bridge.task; from nemo_lpo.cli import build_parser; "
            "build_parser(); print(sorted(m for m in sys.modules if m.startswith('megatron.bridge')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
