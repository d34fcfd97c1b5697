"""``nemo-lpo iterate``: on-policy rounds, generate -> score -> pack -> ref-logps -> train -> export, N times.

Round ``r`` samples from its policy (round 0: ``start_checkpoint``; round r > 0: round r - 1's trained model),
scores the samples, packs them, stores the reference log-probs beside them (the reference is the start model, or
with ``reference="sampler"`` the round's own policy), trains LPO from the round's policy and exports the result
to HF format: the next round's sampler. After the last round the final policy is sampled once more, so the
summary has the mean reward of fresh samples of every policy, start to end.

Every step writes under ``<out_dir>/round_<r>/`` and is skipped when its output is complete (each writer is
atomic or marks completion last), so a killed ``iterate`` resumes at the step it was in; a killed training run
resumes from its last checkpoint. ``--round R --step STEP`` runs one step alone: ``recipes/iterate_lpo.sbatch``
chains them as Slurm jobs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from nemo_lpo.config import ConfigError, load_config
from nemo_lpo.config.loader import _load_yaml, from_dict
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from nemo_lpo.data import layout
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.transforms import RewardTransform
from nemo_lpo.io import atomic_write, latest_checkpoint
from nemo_lpo.model.parallel import destroy_parallel
from nemo_lpo.onpolicy import shards
from nemo_lpo.onpolicy.engines import SamplingSettings
from nemo_lpo.onpolicy.generate import GenerateConfig, generate
from nemo_lpo.onpolicy.score import ScoreConfig, score
from nemo_lpo.train.loop import init_parallel, train
from nemo_lpo.train.reference import write_reference

STEPS = ("generate", "score", "pack", "ref-logps", "train", "export")
REFERENCES = ("start", "sampler")


@dataclasses.dataclass
class IterateConfig:
    """An on-policy run (YAML; ``key=value`` overrides on the command line).

    Attributes:
        out_dir: the run folder (``round_<r>/`` per round, ``summary.json``).
        prompts: prompts JSONL (or any dataset ``pack`` reads) sampled every round.
        start_checkpoint: the first policy, a megatron dist checkpoint (``convert hf-to-mcore`` or a trained one).
        rounds: rounds of training.
        eval_prompts: optional held-out prompts; every policy is also sampled on them (seed fixed across rounds).
        sampling: K, temperature, top-p, max new tokens, base seed (round r samples from seed + 1000 r).
        reward_fn: ``module:function`` reward (``score --reward-fn``).
        reward_model: HF reward-model folder (``score --reward-model``).
        reference: ``start`` (every round against the start model) or ``sampler`` (against the round's policy).
        train_config: trainer YAML (``conf/...``); None: defaults plus ``train_overrides``.
        train_overrides: trainer ``key=value`` overrides (model preset, loss, steps, lr, ...).
        preset: model preset for exporting checkpoints that store no description (``convert --preset``).
        hf_config_from: HF folder whose config describes the model in exports (``convert --hf-config-from``).
        hf_tokenizer: folder whose tokenizer files are copied into exports (``convert --tokenizer``).
        tokenizer: ``mistral`` or a local HF tokenizer folder (prompts in ``generate`` and lists in ``pack``).
        chat_template: ``pack --chat-template`` for an HF tokenizer.
        backend: ``generate --backend``.
        pack_skip_invalid: skip lists ``pack`` cannot use (counted in its manifest) instead of stopping.
        reward_transform: ``pack --reward-transform`` (e.g. ``kind: rank``: 0 = worst ... K-1 = best within each
            list, so LPO's pair weights |r_i² - r_j²| do not depend on the reward's scale).
    """

    out_dir: str
    prompts: str
    start_checkpoint: str
    rounds: int = 3
    eval_prompts: str | None = None
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    reward_fn: str | None = None
    reward_model: str | None = None
    reference: str = dataclasses.field(default="start", metadata={"choices": REFERENCES})
    train_config: str | None = None
    train_overrides: list = dataclasses.field(default_factory=list)
    preset: str | None = None
    hf_config_from: str | None = None
    hf_tokenizer: str | None = None
    tokenizer: str = "mistral"
    chat_template: str | None = None
    backend: str = "hf"
    pack_skip_invalid: bool = True
    reward_transform: RewardTransform = dataclasses.field(default_factory=RewardTransform)


def load_iterate_config(path: str, overrides: list[str] = ()) -> IterateConfig:
    """Read an iterate YAML and apply ``key=value`` overrides (unknown keys are errors naming the source)."""
    data = _load_yaml(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw else None
    return from_dict(data, IterateConfig, source=str(path))


@dataclasses.dataclass(frozen=True)
class RoundPaths:
    """Where round ``r``'s steps read and write."""

    root: Path
    sampler_hf: Path  # the HF export sampled from
    policy_ckpt: Path  # the same policy as a megatron checkpoint (training starts from it)

    @property
    def generated(self) -> Path:  # noqa: D102
        return self.root / "generated.jsonl"

    @property
    def scored(self) -> Path:  # noqa: D102
        return self.root / "scored.jsonl"

    @property
    def data_prefix(self) -> Path:  # noqa: D102
        return self.root / "data" / "train"

    @property
    def run_dir(self) -> Path:  # noqa: D102
        return self.root / "run"

    @property
    def hf(self) -> Path:  # noqa: D102
        return self.root / "hf"

    def eval_file(self, kind: str) -> Path:
        """``eval_generated.jsonl`` / ``eval_scored.jsonl``: the policy's samples on the held-out prompts."""
        return self.root / f"eval_{kind}.jsonl"


def round_paths(cfg: IterateConfig, r: int) -> RoundPaths:
    """Round ``r``'s folders; round ``cfg.rounds`` is the final policy, only sampled."""
    out = Path(cfg.out_dir).resolve()
    if r == 0:
        return RoundPaths(out / "round_0", out / "start_hf", Path(cfg.start_checkpoint).resolve())
    previous = out / f"round_{r - 1}"
    return RoundPaths(out / f"round_{r}", previous / "hf", previous / "run" / "checkpoints")


def _say(message: str) -> None:
    print(f"[iterate] {message}", flush=True)


def export_policy(cfg: IterateConfig, ckpt: Path, out: Path) -> None:
    """Export ``ckpt`` (a run's newest checkpoint) to HF at ``out`` unless done; written aside, renamed last."""
    if (out / "config.json").is_file():
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert_mcore_to_hf(ckpt, staging, hf_config_from=cfg.hf_config_from, tokenizer=cfg.hf_tokenizer,
                        preset_name=cfg.preset)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def _generate(cfg: IterateConfig, sampler: Path, prompts: str, out: Path, seed: int) -> None:
    generate(GenerateConfig(model=str(sampler), prompts=prompts, out=str(out), tokenizer=cfg.tokenizer,
                            sampling=dataclasses.replace(cfg.sampling, seed=seed), chat_template=cfg.chat_template,
                            backend=cfg.backend, progress=False))


def _score(cfg: IterateConfig, generated: Path, out: Path) -> None:
    score(ScoreConfig(generated=str(generated), out=str(out), reward_fn=cfg.reward_fn,
                      reward_model=cfg.reward_model, progress=False))


EVAL_SEED_OFFSET = 999_999  # held-out prompts are sampled from the same seed by every policy


def train_config(cfg: IterateConfig, paths: RoundPaths):
    """The trainer's Config of a round: from the round's policy, on its packed samples, precomputed reference."""
    reference = Path(cfg.start_checkpoint).resolve() if cfg.reference == "start" else paths.policy_ckpt
    return load_config(cfg.train_config, [
        *cfg.train_overrides, f"model.init_checkpoint={paths.policy_ckpt}", f"data.train_prefix={paths.data_prefix}",
        "data.valid_prefix=null", "reference.mode=precomputed", f"reference.checkpoint={reference}",
        f"logging.run_dir={paths.run_dir}", "checkpoint.save_at_end=true", "checkpoint.resume=true"])


def run_step(cfg: IterateConfig, r: int, step: str) -> None:
    """Run one step of round ``r`` unless its output is complete."""
    paths = round_paths(cfg, r)
    paths.root.mkdir(parents=True, exist_ok=True)
    if step == "generate":
        if r == 0:  # the start model's HF export: written by one rank, read by all
            rank, world = shards.dist_rank_world()
            if rank == 0:
                export_policy(cfg, paths.policy_ckpt, paths.sampler_hf)
            shards.barrier(world)
        _generate(cfg, paths.sampler_hf, cfg.prompts, paths.generated, cfg.sampling.seed + 1000 * r)
        if cfg.eval_prompts:
            _generate(cfg, paths.sampler_hf, cfg.eval_prompts, paths.eval_file("generated"),
                      cfg.sampling.seed + EVAL_SEED_OFFSET)
    elif step == "score":
        _score(cfg, paths.generated, paths.scored)
        if cfg.eval_prompts:
            _score(cfg, paths.eval_file("generated"), paths.eval_file("scored"))
    elif step == "pack":
        if not layout.manifest_path(paths.data_prefix).is_file():
            pack(PackConfig(inputs=[str(paths.scored)], output_prefix=str(paths.data_prefix), tokenizer=cfg.tokenizer,
                            chat_template=cfg.chat_template, format="listwise", skip_invalid=cfg.pack_skip_invalid,
                            reward_transform=cfg.reward_transform),
                 log=_say)
    elif step == "ref-logps":
        if not layout.ref_meta_path(paths.data_prefix).is_file():
            tcfg = train_config(cfg, paths)
            init_parallel(tcfg)
            try:
                write_reference(tcfg)
            finally:
                destroy_parallel()
    elif step == "train":
        if not _trained(paths):
            train(train_config(cfg, paths))
            atomic_write(paths.run_dir / "train.done", "done\n")
    elif step == "export":
        export_policy(cfg, paths.run_dir / "checkpoints", paths.hf)
    else:
        raise ConfigError(f"--step {step!r} not in {STEPS}")


def _trained(paths: RoundPaths) -> bool:
    """The round's run finished: its final checkpoint is written and marked (``train.done``)."""
    return (paths.run_dir / "train.done").is_file() and latest_checkpoint(paths.run_dir / "checkpoints") is not None


def _mean_reward(scored: Path) -> float | None:
    meta = scored.with_name(scored.name + ".meta.json")
    return json.loads(meta.read_text())["mean_reward"] if meta.is_file() else None


def summarise(cfg: IterateConfig, seconds: dict | None = None) -> dict:
    """Mean reward of every policy's fresh samples (train prompts and, if given, held-out prompts).

    ``seconds``: wall time of each step this call ran, ``{round: {step: s}}`` (a reused step takes ~0 s).
    """
    rows = []
    for r in range(cfg.rounds + 1):
        paths = round_paths(cfg, r)
        rows.append({"round": r, "policy": "start" if r == 0 else f"after {r} round{'s' if r > 1 else ''}",
                     "mean_reward": _mean_reward(paths.scored),
                     "eval_mean_reward": _mean_reward(paths.eval_file("scored")) if cfg.eval_prompts else None,
                     "step_seconds": (seconds or {}).get(r, {})})
    summary = {"config": dataclasses.asdict(cfg), "rounds": rows}
    atomic_write(Path(cfg.out_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_rounds(cfg: IterateConfig, only_round: int | None = None, only_step: str | None = None) -> dict:
    """Every round's steps (complete ones skipped), then the final policy sampled; or one step of one round."""
    plan = [(r, step) for r in range(cfg.rounds) for step in STEPS] + [(cfg.rounds, "generate"), (cfg.rounds, "score")]
    if only_step is not None:
        plan = [(cfg.rounds if only_round is None else only_round, only_step)]
    seconds: dict[int, dict[str, float]] = {}
    for r, step in plan:
        _say(f"round {r}: {step}" + (" (the final policy)" if r == cfg.rounds else ""))
        t0 = time.perf_counter()
        run_step(cfg, r, step)
        seconds.setdefault(r, {})[step] = round(time.perf_counter() - t0, 2)
    return summarise(cfg, seconds)
