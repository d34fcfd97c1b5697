"""Throughput of ``nemo-lpo pack`` (1 and 2 workers) vs the tokenizer alone on the same texts, in one run.

Data: the real UltraFeedback pairs and AlpacaEval K=8 lists of the --data folder ($NEMO_LPO_DATA) when given
(converted to one listwise JSONL), otherwise generated text. Tokenizer: the real Mistral v1 tokenizer (mistral-common).
Baselines, on the prompt and response texts of every list: the tokenizer one text at a time as mistral-common
calls it (``encode`` -> list of ints), and the same sentencepiece model doing the best it can: one batched
``Encode`` of all the texts to int32 arrays, single-threaded (pack batches too, so this is the fair one), and
with 2 threads (what 2 cores give the tokenizer itself, next to 2 workers).
Printed: lists/s and tokens/s of each (median of --repeats interleaved runs), and ratios measured side by side.
Goal: pack >= 0.8x the tokenizer's own throughput; 2 workers near 2x one worker. Also printed: the CPU the main
process spends for all the workers (reading, ids, writing, handing chunks out), which bounds the speed-up with
many workers: it cannot exceed (1-worker CPU) / (that CPU), where the main process does nothing else.

    .venv/bin/python bench/bench_pack.py [--repeats 5] [--limit 2000] [--workers 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_utils import add_data_argument


def real_lists(data: Path, limit: int) -> list[dict]:
    lists = []
    for name in ("train_clean.jsonl", "eval_clean.jsonl"):
        for line in open(data / "ultrafeedback_binarized" / name):
            r = json.loads(line)
            m = r["metadata"]
            lists.append({"prompt": r["prompt"], "responses": [{"text": r["chosen"], "reward": m["score_chosen"]},
                                                                {"text": r["rejected"], "reward": m["score_rejected"]}]})
    for line in open(data / "alpacaeval2" / "alpacaeval2_gpt4turbo_k8_a.jsonl"):
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


# CPU the main process spends inside its own share of the chunks, per pack run: what is left of its CPU is
# what it does for all the workers (reading, checking ids, writing, handing chunks out), the serial part.
_OWN_CHUNKS = {"cpu": 0.0}


def timed_process_chunk(chunk):
    c0 = time.process_time()
    try:
        return _OWN_CHUNKS["process_chunk"](chunk)
    finally:
        _OWN_CHUNKS["cpu"] += time.process_time() - c0


def measure(repeats: int, fns: dict) -> tuple[dict, dict]:
    """Median wall-clock and CPU seconds (this process + its finished children) of each fn, interleaved."""
    for fn in fns.values():  # warm-up (first-call imports and caches)
        fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), os.times()
            fn()
            t1, c1 = time.perf_counter(), os.times()
            wall[name].append(t1 - t0)
            cpu[name].append((c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user)
                             + (c1.children_system - c0.children_system))
    return ({name: statistics.median(v) for name, v in wall.items()},
            {name: statistics.median(v) for name, v in cpu.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000, help="lists to pack")
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="worker counts compared with 1 (scaling is only meaningful below the CPU count: "
                             "the reading process needs a core too)")
    add_data_argument(parser)
    args = parser.parse_args()

    from nemo_lpo.data import chunk_worker
    from nemo_lpo.data.dataset import indexed_builder
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.templates import MistralChatTokenizer

    real = args.data is not None and args.data.is_dir()
    source = f"{args.data} (UltraFeedback pairs + AlpacaEval K=8)" if real else "generated text"
    lists = real_lists(args.data, args.limit) if real else generated_lists(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    src = tmp / "lists.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate(lists)))
    indexed_builder(str(tmp / "warm.bin"), np.int32)  # import megatron (torch) before timing

    tok = MistralChatTokenizer()
    raw = tok._raw
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in lists]
    texts = [[x["text"] for x in r["responses"]] for r in lists]
    all_texts = [t for r, ts in zip(lists, texts, strict=True) for t in (r["prompt"], *ts)]
    from sentencepiece import SentencePieceProcessor

    counts = sorted({n for n in args.workers if n > 1})
    sp = {n: SentencePieceProcessor(model_file=str(raw.file_path), num_threads=n) for n in (1, *counts)}

    def tokenizer_raw():  # mistral-common's encode of every prompt and response text, one at a time
        return sum(len(raw.encode(r["prompt"], bos=True, eos=False)) +
                   sum(len(raw.encode(t, bos=False, eos=True)) for t in ts) for r, ts in zip(lists, texts, strict=True))

    def tokenizer_batched(threads: int):  # the same texts in one batched sentencepiece call, int32 arrays out
        return lambda: sum(map(len, sp[threads].Encode(all_texts, return_type="numpy")))

    def tokenizer_template():  # the same chat-template tokenisation pack does, one list at a time
        return sum(len(p) + sum(map(len, rs)) for p, rs in
                   (tok.encode_list(m, ts) for m, ts in zip(prompts, texts, strict=True)))

    _OWN_CHUNKS["process_chunk"] = chunk_worker.process_chunk
    chunk_worker.process_chunk = timed_process_chunk  # picklable by name (__main__), inherited by the forks
    serial_cpu = {n: [] for n in counts}

    def run_pack(workers: int):
        def fn():
            _OWN_CHUNKS["cpu"], c0 = 0.0, os.times()
            pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp / f"w{workers}" / "ds"), workers=workers,
                            skip_invalid=True),
                 log=lambda message: None)
            c1 = os.times()
            if workers > 1:
                serial_cpu[workers].append(c1.user - c0.user + c1.system - c0.system - _OWN_CHUNKS["cpu"])
        return fn

    tokens = tokenizer_template()  # tokens stored per run (prompt once per list + every response)
    n_responses = sum(map(len, texts))
    per_text, batched = "tokenizer alone, per text", "tokenizer alone, batched"
    threaded = {n: f"tokenizer alone, batched {n} thr" for n in counts}
    packs = {n: f"pack, {n} workers" for n in counts}
    wall, cpu = measure(args.repeats, {
        per_text: tokenizer_raw,
        batched: tokenizer_batched(1),
        **{threaded[n]: tokenizer_batched(n) for n in counts},
        "tokenizer + chat template": tokenizer_template,
        "pack, 1 worker": run_pack(1),
        **{packs[n]: run_pack(n) for n in counts},
    })
    same = all((tmp / "w1" / f"ds.{p}").read_bytes() == (tmp / f"w{n}" / f"ds.{p}").read_bytes()
               for n in counts for p in ("tokens.bin", "tokens.idx", "rewards.bin", "rewards.idx", "manifest.json"))
    print(f"data: {source}: {len(lists)} lists, {n_responses} responses, {tokens} tokens; "
          f"cpus: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats}")
    print(f"{'':32}{'wall s':>8}{'lists/s':>9}{'tokens/s':>11}{'cpu s':>8}{'tokens/cpu-s':>14}")
    for name in wall:
        print(f"{name:32}{wall[name]:8.3f}{len(lists) / wall[name]:9.0f}{tokens / wall[name]:11.0f}"
              f"{cpu[name]:8.3f}{tokens / cpu[name]:14.0f}")
    for base in (per_text, batched):
        print(f"ratio pack, 1 worker / {base}: wall {wall[base] / wall['pack, 1 worker']:.2f}x, "
              f"per cpu-second {cpu[base] / cpu['pack, 1 worker']:.2f}x")
    for n in counts:
        for base in (batched, threaded[n]):
            print(f"ratio pack, {n} workers / {base}: wall {wall[base] / wall[packs[n]]:.2f}x")
    print(f"ratio pack, 1 worker / tokenizer + template (wall): "
          f"{wall['tokenizer + chat template'] / wall['pack, 1 worker']:.2f}x")
    for n in counts:
        print(f"speed-up {n} workers vs 1 (wall): {wall['pack, 1 worker'] / wall[packs[n]]:.2f}x; "
              f"tokenizer {n} threads vs 1: {wall[batched] / wall[threaded[n]]:.2f}x")
    for n in counts:
        serial = statistics.median(serial_cpu[n])
        print(f"{n} workers: the main process's CPU besides its own chunks (reading, ids, writing, handing out): "
              f"{serial:.3f} s = {serial / cpu['pack, 1 worker']:.3f} of a 1-worker pack's CPU; "
              f"so the main process is filled by that alone at ~{cpu['pack, 1 worker'] / serial:.0f} workers (speed-up bound)")
    print(f"outputs byte-identical for 1 and {counts} workers: {same}")


if __name__ == "__main__":
    main()
