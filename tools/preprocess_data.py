#!/usr/bin/env python3
"""Megatron-LM's ``tools/preprocess_data.py`` habit for listwise data: the same as ``nemo-lpo pack``.

    python tools/preprocess_data.py --input lists.jsonl --output-prefix data/lists --tokenizer-model DIR --workers 8

Every ``nemo-lpo pack`` option works as it is; Megatron-LM's ``--tokenizer-model`` is accepted for ``--tokenizer``
(a local HF tokenizer directory, or ``mistral``). The output is a pair of Megatron indexed datasets per field plus a
manifest (docs/data.md), written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nemo_lpo.cli import main  # noqa: E402

ALIASES = {"--tokenizer-model": "--tokenizer"}


def translate(argv: list[str]) -> list[str]:
    """``nemo-lpo pack`` arguments from Megatron-LM style ones (``--tokenizer-model X`` / ``--tokenizer-model=X``)."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(ALIASES.get(flag, flag) + eq + value if flag in ALIASES else arg)
    return ["pack", *out]


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
