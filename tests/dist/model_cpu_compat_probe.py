"""Run megatron scenarios with all / all-but-one CPU-compat patches, one forked child per run.

Usage: python model_cpu_compat_probe.py SCENARIO:EXCLUDED[,EXCLUDED] ...   (EXCLUDED may be empty)
Prints one JSON line per run: {"run": ..., "ok": bool, "error": "..."}.
megatron is imported once in the parent; each child applies its patch set first, so runs are independent.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _init(**kwargs):
    from nemo_lpo.model.parallel import initialize_parallel

    initialize_parallel(**kwargs)


def _tiny(**kwargs):
    from model_common import build_tiny

    return build_tiny("tiny-mixtral", **kwargs)


def _batch():
    from model_common import make_items, padded_batch

    return padded_batch(make_items())


def scenario_forward():
    """Seed the RNG tracker, build a MoE model (alltoall dispatcher), run a forward with an explicit mask."""
    from nemo_lpo.batch.layouts import sequence_layout_of

    _init()
    model = _tiny()
    with torch.no_grad():
        batch = _batch()
        out = sequence_layout_of(batch).token_logps(model, batch)
    assert torch.isfinite(out).all()


def scenario_forward_default_mask():
    """Forward with attention_mask=None: megatron builds its default causal mask (literal device='cuda')."""
    _init()
    model = _tiny()
    batch = _batch()
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def _train_step(bf16: bool, distributed: bool, preset: str = "tiny-mixtral"):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_lpo.batch.layouts import sequence_layout_of

    _init()
    dtype = torch.bfloat16 if bf16 else torch.float32
    from model_common import build_tiny

    model = build_tiny(preset, params_dtype=dtype, bf16=bf16).train()
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    ddp = DistributedDataParallel(model.config if not bf16 else model.module.config,
                                  DistributedDataParallelConfig(use_distributed_optimizer=distributed), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, clip_grad=1.0, bf16=bf16,
                                                 use_distributed_optimizer=distributed), [ddp])
    batch = _batch()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    (-(sequence_layout_of(batch).token_logps(ddp, batch) * batch["loss_mask"]).sum()).backward()
    finalize_model_grads([ddp])
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0


def scenario_train_step():
    """fp32 DDP backward + grad sync + optimizer step with gradient clipping."""
    _train_step(bf16=False, distributed=False)


def scenario_train_step_dense():
    """The same on a dense model: the first CUDA-stream use is DDP's start_grad_sync, not the MoE dispatcher."""
    _train_step(bf16=False, distributed=False, preset="tiny-mistral")


def scenario_bf16_optimizer():
    """bf16 params: Float16OptimizerWithFloat16Params classifies params by ``param.type()``."""
    _train_step(bf16=True, distributed=False)


def scenario_bf16_distributed_optimizer():
    """bf16 params with the distributed optimizer (same dispatch in DistributedOptimizer)."""
    _train_step(bf16=True, distributed=True)


def scenario_recompute():
    """Full activation recompute: megatron's CheckpointFunction saves and restores the tracked RNG states."""
    from nemo_lpo.batch.layouts import sequence_layout_of

    _init()
    model = _tiny(recompute="full").train()
    batch = _batch()
    forwards = []  # layer 0 runs in the checkpointed forward, and again in backward (the recompute)
    model.decoder.layers[0].register_forward_hook(lambda module, args, output: forwards.append(torch.is_grad_enabled()))
    (sequence_layout_of(batch).token_logps(model, batch) * batch["loss_mask"]).sum().backward()
    assert forwards == [False, True], forwards  # no graph kept in the forward; rebuilt for backward
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.grad.abs().sum() > 0


def scenario_norm_sequence_parallel():
    """The local spec's RMSNorm built under a TP=2 + sequence-parallel config, params tagged for TP grad reduction."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemo_lpo.model.presets import PRESETS, transformer_config

    config = transformer_config(PRESETS["tiny-mistral"], tp=2, sequence_parallel=True)
    norm = WrappedTorchNorm(config, 64, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def scenario_alltoall_split_sizes():
    """The dispatcher's host copy of its split sizes, then all_to_all_single with them (megatron's call)."""
    from megatron.core.transformer.moe import token_dispatcher

    _init()
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    out = torch.empty(3)
    torch.distributed.all_to_all_single(out, torch.arange(3.0), output_split_sizes=splits, input_split_sizes=splits)
    assert torch.equal(out, torch.arange(3.0))


def scenario_noop_with_cuda():
    """apply_cpu_compat() patches nothing when CUDA is available, and is idempotent."""
    from nemo_lpo.model import cpu_compat

    original = torch.cuda.current_device
    torch.cuda.is_available = lambda: True
    assert cpu_compat.apply_cpu_compat() is False
    assert torch.cuda.current_device is original and not cpu_compat._APPLIED


def scenario_idempotent():
    """A second apply_cpu_compat() call changes nothing."""
    from megatron.core.optimizer import clip_grads

    from nemo_lpo.model import cpu_compat

    assert cpu_compat.apply_cpu_compat() is True
    first = (torch.cuda.current_device, clip_grads.clip_grad_by_total_norm_fp32)
    for patch in cpu_compat.PATCHES.values():  # even re-running every patch must not stack wrappers
        patch()
    assert cpu_compat.apply_cpu_compat() is True
    assert clip_grads.clip_grad_by_total_norm_fp32 is first[1]


def _run(spec: str) -> dict:
    scenario, _, excluded = spec.partition(":")
    exclude = [e for e in excluded.split(",") if e]
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    pid = os.fork()
    if pid == 0:  # child
        result = {"run": spec, "ok": True, "error": ""}
        try:
            from nemo_lpo.model import cpu_compat

            if scenario != "noop_with_cuda":
                cpu_compat.apply_cpu_compat(exclude=exclude)
            globals()[f"scenario_{scenario}"]()
        except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
        with open(path, "w") as f:
            json.dump(result, f)
        os._exit(0)
    os.waitpid(pid, 0)
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return json.loads(text) if text else {"run": spec, "ok": False, "error": "child crashed"}


if __name__ == "__main__":
    import megatron.core  # noqa: F401  (import once, before forking)
    from megatron.core.distributed import DistributedDataParallel  # noqa: F401
    from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401

    import nemo_lpo.batch.layouts  # noqa: F401
    import nemo_lpo.model.build  # noqa: F401

    for spec in sys.argv[1:]:
        print(json.dumps(_run(spec)), flush=True)
