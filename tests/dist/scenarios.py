"""The torchrun workers' scenario loop: run each named scenario in turn, report a failure and go on."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def run_scenarios(run: Callable[[Path, str, str], None]) -> None:
    """``run(work, prefix, name)`` for every name of ``argv[3:]`` (``argv[1]``: work dir, ``argv[2]``: data prefix).

    A failing scenario prints ``RESULT {"scenario", "error"}`` on rank 0 (other ranks print theirs to stderr: a failure
    there would otherwise only show as rank 0 waiting for it); the other scenarios still give their numbers.
    """
    import torch

    from nemo_lpo.model.parallel import destroy_parallel

    work, prefix, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    try:
        for name in names:
            try:
                run(work, prefix, name)
            except Exception:  # noqa: BLE001 - reported below, the next scenario runs
                if torch.distributed.get_rank() == 0:
                    print("RESULT " + json.dumps({"scenario": name, "error": traceback.format_exc()}), flush=True)
                else:
                    print(f"rank {torch.distributed.get_rank()}: scenario {name} failed:\n{traceback.format_exc()}",
                          file=sys.stderr, flush=True)
    finally:
        destroy_parallel()
