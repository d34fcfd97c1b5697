"""The on-policy loop on CPU: the tiny Mixtral learns a rule-based reward from its own samples, round after round.

``nemo-lpo iterate`` with the embedded default's prompts: round 0 samples K = 4 responses per prompt from the
start, :func:`target_length` scores them, LPO-abs trains on the lists, the trained model is exported
and samples the next round. Every policy (the start and the one after each round) is also sampled on held-out
prompts from the same seed; the mean reward of those fresh samples, round after round, is the demonstration's
table and plot (``onpolicy.png``, ``summary.md``).

The start: the seeded tiny Mixtral after a short SFT warm start on the embedded default's best responses (the
``sft`` loss), so that it writes short answers and ends them with EOS, as an instruct model does. (A randomly
initialised model never samples EOS from a 32000-word vocabulary and its word pieces carry no learnable
structure: measured, its mean reward of a length target barely moved in a round.)

The reward: a response of ``TARGET_CHARS`` characters scores 1, others ``T / (T + |length - T|)``. The warm start
answers in a few characters (numbers, short words), so reaching the target means writing more before EOS, which
the model learns from its own samples within minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from nemo_lpo.data.transforms import RewardTransform
from nemo_lpo.demo import tasks
from nemo_lpo.demo.config import DemoConfig
from nemo_lpo.demo.pipeline import pack_split, save_start_weights
from nemo_lpo.demo.pipeline import train_config as pipeline_train_config
from nemo_lpo.demo.plots import plot_lines
from nemo_lpo.io import atomic_write, resolve_checkpoint
from nemo_lpo.onpolicy.engines import SamplingSettings
from nemo_lpo.onpolicy.iterate import IterateConfig, run_rounds
from nemo_lpo.train.loop import train

TARGET_CHARS = 24


def target_length(prompt: str, response: str) -> float:
    """Reward: 1 at ``TARGET_CHARS`` characters, ``T / (T + |length - T|)`` otherwise (1/2 at 0 or at 2T)."""
    return round(TARGET_CHARS / (TARGET_CHARS + abs(len(response) - TARGET_CHARS)), 4)


@dataclasses.dataclass
class OnPolicyDemoConfig:
    """Knobs of the on-policy demonstration (defaults: the measured CPU setting, docs/demo.md).

    Attributes:
        out_dir: output folder (``iterate``'s run folder; finished steps are reused on a re-run).
        rounds: rounds of generate -> score -> pack -> ref-logps -> train -> export.
        prompts: train prompts sampled each round (the first N of the embedded train split).
        eval_prompts: held-out prompts every policy is sampled on (the first N of the held-out split).
        k: responses per prompt.
        max_new_tokens: response length limit (tokens).
        sft_steps: steps of the SFT warm start (the start policy) on the embedded train split's best responses.
        sft_lr: peak learning rate of the warm start.
        steps: optimizer steps per round.
        lr: peak learning rate (cosine decay per round).
        seed: seed of the start weights and of sampling.
    """

    out_dir: Path = Path("outputs/onpolicy")
    rounds: int = 3
    prompts: int = 64
    eval_prompts: int = 32
    k: int = 4
    max_new_tokens: int = 16
    sft_steps: int = 60
    sft_lr: float = 1e-3
    steps: int = 48
    lr: float = 2e-3
    seed: int = 1234


def write_prompt_files(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """The first prompts of the embedded train / held-out splits as prompts JSONL files."""
    paths = []
    for split, n in (("train", n_train), ("heldout", n_eval)):
        lines = [json.loads(line) for line in (tasks.DATA_DIR / f"{split}.jsonl").read_text().splitlines()[:n]]
        path = out / f"prompts_{split}.jsonl"
        atomic_write(path, "".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in lines))
        paths.append(path)
    return paths[0], paths[1]


def iterate_config(cfg: OnPolicyDemoConfig, out: Path, start: Path, prompts: Path, held: Path) -> IterateConfig:
    """The ``nemo-lpo iterate`` config of the demonstration."""
    batch = min(8, cfg.prompts)
    return IterateConfig(
        out_dir=str(out / "rounds"), prompts=str(prompts), eval_prompts=str(held) if cfg.eval_prompts else None,
        start_checkpoint=str(start),
        rounds=cfg.rounds, reward_fn=f"{__name__}:target_length", preset="tiny-mixtral",
        reward_transform=RewardTransform(kind="rank"),
        sampling=SamplingSettings(k=cfg.k, temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                  seed=cfg.seed, prompts_per_batch=16),
        train_overrides=["model.preset=tiny-mixtral", f"data.global_batch_size={batch}",
                         f"data.micro_batch_size={batch}", f"data.seed={cfg.seed}", "loss.type=lpo_abs",
                         "loss.beta=0.1", f"optim.lr={cfg.lr}", f"optim.min_lr={cfg.lr / 10}", "optim.warmup_steps=2",
                         "optim.decay_style=cosine", f"train.max_steps={cfg.steps}", f"train.seed={cfg.seed}",
                         "checkpoint.save_interval=null", "checkpoint.keep_last=1", "logging.tensorboard=false",
                         "logging.log_interval=4"])


def warm_start(cfg: OnPolicyDemoConfig, out: Path) -> Path:
    """The start policy: the seeded tiny Mixtral after ``cfg.sft_steps`` of SFT (reused when already trained)."""
    run_dir = out / "sft"
    if not (run_dir / "train.done").is_file():
        if not (out / "init" / "metadata.json").is_file():
            save_start_weights(out / "init", cfg.seed)
        prefix = out / "sft_data" / "train"
        pack_split(tasks.DATA_DIR / "train.jsonl", prefix)
        demo = DemoConfig(out_dir=out, seed=cfg.seed, lr=cfg.sft_lr)
        shutil.rmtree(run_dir, ignore_errors=True)
        train(pipeline_train_config(demo, prefix, out / "init", run_dir, steps=cfg.sft_steps, loss="sft",
                                    extra=("reference.mode=online", "logging.log_interval=10")))
        atomic_write(run_dir / "train.done", "done\n")
    return resolve_checkpoint(run_dir / "checkpoints")


def summary_table(rows: list[dict]) -> list[str]:
    """The markdown table of mean rewards per policy."""
    lines = ["| policy | mean reward, train prompts (its round's samples) | mean reward, held-out prompts |",
             "|---|---:|---:|"]
    for row in rows:
        held = "—" if row["eval_mean_reward"] is None else f"{row['eval_mean_reward']:.4f}"
        lines.append(f"| {row['policy']} | {row['mean_reward']:.4f} | {held} |")
    return lines


def run_onpolicy_demo(cfg: OnPolicyDemoConfig) -> dict:
    """Run the demonstration; returns ``iterate``'s summary with timings (also ``summary.json`` / ``summary.md``)."""
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prompts, held = write_prompt_files(out, cfg.prompts, cfg.eval_prompts)
    start = warm_start(cfg, out)
    summary = run_rounds(iterate_config(cfg, out, start, prompts, held))
    rows = summary["rounds"]
    rounds = [row["round"] for row in rows]
    lines = {"train prompts": (rounds, [r["mean_reward"] for r in rows])}
    if cfg.eval_prompts:
        lines["held-out prompts"] = (rounds, [r["eval_mean_reward"] for r in rows])
    plot = plot_lines(lines, out / "onpolicy.png", "Mean reward of fresh samples (target length)",
                      "mean reward", xlabel="policy (0 = start, r = after r rounds)", xticks=rounds)
    summary.update(seconds=round(time.perf_counter() - t0, 1), plot=str(plot), demo=dataclasses.asdict(cfg))
    summary["demo"]["out_dir"] = str(out)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write(out / "summary.md", "\n".join(summary_table(rows)) + "\n")
    return summary


def onpolicy_section(summary: dict, report_dir: Path) -> list[str]:
    """The report's section on the on-policy rounds (``nemo-lpo reproduce``)."""
    demo, rows = summary["demo"], summary["rounds"]
    plot = os.path.relpath(summary["plot"], report_dir)
    rising = all(b["eval_mean_reward"] > a["eval_mean_reward"] for a, b in zip(rows, rows[1:], strict=False))
    return [f"## On-policy rounds ({demo['rounds']} rounds, K = {demo['k']}, {summary['seconds']:.0f} s)", "",
            f"`nemo-lpo iterate`: each round samples K = {demo['k']} responses to {demo['prompts']} prompts from "
            f"its policy (HF transformers on the exported model), scores them with a rule-based reward (1 at "
            f"{TARGET_CHARS} characters, falling linearly), packs them, stores the start model's log-probs and "
            f"trains LPO-abs for {demo['steps']} steps from the round's policy; the next round samples from the "
            f"exported result. Every policy is also sampled on {demo['eval_prompts']} held-out prompts (same seed).",
            "", *summary_table(rows), "", f"![mean reward per round]({plot})", "",
            "The held-out mean reward " + ("rises round after round." if rising else
                                           "does not rise at every round in this run."), ""]
