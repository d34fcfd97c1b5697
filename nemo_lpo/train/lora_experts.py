"""Bridge's LoRA for expert linears under expert tensor parallelism (etp > 1): the collectives its adapters skip.

At etp > 1 megatron-core sets ``explicit_expert_comm`` on every expert linear (``tensor_parallel/layers.py:960``
and ``:1326`` in 0.19.2) and drops that linear's tensor-parallel collectives: the MoE token dispatcher gives every
expert-TP rank the same tokens, sums the ranks' partial input gradients (fc1) and partial outputs (fc2). Megatron-
Bridge 0.6.2 builds the expert adapter's own linears with ``is_expert=True`` too (``ParallelLinearAdapter.__init__``,
``megatron/bridge/peft/utils.py:1006-1056``), so they lose their collectives as well, although the adapter's inner
contraction over the rank dimension needs them (forward exact, gradients not):

- fc1 (column-parallel): ``linear_out``'s input gradient ``B_r^T g_r`` is never all-reduced, so A's gradient and the
  input gradient miss the other ranks' output shards;
- fc2 (row-parallel): ``linear_in``'s output ``A_r x_r`` is never all-reduced, so B's gradient sees this rank's
  partial sum only, and A's gradient this rank's shard of B only.

``ExpertsLoRA`` gives those adapters their collectives back, in megatron's own terms: ``linear_out`` all-reduces its
input gradient (fc1, fc2), fc2's ``linear_in`` all-reduces its output, and fc2's ``linear_out`` keeps its output
shard and places it at its columns of a zero full-width output (the partial the dispatcher sums, as the base fc2
gives it; the adjoint is a slice). Parameters, shapes and state-dict keys stay Bridge's. The same defect is
reported upstream (NVIDIA-NeMo/Megatron-Bridge issue 5634). Imported only under ``peft.type`` set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.peft.utils import ParallelLinearAdapter

from nemo_lpo.train.adapter_init import SeededAdapterInit


def _tp_size(adapter: ParallelLinearAdapter) -> int:
    return torch.distributed.get_world_size(adapter.tp_group) if adapter.tp_group is not None else 1


def _embed_output_shard(linear_out, inputs, output):
    """Forward hook: this rank's output columns placed into zeros of the full width (the others' columns)."""
    del inputs
    shard, bias = output
    rank, size = torch.distributed.get_rank(linear_out.tp_group), torch.distributed.get_world_size(linear_out.tp_group)
    width = shard.shape[-1]
    return F.pad(shard, (rank * width, (size - 1 - rank) * width)), bias


def complete_expert_adapter_comm(adapter: ParallelLinearAdapter) -> None:
    """Give an expert adapter at etp > 1 the tensor-parallel collectives its inner contraction needs."""
    adapter.linear_out.explicit_expert_comm = False  # input gradient all-reduced (allreduce_dgrad, set at init)
    if adapter.input_is_parallel:  # fc2: partial A_r x_r summed, B's output kept as a shard of a partial sum
        adapter.linear_in.explicit_expert_comm = False
        adapter.linear_out.gather_output = False
        adapter.linear_out.register_forward_hook(_embed_output_shard)


class ExpertsLoRA(SeededAdapterInit, LoRA):
    """Bridge's ``LoRA`` whose expert adapters are exact at expert tensor parallelism > 1 (init from ``init_seed``)."""

    def transform(self, m, name=None, prefix=None):
        """Bridge's transform, then the missing collectives of an expert adapter at etp > 1."""
        wrapped = super().transform(m, name, prefix)
        adapter = getattr(wrapped, "adapter", None)
        if (wrapped is not m and type(adapter) is ParallelLinearAdapter and adapter.is_expert
                and getattr(m, "explicit_expert_comm", False) and _tp_size(adapter) > 1):
            complete_expert_adapter_comm(adapter)
        return wrapped
