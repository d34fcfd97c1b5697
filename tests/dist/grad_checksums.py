"""Per-parameter gradient checksums that do not depend on the parallel layout (for the parity workers).

Each parameter is named by its megatron dist-checkpoint key and its offsets along the stacked layer and expert
axes (GLOBAL layer and expert numbers: the same name under any TP / PP / VPP / EP layout) and summarised by
``(Σg, Σg²)`` of its reduced gradient (``main_grad``, what the optimizer steps with). Both sums add over the
shards of a tensor-parallel split, so the pieces of a name are summed over ranks; a replicated copy is counted
once (megatron's "main replica", as a save writes it). With the DistributedOptimizer a rank holds the reduced
gradient only in the slice it owns: the whole gradient is rebuilt from the owned slices over the optimizer's
data-parallel group.
"""

from __future__ import annotations

import torch


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _distributed_grads(optimizer) -> dict:
    """{param: its whole reduced gradient} for the DistributedOptimizer's parameters (from the owned slices)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    grads = {}
    for opt in _sub_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        # every parameter of the buffers, in the same order on every rank of the group (the optimizer's own
        # map lists only the parameters this rank owns a slice of)
        for param in [param for buffer in opt.buffers for param in buffer.params]:
            owned = None
            if param in opt.model_param_gbuf_map:
                gbuf_index, dtype, bucket = opt.model_param_gbuf_map[param]
                owned = opt.gbuf_ranges[gbuf_index][dtype][bucket]["param_map"][param]
            full = torch.zeros(param.numel(), dtype=torch.float64)
            if owned is not None:
                start, end = owned["param"].start, owned["param"].end
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


def grad_checksums(chunks: list, optimizer) -> dict[str, list[float]]:
    """{global key[layer, expert]: [Σg, Σg²]} of the reduced gradients; the same dict on every rank.

    Megatron stacks the layers (and experts) of a parameter under one key; the offsets along those stacked
    ("prepended") axes name the layer and the expert, so they are part of the name here.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    distributed = _distributed_grads(optimizer)
    local: dict[str, list[float]] = {}
    for chunk in chunks:
        for item in nested_values(chunk.sharded_state_dict()):
            if not isinstance(item, ShardedTensor | ShardedTensorFactory):
                continue
            param = item.data
            if not isinstance(param, torch.nn.Parameter) or not param.requires_grad:
                continue
            grad = distributed[param] if param in distributed else param.main_grad.detach().double()
            for piece, g in _pieces(item, grad):
                if not is_main_replica(piece.replica_id):
                    continue
                name = f"{piece.key}{list(piece.global_offset[:piece.prepend_axis_num])}"
                total = local.setdefault(name, [0.0, 0.0])
                total[0] += g.double().sum().item()
                total[1] += (g.double() ** 2).sum().item()
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for key, (s, s2) in part.items():
            total = merged.setdefault(key, [0.0, 0.0])
            total[0] += s
            total[1] += s2
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
