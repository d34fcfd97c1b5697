"""The trainer learns on real data.

A few dozen LPO steps on 16 real UltraFeedback pairs raise rewards/accuracies and the implicit reward
margins on those lists (tiny Mixtral, real Mistral tokenizer, online reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.train_common import REPO, TINY_CONF, metrics_lines
from tests.torchrun import run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"
STEPS, LISTS, BATCH = 24, 16, 4
EPOCH = LISTS // BATCH

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def strict_pairs(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` UltraFeedback pairs whose chosen score beats the rejected one (no ties)."""
    kept = []
    with open(src) as f:
        for line in f:
            meta = json.loads(line)["metadata"]
            if meta["score_chosen"] > meta["score_rejected"]:
                kept.append(line)
            if len(kept) == n:
                break
    dst.write_text("".join(kept))
    return dst


def test_lpo_raises_accuracy_on_real_lists(shared_data, tmp_path):
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.transforms import LengthLimits

    src = strict_pairs(shared_data / "ultrafeedback_binarized" / "train_clean.jsonl", tmp_path / "uf.jsonl", LISTS)
    prefix = tmp_path / "data" / "uf"
    limits = LengthLimits(max_prompt_length=64, max_length=128, overflow="truncate_response")
    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), limits=limits), log=lambda message: None)
    run = tmp_path / "run"
    run_torchrun(CLI, 1, "train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}",
                 "reference.mode=online", f"train.max_steps={STEPS}", "optim.lr=2e-3", "optim.warmup_steps=2",
                 f"data.global_batch_size={BATCH}", f"data.micro_batch_size={BATCH}", "checkpoint.save_at_end=false",
                 "checkpoint.save_interval=null", "logging.tensorboard=false")
    lines = metrics_lines(run / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))

    def mean(key, part):
        return sum(line[key] for line in part) / len(part)

    first, last = lines[:EPOCH], lines[-EPOCH:]  # the first and the last pass over the same 16 lists
    assert lines[0]["rewards/accuracies"] == 0.0  # policy == reference: every margin is exactly 0
    assert mean("rewards/accuracies", last) >= 0.9 > mean("rewards/accuracies", first)
    assert mean("rewards/margins", last) > 0.5
    assert mean("loss", last) < 0.5 * mean("loss", first)
