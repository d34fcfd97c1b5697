"""One interface for the three batch layouts: how lists become model inputs and come back as ``[B, K]`` log-probs.

A ``BatchLayout`` is chosen once from the config (``select_layout``) and is all the trainer, the reference pass,
evaluation and the benchmarks call:

- ``collator(pad_id, pad_to_multiple_of)``: dataset items -> batch dict;
- ``model_inputs(batch, model)``: ``GPTModel.forward`` keyword arguments, after checking that the model's
  attention backend serves the layout (``check_backend``);
- ``response_logps(output, batch, length_average)``: the last stage's output -> float32 ``[B, K]``;
- ``computed_tokens(batch)``: the tokens the model actually computed (throughput metrics);
- ``fill_rows(batch, rows, pad_id)``: pad a micro-batch to a row count (one shape per virtual-pipeline step).

Attention backends (``BACKENDS``): ``gathered`` (megatron's local spec with ``GatheredDotProductAttention``
handed the row's part layout), ``dense`` (megatron's local dense path with the layout's boolean mask, the
reference semantics) and ``te`` (Transformer Engine's layer spec). TE's core attention runs the causal kernel
and ignores an explicit mask: right-padded rows stay exact (causality already hides trailing padding from real
tokens), but packed and shared-prompt rows would attend across sequences and responses, silently giving wrong
log-probs. Those combinations are refused with an error naming what to use instead (``check_backend``), before
the first step; ``tests/test_batch_layouts.py`` enumerates every combination.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import ClassVar

import torch

from nemo_lpo.batch.collate import ListwiseCollator
from nemo_lpo.batch.logps import gathered_logps, sequence_logps
from nemo_lpo.batch.masks import causal_padding_mask, packed_causal_mask, padding_token_mask, shared_prompt_mask
from nemo_lpo.batch.shared_prompt import SharedPromptCollator
from nemo_lpo.model.attention import attention_layout, packed_layout, takes_attention_layout
from nemo_lpo.model.build import uses_transformer_engine
from nemo_lpo.model.gpt import unwrapped_attribute
from nemo_lpo.model.varlen import thd_attention_inputs

BACKENDS = ("gathered", "dense", "te")

_USE_INSTEAD = ("use padded batches (data.packed=false, data.shared_prompt=false), or megatron's local layer spec "
                "(model.transformer_impl=local), whose gathered core attention serves every layout, or TE's varlen "
                "attention (model.te_varlen_attention=true; check it first with tools/container_check.sh)")


class UnsupportedLayoutError(ValueError):
    """A batch layout that the model's attention backend would compute wrongly."""


class BatchLayout(abc.ABC):
    """How a micro-batch of lists is laid out for the model; see the module docstring.

    Args:
        dense_masks: on megatron's local spec, hand the model the layout's dense boolean mask instead of the part
            layout the gathered attention takes (the reference semantics; benchmarks and tests compare the two).
        te_varlen: on Transformer Engine's spec, run the layout through TE's varlen (THD) attention
            (``model.te_varlen_attention``); without it TE refuses packed and shared-prompt rows.
    """

    name: ClassVar[str]
    """The layout's name in messages (and ``LAYOUTS``)."""
    te_refusal: ClassVar[str | None] = None
    """Why TE's causal attention (without ``te_varlen``) computes this layout wrongly; None when it does not."""

    def __init__(self, *, dense_masks: bool = False, te_varlen: bool = False) -> None:
        self.dense_masks = dense_masks
        self.te_varlen = te_varlen

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dense_masks={self.dense_masks}, te_varlen={self.te_varlen})"

    @property
    def refused(self) -> dict[str, str]:
        """Attention backends that cannot compute this layout, with the reason."""
        return {"te": self.te_refusal} if self.te_refusal and not self.te_varlen else {}

    # ------------------------------------------------------------------ backends
    def backend_of(self, model) -> str:
        """The attention backend ``model`` (possibly wrapped) runs this layout on."""
        if uses_transformer_engine(model):
            return "te"
        return "gathered" if takes_attention_layout(model) and not self.dense_masks else "dense"

    def backend_for(self, use_te: bool) -> str:
        """The attention backend of a model ``build_gpt_model(..., use_te=use_te)`` will build (start-up checks)."""
        return "te" if use_te else "dense" if self.dense_masks else "gathered"

    def check_backend(self, backend: str) -> None:
        """Raise ``UnsupportedLayoutError`` when ``backend`` would compute this layout wrongly."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; one of {BACKENDS}")
        if backend in self.refused:
            raise UnsupportedLayoutError(
                f"batch layout {self.name!r} cannot run on attention backend {backend!r}: "
                f"{self.refused[backend]}. Instead, {_USE_INSTEAD}")

    # ------------------------------------------------------------------ the interface
    @abc.abstractmethod
    def collator(self, pad_id: int, pad_to_multiple_of: int = 1) -> Callable[[list[dict]], dict]:
        """The callable turning a micro-batch of ``ListwiseDataset`` items into this layout's batch dict."""

    def model_inputs(self, batch: dict, model) -> dict:
        """Keyword arguments of ``GPTModel.forward`` for ``batch`` on ``model`` (tensors on its device).

        MoE models also get ``padding_mask`` (padding tokens kept out of the routing statistics).

        Raises:
            UnsupportedLayoutError: the model's attention backend does not serve this layout.
            ValueError: a sequence length that sequence parallelism cannot split.
        """
        backend = self.backend_of(model)
        self.check_backend(backend)
        config = unwrapped_attribute(model, "config")
        tp = getattr(config, "tensor_model_parallel_size", 1)
        if getattr(config, "sequence_parallel", False) and batch["tokens"].shape[1] % tp:
            raise ValueError(f"sequence parallelism over tp={tp} needs a sequence length divisible by {tp}, got "
                             f"tokens of shape {tuple(batch['tokens'].shape)}: collate with pad_to_multiple_of "
                             f"a multiple of {tp}")
        inputs = {"input_ids": batch["tokens"], "position_ids": batch["position_ids"],
                  **self._attention_inputs(batch, backend, model)}
        if getattr(config, "num_moe_experts", None):
            inputs["padding_mask"] = padding_token_mask(batch)
        return inputs

    @abc.abstractmethod
    def _attention_inputs(self, batch: dict, backend: str, model) -> dict:
        """The layout's ``attention_mask`` (and ``labels`` when the model computes the token loss) for ``backend``."""

    @abc.abstractmethod
    def response_logps(self, output: torch.Tensor, batch: dict, length_average: bool = False) -> torch.Tensor:
        """float32 ``[B, K]`` response log-probs from the last stage's ``output`` (0 in invalid slots)."""

    @abc.abstractmethod
    def computed_tokens(self, batch: dict) -> torch.Tensor:
        """The number of real tokens the model computes for ``batch`` (0-dim)."""

    @abc.abstractmethod
    def attended_pairs(self, batch: dict) -> torch.Tensor:
        """The (query, key) pairs the layout's attention needs for ``batch`` (0-dim; the FLOP model's attention term)."""

    def fill_rows(self, batch: dict, rows: int, pad_id: int) -> dict:
        """``batch`` with ``rows`` rows (the interleaved schedule needs one shape per step)."""
        if batch["tokens"].shape[0] != rows:
            raise ValueError(f"batch layout {self.name!r}: a micro-batch of {batch['tokens'].shape[0]} rows cannot "
                             f"be filled to {rows} (its row count is fixed by the micro-batch size)")
        return batch

    def logps(self, model, batch: dict, length_average: bool = False) -> torch.Tensor:
        """Run ``model`` (one stage holding embedding and output layer) on ``batch``: ``[B, K]`` log-probs."""
        return self.response_logps(model(**self.model_inputs(batch, model)), batch, length_average)


class _SequenceLayout(BatchLayout):
    """One sequence per (list, slot); the model computes ``-log p(label)`` per token (called with labels)."""

    packed: ClassVar[bool]

    def collator(self, pad_id: int, pad_to_multiple_of: int = 1) -> ListwiseCollator:
        """``ListwiseCollator`` (``nemo_lpo.batch.collate``)."""
        return ListwiseCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of, packed=self.packed)

    def response_logps(self, output: torch.Tensor, batch: dict, length_average: bool = False) -> torch.Tensor:
        """Token log-probs (the negated output) summed per response over ``loss_mask``."""
        return sequence_logps(-output.float(), batch, length_average)

    def computed_tokens(self, batch: dict) -> torch.Tensor:
        """Every sequence's tokens (the prompt once per response); filled rows left out."""
        return batch["seq_lengths"].sum() - batch.get("empty_rows", 0)

    def attended_pairs(self, batch: dict) -> torch.Tensor:
        """Each sequence attends causally to itself: ``L (L + 1) / 2`` pairs per sequence."""
        lengths = batch["seq_lengths"].double()
        return (lengths * (lengths + 1) / 2).sum() - batch.get("empty_rows", 0)

    def token_logps(self, model, batch: dict) -> torch.Tensor:
        """float32 ``log p(labels[:, t] | tokens[:, :t+1])`` of every row position (meaningless where loss_mask is 0)."""
        return -model(**self.model_inputs(batch, model)).float()


class PaddedLayout(_SequenceLayout):
    """``[N, T]``: each (list, slot) its own right-padded row ``prompt + response``."""

    name = "padded"
    packed = False

    def _attention_inputs(self, batch: dict, backend: str, model) -> dict:
        if backend == "te":  # TE's causal kernel ignores a mask: no [N, 1, T, T] tensor for it (as Megatron-LM)
            return {"attention_mask": None, "labels": batch["labels"]}
        tokens = batch["tokens"]
        return {"attention_mask": causal_padding_mask(batch["seq_lengths"].to(tokens.device), tokens.shape[1]),
                "labels": batch["labels"]}

    def fill_rows(self, batch: dict, rows: int, pad_id: int) -> dict:
        """Append empty one-pad-token sequences (loss_mask 0, counted in ``empty_rows``) up to ``rows``.

        Each is attributed to slot 0 of list 0 with a zero sum, so no response's log-prob changes; one token,
        as the collator's empty slots, because a zero-length sequence would leave its attention row fully masked.
        """
        n, t = batch["tokens"].shape
        extra = rows - n
        if extra <= 0:
            return batch
        out = dict(batch)
        pad = torch.full((extra, t), pad_id, dtype=batch["tokens"].dtype, device=batch["tokens"].device)
        out["tokens"] = torch.cat([batch["tokens"], pad])
        out["labels"] = torch.cat([batch["labels"], pad.clone()])
        out["loss_mask"] = torch.cat([batch["loss_mask"], batch["loss_mask"].new_zeros(extra, t)])
        out["position_ids"] = torch.cat([batch["position_ids"],
                                         torch.arange(t, device=pad.device).expand(extra, t)])
        out["seq_lengths"] = torch.cat([batch["seq_lengths"], batch["seq_lengths"].new_ones(extra)])
        for key in ("list_index", "slot_index"):
            out[key] = torch.cat([batch[key], batch[key].new_zeros(extra)])
        out["empty_rows"] = torch.tensor(extra, dtype=torch.int64)
        return out


class PackedLayout(_SequenceLayout):
    """``[1, S]``: the micro-batch's sequences back to back (``cu_seqlens``), each attending to itself only."""

    name = "packed"
    packed = True
    te_refusal = ("TE's causal attention ignores the block-diagonal mask, so each sequence would attend to the "
                  "sequences packed before it")

    def _attention_inputs(self, batch: dict, backend: str, model) -> dict:
        tokens = batch["tokens"]
        if tokens.shape[0] != 1:
            raise ValueError(f"a packed batch has tokens of shape [1, S], got {tuple(tokens.shape)}")
        if backend == "te":  # megatron's THD path: PackedSeqParams, RoPE restarting at every cu_seqlens boundary
            return {**thd_attention_inputs(batch, model), "labels": batch["labels"]}
        cu_seqlens = batch["cu_seqlens"].to(tokens.device)
        mask = packed_layout(cu_seqlens, tokens.shape[1]) if backend == "gathered" else \
            packed_causal_mask(cu_seqlens, tokens.shape[1])
        return {"attention_mask": mask, "labels": batch["labels"]}


class SharedPromptLayout(BatchLayout):
    """One row per list ``[prompt | y_1 | ... | y_K]`` (all lists in one row when ``packed``), the prompt computed once.

    Args:
        packed: all lists of a micro-batch in one row ``[1, S]``.
        dense_masks: as ``BatchLayout``.
    """

    te_refusal = ("TE's causal attention ignores the shared-prompt mask, so each response would attend to the "
                  "responses before it in the row")

    def __init__(self, *, packed: bool = False, dense_masks: bool = False, te_varlen: bool = False) -> None:
        super().__init__(dense_masks=dense_masks, te_varlen=te_varlen)
        self.packed = packed

    @property
    def name(self) -> str:  # type: ignore[override]
        """``shared_prompt`` or ``shared_prompt_packed``."""
        return "shared_prompt_packed" if self.packed else "shared_prompt"

    def __repr__(self) -> str:
        return f"SharedPromptLayout(packed={self.packed}, dense_masks={self.dense_masks}, te_varlen={self.te_varlen})"

    def collator(self, pad_id: int, pad_to_multiple_of: int = 1) -> SharedPromptCollator:
        """``SharedPromptCollator`` (``nemo_lpo.batch.shared_prompt``)."""
        return SharedPromptCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of, packed=self.packed)

    def _attention_inputs(self, batch: dict, backend: str, model) -> dict:
        # no labels: the model returns the logits, gathered at each response token's predicting position
        if backend == "te" and not takes_attention_layout(model):
            raise UnsupportedLayoutError("shared-prompt rows on Transformer Engine need its gathered varlen core "
                                         "attention: build the model with model.te_varlen_attention=true")
        if backend in ("gathered", "te"):  # part by part, no [R, 1, S, S] mask or S² scores
            return {"attention_mask": attention_layout(batch["segment_ids"], batch["part_ids"])}
        return {"attention_mask": shared_prompt_mask(batch)}

    def response_logps(self, output: torch.Tensor, batch: dict, length_average: bool = False) -> torch.Tensor:
        """Log-probs gathered from the vocab-parallel logits ``[R, S, V/tp]`` at each response token's source."""
        return gathered_logps(output, batch, length_average)

    def computed_tokens(self, batch: dict) -> torch.Tensor:
        """The rows' real tokens: each prompt once per list."""
        return batch["row_lengths"].sum()

    def attended_pairs(self, batch: dict) -> torch.Tensor:
        """The prompt causally once, each response to its prompt and causally to itself."""
        prompt = batch["prompt_lengths"].double()
        response = batch["response_lengths"].double()  # 0 in empty slots
        return (prompt * (prompt + 1) / 2).sum() + (response * prompt[:, None] + response * (response + 1) / 2).sum()


LAYOUTS = ("padded", "packed", "shared_prompt", "shared_prompt_packed")


def select_layout(*, shared_prompt: bool = False, packed: bool = False, dense_masks: bool = False,
                  te_varlen: bool = False) -> BatchLayout:
    """The layout of ``data.shared_prompt`` / ``data.packed`` (``layout_of(cfg)`` for a run config)."""
    options = {"dense_masks": dense_masks, "te_varlen": te_varlen}
    if shared_prompt:
        return SharedPromptLayout(packed=packed, **options)
    return PackedLayout(**options) if packed else PaddedLayout(**options)


def sequence_layout_of(batch: dict, *, dense_masks: bool = False) -> BatchLayout:
    """The padded or packed layout a ``ListwiseCollator`` batch is in (packed ones carry ``cu_seqlens``)."""
    return PackedLayout(dense_masks=dense_masks) if "cu_seqlens" in batch else PaddedLayout(dense_masks=dense_masks)


def layout_by_name(name: str, *, dense_masks: bool = False, te_varlen: bool = False) -> BatchLayout:
    """The layout called ``name`` (one of ``LAYOUTS``)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown batch layout {name!r}; one of {LAYOUTS}")
    return select_layout(shared_prompt=name.startswith("shared_prompt"), packed=name.endswith("packed"),
                         dense_masks=dense_masks, te_varlen=te_varlen)


def pad_multiple(data_multiple: int, *, tp: int, sequence_parallel: bool) -> int:
    """Padded length multiple: ``data.pad_to_multiple_of``, and a multiple of tp under sequence parallelism."""
    return math.lcm(data_multiple, tp) if sequence_parallel and tp > 1 else data_multiple
