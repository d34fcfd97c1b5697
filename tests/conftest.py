"""Shared pytest fixtures: the real third-party data beside the checkout, and torchrun launching."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny models on a 2-core machine: extra intra-op threads only add contention (torchrun workers inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc gives every freed block above its mmap threshold back to the kernel, so each step's logits ([tokens, 32768]
# fp32) come back as fresh zero-filled pages. Measured on the 1-process parity worker (3 scenarios, 4 runs each):
# 1.65 M page faults and 5.2-5.8 s of kernel time in 24-28 s, against 0.44 M and 2.3-2.7 s with these settings
# (wall 10-15 % less). Allocator tuning only, no result changes; every process of the suite inherits it, except the
# tests that measure memory (test_convert_memory.py drops it: its cap is for the default allocator).
ALLOCATOR_TUNING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
for _name, _value in ALLOCATOR_TUNING.items():
    os.environ.setdefault(_name, _value)

# The suite is the CPU suite (gloo, the CPU compatibility layer) on every machine: in-process tests build
# their models where torch.cuda.is_available() says, so on a GPU machine they would silently change device.
# The GPU is hidden before torch looks; tests/test_gpu.py gives it back to the processes it launches.
# The value before the suite hid it travels in NEMO_LPO_TEST_CUDA_DEVICES to pytest-xdist workers (their conftest
# import sees the hidden one); "<unset>" stands for no CUDA_VISIBLE_DEVICES at all.
_ORIGINAL = os.environ.setdefault("NEMO_LPO_TEST_CUDA_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
CUDA_DEVICES = None if _ORIGINAL == "<unset>" else _ORIGINAL
GPU_PRESENT = CUDA_DEVICES != "" and shutil.which("nvidia-smi") is not None and subprocess.run(
    ["nvidia-smi", "-L"], capture_output=True).returncode == 0
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def gpu_env(env: dict) -> dict:
    """``env`` with the GPU visible again (as it was before the suite hid it)."""
    env = dict(env)
    if CUDA_DEVICES is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = CUDA_DEVICES
    return env


@functools.cache
def cuda_failure() -> str | None:
    """Why CUDA does not work in a fresh process with the GPU visible again; None when a CUDA kernel ran there."""
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.cuda.init(); "
                            "assert float(torch.ones(2, device='cuda').sum()) == 2.0"],
                           capture_output=True, text=True, env=gpu_env(os.environ), timeout=300)
    lines = (probe.stdout + probe.stderr).strip().splitlines()
    return None if probe.returncode == 0 else (lines[-1] if lines else f"exit status {probe.returncode}")


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real UltraFeedback, HH-RLHF, AlpacaEval samples); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real third-party data not found at {SHARED_DATA} (only present beside the dev checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors (the loss tests): OpenMP threads only add barrier waits on a shared 2-core machine (40 -> 3 ms)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def megatron_single():
    """Megatron's parallel state for one process (gloo on CPU), torn down after the test module."""
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=1234)
    yield
    destroy_parallel()


# The longest modules first, so that the two pytest-xdist workers end together (the others keep their order; the
# scheduler keeps this order with --no-loadscope-reorder, pyproject.toml). Measured per file on the 2-core box,
# today's run of 2026-12-07: parity 441 s, crash 247 s, Slurm 85 s, tools 76 s, Bridge parity 55 s, Bridge deps
# 52 s (mostly waiting for PyPI), checkpoint 49 s, from-checkpoint 43 s, convert-dist 39 s, container check 33 s,
# learns 32 s, on-policy ~30 s, quiet 30 s, demo 30 s, model parallel 29 s (one launch). Items of one module stay
# together (module-scoped fixtures run once).
SLOWEST_FIRST = ("test_train_parity.py", "test_train_crash.py", "test_launch_slurm.py", "test_tools.py",
                 "test_bridge_parity.py", "test_bridge_deps.py", "test_train_checkpoint.py",
                 "test_train_from_checkpoint.py", "test_convert_dist.py", "test_container_check.py",
                 "test_train_learns.py", "test_onpolicy.py", "test_quiet.py", "test_demo_pipeline.py",
                 "test_model_parallel.py", "test_shared_prompt_train.py", "test_convert_memory.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
