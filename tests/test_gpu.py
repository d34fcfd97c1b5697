"""The trainer on a CUDA device (skipped on machines without one, i.e. in CI).

Run on a GPU machine with ``python -m pytest -m gpu``. What they hold:
- a checkpoint trained on the GPU gives the same reference log-probs on the GPU and on the CPU (the
  dist checkpoint is device-portable and the CPU compatibility layer computes what CUDA computes);
- bf16 training on the GPU (Float16Module, fp32 main grads) learns the embedded lists like fp32 does;
- shared-prompt batches give the padded layout's loss on the GPU (the packed attention mask on CUDA).

Each test first asserts that CUDA works with the GPU visible (a CUDA kernel ran in a fresh process): on a
machine whose nvidia-smi lists a GPU but whose CUDA is broken they FAIL rather than run on the CPU; the trainer
and ref-logps refuse such a fallback themselves too (``model.parallel.check_cuda_or_cpu_allowed``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GPU_PRESENT, cuda_failure, gpu_env
from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU_PRESENT, reason="needs an NVIDIA GPU (nvidia-smi -L)")]


@pytest.fixture(autouse=True)
def cuda_works():
    """Every GPU check runs on CUDA: fail (not skip, not run on the CPU) where CUDA does not work."""
    failure = cuda_failure()
    assert failure is None, f"nvidia-smi lists a GPU but CUDA does not work with it visible: {failure}"


COMMON = ["logging.tensorboard=false", "checkpoint.save_interval=null", "data.shuffle=false"]


def nemo_lpo(*args: str, cpu: bool = False) -> str:
    """Run ``nemo-lpo ARGS`` in a fresh process (on the CPU with ``cpu``); returns its output, raises on failure."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    if not cpu:
        env = gpu_env(env)
    proc = subprocess.run([sys.executable, "-m", "nemo_lpo.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nemo-lpo {' '.join(args)} failed (rc {proc.returncode}):\n{out[-6000:]}"
    return out


def copy_dataset(prefix: Path, dst: Path) -> Path:
    """Copy every file of the packed dataset ``prefix`` to the prefix ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(f, dst.parent / (dst.name + f.name[len(prefix.name):]))
    return dst


def ref_logps(prefix: Path) -> np.ndarray:
    from nemo_lpo.data import ListwiseDataset

    ds = ListwiseDataset(prefix)
    assert ds.has_ref_logps
    return np.concatenate([np.asarray(ds[i]["ref_logps"], dtype=np.float64) for i in range(len(ds))])


def test_gpu_checkpoint_gives_cpu_reference_logps(tmp_path):
    prefix = pack_lists(DEMO_LISTS, tmp_path / "gpu" / "lists", 16)
    run = tmp_path / "run"
    nemo_lpo("train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}", "reference.mode=online",
             "train.max_steps=2", "optim.lr=1e-3", "data.global_batch_size=4", "data.micro_batch_size=2", *COMMON)
    ckpt = run / "checkpoints"
    cpu_prefix = copy_dataset(prefix, tmp_path / "cpu" / "lists")
    nemo_lpo("ref-logps", str(TINY_CONF), f"data.train_prefix={prefix}", "--checkpoint", str(ckpt))
    nemo_lpo("ref-logps", str(TINY_CONF), f"data.train_prefix={cpu_prefix}", "--checkpoint", str(ckpt), cpu=True)
    gpu, cpu = ref_logps(prefix), ref_logps(cpu_prefix)
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all() and (gpu < 0).all()
    rel = np.abs(gpu - cpu).max() / np.abs(cpu).max()
    print(f"GPU vs CPU reference log-probs: max rel diff {rel:.2e} over {gpu.size} responses")
    assert rel < 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_training_learns(tmp_path, dtype):
    prefix = pack_lists(DEMO_LISTS, tmp_path / "data" / "lists", 16)
    run = tmp_path / "run"
    nemo_lpo("train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}", "reference.mode=online",
             f"model.params_dtype={dtype}", "train.max_steps=24", "optim.lr=2e-3", "optim.warmup_steps=2",
             "data.global_batch_size=4", "data.micro_batch_size=4", "checkpoint.save_at_end=false", *COMMON)
    lines = metrics_lines(run / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 25))
    assert all(np.isfinite(line["loss"]) for line in lines)
    first, last = lines[:4], lines[-4:]  # the first and the last pass over the same 16 lists
    mean = lambda part, key: sum(line[key] for line in part) / len(part)  # noqa: E731
    print(f"{dtype}: loss {mean(first, 'loss'):.4f} -> {mean(last, 'loss'):.4f}, accuracy "
          f"{mean(first, 'rewards/accuracies'):.3f} -> {mean(last, 'rewards/accuracies'):.3f}, "
          f"step {1000 * mean(last, 'step_time'):.0f} ms")
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert "tflops_per_gpu" in lines[-1]  # an H100 is a known GPU: the trainer reports TFLOP/s and MFU


def test_gpu_shared_prompt_matches_padded_loss(tmp_path):
    prefix = pack_lists(DEMO_LISTS, tmp_path / "data" / "lists", 8)
    losses = {}
    for layout, flag in [("padded", "false"), ("shared", "true")]:
        run = tmp_path / layout
        nemo_lpo("train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}",
                 "reference.mode=online", "train.max_steps=2", "optim.lr=1e-3", "data.global_batch_size=4",
                 "data.micro_batch_size=2", f"data.shared_prompt={flag}", "checkpoint.save_at_end=false", *COMMON)
        losses[layout] = [line["loss"] for line in metrics_lines(run / "metrics.jsonl")]
    print(f"loss per step, padded {losses['padded']} shared {losses['shared']}")
    # step 1: policy == reference, the same closed form in both layouts. Step 2 follows one update whose MoE
    # load-balancing term counts the shared prompt's tokens once instead of K times: close, not equal.
    assert abs(losses["padded"][0] - losses["shared"][0]) < 1e-5
    assert np.allclose(losses["padded"], losses["shared"], rtol=1e-3)
