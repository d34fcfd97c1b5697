"""Shared-prompt packing: each list as ONE sequence ``[prompt, y_1, ..., y_K]``, the prompt computed once.

- ``collate_shared_prompt(items, pad_id, ...)`` builds the batch (per-token RoPE positions that continue
  from the end of the prompt for every response, segment ids from which the mask is built, and the
  per-response gather indices).
- ``shared_prompt_mask(batch)``: "causal, and each response sees the prompt and itself only" (True = masked).
- ``shared_prompt_model_inputs`` / ``shared_prompt_logps`` / ``sequence_logps_shared_prompt``: the model
  call and the [B, K] sequence log-probs (vocab-parallel cross-entropy on the gathered rows; exact under TP).
- ``SharedPromptLPOModel``: the trainer's ``LPOModel`` with its schedule callbacks on shared-prompt batches.

The public names are imported lazily so ``import nemo_lpo.packing`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "collate_shared_prompt": "nemo_lpo.packing.collate",
    "SharedPromptCollator": "nemo_lpo.packing.collate",
    "shared_prompt_mask": "nemo_lpo.packing.collate",
    "shared_prompt_model_inputs": "nemo_lpo.packing.logprobs",
    "shared_prompt_logps": "nemo_lpo.packing.logprobs",
    "sequence_logps_shared_prompt": "nemo_lpo.packing.logprobs",
    "SharedPromptLPOModel": "nemo_lpo.packing.lpo_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
