"""Per-response log-probs under a parallel layout equal the single-process ones (same weights).

save OUT:          one process (TP1): build tiny-mixtral, save a megatron dist checkpoint to OUT/ckpt and the
                   reference log-probs and RMSNorm weight grads to OUT/ref.pt.
check OUT LAYOUT [LAYOUT ...]:
                   under torchrun: for each LAYOUT in turn (tp2sp | ep2 | pp2; one launch, the process group
                   stays), build for it, load OUT/ckpt (megatron reshards), recompute, and print
                   ``PARITY <layout> <name> <max abs diff>`` lines on rank 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_common import build_tiny, make_items, packed_batch, padded_batch  # noqa: E402

PRESET = "tiny-mixtral"
NORMS = ("decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight",
         "decoder.layers.1.pre_mlp_layernorm.weight")
LAYOUTS = {
    "tp2sp": dict(tp=2, etp=1, sequence_parallel=True),  # etp=1: gloo cannot all-gather unequal sizes
    "ep2": dict(ep=2, moe_token_dispatcher_type="alltoall"),
    "pp2": dict(pp=2),
}


def batches() -> dict:
    items = make_items(seed=7, ks=(3, 2, 4))
    # lengths divisible by 2 so that sequence parallelism can shard them
    return {"padded": padded_batch(items, multiple=4), "packed": packed_batch(items, multiple=4)}


def _logps_and_grads(model, batch):
    from nemo_lpo.batch.layouts import sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps

    logps = sequence_logps(sequence_layout_of(batch).token_logps(model, batch), batch)
    logps.sum().backward()
    return logps.detach()


def save(out: Path) -> None:
    from megatron.core import dist_checkpointing

    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=4321)
    model = build_tiny(PRESET)
    ref = {}
    for name, batch in batches().items():
        model.zero_grad()
        ref[name] = _logps_and_grads(model, batch)
        params = dict(model.named_parameters())
        ref[f"{name}_grads"] = {n: params[n].grad.clone() for n in NORMS}
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(out / "ckpt"))
    torch.save(ref, out / "ref.pt")
    destroy_parallel()


def _forward_step(data_iterator, model):
    from nemo_lpo.batch.layouts import sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps

    batch = next(data_iterator)

    def loss_func(output):
        logps = sequence_logps(-output.float(), batch)
        return logps.sum(), {"logps": logps.detach()}

    return model(**sequence_layout_of(batch).model_inputs(batch, model)), loss_func


def check(out: Path, layout: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_lpo.model.parallel import initialize_parallel

    plan = LAYOUTS[layout]
    destroy_moe_metrics_tracker()  # process-global, sized by the previous layout's model
    initialize_parallel(**{k: v for k, v in plan.items() if k in ("tp", "pp", "ep", "etp")}, seed=99)
    model = build_tiny(PRESET, **plan)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(out / "ckpt"))
    model.load_state_dict(state)
    ref = torch.load(out / "ref.pt")
    shape = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size(), len(model.decoder.layers),
             len(model.decoder.layers[0].mlp.experts.local_experts))
    expected = {"tp2sp": (2, 1, 1, 2, 4), "ep2": (1, 1, 2, 2, 2), "pp2": (1, 2, 1, 1, 4)}[layout]
    assert shape == expected, f"{layout}: (tp, pp, ep, layers, local experts) = {shape}, expected {expected}"
    rank0 = torch.distributed.get_rank() == 0
    data = batches()

    if layout == "pp2":
        forward_backward = get_forward_backward_func()
        with torch.no_grad():
            stored = forward_backward(forward_step_func=_forward_step, data_iterator=iter(data.values()),
                                      model=[model], num_microbatches=2, seq_length=0, micro_batch_size=0,
                                      forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            for name, record in zip(data, stored, strict=True):
                diff = (record["logps"] - ref[name]).abs().max().item()
                print(f"PARITY {layout} {name} {diff:.3e}", flush=True)
        return

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    for name, batch in data.items():
        ddp.zero_grad_buffer()
        logps = _logps_and_grads(ddp, batch)
        finalize_model_grads([ddp])
        diff = (logps - ref[name]).abs().max().item()
        params = dict(model.named_parameters())
        grad_diff = max((params[n].main_grad - ref[f"{name}_grads"][n]).abs().max().item() for n in NORMS)
        grad_scale = max(ref[f"{name}_grads"][n].abs().max().item() for n in NORMS)
        if rank0:
            print(f"PARITY {layout} {name} {diff:.3e}", flush=True)
            print(f"GRAD {layout} {name} {grad_diff:.3e} {grad_scale:.3e}", flush=True)


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "save":
        save(out)
    else:
        from nemo_lpo.model.parallel import destroy_parallel

        for layout in sys.argv[3:]:  # initialize_parallel re-makes megatron's groups; the process group stays
            check(out, layout)
        destroy_parallel()
