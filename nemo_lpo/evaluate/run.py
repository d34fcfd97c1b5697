"""Evaluate a checkpoint on a packed dataset: load policy and reference, run them forward, rank.

The policy is a megatron dist checkpoint: a training checkpoint folder (its ``latest`` marker or one
``step_*`` folder; the run's config is read from it) or a weights-only one (``save_model_weights``,
``nemo-lpo convert hf-to-mcore``). The architecture is resolved as the trainer resolves it
(``lpo_model.resolve_preset``): a named preset, or ``from_checkpoint``, the converted-model description
(``nemo_lpo_model.json``) that a converted checkpoint and the training checkpoints of a run started from one
carry. The reference μ of the implicit
reward β(log π − log μ) is, in order: an explicit reference checkpoint; the run's own reference (its
``reference.checkpoint`` or ``model.init_checkpoint``); the dataset's reference sidecar (``nemo-lpo
ref-logps``). Policy and reference go through the same forward code, so a policy evaluated against itself
has implicit rewards of exactly 0. An adapter checkpoint (a ``peft`` run) is scored as its base with the adapters
(``train.adapter_checkpoint``, Megatron-Bridge's PEFT), the base being the run's reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing
from rich.table import Table

from nemo_lpo import io
from nemo_lpo.config import Config, ConfigError, ModelConfig, ReferenceConfig
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.evaluate.engine import dataset_logps, summarize
from nemo_lpo.io import checkpoint_sidecar
from nemo_lpo.model.build import build_gpt_model
from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
from nemo_lpo.model.presets import get_preset, transformer_config
from nemo_lpo.model.resolve import FROM_CHECKPOINT, resolve_preset
from nemo_lpo.train.adapter_checkpoint import adapter_pointer, load_adapter_model

SIDECAR = "sidecar"  # ``reference=SIDECAR``: use the dataset's stored reference log-probs


def resolve_checkpoint(path: str | Path) -> Path:
    """Return the concrete checkpoint folder of ``path`` (follows a training folder's ``latest`` marker)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return io.resolve_checkpoint(path)


def checkpoint_run_config(path: str | Path) -> dict | None:
    """The run config stored in a training checkpoint (a plain dict), or None for a weights-only one."""
    common = dist_checkpointing.load_common_state_dict(str(resolve_checkpoint(path)))
    config = common.get("config") if isinstance(common, dict) else None
    return config if isinstance(config, dict) else None


def resolve_model_preset(checkpoint: str | Path, run_config: dict | None = None, preset: str | None = None,
                         reference: str | Path | None = None):
    """The ModelPreset of the policy ``checkpoint``, resolved as the trainer does (``lpo_model.resolve_preset``).

    The name is ``preset``, else the run's ``model.preset``, else ``from_checkpoint`` when the checkpoint
    carries a converted-model description (``nemo_lpo_model.json``), else ``tiny-mixtral``. ``from_checkpoint``
    takes the architecture from the description of the policy checkpoint itself (training checkpoints carry a
    copy), else of the reference (``reference``, or the run's ``reference.checkpoint`` /
    ``model.init_checkpoint``); a named preset must agree with every description found.

    Raises:
        ValueError: unknown preset name, no description for ``from_checkpoint``, or a disagreement.
    """
    policy = resolve_checkpoint(checkpoint)
    if preset is None:
        preset = ((run_config or {}).get("model") or {}).get("preset")
    if preset is None:
        preset = FROM_CHECKPOINT if checkpoint_sidecar(policy) is not None else "tiny-mixtral"
    if reference is None or str(reference) == SIDECAR:
        reference = _run_reference(run_config)
    try:
        cfg = Config(model=ModelConfig(preset=preset, init_checkpoint=str(policy)),
                     reference=ReferenceConfig(checkpoint=str(reference) if reference else None))
        return resolve_preset(cfg)
    except ConfigError as err:  # its keys name the trainer's config: say which checkpoints they are here
        raise ValueError(f"model of {checkpoint} (model.init_checkpoint = the evaluated checkpoint, "
                         f"reference.checkpoint = its reference): {err}") from None


def build_model(preset, checkpoint: str | Path | None):
    """Build a single-process GPTModel of ``preset`` and load ``checkpoint``'s weights into it (eval mode).

    ``preset`` is a preset name or a ``ModelPreset`` (e.g. from :func:`resolve_model_preset`). Needs
    ``nemo_lpo.model.parallel.initialize_parallel()`` (tp = pp = ep = 1) first; without a checkpoint the random
    init follows the RNG state it seeded.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    module = build_gpt_model(preset, transformer_config(preset))  # fp32, as the trainer's _build_module
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    if checkpoint is not None:
        load_weights(module, checkpoint)
    module.eval()
    return module


def load_weights(module, checkpoint: str | Path) -> None:
    """Load a dist checkpoint's model weights into ``module`` (training or weights-only checkpoint).

    ``dist_checkpointing.load`` returns the checkpoint's common state (step, config, optimizer metadata of a
    training checkpoint) beside the requested tensors; only the requested keys go into the module.
    """
    path = resolve_checkpoint(checkpoint)
    request = module.sharded_state_dict()
    loaded = dist_checkpointing.load(request, str(path))
    module.load_state_dict({k: v for k, v in loaded.items() if k in request})


def _policy_model(preset, checkpoint: Path):
    """The evaluated model: the checkpoint's weights, or for an adapter checkpoint its base with the adapters."""
    if adapter_pointer(checkpoint) is None:
        return build_model(preset, checkpoint)
    return load_adapter_model(checkpoint).module


def _run_reference(run_config: dict | None) -> str | None:
    if not run_config:
        return None
    return (run_config.get("reference") or {}).get("checkpoint") or (run_config.get("model") or {}).get(
        "init_checkpoint")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_prefix: str | Path,
    *,
    reference: str | Path | None = None,
    beta: float | None = None,
    preset: str | None = None,
    micro_batch_size: int = 8,
    ndcg_k: int | None = None,
    progress=None,
    reference_logps: np.ndarray | None = None,
) -> dict:
    """Return the ranking metrics of ``checkpoint`` on ``data_prefix`` (see ``metrics.ranking_metrics``).

    Args:
        checkpoint: policy dist checkpoint (training folder, ``step_*`` folder or weights-only); an adapter
            checkpoint (``peft``) is its base with the adapters, the base its default reference.
        data_prefix: packed dataset prefix (``nemo-lpo pack --output-prefix``).
        reference: reference checkpoint, or ``"sidecar"`` for the dataset's stored log-probs; default: the
            run's own reference, then the sidecar.
        beta: β of the implicit reward (default: the run's ``loss.beta``, else 0.1).
        preset: model preset name or ``from_checkpoint`` (default: see :func:`resolve_model_preset`).
        micro_batch_size: lists per forward pass.
        ndcg_k: NDCG cutoff (default: the whole list).
        progress: optional ``progress(done, total)`` callback.
        reference_logps: the reference's log-probs of this dataset when the caller already has them
            (``[num_lists, K_max]``, e.g. the policy's own before training); ``reference`` then only names them.

    Raises:
        FileNotFoundError: a checkpoint or the dataset is missing.
        ValueError: no reference can be found, or its log-probs do not fit the dataset.
    """
    dataset = ListwiseDataset(data_prefix)
    owns_process_group = not torch.distributed.is_initialized()
    initialize_parallel(seed=1234)
    try:
        run_config = checkpoint_run_config(checkpoint)
        model_preset = resolve_model_preset(checkpoint, run_config, preset, reference)
        if beta is None:
            beta = float(((run_config or {}).get("loss") or {}).get("beta", 0.1))
        if reference is None:
            reference = _run_reference(run_config) or (SIDECAR if dataset.has_ref_logps else None)
        if reference is None:
            raise ValueError(f"no reference for {checkpoint}: pass a reference checkpoint, or run "
                             f"`nemo-lpo ref-logps` on {data_prefix} to store the reference log-probs")
        policy_model = _policy_model(model_preset, resolve_checkpoint(checkpoint))
        policy = dataset_logps(policy_model, dataset, micro_batch_size, progress=progress)
        del policy_model
        if reference_logps is not None:
            ref_logps, ref_name = np.asarray(reference_logps, dtype=np.float64), str(reference)
        elif str(reference) == SIDECAR:
            if policy.ref_logps is None:
                raise ValueError(f"{data_prefix} has no reference log-probs sidecar (run `nemo-lpo ref-logps`)")
            ref_logps, ref_name = policy.ref_logps, f"sidecar ({(dataset.ref_meta or {}).get('checkpoint')})"
        else:
            ref_path = resolve_checkpoint(reference)
            if ref_path == resolve_checkpoint(checkpoint):
                ref_logps = policy.policy_logps  # the same weights: reuse rather than recompute
            else:
                ref_logps = dataset_logps(build_model(model_preset, ref_path), dataset,
                                         micro_batch_size).policy_logps
            ref_name = str(ref_path)
    finally:
        if owns_process_group:  # a caller's process group (e.g. a one-rank torchrun worker's) stays
            destroy_parallel()
    result = _summarize_with_loss(policy, ref_logps, beta, ndcg_k, run_config)
    result["_policy_logps"] = policy.policy_logps
    result.update(checkpoint=str(resolve_checkpoint(checkpoint)), data=str(data_prefix), reference=ref_name,
                  beta=beta, preset=model_preset.name)
    return result


def _summarize_with_loss(policy, ref_logps, beta: float, ndcg_k: int | None, run_config: dict | None) -> dict:
    """``engine.summarize`` with the run's loss (``loss.type`` / ``options`` of a training checkpoint).

    The loss terms are left out, with ``loss_error`` saying why, when the run's loss does not take these lists
    (a ``dpo`` run evaluated on K > 2 lists); the ranking metrics do not depend on the loss.
    """
    loss = (run_config or {}).get("loss") or {}
    if not loss.get("type"):
        return summarize(policy, ref_logps, beta, ndcg_k=ndcg_k)
    try:
        return summarize(policy, ref_logps, beta, ndcg_k=ndcg_k, loss_type=loss["type"],
                         loss_options=loss.get("options"))
    except ValueError as err:
        result = summarize(policy, ref_logps, beta, ndcg_k=ndcg_k)
        result["loss_error"] = f"loss.type={loss['type']}: {err}"
        return result


def format_value(value) -> str:
    """Format a metric for the table (n/a for NaN)."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def metrics_table(results: dict[str, dict], title: str = "held-out ranking"):
    """A rich Table with one column per evaluated model (``{column name: ranking_metrics dict}``)."""
    rows = [
        ("implicit/accuracy", "pairwise accuracy (implicit reward)"),
        ("implicit/kendall_tau", "Kendall τ (implicit reward)"),
        ("implicit/ndcg", "NDCG@K (implicit reward)"),
        ("likelihood/accuracy", "pairwise accuracy (log π per token)"),
        ("likelihood/kendall_tau", "Kendall τ (log π per token)"),
        ("likelihood/ndcg", "NDCG@K (log π per token)"),
        ("logps/best", "log-likelihood of the best response"),
        ("logps/worst", "log-likelihood of the worst response"),
        ("logps_per_token/best", "… per token, best"),
        ("logps_per_token/worst", "… per token, worst"),
        ("loss", "loss (the run's loss.type, whole set)"),
        ("rewards/accuracies", "rewards/accuracies (loss module: a tie is wrong)"),
        ("rewards/margins", "rewards/margins"),
        ("lists", "lists"),
        ("pairs", "ordered pairs (r_i > r_j)"),
    ]
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key, label in rows:
        if any(key in r for r in results.values()):
            table.add_row(label, *(format_value(r.get(key, math.nan)) for r in results.values()))
    return table


def to_jsonable(result: dict) -> dict:
    """Replace NaN by None (strict JSON) and numpy scalars by Python numbers."""
    out = {}
    for key, value in result.items():
        if key.startswith("_"):  # arrays kept for the caller, not part of the report
            continue
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out
