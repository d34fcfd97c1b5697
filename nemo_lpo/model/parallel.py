"""Process groups and RNG seeding for megatron-core, on GPUs (nccl) or on CPU (gloo)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel

from nemo_lpo.model.cpu_compat import apply_cpu_compat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    seed: int = 1234,
    backend: str | None = None,
    vpp: int = 1,
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
    """
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
