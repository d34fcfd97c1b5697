"""Megatron-Bridge model and dataset providers for nemo-lpo (import only where Megatron-Bridge is installed).

``LPOModelProvider`` is a Megatron-Bridge ``GPTModelProvider`` (a TransformerConfig that builds the model) whose
``provide()`` builds nemo-lpo's own model (``nemo_lpo.model.build.build_gpt_model``: a GPTModel honouring per-token
positions, with the gathered attention on megatron's local spec) for a named preset or for the architecture a
converted checkpoint records in its ``nemo_lpo_model.json``. ``LPODatasetProvider`` serves a packed listwise
dataset (``nemo-lpo pack``) with its reference log-prob sidecar (``nemo-lpo ref-logps``), collated by nemo-lpo's
collator; Megatron-Bridge's data loader batches ``micro_batch_size`` lists per micro-batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig as MCoreTransformerConfig

from nemo_lpo.batch.layouts import select_layout
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.model.build import build_gpt_model
from nemo_lpo.model.presets import transformer_config
from nemo_lpo.model.resolve import preset_of

FROM_CHECKPOINT = "from_checkpoint"


def resolve_preset(preset: str, checkpoint: str | None):
    """The ModelPreset named ``preset``, or (``from_checkpoint``) the one ``checkpoint``'s nemo_lpo_model.json records.

    Raises:
        ConfigError: an unknown name, no description in the checkpoint, or a named preset that disagrees with it.
    """
    return preset_of(preset, {"LPOModelProvider.lpo_checkpoint": checkpoint}, key="LPOModelProvider.lpo_preset")


@dataclass
class LPOModelProvider(GPTModelProvider):
    """Megatron-Bridge GPT provider that builds nemo-lpo's model (see the module docstring)."""

    lpo_preset: str = "tiny-mixtral"
    """A ``nemo_lpo.model.presets`` name, or ``from_checkpoint`` (the architecture of ``lpo_checkpoint``)."""
    lpo_checkpoint: str | None = None
    """The converted checkpoint (``nemo-lpo convert hf-to-mcore`` output) whose description is checked / used."""
    lpo_use_te: bool = False
    """Build Transformer Engine's layer spec (``model.transformer_impl`` resolved by ``build.resolve_use_te``)."""

    def provide(self, pre_process=None, post_process=None, vp_stage=None):
        """nemo-lpo's GPTModel of this pipeline stage (TE's layer spec when ``lpo_use_te``, the local one otherwise)."""
        preset = resolve_preset(self.lpo_preset, self.lpo_checkpoint)
        model = build_gpt_model(preset, self, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                                use_te=self.lpo_use_te)
        keep_router_losses_per_list(model)
        return model


def keep_router_losses_per_list(model) -> None:
    """Turn off the routers' per-TOKEN scaling of the load-balancing and z losses (they read it at construction).

    Under ``calculate_per_token_loss`` megatron-core 0.19's ``Router`` multiplies those losses by the micro-batch's
    token count, assuming ``finalize_model_grads`` divides by the global TOKEN count. The LPO loss function's count
    is lists (``nemo_lpo.bridge.task``), so that factor would weight the router losses by tokens per list (hundreds
    to thousands). Without it the router losses keep their unscaled per-micro-batch value, and with
    ``moe_aux_loss_coeff`` × lists per micro-batch (``lpo_model_provider``) the divide by the global list count gives
    nemo-lpo's weight. Found by tests/test_bridge_loop.py (Bridge's train(): grad norm 1.465 vs the trainer's 1.031).
    """
    for module in model.modules():
        if isinstance(module, Router):
            module.calculate_per_token_loss = False


def lpo_model_provider(preset: str = "tiny-mixtral", *, checkpoint: str | None = None, micro_batch_size: int = 1,
                       seq_length: int = 4096, moe_aux_loss_coeff: float = 1e-2, use_te: bool = False,
                       **parallel) -> LPOModelProvider:
    """An ``LPOModelProvider`` configured as nemo-lpo configures its model (``presets.transformer_config``).

    Args:
        preset: preset name or ``from_checkpoint``.
        checkpoint: converted checkpoint to read / check the architecture against.
        micro_batch_size: lists per micro-batch. The MoE load-balancing loss gets ``moe_aux_loss_coeff ×
            micro_batch_size``: under ``calculate_per_token_loss`` megatron divides its gradient by the global
            valid-list count (not by micro-batches × data-parallel size), so this keeps nemo-lpo's weight
            exactly whenever every list of the step is valid (``nemo_lpo.bridge.task``).
        seq_length: the model's nominal sequence length (pipeline buffers when shapes are not exchanged).
        moe_aux_loss_coeff: nemo-lpo's weight of the router load-balancing loss.
        use_te: Transformer Engine's layer spec (else megatron's local one with the gathered attention).
        **parallel: ``transformer_config`` arguments (tp, pp, ep, etp, sequence_parallel, params_dtype, bf16,
            fp8, recompute, moe_token_dispatcher_type, ...).
    """
    arch = resolve_preset(preset, checkpoint)
    config = transformer_config(arch, moe_aux_loss_coeff=moe_aux_loss_coeff * micro_batch_size,
                                calculate_per_token_loss=True, **parallel)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(MCoreTransformerConfig) if f.init}
    return LPOModelProvider(**values, lpo_preset=preset, lpo_checkpoint=checkpoint, lpo_use_te=use_te,
                            vocab_size=arch.vocab_size,
                            should_pad_vocab=False, make_vocab_size_divisible_by=1, seq_length=seq_length,
                            share_embeddings_and_output_weights=False, position_embedding_type="rope",
                            rotary_base=int(arch.rotary_base))


class CollatedListwiseDataset:
    """A ``ListwiseDataset`` with the ``collate_fn`` Megatron-Bridge's data loader picks up."""

    def __init__(self, dataset, collate_fn) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[int(index)]


@dataclass(kw_only=True)
class LPODatasetProvider(DatasetProvider):
    """Packed listwise training data with a precomputed reference (the recipe holds one model: no online μ)."""

    train_prefix: str
    """Prefix of the packed dataset (``nemo-lpo pack`` output) with its ``nemo-lpo ref-logps`` sidecar."""
    pad_to_multiple_of: int = 8
    """Padded sequence length multiple (a multiple of tp under sequence parallelism)."""
    packed: bool = False
    """One row of back-to-back sequences per micro-batch (megatron's local attention only)."""
    seq_length: int = 4096
    """Nominal tokens per sample: Megatron-Bridge's throughput and runtime logging read ``dataset.seq_length``
    (tokens = samples × seq_length); the recipes give the model provider's. Lists are padded per micro-batch."""

    def build_datasets(self, context: DatasetBuildContext):
        """(train, None, None): the collated listwise dataset; no validation or test split."""
        if not Path(f"{self.train_prefix}.manifest.json").is_file():
            raise FileNotFoundError(f"dataset.train_prefix: no packed dataset at {self.train_prefix} "
                                    f"({self.train_prefix}.manifest.json is missing; run `nemo-lpo pack`)")
        dataset = ListwiseDataset(self.train_prefix)
        if not dataset.has_ref_logps:
            raise ValueError(f"dataset.train_prefix: {self.train_prefix} has no reference log-probs; the "
                             "Megatron-Bridge LPO recipe trains on a precomputed reference only: run "
                             "`nemo-lpo ref-logps` on it first")
        collate = select_layout(packed=self.packed).collator(dataset.pad_id, self.pad_to_multiple_of)
        return CollatedListwiseDataset(dataset, collate), None, None
