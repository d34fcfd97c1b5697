"""Listwise data: readers, tokenisation, packing into megatron indexed datasets, and reading back.

The public names are imported lazily so that ``import nemo_lpo.data`` (and the CLI) stays cheap:
megatron-core and torch are only imported when a dataset, collator or the packer is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ListwiseExample": "nemo_lpo.data.examples",
    "ListwiseDataset": "nemo_lpo.data.dataset",
    "write_reference_logps": "nemo_lpo.data.dataset",
    "ListwiseSampler": "nemo_lpo.data.sampler",
    "PackConfig": "nemo_lpo.data.pack",
    "pack": "nemo_lpo.data.pack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
