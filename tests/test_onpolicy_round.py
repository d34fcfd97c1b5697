"""A small on-policy round on CPU (the demonstration at a tiny size): every step's artefact, reuse, pack input."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from nemo_lpo.config import ConfigError
from nemo_lpo.data import layout
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.demo.onpolicy import OnPolicyDemoConfig, iterate_config, run_onpolicy_demo, target_length
from nemo_lpo.onpolicy import shards
from nemo_lpo.onpolicy.iterate import load_iterate_config, round_paths, run_rounds


def test_target_length_reward():
    assert target_length("", "x" * 24) == 1.0 and target_length("", "") == 0.5 == target_length("", "x" * 48)
    assert target_length("", "x" * 12) == target_length("", "x" * 36) == round(24 / 36, 4)


def test_small_round_runs_and_its_artefacts_feed_pack(tmp_path):
    cfg = OnPolicyDemoConfig(out_dir=tmp_path / "op", rounds=1, prompts=4, eval_prompts=2, k=2, max_new_tokens=4,
                             sft_steps=2, steps=2)
    summary = run_onpolicy_demo(cfg)
    out = tmp_path / "op"
    start = Path(summary["config"]["start_checkpoint"])
    assert start.parent == out / "sft" / "checkpoints"  # the start policy: the SFT warm start's checkpoint
    icfg = iterate_config(cfg, out, start, out / "prompts_train.jsonl", out / "prompts_heldout.jsonl")
    first, final = round_paths(icfg, 0), round_paths(icfg, 1)
    # every step's output of round 0, and the final policy's samples
    assert layout.manifest_path(first.data_prefix).is_file() and layout.ref_meta_path(first.data_prefix).is_file()
    assert (first.run_dir / "train.done").is_file() and (first.hf / "config.json").is_file()
    assert final.sampler_hf == first.hf and final.scored.is_file() and final.eval_file("scored").is_file()
    generated_meta = json.loads(shards.meta_path(final.generated).read_text())
    assert generated_meta["model"] == str(first.hf)  # round 1 samples from round 0's trained, exported model
    ref_meta = json.loads(layout.ref_meta_path(first.data_prefix).read_text())
    assert ref_meta["checkpoint"] == str(start)  # reference: the start model
    scored_meta = json.loads(shards.meta_path(first.scored).read_text())
    assert scored_meta["reward"]["function"].endswith(":target_length") and scored_meta["sampling"]["k"] == 2
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["mean_reward"]) and math.isfinite(r["eval_mean_reward"]) for r in rows)
    assert (out / "onpolicy.png").stat().st_size > 0 and "| start |" in (out / "summary.md").read_text()

    # the scored lists are the listwise JSONL pack reads as they are (format detected, nothing skipped)
    manifest = pack(PackConfig(inputs=[str(first.scored)], output_prefix=str(tmp_path / "again" / "train")),
                    log=lambda m: None)
    assert manifest["counts"]["lists_written"] == 4 and manifest["counts"]["lists_skipped"] == 0

    # a second run reuses every step's output (nothing rewritten)
    outputs = [first.generated, first.scored, layout.manifest_path(first.data_prefix), first.hf / "config.json",
               final.scored]
    before = [os.stat(p).st_mtime_ns for p in outputs]
    run_rounds(icfg)
    assert [os.stat(p).st_mtime_ns for p in outputs] == before


def test_iterate_config_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "it.yaml"
    path.write_text("out_dir: runs/x\nprompts: p.jsonl\nstart_checkpoint: ckpt\nsampling: {k: 8, seed: 3}\n"
                    "reward_fn: m:f\nreward_transform: {kind: rank}\ntrain_overrides: [train.max_steps=5]\n")
    cfg = load_iterate_config(str(path), ["sampling.temperature=0.7", "rounds=2"])
    assert (cfg.sampling.k, cfg.sampling.seed, cfg.sampling.temperature, cfg.rounds) == (8, 3, 0.7, 2)
    assert cfg.reward_transform.kind == "rank" and cfg.train_overrides == ["train.max_steps=5"]
    with pytest.raises(ConfigError, match="unknown key 'sampling.topp'"):
        load_iterate_config(str(path), ["sampling.topp=0.9"])
    with pytest.raises(ConfigError, match="'sampler'"):
        load_iterate_config(str(path), ["reference=policy"])


def test_the_example_iterate_config_loads():
    cfg = load_iterate_config(str(Path(__file__).resolve().parents[1] / "recipes" / "conf" / "iterate_mistral_7b.yaml"))
    assert cfg.rounds == 3 and cfg.sampling.k == 8 and cfg.backend == "vllm" and cfg.reward_model


def test_slurm_chain_submits_one_job_per_step_each_after_the_previous(tmp_path):
    """recipes/iterate_lpo.sbatch's submission mode, against a stand-in ``sbatch`` that logs its arguments."""
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\nwc -l < {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake.parent}:{env['PATH']}", NEMO_LPO_ITERATE_CONFIG="c.yaml", NEMO_LPO_ROUNDS="2")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "iterate_lpo.sbatch"
    subprocess.run(["bash", str(recipe)], env=env, check=True, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    steps = ["generate", "score", "pack", "ref-logps", "train", "export"]
    expected = [(r, s) for r in range(2) for s in steps] + [(2, "generate"), (2, "score")]
    assert len(calls) == len(expected)
    for n, (call, (r, step)) in enumerate(zip(calls, expected, strict=True), start=1):
        assert f"NEMO_LPO_ITERATE_ROUND={r},NEMO_LPO_ITERATE_STEP={step}" in call
        assert (f"--dependency=afterok:{n - 1}" in call) == (n > 1)
        assert ("--ntasks=1" in call) == (step in ("pack", "export"))


def test_report_section_says_whether_the_reward_rises(tmp_path):
    from nemo_lpo.demo.onpolicy import onpolicy_section

    def summary(held):
        rows = [{"round": r, "policy": f"p{r}", "mean_reward": 0.5, "eval_mean_reward": v} for r, v in enumerate(held)]
        return {"demo": {"rounds": 2, "k": 4, "prompts": 64, "eval_prompts": 32, "steps": 48}, "rounds": rows,
                "seconds": 10.0, "plot": str(tmp_path / "onpolicy.png")}

    rising = "\n".join(onpolicy_section(summary([0.3, 0.4, 0.5]), tmp_path))
    assert "| p2 | 0.5000 | 0.5000 |" in rising and "rises round after round" in rising
    assert "does not rise" in "\n".join(onpolicy_section(summary([0.3, 0.4, 0.35]), tmp_path))
