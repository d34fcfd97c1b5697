"""Throughput of ``nemo-lpo pack`` (1 and 2 workers) vs the tokenizer alone on the same texts, in one run.

Data: the real UltraFeedback pairs and AlpacaEval K=8 lists from ../shared/data when present (converted to
one listwise JSONL), otherwise generated text. Tokenizer: the real Mistral v1 tokenizer (mistral-common).
Printed: lists/s and tokens/s of each, and ratios measured side by side (best of --repeats runs each).
Goal: pack >= 0.8x the tokenizer's own throughput; 2 workers near 2x one worker.

    .venv/bin/python bench/bench_pack.py [--repeats 3] [--limit 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_lists(limit: int) -> list[dict]:
    lists = []
    for name in ("train_clean.jsonl", "eval_clean.jsonl"):
        for line in open(SHARED / "ultrafeedback_binarized" / name):
            r = json.loads(line)
            m = r["metadata"]
            lists.append({"prompt": r["prompt"], "responses": [{"text": r["chosen"], "reward": m["score_chosen"]},
                                                                {"text": r["rejected"], "reward": m["score_rejected"]}]})
    for line in open(SHARED / "alpacaeval2" / "alpacaeval2_gpt4turbo_k8_a.jsonl"):
        r = json.loads(line)
        lists.append({"prompt": r["prompt"], "responses": [{"text": x["text"], "reward": x["reward"]}
                                                           for x in r["responses"]]})
    return lists[:limit]


def generated_lists(limit: int) -> list[dict]:
    rng = random.Random(0)
    words = "the model answers a question about data with several careful sentences and some numbers 42".split()
    def text(n):
        return " ".join(rng.choice(words) for _ in range(n)) + "."
    return [{"prompt": text(30), "responses": [{"text": text(200), "reward": rng.random()} for _ in range(4)]}
            for _ in range(limit)]


def measure(repeats: int, fns: dict) -> tuple[dict, dict]:
    """Best wall-clock and best CPU seconds (this process + its finished children) of each fn, interleaved."""
    wall = {name: float("inf") for name in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), os.times()
            fn()
            t1, c1 = time.perf_counter(), os.times()
            wall[name] = min(wall[name], t1 - t0)
            used = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + (
                c1.children_system - c0.children_system)
            cpu[name] = min(cpu[name], used)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=2000, help="lists to pack")
    args = parser.parse_args()

    from nemo_lpo.data.dataset import _indexed_builder  # noqa: F401  (import megatron before timing)
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.templates import MistralChatTokenizer

    source = "../shared/data (UltraFeedback pairs + AlpacaEval K=8)" if SHARED.is_dir() else "generated text"
    lists = real_lists(args.limit) if SHARED.is_dir() else generated_lists(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    src = tmp / "lists.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate(lists)))

    tok = MistralChatTokenizer()
    raw = tok._raw
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in lists]
    texts = [[x["text"] for x in r["responses"]] for r in lists]

    def tokenizer_raw():  # the bare sentencepiece encode of every prompt and response text
        return sum(len(raw.encode(r["prompt"], bos=True, eos=False)) +
                   sum(len(raw.encode(t, bos=False, eos=True)) for t in ts) for r, ts in zip(lists, texts, strict=True))

    def tokenizer_template():  # the same chat-template tokenisation pack does, in this process
        return sum(len(p) + sum(map(len, rs)) for p, rs in
                   (tok.encode_list(m, ts) for m, ts in zip(prompts, texts, strict=True)))

    def run_pack(workers: int):
        def fn():
            pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp / f"w{workers}" / "ds"), workers=workers,
                            skip_invalid=True),
                 log=lambda message: None)
        return fn

    tokens = tokenizer_template()  # tokens stored per run (prompt once per list + every response)
    n_responses = sum(map(len, texts))
    wall, cpu = measure(args.repeats, {
        "tokenizer alone (raw encode)": tokenizer_raw,
        "tokenizer + chat template": tokenizer_template,
        "pack, 1 worker": run_pack(1),
        "pack, 2 workers": run_pack(2),
    })
    same = all((tmp / "w1" / f"ds.{p}").read_bytes() == (tmp / "w2" / f"ds.{p}").read_bytes()
               for p in ("tokens.bin", "tokens.idx", "rewards.bin", "rewards.idx", "manifest.json"))
    print(f"data: {source}: {len(lists)} lists, {n_responses} responses, {tokens} tokens; "
          f"cpus: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print(f"{'':32}{'wall s':>8}{'lists/s':>9}{'tokens/s':>11}{'cpu s':>8}{'tokens/cpu-s':>14}")
    for name in wall:
        print(f"{name:32}{wall[name]:8.3f}{len(lists) / wall[name]:9.0f}{tokens / wall[name]:11.0f}"
              f"{cpu[name]:8.3f}{tokens / cpu[name]:14.0f}")
    base, base_cpu = wall["tokenizer alone (raw encode)"], cpu["tokenizer alone (raw encode)"]
    for name in ("pack, 1 worker", "pack, 2 workers"):
        print(f"ratio {name} / tokenizer alone: wall {base / wall[name]:.2f}x, per cpu-second "
              f"{base_cpu / cpu[name]:.2f}x")
    print(f"ratio pack, 1 worker / tokenizer + template (wall): "
          f"{wall['tokenizer + chat template'] / wall['pack, 1 worker']:.2f}x")
    print(f"speed-up 2 workers vs 1 (wall): {wall['pack, 1 worker'] / wall['pack, 2 workers']:.2f}x")
    print(f"1-worker and 2-worker outputs byte-identical: {same}")

if __name__ == "__main__":
    main()
