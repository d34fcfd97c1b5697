"""Shared pytest fixtures: the real third-party data beside the checkout, and torchrun launching."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models on a 2-core machine: extra intra-op threads only add contention (torchrun workers inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real UltraFeedback, HH-RLHF, AlpacaEval samples); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real third-party data not found at {SHARED_DATA} (only present beside the dev checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def megatron_single():
    """Megatron's parallel state for one process (gloo on CPU), torn down after the test module."""
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=1234)
    yield
    destroy_parallel()
