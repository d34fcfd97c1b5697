"""Shared-prompt (and packed) rows on Transformer Engine's layer spec: K/V-gathered varlen core attention.

What executed where: TE's kernels and ``with_te_gathered_attention`` are CODE ONLY here (Transformer Engine does
not install on a CPU machine); ``tools/container_check.sh`` runs them in a user's image (tests/test_te.py). The
class itself is built by ``gathered_attention_class(base, te_forward)``: EXECUTED ON CPU in tests/test_te_glue.py
with a CPU stand-in for ``TEDotProductAttention`` and a recorder in place of TE's ``DotProductAttention.forward``
that checks every argument this module passes and runs ``varlen.reference_varlen_kernel``; the index math
(``nemo_lpo/model/varlen.py``) equals megatron's dense masked attention on CPU (tests/test_model_varlen.py).

TE's causal attention ignores an explicit mask, so a shared-prompt row ``[prompt | y_1 | ... | y_K]`` cannot
go through ``TEDotProductAttention`` with the dense ``shared_prompt_mask``. This module receives the row
layout instead (``attention_layout``, the ``attention_mask`` argument the local ``GatheredDotProductAttention``
takes), gathers each response's keys as ``[its prompt | itself]`` and calls TE's ``DotProductAttention`` once
per layer in THD format with separate ``cu_seqlens_q`` / ``cu_seqlens_kv`` and the bottom-right-aligned causal
mask; prompts are segments of their own, attended causally once. Exact arguments, from TransformerEngine's
``transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py``
(``DotProductAttention.forward``):

- ``qkv_format="thd"``: q/k/v must be 3-D ``[t, heads, dim]``; ``cu_seqlens_q`` and ``cu_seqlens_kv`` int32 of
  the same shape ``[segments + 1]`` (asserted there); ``max_seqlen_q`` / ``max_seqlen_kv`` as Python ints
  avoid a device sync (its "max_seqlen note");
- ``attn_mask_type="padding_causal_bottom_right"``: with THD the mask type must contain ``padding`` (asserted);
  ``bottom_right_diagonal`` is then forced to True; ``utils.get_full_mask`` defines it as key ``j`` visible to
  query ``i`` iff ``j <= i + Lk - Lq`` per segment, and ``utils.get_attention_backend`` lists
  ``padding_causal_bottom_right`` as served by all backends (flash, fused, unfused);
- ``attention_type`` switched to ``"cross"`` for the call (``_as_cross_attention``): queries and keys have
  different ``cu_seqlens``;
- no ``cu_seqlens_*_padded``: the gathered tensors hold no padding (``pad_between_seqs`` stays False);
- context parallelism is refused: ``get_attention_backend`` disables the flash and fused backends for
  ``bottom_right`` masks under context parallelism.

megatron's ``TEDotProductAttention.forward`` (``megatron/core/extensions/transformer_engine.py``) passes
``attn_mask_type.name`` of megatron's ``AttnMaskType``, which has no ``padding_causal_bottom_right``, so the
gathered path calls ``transformer_engine.pytorch.DotProductAttention.forward`` directly; everything else
(constructor, TP/CP groups, RNG tracker, dropout, softmax scale, checkpoint keys) is ``TEDotProductAttention``'s.
Any other ``attention_mask`` (None, boolean) takes ``TEDotProductAttention.forward`` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from nemo_lpo.model.attention import is_attention_layout, with_core_attention
from nemo_lpo.model.varlen import VarlenPlan, cached_varlen_plan, check_te_gathered_config, gathered_varlen_attention

try:  # TE raises RuntimeError / OSError (not only ImportError) where it is installed but unusable
    import transformer_engine.pytorch as te_pytorch
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
except (ImportError, RuntimeError, OSError):
    te_pytorch = None
    TEDotProductAttention = None

BOTTOM_RIGHT_CAUSAL = "padding_causal_bottom_right"


def gathered_attention_class(base: type, te_forward: Callable) -> type:
    """``TEGatheredDotProductAttention`` on ``base`` (megatron's ``TEDotProductAttention``), calling ``te_forward``.

    ``te_forward`` is ``transformer_engine.pytorch.DotProductAttention.forward`` in production; tests pass a
    recorder. The class is ``base`` for every mask that is not an ``attention_layout``.
    """

    class TEGatheredDotProductAttention(base):
        """``TEDotProductAttention`` that attends an ``attention_layout`` through one THD varlen call.

        Same constructor and parameters as ``TEDotProductAttention``; output ``[S, R, heads * dim / tp]``.
        """

        accepts_attention_layout = True

        def __init__(self, config, *args, **kwargs):
            check_te_gathered_config(config)  # what the direct TE call below would silently drop
            super().__init__(config, *args, **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, num_splits=None):
            """``TEDotProductAttention.forward``; the gathered varlen path when ``attention_mask`` is a layout."""
            if not is_attention_layout(attention_mask):
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                                       num_splits=num_splits)
            if packed_seq_params is not None or attention_bias is not None or num_splits not in (None, 0):
                raise ValueError("the gathered varlen path takes no packed_seq_params, attention_bias or num_splits")
            if self.config.context_parallel_size > 1:
                raise ValueError("shared-prompt rows on TE need context_parallel_size=1: TE serves "
                                 "padding_causal_bottom_right under context parallelism with no backend")
            return gathered_varlen_attention(query, key, value, cached_varlen_plan(attention_mask), self._te_kernel)

        def _te_kernel(self, q, k, v, plan: VarlenPlan):
            # skips TEDotProductAttention.forward on purpose: its mask type goes through megatron's AttnMaskType
            with _as_cross_attention(self):
                return te_forward(
                    self, q, k, v, None, qkv_format="thd", cu_seqlens_q=plan.cu_seqlens_q,
                    cu_seqlens_kv=plan.cu_seqlens_kv, max_seqlen_q=plan.max_seqlen_q,
                    max_seqlen_kv=plan.max_seqlen_kv, attn_mask_type=BOTTOM_RIGHT_CAUSAL)

    return TEGatheredDotProductAttention


@contextlib.contextmanager
def _as_cross_attention(module):
    """Queries and keys with different ``cu_seqlens`` for the duration of one call.

    With ``attention_type="self"`` TE's backends take ``cu_seqlens_kv = cu_seqlens_q`` (``backends.py``
    ``UnfusedDotProductAttention`` via ``utils.get_padding_mask``; the flash path asserts equal maximum
    lengths); TE's own KV-cache path switches the module and its three backends to ``"cross"`` the same way
    (``DotProductAttention.forward``). Padded batches keep ``"self"`` (FlashAttention serves causal
    self-attention only).
    """
    parts = [module, module.flash_attention, module.fused_attention, module.unfused_attention]
    before = [part.attention_type for part in parts]
    for part in parts:
        object.__setattr__(part, "attention_type", "cross")
    try:
        yield
    finally:
        for part, value in zip(parts, before, strict=True):
            object.__setattr__(part, "attention_type", value)


TEGatheredDotProductAttention = (None if TEDotProductAttention is None else
                                 gathered_attention_class(TEDotProductAttention, te_pytorch.DotProductAttention.forward))


def with_te_gathered_attention(block_spec):
    """A copy of TE's decoder block spec whose core attention is ``TEGatheredDotProductAttention``.

    The TE counterpart of ``build.with_gathered_attention``. CODE ONLY here: it needs Transformer Engine
    (absent on CPU machines, where it raises RuntimeError); tools/container_check.sh executes it.
    """
    if TEGatheredDotProductAttention is None:
        raise RuntimeError("with_te_gathered_attention needs Transformer Engine, which does not import here")
    return with_core_attention(block_spec, TEDotProductAttention, TEGatheredDotProductAttention)
