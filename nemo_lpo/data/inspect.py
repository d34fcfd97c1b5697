"""``nemo-lpo inspect``: a packed dataset's manifest, length histograms, K distribution and decoded lists."""

from __future__ import annotations

import json
import os

import numpy as np

from nemo_lpo.data.dataset import ListwiseDataset
from nemo_lpo.data.templates import load_tokenizer


def histogram(values: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram over power-of-two buckets ``[2^i, 2^(i+1))``."""
    if len(values) == 0:
        return ["  (empty)"]
    buckets = np.floor(np.log2(np.maximum(values, 1))).astype(int)
    counts = np.bincount(buckets)
    top = counts.max()
    lines = []
    for b, count in enumerate(counts):
        if count:
            bar = "#" * max(1, round(width * count / top))
            lines.append(f"  [{2 ** b:>6}, {2 ** (b + 1):>6})  {count:>8}  {bar}")
    lines.append(f"  min {values.min()}  median {int(np.median(values))}  mean {values.mean():.1f}  max {values.max()}")
    return lines


def _decoder(tokenizer: dict):
    name = tokenizer.get("name", "")
    if name != "mistral" and not os.path.isdir(name):
        return None
    return load_tokenizer(name).decode


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + f"... [{len(text) - max_chars} more chars]"


def inspect_dataset(prefix: str, show: int = 2, max_chars: int = 400) -> str:
    """Return the human-readable report of the dataset at ``prefix``."""
    ds = ListwiseDataset(prefix)
    m = ds.manifest
    doc = ds._doc_index
    seq_lengths = np.asarray(ds.sequence_lengths(), dtype=np.int64)
    is_prompt = np.zeros(len(seq_lengths), dtype=bool)
    is_prompt[doc[:-1]] = True
    prompt_lengths = seq_lengths[is_prompt]
    response_lengths = seq_lengths[~is_prompt]
    k = ds.num_responses()
    total = np.repeat(prompt_lengths, k) + response_lengths
    out = [f"dataset {prefix}: {len(ds)} lists, {len(response_lengths)} responses, "
           f"{int(seq_lengths.sum())} stored tokens",
           f"tokenizer: {m['tokenizer']['name']} (vocab {ds.vocab_size}, eos {ds.eos_id}, pad {ds.pad_id})",
           "inputs: " + ", ".join(f"{i['path']} [{i['format']}]" for i in m["inputs"]),
           "options: " + json.dumps(m["options"], sort_keys=True),
           "counts: " + json.dumps(m["counts"], sort_keys=True),
           f"reference log-probs: {'yes ' + json.dumps(ds.ref_meta, sort_keys=True) if ds.has_ref_logps else 'no'}",
           "K distribution:"]
    values, counts = np.unique(k, return_counts=True)
    out += [f"  K={v}: {c}" for v, c in zip(values, counts, strict=True)]
    for title, values in (("prompt tokens", prompt_lengths), ("response tokens", response_lengths),
                          ("prompt + response tokens", total)):
        out += [f"{title}:", *histogram(values)]
    decode = _decoder(m["tokenizer"])
    for i in range(min(show, len(ds))):
        item = ds[i]
        out.append(f"--- list {i} (K={len(item['response_ids'])}) prompt, {len(item['prompt_ids'])} tokens:")
        out.append(_clip(decode(item["prompt_ids"]) if decode else str(item["prompt_ids"].tolist()), max_chars))
        for slot, ids in enumerate(item["response_ids"]):
            out.append(f"  [response {slot}] reward {float(item['rewards'][slot]):.4g}, {len(ids)} tokens:")
            out.append("  " + _clip(decode(ids) if decode else str(ids.tolist()), max_chars))
    return "\n".join(out)
