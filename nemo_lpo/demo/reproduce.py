"""``nemo-lpo reproduce``: the LPO paper's findings in miniature, on the real pipeline, with a markdown report.

For each suite (the embedded default; the real K = 8 AlpacaEval lists of a samples folder, ``--data``) one
seeded tiny Mixtral start, one reference pass per training set, then these runs at equal steps:

- Figure 1: ``dpo`` on Zephyr-style pairs (best vs one random other) and ``lpo_abs`` on the K = 4 lists;
  the log-likelihood of the chosen (best) response over training. As in the paper, both start from an SFT
  model (warm start: a short ``sft`` run on the best responses, from the seeded start), which is also their
  reference; the same two runs from the random start are kept for comparison.
- Figure 2: ``lpo`` and ``lpo_abs`` trained on K = 2, 4 and 8 responses per prompt; held-out pairwise ranking
  accuracy of the implicit reward on the K = 8 held-out lists.
- Table 1: ``lpo`` with ``preference=true`` (m ≡ 1) on the same pairs as ``dpo``: the per-step losses and the
  final weights compared bit for bit, plus the loss functions on random inputs.
- Optionally (``--compare-losses``, embedded default only): every listwise loss (listmle, kpo, ... beside lpo and
  lpo_abs) on the K = 4 lists at the same steps, a table of held-out ranking metrics (``nemo_lpo.demo.compare``).

Everything is written under the output folder; ``report.md`` holds the figures, the numbers and plain
statements of where the miniature shows the paper's effect and where it does not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.transforms import LengthLimits
from nemo_lpo.demo import tasks
from nemo_lpo.demo.compare import COMPARE_K, comparison_plan, comparison_rows
from nemo_lpo.demo.config import DemoConfig
from nemo_lpo.demo.onpolicy import OnPolicyDemoConfig, onpolicy_section, run_onpolicy_demo
from nemo_lpo.demo.pipeline import save_start_weights, train_config, write_sidecar
from nemo_lpo.demo.report import draw_figures, write_report
from nemo_lpo.evaluate.run import build_model, evaluate_checkpoint, resolve_checkpoint, to_jsonable
from nemo_lpo.io import atomic_write
from nemo_lpo.losses import listwise_loss
from nemo_lpo.metrics import pairwise_accuracy
from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
from nemo_lpo.train.loop import train

ALPACAEVAL = Path("alpacaeval2") / "alpacaeval2_gpt4turbo_k8_a.jsonl"  # under the folder of real samples
DATA_ENV = "NEMO_LPO_DATA"  # the default folder of real samples (ultrafeedback_binarized/, alpacaeval2/, ...)


@dataclasses.dataclass
class Suite:
    """One dataset family: training sources per K, the pairs source, the held-out source, pack limits."""

    name: str
    train: dict[int, tuple[Path, int | None]]  # K -> (listwise JSONL, max_k for the packer or None)
    pairs_source: Path  # listwise JSONL turned into Zephyr pairs by the packer
    heldout: Path
    steps: int
    limits: dict = dataclasses.field(default_factory=dict)
    sft_steps: int = 0  # steps of the SFT warm start before Figure 1's runs (0: no warm start)
    compare_losses: list[str] | None = None  # listwise losses to compare on the K = 4 lists ([] = all; None: none)


def _say(message: str) -> None:
    print(f"[reproduce] {message}", flush=True)


def embedded_suite(src_dir: Path, steps: int, sft_steps: int = 0, compare_losses: list[str] | None = None) -> Suite:
    """Write the nested K = 2 / 4 / 8 training files and the K = 8 held-out file of the embedded default."""
    splits = tasks.generate()
    files = {}
    for k in (2, 4, 8):
        files[k] = src_dir / f"train_k{k}.jsonl"
        atomic_write(files[k], tasks.to_jsonl(tasks.subset_lists(splits["train"], k)))
    held = src_dir / "heldout_k8.jsonl"
    atomic_write(held, tasks.to_jsonl(tasks.subset_lists(splits["heldout"], 8)))
    return Suite("embedded", {k: (p, None) for k, p in files.items()}, files[4], held, steps, sft_steps=sft_steps,
                 compare_losses=compare_losses)


def alpacaeval_suite(src_dir: Path, data: Path | None, steps: int, num_heldout: int = 64,
                     sft_steps: int = 0) -> Suite | None:
    """Split the real K = 8 AlpacaEval lists of the samples folder ``data`` (when there) into train / held-out files."""
    if data is None or not (data / ALPACAEVAL).is_file():
        return None
    lines = [line for line in (data / ALPACAEVAL).read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held = src_dir / "alpacaeval_train.jsonl", src_dir / "alpacaeval_heldout.jsonl"
    atomic_write(train, ("\n".join(lines[:-num_heldout]) + "\n").encode())
    atomic_write(held, ("\n".join(lines[-num_heldout:]) + "\n").encode())
    return Suite("alpacaeval", {2: (train, 2), 4: (train, 4), 8: (train, None)}, train, held, steps,
                 limits={"max_prompt_length": 64, "max_response_length": 64}, sft_steps=sft_steps)


def _pack(src: Path, prefix: Path, suite: Suite, **options) -> Path:

    for stale in prefix.parent.glob(prefix.name + "*"):
        stale.unlink()
    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), tokenizer="mistral", format="listwise",
                    limits=LengthLimits(**suite.limits), **options), log=lambda message: None)
    return prefix


def _train_and_evaluate(cfg, held: Path, reference: Path, ref_logps, beta: float) -> tuple[dict, object]:
    """One training run (``cfg``) and its held-out evaluation against ``reference``.

    Returns the run's result entry and the trained policy's held-out log-probs ([lists, K] array).
    """
    run_dir = Path(cfg.logging.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t_run = time.perf_counter()
    train(cfg)
    ev = evaluate_checkpoint(run_dir / "checkpoints", held, reference=reference, beta=beta, preset="tiny-mixtral",
                             reference_logps=ref_logps)
    entry = {"loss": cfg.loss.type, "metrics": str(run_dir / "metrics.jsonl"), "checkpoint": ev["checkpoint"],
             "heldout": to_jsonable(ev), "seconds": round(time.perf_counter() - t_run, 1)}
    return entry, ev["_policy_logps"]


def run_suite(suite: Suite, out: Path, demo_cfg) -> dict:
    """Pack, reference passes, the runs of Figures 1-2 and Table 1, held-out evaluation; returns the results."""
    data, runs_dir = out / "data", out / "runs"
    t0 = time.perf_counter()
    _say(f"{suite.name}: packing (Mistral v1 tokenizer)")
    prefixes = {f"k{k}": _pack(src, data / f"train_k{k}", suite, max_k=mk) for k, (src, mk) in suite.train.items()}
    prefixes["pairs"] = _pack(suite.pairs_source, data / "train_pairs", suite, pairs="zephyr")
    held = _pack(suite.heldout, data / "heldout_k8", suite)
    start = out / "start"
    save_start_weights(start, demo_cfg.seed)
    for name, prefix in prefixes.items():
        _say(f"{suite.name}: reference pass over {name}")
        write_sidecar(demo_cfg, prefix, start, runs_dir / "ref")
    base = evaluate_checkpoint(start, held, reference=start, beta=demo_cfg.beta, preset="tiny-mixtral")
    ref_logps = base.pop("_policy_logps")

    plan = {"dpo_pairs": ("pairs", "dpo", ()), "lpo_pref_pairs": ("pairs", "lpo", ("loss.options.preference=true",))}
    for k in sorted(suite.train):
        plan[f"lpo_k{k}"] = (f"k{k}", "lpo", ())
        plan[f"lpo_abs_k{k}"] = (f"k{k}", "lpo_abs", ())
    results = {"suite": suite.name, "steps": suite.steps, "beta": demo_cfg.beta, "start": to_jsonable(base), "runs": {},
               "length_baseline": length_baseline(held)}
    for run, (data_name, loss, extra) in plan.items():
        _say(f"{suite.name}: training {run} ({loss} on {data_name}, {suite.steps} steps)")
        cfg = train_config(demo_cfg, prefixes[data_name], start, runs_dir / run, steps=suite.steps, loss=loss,
                           extra=extra)
        entry, _ = _train_and_evaluate(cfg, held, start, ref_logps, demo_cfg.beta)
        results["runs"][run] = {"data": data_name, **entry}
    results["table1"] = table1(results["runs"]["dpo_pairs"], results["runs"]["lpo_pref_pairs"])
    if suite.sft_steps:
        results["warm_start"] = warm_start(suite, out, held, ref_logps, demo_cfg)
    if suite.compare_losses is not None:
        results["loss_comparison"] = loss_comparison(suite, out, held, ref_logps, demo_cfg, results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


FIG1_K = 4  # LPO-abs of Figure 1 trains on the K = 4 lists


def warm_start(suite: Suite, out: Path, held: Path, start_logps, demo_cfg) -> dict:
    """Figure 1 from an SFT model: ``sft`` on the best responses, then DPO and LPO-abs from it (reference = it).

    The SFT run trains on the Zephyr pairs (the ``sft`` loss reads only each list's best response) from the
    seeded start, with the same optimiser settings as every run. Its checkpoint is the starting policy of both
    runs and their reference μ, held online by the trainer (the datasets' stored log-probs are the random
    start's); both are evaluated on the held-out lists against it.
    """
    data, runs_dir = out / "data", out / "runs"
    _say(f"{suite.name}: SFT warm start ({suite.sft_steps} steps of sft on the best responses)")
    sft_cfg = train_config(demo_cfg, data / "train_pairs", out / "start", runs_dir / "sft", steps=suite.sft_steps,
                           loss="sft")
    sft, sft_logps = _train_and_evaluate(sft_cfg, held, out / "start", start_logps, demo_cfg.beta)
    sft_ckpt = resolve_checkpoint(runs_dir / "sft" / "checkpoints")
    runs = {}
    for run, (data_name, loss) in {"dpo_pairs_sft": ("pairs", "dpo"),
                                   f"lpo_abs_k{FIG1_K}_sft": (f"k{FIG1_K}", "lpo_abs")}.items():
        _say(f"{suite.name}: training {run} ({loss} on {data_name} from the SFT model, {suite.steps} steps)")
        cfg = train_config(demo_cfg, data / f"train_{data_name}", sft_ckpt, runs_dir / run, steps=suite.steps, loss=loss,
                           extra=("reference.mode=online",))
        entry, _ = _train_and_evaluate(cfg, held, sft_ckpt, sft_logps, demo_cfg.beta)
        runs[run] = {"data": data_name, **entry}
    return {"sft_steps": suite.sft_steps, "sft": sft, "runs": runs}


def loss_comparison(suite: Suite, out: Path, held: Path, start_logps, demo_cfg, results: dict) -> dict:
    """Train each listwise loss of ``suite.compare_losses`` ([] = all) on the K = 4 lists, evaluate, tabulate.

    Same start, reference, data, steps and optimiser settings as Figure 2's runs; the ``lpo`` and ``lpo_abs``
    runs on the K = 4 lists that Figure 2 already trained are reused, not trained again.
    """
    data_name = f"k{COMPARE_K}"
    runs = {}
    for loss, extra in comparison_plan(suite.compare_losses or None).items():
        done = results["runs"].get(f"{loss}_{data_name}")
        if done is not None and not extra:
            runs[loss] = done
            continue
        _say(f"{suite.name}: training compare_{loss} ({loss} on {data_name}, {suite.steps} steps)")
        cfg = train_config(demo_cfg, out / "data" / f"train_{data_name}", out / "start", out / "runs" / f"compare_{loss}",
                           steps=suite.steps, loss=loss, extra=extra)
        entry, _ = _train_and_evaluate(cfg, held, out / "start", start_logps, demo_cfg.beta)
        runs[loss] = {"data": data_name, "extra": list(extra), **entry}
    return {"k": COMPARE_K, "steps": suite.steps, "runs": runs, "rows": comparison_rows(runs, results["start"])}


def length_baseline(prefix: Path) -> float:
    """Held-out pairwise accuracy of ranking the responses by their token count alone (longer = better)."""
    ds = ListwiseDataset(prefix)
    k_max = int(ds.num_responses().max())
    lengths, rewards = np.zeros((len(ds), k_max)), np.zeros((len(ds), k_max))
    mask = np.zeros((len(ds), k_max), dtype=bool)
    for i in range(len(ds)):
        item = ds[i]
        k = len(item["response_ids"])
        lengths[i, :k] = [len(r) for r in item["response_ids"]]
        rewards[i, :k], mask[i, :k] = item["rewards"], True
    acc = pairwise_accuracy(torch.from_numpy(lengths), torch.from_numpy(rewards), torch.from_numpy(mask))
    return float(acc[~torch.isnan(acc)].mean())


def _state_dict(checkpoint: str):

    initialize_parallel(seed=1)
    try:
        return {k: v.clone() for k, v in build_model("tiny-mixtral", checkpoint).state_dict().items()
                if hasattr(v, "dtype")}
    finally:
        destroy_parallel()


def loss_function_check(trials: int = 200, seed: int = 0) -> dict:
    """``lpo`` (preference) vs ``dpo`` on random K = 2 inputs: how many per-list losses differ in any bit."""
    gen = torch.Generator().manual_seed(seed)
    differing = 0
    for _ in range(trials):
        policy, reference = torch.randn(16, 2, generator=gen) * 5, torch.randn(16, 2, generator=gen) * 5
        rewards = torch.rand(16, 2, generator=gen)
        mask = torch.ones(16, 2, dtype=torch.bool)
        a, _ = listwise_loss("lpo", policy, reference, rewards, mask, 0.1, preference=True)
        b, _ = listwise_loss("dpo", policy, reference, rewards, mask, 0.1)
        differing += int((a != b).sum()) + int(a.dtype != b.dtype)
    return {"trials": trials, "lists": trials * 16, "differing_bits_lists": differing}


def table1(dpo: dict, lpo: dict) -> dict:
    """Compare the DPO and LPO(preference) runs bit for bit: per-step loss lines and final weights."""

    def lines(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    a, b = lines(dpo["metrics"]), lines(lpo["metrics"])
    keys = ("loss", "grad_norm", "rewards/accuracies", "logps/chosen", "logps/rejected")
    same_steps = sum(all(x.get(k) == y.get(k) for k in keys) for x, y in zip(a, b, strict=False))
    wa, wb = _state_dict(dpo["checkpoint"]), _state_dict(lpo["checkpoint"])
    same_tensors = sum(torch.equal(wa[k], wb[k]) for k in wa if k in wb)
    return {"steps": len(a), "steps_identical": same_steps, "tensors": len(wa), "tensors_identical": same_tensors,
            "final_loss_dpo": a[-1]["loss"] if a else None, "final_loss_lpo": b[-1]["loss"] if b else None,
            "loss_function": loss_function_check()}


def run_reproduce(out: Path, steps: int | None = None, include_real: bool = True, real_steps: int | None = None,
                  include_embedded: bool = True, sft_steps: int | None = None, real_sft_steps: int | None = None,
                  compare_losses: list[str] | None = None, data: Path | None = None,
                  include_onpolicy: bool = True) -> int:
    """Run every suite, draw the figures and write ``report.md`` under ``out``; returns the exit code.

    ``data``: the folder of real samples (default ``$NEMO_LPO_DATA``); its AlpacaEval K = 8 lists are the real suite.

    ``compare_losses``: listwise losses to compare on the embedded default ([] = all of them; None = no comparison).

    ``include_onpolicy``: also run the on-policy demonstration (``nemo_lpo.demo.onpolicy``, 3 rounds of K = 4).
    """
    out = Path(out).resolve()
    if compare_losses is not None:

        try:  # a name that is no listwise loss fails now, not after the suite's other runs
            comparison_plan(compare_losses or None)
        except ValueError as err:
            print(f"nemo-lpo reproduce: --compare-losses: {err}")
            return 2
    t0 = time.perf_counter()
    steps = steps or 40
    sft_steps = steps if sft_steps is None else sft_steps
    demo_cfg = DemoConfig(out_dir=out, steps=steps)
    suites = [embedded_suite(out / "embedded" / "src", steps, sft_steps=sft_steps, compare_losses=compare_losses)] \
        if include_embedded else []
    if include_real:
        real_steps = real_steps or max(8, steps // 5)
        if data is None and os.environ.get(DATA_ENV):
            data = Path(os.environ[DATA_ENV])
        real = alpacaeval_suite(out / "alpacaeval" / "src", data, real_steps,
                                sft_steps=real_steps if real_sft_steps is None else real_sft_steps)
        if real is None:
            _say(f"no real K = 8 lists ({ALPACAEVAL} under --data DIR or ${DATA_ENV}; got {data}): skipping them")
        else:
            suites.append(real)
    if not suites and not include_onpolicy:
        print("nemo-lpo reproduce: nothing to run")
        return 1
    for suite in suites:
        res = run_suite(suite, out / suite.name, demo_cfg)
        # results first: a failure while drawing leaves them for `--report-only`
        atomic_write(out / suite.name / "results.json", (json.dumps(res, indent=2) + "\n").encode())
    if include_onpolicy:
        _say("on-policy rounds: generate -> score -> pack -> ref-logps -> train -> export, 3 rounds of K = 4")
        run_onpolicy_demo(OnPolicyDemoConfig(out_dir=out / "onpolicy"))
    names = [name for name in ("embedded", "alpacaeval") if (out / name / "results.json").is_file()]
    return write_outputs(out, names, round(time.perf_counter() - t0, 1), demo_cfg)


def write_outputs(out: Path, suite_names: list[str], total_seconds: float | None, demo_cfg) -> int:
    """Draw the figures and write ``report.md`` from the suites' ``results.json`` files."""
    results = []
    for name in suite_names:
        res = json.loads((out / name / "results.json").read_text())
        if "length_baseline" not in res:  # results of an older version
            res["length_baseline"] = length_baseline(out / name / "data" / "heldout_k8")
        res["figures"] = {key: str(p) for key, p in draw_figures(res, out / name / "figures").items()}
        results.append(res)
    if total_seconds is None:
        total_seconds = sum(r["seconds"] for r in results)
    onpolicy = out / "onpolicy" / "summary.json"
    extra = onpolicy_section(json.loads(onpolicy.read_text()), out) if onpolicy.is_file() else []
    report = write_report(results, out / "report.md", total_seconds=total_seconds, demo_cfg=demo_cfg, extra=extra)
    _say(f"report: {report} ({total_seconds:.0f} s)")
    return 0


def report_only(out: Path) -> int:
    """Rebuild the figures and the report from the ``results.json`` files already under ``out``."""
    out = Path(out).resolve()
    names = [name for name in ("embedded", "alpacaeval") if (out / name / "results.json").is_file()]
    if not names and not (out / "onpolicy" / "summary.json").is_file():
        print(f"nemo-lpo reproduce: no results.json under {out}")
        return 1
    return write_outputs(out, names, None, DemoConfig(out_dir=out))
