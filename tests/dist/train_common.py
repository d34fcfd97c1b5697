"""Helpers shared by the trainer tests: a small packed dataset and parsing of worker output."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_LISTS = REPO / "nemo_lpo" / "demo" / "data" / "train.jsonl"  # the embedded default (K = 4, short)
TINY_CONF = REPO / "conf" / "tiny_cpu.yaml"


def pack_lists(src: Path, prefix: Path, n: int, max_length: int | None = None) -> Path:
    """Pack the first ``n`` lists of the JSONL ``src`` with the real Mistral tokenizer; returns the prefix."""
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.transforms import LengthLimits

    prefix.parent.mkdir(parents=True, exist_ok=True)
    head = prefix.parent / f"{prefix.name}.input.jsonl"
    with open(src) as f:
        head.write_text("".join(line for _, line in zip(range(n), f, strict=False)))
    limits = LengthLimits(max_length=max_length, overflow="truncate_response") if max_length else LengthLimits()
    pack(PackConfig(inputs=[str(head)], output_prefix=str(prefix), limits=limits), log=lambda message: None)
    return prefix


def results(output: str) -> dict[str, dict]:
    """The ``RESULT {json}`` lines a worker printed, by scenario."""
    found = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT "):])
            found[record["scenario"]] = record
    return found


def metrics_lines(path: Path) -> list[dict]:
    """The metrics JSONL of a run."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def without_timings(line: dict) -> dict:
    """A metrics line without the wall-clock fields (they differ between identical runs)."""
    return {k: v for k, v in line.items() if not (k.startswith("time/") or k in ("step_time", "tokens_per_s"))}


# The ragged parity lists: (rewards, response lengths in words). K runs from 2 to 8, several lists have tied
# rewards, list 2 (and list 9, a pair) has NO strictly ordered pair (valid, loss 0), and the responses run from
# 1 word to 199 words: 2 to 200 tokens with the EOS (an empty response, EOS alone, is refused by `pack`). Every
# parallel layout sees ragged K, ragged lengths, empty pair sets and micro-batches of mostly padding.
RAGGED_SPEC = [
    ([1.0, 0.0], [1, 199]),
    ([0.9, 0.5, 0.5, 0.1, 0.9, 0.3, 0.0, 0.7], [3, 17, 1, 40, 8, 25, 2, 60]),
    ([0.5, 0.5, 0.5], [12, 4, 30]),
    ([0.2, 0.8, 0.4, 0.6, 0.0], [5, 9, 120, 2, 14]),
    ([0.7, 0.7, 0.1, 0.3], [6, 1, 22, 11]),
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [2, 3, 4, 5, 6, 7, 8]),
    ([0.0, 1.0, 0.5, 0.5, 0.25, 0.75], [44, 1, 9, 9, 70, 3]),
    ([0.6, 0.3], [15, 150]),
    ([0.4, 0.9, 0.4], [7, 2, 33]),
    ([0.8, 0.8], [10, 5]),
    ([0.3, 0.0, 1.0, 0.6, 0.6, 0.9, 0.2, 0.1], [1, 13, 26, 5, 90, 4, 18, 2]),
    ([0.5, 0.0, 0.25, 1.0], [11, 3, 1, 55]),
]
_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "red", "blue", "one", "two", "and", "big", "sun", "sky"]


def write_ragged_lists(path: Path) -> Path:
    """Write the RAGGED_SPEC lists as listwise JSONL (prompts 3-12 words; each word one Mistral token)."""
    import random

    rng = random.Random(17)
    records = []
    for i, (rewards, lengths) in enumerate(RAGGED_SPEC):
        prompt = "Say: " + " ".join(rng.choice(_WORDS) for _ in range(3 + i % 10))
        responses = [{"text": " ".join(rng.choice(_WORDS) for _ in range(n)), "reward": r}
                     for r, n in zip(rewards, lengths, strict=True)]
        records.append(json.dumps({"id": f"ragged-{i}", "prompt": prompt, "responses": responses}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(records) + "\n")
    return path


def seed_resume(work: Path, name: str, saved: Path) -> None:
    """Make ``saved`` (a step folder) the latest checkpoint of run ``work/name`` so that the run resumes from it.

    Rank 0 copies, every rank waits (a torchrun worker helper: the process group is up).
    """
    import shutil

    import torch

    if torch.distributed.get_rank() == 0:
        ckpt = work / name / "checkpoints"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(saved, ckpt / saved.name)
        (ckpt / "latest").write_text(saved.name + "\n")
    torch.distributed.barrier()


def scenario(found: dict, name: str) -> dict:
    """The result a worker printed for scenario ``name`` (``results``); fails naming a missing or failed one."""
    assert name in found, f"scenario {name} printed no result"
    assert "error" not in found[name], f"scenario {name} failed:\n{found[name]['error']}"
    return found[name]
