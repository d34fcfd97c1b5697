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
