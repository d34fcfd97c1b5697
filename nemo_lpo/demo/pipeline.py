"""The embedded default demo, end to end: pack, reference pass, evaluate, train (LPO-abs), evaluate, plot, export.

Everything runs in this one process on the real components: the packer with the Mistral v1 tokenizer,
the megatron-core trainer (tiny Mixtral, 4 experts top-2) with its dist checkpoints, ``nemo-lpo eval``'s
ranking code, and the mcore-to-hf converter. Outputs go under one folder:

    data/            packed train / held-out datasets (+ reference log-prob sidecars)
    start/           the starting weights (a dist checkpoint)
    run/             the LPO-abs run: metrics.jsonl, config.yaml, checkpoints/
    plots/           loss.png, rewards_accuracies.png, logps.png
    hf/              the trained model in Hugging Face format (safetensors + config.json)
    summary.json     held-out metrics before / after, timings, paths
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import mistral_common

from nemo_lpo.config import load_config
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.demo.config import DemoConfig
from nemo_lpo.demo.plots import plot_training
from nemo_lpo.evaluate.run import build_model, evaluate_checkpoint, resolve_checkpoint, to_jsonable
from nemo_lpo.io import atomic_write
from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
from nemo_lpo.train.checkpoint import save_model_weights
from nemo_lpo.train.loop import init_parallel, train
from nemo_lpo.train.reference import write_reference


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pack_split(src: Path, prefix: Path) -> dict:
    """Pack one listwise JSONL with the Mistral v1 tokenizer; returns the manifest."""
    for stale in prefix.parent.glob(prefix.name + "*"):  # a re-run replaces the old dataset and its sidecar
        stale.unlink()
    return pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), tokenizer="mistral", format="listwise"),
                log=lambda message: None)


def train_config(cfg: DemoConfig, train_prefix: Path, start: Path, run_dir: Path, steps: int | None = None,
                 loss: str | None = None, extra: tuple[str, ...] = (), valid_prefix: Path | None = None):
    """The trainer's Config for one run of the demo (built from overrides only: no conf/ files needed).

    With ``valid_prefix`` the run validates on its first ``cfg.eval_lists`` lists every ``cfg.eval_interval``
    steps (and the reference pass of this config covers them).
    """
    overrides = [
        "model.preset=tiny-mixtral", f"model.init_checkpoint={start}",
        f"data.train_prefix={train_prefix}", f"data.global_batch_size={cfg.global_batch_size}",
        f"data.micro_batch_size={cfg.micro_batch_size}", f"data.seed={cfg.seed}",
        f"loss.type={loss or cfg.loss}", f"loss.beta={cfg.beta}", "reference.mode=precomputed",
        f"optim.lr={cfg.lr}", f"optim.min_lr={cfg.lr / 10}", "optim.warmup_steps=5", "optim.decay_style=cosine",
        f"train.max_steps={steps or cfg.steps}", f"train.seed={cfg.seed}",
        "checkpoint.save_interval=null", "checkpoint.save_at_end=true", "checkpoint.keep_last=1",
        "checkpoint.resume=false", f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.log_interval=1",
        *extra,
    ]
    if valid_prefix is not None:
        interval = max(1, min(cfg.eval_interval, steps or cfg.steps))
        overrides += [f"data.valid_prefix={valid_prefix}", f"train.eval_interval={interval}",
                      f"train.eval_lists={cfg.eval_lists}"]
    return load_config(None, overrides)


def save_start_weights(path: Path, seed: int) -> None:
    """Write the randomly initialised tiny Mixtral (seeded) as a dist checkpoint at ``path``."""
    if path.exists():
        shutil.rmtree(path)
    initialize_parallel(seed=seed)
    try:
        save_model_weights(build_model("tiny-mixtral", None), path)
    finally:
        destroy_parallel()


def write_sidecar(cfg: DemoConfig, prefix: Path, start: Path, run_dir: Path, valid_prefix: Path | None = None) -> None:
    """Store the starting model's log-probs beside ``prefix`` (and ``valid_prefix``) with the reference pass."""
    rcfg = train_config(cfg, prefix, start, run_dir, valid_prefix=valid_prefix)
    init_parallel(rcfg)
    try:
        write_reference(rcfg)
    finally:
        destroy_parallel()


def export_hf(run_ckpts: Path, out: Path) -> dict:
    """Export the run's latest checkpoint to HF format at ``out`` (the Mistral tokenizer model beside it)."""
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tok_dir:
        sp_model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        tokenizer = None
        if sp_model.is_file():
            shutil.copy(sp_model, Path(tok_dir) / "tokenizer.model")
            tokenizer = tok_dir
        return convert_mcore_to_hf(resolve_checkpoint(run_ckpts), out, preset_name="tiny-mixtral", tokenizer=tokenizer)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the summary dict (also written to ``<out>/summary.json``)."""
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 1)
        return value

    train_prefix, held_prefix = out / "data" / "train", out / "data" / "heldout"
    start, run_dir = out / "start", out / "run"
    _say(f"packing {cfg.train_file.name} and {cfg.heldout_file.name} with the Mistral v1 tokenizer")
    manifests = timed("pack", lambda: [pack_split(cfg.train_file, train_prefix), pack_split(cfg.heldout_file, held_prefix)])
    n_train, n_held = (m["counts"]["lists_written"] for m in manifests)
    _say(f"{n_train} train lists, {n_held} held-out lists -> {out / 'data'}")

    _say(f"initialising a tiny Mixtral (2 layers, 4 experts top-2, vocab 32000; seed {cfg.seed}) -> {start}")
    timed("init", save_start_weights, start, cfg.seed)
    _say("reference pass: the starting model's log-probs of every train and held-out response")
    timed("reference", write_sidecar, cfg, train_prefix, start, run_dir, held_prefix)

    _say("evaluating the starting model on the held-out lists")
    before = timed("eval_before", evaluate_checkpoint, start, held_prefix, reference=start, beta=cfg.beta,
                   preset="tiny-mixtral")

    _say(f"training with {cfg.loss} for {cfg.steps} steps ({cfg.global_batch_size} lists per step)")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    timed("train", train, train_config(cfg, train_prefix, start, run_dir, valid_prefix=held_prefix))

    _say("evaluating the trained model on the held-out lists")
    after = timed("eval_after", evaluate_checkpoint, run_dir / "checkpoints", held_prefix, reference=start,
                  beta=cfg.beta, preset="tiny-mixtral", reference_logps=before["_policy_logps"])
    plots = timed("plots", plot_training, run_dir / "metrics.jsonl", out / "plots")
    exported = None
    if cfg.export:
        _say("exporting the trained model to Hugging Face format")
        exported = timed("export", export_hf, run_dir / "checkpoints", out / "hf")
    timings["total"] = round(time.perf_counter() - t_all, 1)

    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "heldout_before": to_jsonable(before), "heldout_after": to_jsonable(after), "timings_s": timings,
        "paths": {"out": str(out), "metrics": str(run_dir / "metrics.jsonl"), "plots": [str(p) for p in plots],
                  "checkpoint": after["checkpoint"], "hf": str(out / "hf") if exported else None},
    }
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
