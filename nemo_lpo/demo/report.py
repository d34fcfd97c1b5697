"""Figures and the markdown report of ``nemo-lpo reproduce`` (from the suites' result dicts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from nemo_lpo.demo.plots import plot_lines, read_metrics, series
from nemo_lpo.demo.tasks import write_jsonl_atomic


def _window_mean(values: list[float], first: bool, frac: float = 0.15) -> float:
    n = max(1, int(len(values) * frac))
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def chosen_trend(metrics_path: str) -> dict:
    """Mean logps/chosen over the first and last 15 % of steps, and the change."""
    _, values = series(read_metrics(metrics_path)[0], "logps/chosen")
    if not values:
        return {"first": None, "last": None, "change": None}
    first, last = _window_mean(values, True), _window_mean(values, False)
    return {"first": first, "last": last, "change": last - first}


def _fig1_run(results: dict) -> str:
    return "lpo_abs_k4" if "lpo_abs_k4" in results["runs"] else "lpo_abs_k8"


def draw_figures(results: dict, out_dir: Path) -> list[Path]:
    """Figure 1 (chosen log-likelihood, DPO vs LPO-abs) and Figure 2 (held-out accuracy vs K)."""
    runs = results["runs"]
    fig1_run = _fig1_run(results)
    lines = {"DPO (pairs)": series(read_metrics(runs["dpo_pairs"]["metrics"])[0], "logps/chosen"),
             f"LPO-abs ({fig1_run.split('_')[-1].upper()})": series(read_metrics(runs[fig1_run]["metrics"])[0],
                                                                    "logps/chosen")}
    fig1 = plot_lines(lines, out_dir / "figure1_chosen_logps.png",
                      f"Figure 1 ({results['suite']}): log-likelihood of the chosen response",
                      "logps/chosen (sum over tokens, train batches)")
    ks = sorted(int(name.rsplit("_k", 1)[1]) for name in runs if name.startswith("lpo_k"))
    fig2_lines = {}
    for loss, label in (("lpo", "LPO"), ("lpo_abs", "LPO-abs")):
        fig2_lines[label] = (ks, [runs[f"{loss}_k{k}"]["heldout"]["implicit/accuracy"] for k in ks])
    fig2 = plot_lines(fig2_lines, out_dir / "figure2_accuracy_vs_k.png",
                      f"Figure 2 ({results['suite']}): held-out ranking accuracy at {results['steps']} steps",
                      "pairwise accuracy of the implicit reward", xlabel="K (responses per prompt in training)",
                      hline=0.5, xticks=ks)
    return [fig1, fig2]


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _suite_section(res: dict, report_dir: Path) -> list[str]:
    runs = res["runs"]
    fig1_run = _fig1_run(res)
    rel = [os.path.relpath(p, report_dir) for p in res["figures"]]
    dpo, lpo_abs = chosen_trend(runs["dpo_pairs"]["metrics"]), chosen_trend(runs[fig1_run]["metrics"])
    lines = [f"## {res['suite']} ({res['steps']} steps per run, {res['seconds']:.0f} s)", "",
             "### Figure 1: chosen log-likelihood over training", "", f"![Figure 1]({rel[0]})", "",
             "| run | logps/chosen, first 15 % of steps | last 15 % | change |", "|---|---:|---:|---:|",
             f"| DPO on Zephyr pairs | {_f(dpo['first'])} | {_f(dpo['last'])} | {_f(dpo['change'])} |",
             f"| LPO-abs ({fig1_run}) | {_f(lpo_abs['first'])} | {_f(lpo_abs['last'])} | {_f(lpo_abs['change'])} |", ""]
    if dpo["change"] is not None and lpo_abs["change"] is not None:
        falls, rises = dpo["change"] < 0, lpo_abs["change"] > 0
        verdict = ("shows the paper's effect: the chosen log-likelihood falls under DPO and rises under LPO-abs."
                   if falls and rises else
                   "does NOT show the paper's effect as stated: " +
                   ("DPO's chosen log-likelihood rises too; " if not falls else "DPO's falls as in the paper; ") +
                   ("LPO-abs's rises." if rises else "LPO-abs's falls."))
        lines += [f"**The miniature {verdict}**", "",
                  f"Change of the chosen log-likelihood over the run: DPO {dpo['change']:+.2f} nats, LPO-abs "
                  f"{lpo_abs['change']:+.2f} nats. From a random start every response's likelihood first rises as "
                  "the model learns the answer format; the paper's DPO decline is measured from an SFT model that "
                  "already fits the responses.", ""]
    ks = sorted(int(name.rsplit("_k", 1)[1]) for name in runs if name.startswith("lpo_k"))
    lines += ["### Figure 2: held-out ranking accuracy vs K (equal steps)", "", f"![Figure 2]({rel[1]})", "",
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
    return lines


def write_report(results: list[dict], path: Path, total_seconds: float, demo_cfg) -> Path:
    """Write the markdown report; returns its path."""
    import torch

    lines = ["# LPO in miniature: `nemo-lpo reproduce`", "",
             f"Tiny Mixtral (2 layers, hidden 64, 4 experts top-2, Mistral v1 vocabulary), randomly initialised "
             f"(seed {demo_cfg.seed}); the reference μ is the start model. β = {demo_cfg.beta}, lr {demo_cfg.lr} "
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
    write_jsonl_atomic(path, ("\n".join(lines) + "\n").encode())
    return path
