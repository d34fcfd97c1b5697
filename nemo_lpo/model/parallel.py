"""Process groups and RNG seeding for megatron-core, on GPUs (nccl) or on CPU (gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel

from nemo_lpo.model.cpu_compat import apply_cpu_compat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ALLOW_CPU_ENV = "NEMO_LPO_ALLOW_CPU"  # "1": run on the CPU on purpose although this machine has GPUs
# Slurm's GPU allocations (sbatch/srun --gpus*, --gres=gpu): set and non-empty inside a GPU job step
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE",
                       "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")


def listed_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (its ``GPU i: ...`` lines); [] without nvidia-smi or when it fails."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        proc = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]


def gpus_asked_for(environ: dict | None = None) -> str | None:
    """Why this process is meant to run on GPUs, or None when it is not.

    ``CUDA_VISIBLE_DEVICES``, when set, decides: empty (or -1) hides every GPU on purpose (the test suite does
    so), anything else asks for GPUs. Unset: a non-empty Slurm GPU allocation, else the GPUs ``nvidia-smi -L``
    lists.
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return None if visible.strip() in ("", "-1") else f"CUDA_VISIBLE_DEVICES={visible}"
    for name in SLURM_GPU_VARIABLES:
        if environ.get(name, "").strip() not in ("", "0"):
            return f"{name}={environ[name]}"
    gpus = listed_gpus()
    return f"nvidia-smi -L lists {len(gpus)} GPU(s): {gpus[0]}" if gpus else None


class CPUFallbackRefused(RuntimeError):
    """The machine has GPUs but CUDA does not work in this process, and the CPU was not asked for."""


def check_cuda_or_cpu_allowed(allow_cpu: bool = False) -> None:
    """Refuse a silent CPU fallback: raise when the machine has GPUs but CUDA does not work in this process.

    Args:
        allow_cpu: run on the CPU on purpose (config ``parallel.allow_cpu``; ``NEMO_LPO_ALLOW_CPU=1`` does the
            same for every command).

    Raises:
        CPUFallbackRefused: GPUs are asked for (``gpus_asked_for``) and ``torch.cuda.is_available()`` is False.
    """
    if torch.cuda.is_available() or allow_cpu or os.environ.get(ALLOW_CPU_ENV) == "1":
        return
    reason = gpus_asked_for()
    if reason is None:
        return
    try:  # torch.cuda.is_available() is silent; initialising CUDA says why it cannot
        torch.cuda.init()
        why = "torch.cuda.is_available() is False"
    except Exception as err:  # noqa: BLE001 - any CUDA initialisation error is the reason we report
        why = f"{type(err).__name__}: {err}"
    raise CPUFallbackRefused(
        f"this machine has GPUs ({reason}) but CUDA does not work in this process (torch {torch.__version__}, "
        f"built for CUDA {torch.version.cuda}; {why}). Refusing to fall back to the CPU silently: fix the driver "
        f"/ container / torch build, or run on the CPU on purpose with parallel.allow_cpu=true (any command: "
        f"{ALLOW_CPU_ENV}=1)")


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    seed: int = 1234,
    backend: str | None = None,
    vpp: int = 1,
    allow_cpu: bool = False,
) -> None:
    """Initialise torch.distributed, megatron's model-parallel groups and its RNG tracker.

    Works inside torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK) and in a plain single process (a
    one-rank group on a free local port). On a machine without CUDA the CPU compatibility layer is
    applied first and the backend is always gloo (torch reports NCCL available even without a GPU).

    Args:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert-tensor-parallel size (None: megatron's default, equal to ``tp``).
        seed: base seed; megatron derives the TP / expert streams from it.
        backend: force a torch.distributed backend (default: nccl with CUDA, gloo without).
        vpp: virtual pipeline stages (model chunks) per pipeline rank; 1 = no interleaving.
        allow_cpu: run on the CPU although this machine has GPUs (``check_cuda_or_cpu_allowed``).

    Raises:
        CPUFallbackRefused: the machine has GPUs but CUDA does not work here, and ``allow_cpu`` is not set.
    """
    check_cuda_or_cpu_allowed(allow_cpu)
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("backend='nccl' needs CUDA; this machine has none (use gloo)")

    if not torch.distributed.is_initialized():
        init_method = None
        if "RANK" not in os.environ:  # a plain single process: a one-rank group on a free local port
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world_size,
            rank=rank,
            timeout=timedelta(minutes=10),
        )
    world_size = torch.distributed.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    # As Megatron-LM's _set_random_seed: the CPU generator too (it is the only one on CPU), then the
    # tracked model-parallel streams.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
