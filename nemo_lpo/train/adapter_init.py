"""Adapters drawn from a seed of their own, whoever applies them.

nemo-lpo's trainer applies Bridge's LoRA / DoRA itself (``adapters.add_adapters``); ``nemo-lpo bridge-train`` leaves
it to Megatron-Bridge's PEFT pre-wrap hook (``training/setup.py`` ``_create_peft_pre_wrap_hook``), which calls the
PEFT object on the loaded base. Seeding inside that call gives both the same adapters for one ``train.seed``, and
makes them independent of what ran before in the process (a reference pass, another model, a checkpoint load).

Scope: the draws of host-initialised weights (``use_cpu_initialization``, the default without CUDA), which come
from torch's CPU generator. With weights initialised on the GPU, megatron-core draws them inside its CUDA RNG
tracker (``tensor_parallel/layers.py`` ``_initialize_affine_weight_gpu``), seeded per model-parallel rank at
start-up; the CPU seed does not reach those.
"""

from __future__ import annotations

import torch


class SeededAdapterInit:
    """Mixin for a Megatron-Bridge PEFT class: its adapter init drawn from ``init_seed``.

    ``__call__`` (the transform of the whole model) runs on a forked CPU generator seeded with ``init_seed``
    (set by ``adapters.build_peft``), leaving the process's own stream untouched.
    """

    init_seed: int

    def __call__(self, model, training: bool = True):
        """Bridge's transform of ``model`` (a chunk or a list of chunks), drawing from ``init_seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            return super().__call__(model, training)
