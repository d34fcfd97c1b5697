"""Shared-prompt packing inside the trainer's step, and under TP=2 + sequence parallel (torchrun, gloo).

This file is also the torchrun worker of the distributed test: ``python -m torch.distributed.run
--nproc-per-node=2 tests/test_shared_prompt_train.py`` prints one ``RESULT {json}`` line from rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAD = 0


def _items(seed: int, ks, vocab: int = 32000) -> list[dict]:
    """Ragged lists with variable prompt lengths (as tests/test_shared_prompt.py, self-contained for torchrun)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    items = []
    for b, k in enumerate(ks):
        prompt = rng.integers(3, vocab, rng.integers(1, 12)).astype(np.int32)
        responses = [rng.integers(3, vocab, rng.integers(1, 7)).astype(np.int32) for _ in range(k)]
        items.append({"prompt_ids": prompt, "response_ids": responses,
                      "rewards": rng.random(k).astype(np.float32), "ref_logps": None, "index": b})
    return items


def _cfg(*overrides: str):
    from nemo_lpo.config import load_config

    return load_config(REPO / "conf" / "tiny_cpu.yaml",
                       ["reference.mode=online", "optim.lr=1e-3", "optim.warmup_steps=0", "logging.tensorboard=false",
                        *overrides])


def _step(lpo, microbatches):
    from nemo_lpo.train.optimizer import build_optimizer
    from nemo_lpo.train.step import train_step

    optimizer, scheduler = build_optimizer(lpo.cfg, lpo.model, 10)
    return train_step(lpo, optimizer, scheduler, microbatches)


@pytest.fixture()
def megatron_single():
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=1234)
    yield
    destroy_parallel()


def test_train_step_matches_unpacked(megatron_single):
    """One optimizer step (online reference, 2 micro-batches, LPO loss): same loss, metrics and grad norm.

    Without the MoE router's load-balancing loss: its statistics count every token routed, and a shared
    prompt is routed once instead of K times, so with the aux loss on the gradients differ slightly (by
    design; docs/performance.md).
    """
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.train.lpo_model import LPOModel

    cfg = _cfg("model.moe_aux_loss_coeff=0.0")
    plain = LPOModel(cfg)
    shared = LPOModel(cfg, layout=SharedPromptLayout())
    shared.module.load_state_dict(plain.module.state_dict())
    shared.reference.load_state_dict(plain.reference.state_dict())
    chunks = [_items(10, (4, 3)), _items(11, (2, 4))]
    results = [_step(plain, [ListwiseCollator(PAD)(c) for c in chunks]),
               _step(shared, [collate_shared_prompt(c, PAD) for c in chunks])]
    a, b = (r.metrics for r in results)
    assert a.keys() == b.keys() and a["lists/valid"] == b["lists/valid"] == 4
    for name in a:
        assert abs(a[name] - b[name]) < 1e-5 * max(1.0, abs(a[name])), (name, a[name], b[name])
    assert abs(results[0].grad_norm - results[1].grad_norm) < 1e-5 * results[0].grad_norm
    assert results[1].tokens < results[0].tokens  # each prompt computed once
    after = [dict(m.module.named_parameters()) for m in (plain, shared)]
    worst = max((after[0][n] - after[1][n]).abs().max().item() for n in after[0])
    assert worst < 1e-5  # the same update


def test_trainer_runs_shared_prompt_batches(megatron_single, tmp_path):
    """``data.shared_prompt=true`` makes the Trainer collate and compute shared-prompt rows."""
    from nemo_lpo.batch.layouts import SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import SharedPromptCollator
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.train.loop import Trainer

    src = tmp_path / "lists.jsonl"
    lines = (REPO / "nemo_lpo" / "demo" / "data" / "train.jsonl").read_text().splitlines()[:8]
    src.write_text("\n".join(lines) + "\n")
    pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / "data" / "lists")), log=lambda m: None)
    cfg = _cfg("model.moe_aux_loss_coeff=0.0", f"data.train_prefix={tmp_path / 'data' / 'lists'}",
               f"logging.run_dir={tmp_path / 'run'}", "data.global_batch_size=4", "data.micro_batch_size=2",
               "data.shuffle=false", "checkpoint.save_at_end=false", "checkpoint.resume=false", "train.max_steps=1")
    plain = Trainer(cfg).run(max_steps=1)
    trainer = Trainer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shared_prompt=True)))
    assert isinstance(trainer.lpo.layout, SharedPromptLayout) and trainer.feeder.layout is trainer.lpo.layout
    assert isinstance(trainer.feeder.collator, SharedPromptCollator)
    shared = trainer.run(max_steps=1)
    # step 1: policy == reference, so the loss is its closed form for these rewards (exactness of the
    # log-probs themselves is test_train_step_matches_unpacked's); this checks batching, counts and reduction
    assert abs(shared["loss"] - plain["loss"]) < 1e-5 and shared["lists/valid"] == plain["lists/valid"] == 4
    assert shared["tokens"] < plain["tokens"]  # the prompts were computed once


def worker() -> None:
    """Run under torchrun: tiny-mixtral and tiny-mistral at TP=2 + SP, shared-prompt vs unpacked log-probs."""
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import SharedPromptLayout, sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
    from nemo_lpo.model.presets import PRESETS, transformer_config

    initialize_parallel(tp=2, seed=1234)
    result = {}
    items = _items(20, (3, 1, 4, 2))
    for name in ("tiny-mixtral", "tiny-mistral"):
        preset = PRESETS[name]
        model = build_gpt_model(preset, transformer_config(preset, tp=2, sequence_parallel=True)).eval()
        padded = ListwiseCollator(PAD, pad_to_multiple_of=2)(items)
        diffs = {}
        for packed in (False, True):
            batch = collate_shared_prompt(items, PAD, pad_to_multiple_of=2, packed=packed)
            with torch.no_grad():
                expected = sequence_logps(sequence_layout_of(padded).token_logps(model, padded), padded)
                got = SharedPromptLayout().logps(model, batch)
            diffs["packed" if packed else "rows"] = (got - expected).abs().max().item()
        result[name] = diffs
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    destroy_parallel()


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_sequence_parallel_matches_unpacked():
    from tests.torchrun import run_torchrun

    out = run_torchrun(Path(__file__), 2, timeout=600)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    print(result)
    assert set(result) == {"tiny-mixtral", "tiny-mistral"}
    for diffs in result.values():
        assert max(diffs.values()) < 1e-5, result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker()
