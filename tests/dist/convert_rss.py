"""Subprocess worker: run one conversion and report its memory as JSON on the last stdout line.

Usage: convert_rss.py hf-to-mcore|mcore-to-hf SRC OUT SHARD_BYTES WARMUP_HF_DIR SCRATCH_DIR
A warm-up round trip of the small model at WARMUP_HF_DIR first pays every lazy import and cache, then the
peak-RSS mark is reset (/proc/self/clear_refs), so the reported growth is the conversion's own.
Prints {"baseline_rss": bytes before converting, "peak_rss": the process's VmHWM in bytes}.
VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child spawned by a big parent (pytest
holding a model) would report the parent's size.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import psutil


def peak_rss() -> int:
    """The process's peak resident set size since the last reset, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def main() -> int:
    direction, src, out, shard_bytes, warm_hf, scratch = sys.argv[1:7]
    from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
    from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf

    convert_hf_to_mcore(warm_hf, Path(scratch) / "warm-ckpt")
    convert_mcore_to_hf(Path(scratch) / "warm-ckpt", Path(scratch) / "warm-hf")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = psutil.Process().memory_info().rss
    if direction == "hf-to-mcore":
        convert_hf_to_mcore(src, out)
    else:
        convert_mcore_to_hf(src, out, max_shard_bytes=int(shard_bytes))
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak_rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
