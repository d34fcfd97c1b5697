"""Figures and the markdown report of ``nemo-lpo reproduce`` (from the suites' result dicts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from nemo_lpo.demo.compare import comparison_section
from nemo_lpo.demo.plots import plot_lines, read_metrics, series
from nemo_lpo.io import atomic_write


def _beta(results: dict) -> float:
    return float(results.get("beta") or results["runs"]["dpo_pairs"]["heldout"]["beta"])


def chosen_series(metrics_path: str, beta: float) -> tuple[list[int], list[float]]:
    """Per step, log π(y_w) − log μ(y_w) of the batch's chosen responses (``rewards/chosen`` / β), in nats.

    μ is the run's start model (its reference), so this is the change of the chosen responses' log-likelihood
    since the start measured on the same responses: 0 at step 1, and the batches' differing content (which moves
    the raw ``logps/chosen`` from step to step) does not enter.
    """
    steps, values = series(read_metrics(metrics_path)[0], "rewards/chosen")
    return steps, [v / beta for v in values]


def chosen_change(metrics_path: str, beta: float, frac: float = 0.15) -> dict:
    """The chosen log-likelihood change (``chosen_series``): mean over the last ``frac`` of steps, lowest, highest."""
    _, values = chosen_series(metrics_path, beta)
    if not values:
        return {"end": None, "lowest": None, "highest": None}
    n = max(1, int(len(values) * frac))
    return {"end": sum(values[-n:]) / n, "lowest": min(values), "highest": max(values)}


def _fig1_run(results: dict) -> str:
    return "lpo_abs_k4" if "lpo_abs_k4" in results["runs"] else "lpo_abs_k8"


def _fig1_pairs(results: dict) -> dict[str, tuple[dict, dict]]:
    """{start label: (DPO run, LPO-abs run)}: from the SFT model (when the suite has a warm start), from random init."""
    runs, fig1_run = results["runs"], _fig1_run(results)
    pairs = {}
    warm = results.get("warm_start")
    if warm:
        pairs["SFT model"] = (warm["runs"]["dpo_pairs_sft"], warm["runs"][f"{fig1_run}_sft"])
    pairs["random init"] = (runs["dpo_pairs"], runs[fig1_run])
    return pairs


def draw_figures(results: dict, out_dir: Path) -> dict[str, Path]:
    """Figure 1 (chosen log-likelihood change, DPO vs LPO-abs; per start) and Figure 2 (held-out accuracy vs K)."""
    runs, beta = results["runs"], _beta(results)
    fig1_k = _fig1_run(results).split("_")[-1].upper()
    figures = {}
    for start, (dpo, lpo_abs) in _fig1_pairs(results).items():
        name = "figure1" if start == "SFT model" or "warm_start" not in results else "figure1_random_init"
        lines = {"DPO (pairs)": chosen_series(dpo["metrics"], beta),
                 f"LPO-abs ({fig1_k})": chosen_series(lpo_abs["metrics"], beta)}
        figures[name] = plot_lines(
            lines, out_dir / f"{name}_chosen_logps.png",
            f"Figure 1 ({results['suite']}, from the {start}): chosen log-likelihood",
            "log π(chosen) − log π_start(chosen), nats (train batches)", hline=0.0)
    ks = sorted(int(name.rsplit("_k", 1)[1]) for name in runs if name.startswith("lpo_k"))
    fig2_lines = {}
    for loss, label in (("lpo", "LPO"), ("lpo_abs", "LPO-abs")):
        fig2_lines[label] = (ks, [runs[f"{loss}_k{k}"]["heldout"]["implicit/accuracy"] for k in ks])
    figures["figure2"] = plot_lines(fig2_lines, out_dir / "figure2_accuracy_vs_k.png",
                                    f"Figure 2 ({results['suite']}): held-out ranking accuracy at {results['steps']} steps",
                                    "pairwise accuracy of the implicit reward", xlabel="K (responses per prompt in training)",
                                    hline=0.5, xticks=ks)
    return figures


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


FLAT_NATS = 0.1  # a change of the chosen log-likelihood smaller than this counts as none (neither fall nor rise)


def _direction(change: float) -> str:
    return "falls" if change < -FLAT_NATS else "rises" if change > FLAT_NATS else "is flat"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value + 0.0:+.2f}"  # + 0.0: no "-0.00"


def _figure1_section(res: dict, figures: dict[str, str]) -> list[str]:
    beta, fig1_run, warm = _beta(res), _fig1_run(res), res.get("warm_start")
    lines = ["### Figure 1: chosen log-likelihood over training, DPO vs LPO-abs", "", f"![Figure 1]({figures['figure1']})", ""]
    if "figure1_random_init" in figures:
        lines += [f"![Figure 1, from random init]({figures['figure1_random_init']})", ""]
    if warm:
        sft = warm["sft"]["heldout"]
        lines += [f"As in the paper, DPO and LPO-abs start from an SFT model, which is also their reference: "
                  f"{warm['sft_steps']} steps of the `sft` loss (NLL per token of each list's best response) from the "
                  f"seeded start, with the same optimiser settings; held-out log-likelihood of the best response "
                  f"{_f(res['start']['logps/best'], 2)} → {_f(sft['logps/best'], 2)}. The same two runs from the "
                  "random start are shown for comparison.", ""]
    lines += ["Train batches: the change of the chosen (best) response's log-likelihood against the run's start "
              "model on the same responses (`rewards/chosen` / β), mean over the last 15 % of steps, and its lowest "
              "and highest step value. Held-out: the mean log-likelihood of the best response of the 64 held-out "
              f"lists, start model → trained model. A change under {FLAT_NATS} nats counts as none.", "",
              "| start | run | Δ chosen log-lik, train batches | lowest | highest | held-out best log-lik: start → end |",
              "|---|---|---:|---:|---:|---|"]
    changes = {}
    for start, (dpo, lpo_abs) in _fig1_pairs(res).items():
        start_best = warm["sft"]["heldout"]["logps/best"] if start == "SFT model" else res["start"]["logps/best"]
        for label, run in (("DPO on Zephyr pairs", dpo), (f"LPO-abs ({fig1_run})", lpo_abs)):
            c = chosen_change(run["metrics"], beta)
            end_best = run["heldout"]["logps/best"]
            changes[(start, label.split()[0])] = (c["end"], end_best - start_best)
            lines.append(f"| {start} | {label} | {_signed(c['end'])} | {_signed(c['lowest'])} | {_signed(c['highest'])} | "
                         f"{_f(start_best, 2)} → {_f(end_best, 2)} ({end_best - start_best:+.2f}) |")
    lines.append("")
    if any(v is None for pair in changes.values() for v in pair):
        return lines
    start = "SFT model" if warm else "random init"
    (dpo_train, dpo_held), (abs_train, abs_held) = changes[(start, "DPO")], changes[(start, "LPO-abs")]
    falls = dpo_train < -FLAT_NATS and dpo_held < -FLAT_NATS
    rises = abs_train > FLAT_NATS and abs_held > FLAT_NATS
    if falls and rises:
        verdict = (f"shows the paper's effect from the {start}: the chosen log-likelihood falls under DPO and rises "
                   f"under LPO-abs (DPO {dpo_train:+.2f} nats on train batches, {dpo_held:+.2f} held-out; LPO-abs "
                   f"{abs_train:+.2f} and {abs_held:+.2f}).")
    else:
        verdict = (f"does NOT show the paper's effect as stated from the {start}: DPO's chosen log-likelihood "
                   f"{_direction(dpo_train)} on train batches ({dpo_train:+.2f} nats) and {_direction(dpo_held)} held-out "
                   f"({dpo_held:+.2f}); LPO-abs's {_direction(abs_train)} on train batches ({abs_train:+.2f}) and "
                   f"{_direction(abs_held)} held-out ({abs_held:+.2f}).")
    lines += [f"**The miniature {verdict}**", ""]
    if warm:
        r_dpo, r_abs = changes[("random init", "DPO")], changes[("random init", "LPO-abs")]
        lines += [f"From the random start, DPO's chosen log-likelihood changes by {r_dpo[0]:+.2f} nats "
                  f"({r_dpo[1]:+.2f} held-out) and LPO-abs's by {r_abs[0]:+.2f} ({r_abs[1]:+.2f}): there every "
                  "response's likelihood rises while the model learns the answer format, so DPO's decline needs a "
                  "start that already fits the responses.", ""]
    else:
        lines += ["From a random start every response's likelihood first rises as the model learns the answer "
                  "format; the paper's DPO decline is measured from an SFT model that already fits the responses.", ""]
    return lines


def _suite_section(res: dict, report_dir: Path) -> list[str]:
    runs = res["runs"]
    figures = {name: os.path.relpath(p, report_dir) for name, p in res["figures"].items()}
    lines = [f"## {res['suite']} ({res['steps']} steps per run, {res['seconds']:.0f} s)", "",
             *_figure1_section(res, figures)]
    ks = sorted(int(name.rsplit("_k", 1)[1]) for name in runs if name.startswith("lpo_k"))
    lines += ["### Figure 2: held-out ranking accuracy vs K (equal steps)", "", f"![Figure 2]({figures['figure2']})", "",
              "Pairwise accuracy of the implicit reward β(log π − log μ) on the held-out K = 8 lists "
              f"(start model: {_f(res['start']['implicit/accuracy'])}, a coin flip; ranking by response length "
              f"alone, longer = better: {_f(res.get('length_baseline'))}).", "",
              "| K | LPO | LPO-abs | LPO Kendall τ | LPO-abs Kendall τ |", "|---:|---:|---:|---:|---:|"]
    acc = {}
    for k in ks:
        a, b = runs[f"lpo_k{k}"]["heldout"], runs[f"lpo_abs_k{k}"]["heldout"]
        acc[k] = (a["implicit/accuracy"], b["implicit/accuracy"])
        lines.append(f"| {k} | {_f(a['implicit/accuracy'])} | {_f(b['implicit/accuracy'])} | "
                     f"{_f(a['implicit/kendall_tau'])} | {_f(b['implicit/kendall_tau'])} |")
    lines.append("")
    if res.get("length_baseline") is not None and max(max(v) for v in acc.values()) <= res["length_baseline"]:
        lines.append("- No run beats ranking by response length alone: on these lists the accuracies above can be "
                     "explained by length, not by learnt quality.")
    grows = {name: all(acc[ks[i + 1]][j] >= acc[ks[i]][j] for i in range(len(ks) - 1))
             for j, name in enumerate(("LPO", "LPO-abs"))}
    for name, ok in grows.items():
        lines.append(f"- {name}: accuracy {'grows' if ok else 'does NOT grow'} monotonically with K in this "
                     f"miniature ({', '.join(f'K={k}: {_f(acc[k][0 if name == "LPO" else 1])}' for k in ks)}).")
    t = res["table1"]
    lf = t["loss_function"]
    lines += ["", "### Table 1: LPO on K = 2 preference data equals DPO", "",
              "| check | identical | of |", "|---|---:|---:|",
              f"| training steps (loss, grad norm, accuracy, logps all bit-equal) | {t['steps_identical']} | {t['steps']} |",
              f"| final weight tensors (torch.equal) | {t['tensors_identical']} | {t['tensors']} |",
              f"| per-list losses, random inputs | {lf['lists'] - lf['differing_bits_lists']} | {lf['lists']} |", ""]
    same = t["steps_identical"] == t["steps"] and t["tensors_identical"] == t["tensors"] and not lf["differing_bits_lists"]
    lines += [f"**{'Equal to the last bit.' if same else 'NOT bit-identical (see the counts above).'}**", ""]
    if res.get("loss_comparison"):
        lines += comparison_section(res["loss_comparison"])
    return lines


def write_report(results: list[dict], path: Path, total_seconds: float, demo_cfg, extra: list[str] = ()) -> Path:
    """Write the markdown report (``extra``: further markdown lines at its end); returns its path."""
    lines = ["# LPO in miniature: `nemo-lpo reproduce`", "",
             f"Tiny Mixtral (2 layers, hidden 64, 4 experts top-2, Mistral v1 vocabulary), randomly initialised "
             f"(seed {demo_cfg.seed}); every run's reference μ is its start model (the seeded start, or for "
             f"Figure 1 the SFT model trained from it). β = {demo_cfg.beta}, lr {demo_cfg.lr} "
             f"(cosine), {demo_cfg.global_batch_size} lists per step, fp32, one CPU process. Seeds fixed: the "
             "same command gives the same numbers.", "",
             f"Runtime: {total_seconds:.0f} s in total on {os.cpu_count()} CPU core(s) ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}; load average when the report was written: "
             f"{os.getloadavg()[0]:.1f} (other work on the machine slows the runs down, not their numbers).", "",
             "Scale caveat: the paper fine-tunes 7B models on UltraFeedback for thousands of steps; this is a "
             "4M-parameter model trained from scratch for a few minutes. What it can show is the direction of "
             "each effect on the real training code, not its size.", ""]
    for res in results:
        lines += _suite_section(res, path.parent)
    lines += extra
    atomic_write(path, "\n".join(lines) + "\n")
    return path
