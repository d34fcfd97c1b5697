"""Per-parameter gradient checksums that do not depend on the parallel layout (for the parity workers).

Each parameter is named by its megatron dist-checkpoint key and its offsets along the stacked layer and expert
axes (GLOBAL layer and expert numbers: the same name under any TP / PP / VPP / EP layout) and summarised by
``CHECKSUMS`` of its reduced gradient (``main_grad``, what the optimizer steps with): Σg, Σg², Σ|g| and
``<r, g>`` = Σ r·g, where ``r`` is a fixed pseudo-random weight of each element's index in the WHOLE (unsharded)
tensor, found through the piece's global offsets. The first three do not change when elements move (a swapped
tensor-parallel shard, a distributed-optimizer slice put back at the wrong offset); ``<r, g>`` does. All four add
over the shards of a tensor-parallel split, so the pieces of a name are summed over ranks; a replicated copy is
counted once (megatron's "main replica", as a save writes it). With the DistributedOptimizer a rank holds the
reduced gradient only in the slice it owns: the whole gradient is rebuilt from the owned slices (at their
offsets in the parameter) over the optimizer's data-parallel group.
"""

from __future__ import annotations

import torch

CHECKSUMS = ("sum g", "sum g^2", "sum |g|", "<r, g>")
_HASH = 2654435761  # Knuth's multiplicative hash: neighbouring indices get unrelated weights

def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def owned_slice(optimizer, param) -> tuple[int, int] | None:
    """(start, end) of the flat elements of ``param`` whose reduced gradient this rank's DistributedOptimizer owns.

    None when the rank owns none of it (or ``optimizer`` is not a DistributedOptimizer).
    """
    if param not in getattr(optimizer, "model_param_gbuf_map", {}):
        return None
    gbuf_index, dtype, bucket = optimizer.model_param_gbuf_map[param]
    owned = optimizer.gbuf_ranges[gbuf_index][dtype][bucket]["param_map"][param]["param"]
    return owned.start, owned.end


def _distributed_grads(optimizer) -> dict:
    """{param: its whole reduced gradient} for the DistributedOptimizer's parameters (from the owned slices)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    grads = {}
    for opt in sub_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        # every parameter of the buffers, in the same order on every rank of the group (the optimizer's own
        # map lists only the parameters this rank owns a slice of)
        for param in [param for buffer in opt.buffers for param in buffer.params]:
            owned = owned_slice(opt, param)
            full = torch.zeros(param.numel(), dtype=torch.float64)
            if owned is not None:
                start, end = owned
                full[start:end] = param.main_grad.detach().view(-1)[start:end].double()
            torch.distributed.all_reduce(full, group=opt.data_parallel_group)
            grads[param] = full.view(param.shape)
    return grads


def _pieces(item, grad: torch.Tensor) -> list:
    """The ShardedTensors of ``grad`` laid out as ``item`` lays out its parameter (a factory builds several)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(item, ShardedTensorFactory):
        built = item.build_fn(item.key, grad, item.replica_id, item.flattened_range)
        return [piece for value in nested_values(built) for piece in _pieces(value, value.data)]
    return [(item, grad)] if isinstance(item, ShardedTensor) else []


def index_weights(piece, local_shape: torch.Size) -> torch.Tensor:
    """``r`` in [-0.5, 0.5) for each element of ``piece``: a hash of its flat index in the unsharded tensor.

    The index is taken over the axes after the stacked (prepended) layer / expert axes, which name the checksum.
    """
    assert piece.flattened_range is None, f"{piece.key}: a flattened piece (not a model parameter's layout)"
    axes = len(local_shape)
    shape, offset = piece.global_shape[-axes:] if axes else (), piece.global_offset[-axes:] if axes else ()
    index = torch.zeros(local_shape, dtype=torch.int64)
    stride = 1
    for axis in reversed(range(axes)):
        coord = torch.arange(local_shape[axis], dtype=torch.int64) + offset[axis]
        index += (coord * stride).view([-1 if a == axis else 1 for a in range(axes)])
        stride *= shape[axis]
    return ((index * _HASH) % 2**32).double() / 2**32 - 0.5


def _sums(piece, g: torch.Tensor) -> list[float]:
    g = g.double()
    return [g.sum().item(), (g**2).sum().item(), g.abs().sum().item(),
            (index_weights(piece, g.shape) * g).sum().item()]


def _trainable_items(chunks: list):
    """(parameter, its sharded-state-dict item) for every trainable parameter of the model ``chunks``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for chunk in chunks:
        for item in nested_values(chunk.sharded_state_dict()):
            if (isinstance(item, ShardedTensor | ShardedTensorFactory) and isinstance(item.data, torch.nn.Parameter)
                    and item.data.requires_grad):
                yield item.data, item


def _name(piece) -> str:
    """The checkpoint key and the offsets along the stacked layer / expert axes (the layout-free name)."""
    return f"{piece.key}{list(piece.global_offset[:piece.prepend_axis_num])}"


def checksum_names(chunks: list, param) -> list[str]:
    """The names ``grad_checksums`` gives the pieces of ``param`` (one, unless a factory splits it)."""
    return sorted({_name(piece) for p, item in _trainable_items(chunks) if p is param
                   for piece, _ in _pieces(item, p.detach())})


def grad_checksums(chunks: list, optimizer) -> dict[str, list[float]]:
    """{global key[layer, expert]: CHECKSUMS} of the reduced gradients; the same dict on every rank.

    Megatron stacks the layers (and experts) of a parameter under one key; the offsets along those stacked
    ("prepended") axes name the layer and the expert, so they are part of the name here.
    """
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    distributed = _distributed_grads(optimizer)
    local: dict[str, list[float]] = {}
    for param, item in _trainable_items(chunks):
        grad = distributed[param] if param in distributed else param.main_grad.detach().double()
        for piece, g in _pieces(item, grad):
            if is_main_replica(piece.replica_id):
                name = _name(piece)
                local[name] = [a + b for a, b in zip(local.get(name, [0.0] * len(CHECKSUMS)), _sums(piece, g),
                                                     strict=True)]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for key, sums in part.items():
            merged[key] = [a + b for a, b in zip(merged.get(key, [0.0] * len(CHECKSUMS)), sums, strict=True)]
    return dict(sorted(merged.items()))


def record_grad_checksums(trainer) -> list[dict]:
    """Wrap ``trainer.optimizer.step`` so that each step first appends its checksums to the returned list."""
    steps: list[dict] = []
    step = trainer.optimizer.step

    def checked_step(*args, **kwargs):
        steps.append(grad_checksums(trainer.lpo.modules, trainer.optimizer))
        return step(*args, **kwargs)

    trainer.optimizer.step = checked_step
    return steps
