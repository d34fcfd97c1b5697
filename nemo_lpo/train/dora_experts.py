"""Bridge's DoRA for the experts of a MoE layer: the one piece of Megatron-Bridge 0.6.2's PEFT that cannot serve as is.

``DoRALinear.forward`` (``megatron/bridge/peft/dora_layers.py:160``) shapes the magnitude scale as ``(1, 1, out)``
for ``[s, b, h]`` activations. megatron's ``SequentialMLP`` experts get their tokens as ``[tokens, h]``: the scale
then broadcasts them to ``[1, tokens, out]`` and the experts' outputs no longer concatenate. ``ExpertsDoRALinear``
runs a 2-D input through Bridge's own forward as ``[tokens, 1, h]`` and squeezes the result back; everything
else (the magnitude, the norm, the TP gathers, the state dicts) is Bridge's. Expert DoRA at expert tensor
parallelism > 1 is refused: Bridge builds it as a dense adapter (``megatron/bridge/peft/dora.py:93``, no
``is_expert``), whose fc2 delta is full-width on every expert-TP rank while megatron's base fc2 gives a partial sum
there (``explicit_expert_comm``), so the dispatcher would count the delta etp times (see ``lora_experts``). Imported only under ``peft.type=dora`` (it subclasses Bridge's classes).
"""

from __future__ import annotations

import torch
from megatron.bridge.peft.dora import DoRA
from megatron.bridge.peft.dora_layers import DoRALinear

from nemo_lpo.config import ConfigError
from nemo_lpo.train.adapter_init import SeededAdapterInit


class ExpertsDoRALinear(DoRALinear):
    """``DoRALinear`` that also takes the 2-D token-major inputs of ``SequentialMLP`` experts."""

    def forward(self, x, *args, **kwargs):
        """Bridge's DoRA forward; a ``[tokens, h]`` input goes through it as ``[tokens, 1, h]``."""
        if x.dim() != 2:
            return super().forward(x, *args, **kwargs)
        output, bias = super().forward(x.unsqueeze(1), *args, **kwargs)
        return output.squeeze(1), bias


class ExpertsDoRA(SeededAdapterInit, DoRA):
    """Bridge's ``DoRA`` whose wrappers are ``ExpertsDoRALinear`` (same parameters, state-dict keys; ``init_seed``)."""

    def transform(self, m, name=None, prefix=None):
        """Bridge's transform, then the wrapper's class swapped for the one that serves 2-D inputs."""
        wrapped = super().transform(m, name, prefix)
        expert_tp = getattr(m, "explicit_expert_comm", False) and torch.distributed.get_world_size(m.tp_group) > 1
        if wrapped is not m and expert_tp:  # Bridge builds it as a dense adapter: fc2's delta summed etp times
            raise ConfigError("peft.type=dora on expert linears needs expert tensor parallelism 1 (Megatron-Bridge "
                              "0.6.2 builds expert DoRA as a dense adapter, whose delta the MoE dispatcher would sum "
                              "once per expert-TP rank): set "
                              "parallel.etp=1, or peft.type=lora, or leave the experts out of peft.target_modules")
        if type(wrapped) is DoRALinear:
            wrapped.__class__ = ExpertsDoRALinear
        return wrapped
