"""The self-check's attention kernel check: TE's varlen calls against ``reference_varlen_kernel`` in fp32.

Random bf16 GQA q/k/v (head size 128; prompts of 50-600 tokens, K = 2-8 responses of 20-800 tokens on a GPU)
go through the exact calls the project makes: the shared-prompt rows through ``TEGatheredDotProductAttention``
(THD, ``padding_causal_bottom_right``, separate ``cu_seqlens_q/kv``), the packed rows through megatron's
``TEDotProductAttention`` with ``PackedSeqParams``. Each output is compared over the real tokens with the fp32
reference on the same (bf16-rounded) inputs. ``tests/te_checks.py kernels --backend B`` runs it once per TE
backend, forced by TE's switches (``BACKEND_SWITCHES``), and reports which backend TE actually ran.

The tolerance is an absolute error on unit-variance values: a bf16 kernel is off by ~1e-2 at most, and each
planted mask error moves the first queries of a segment (which see one or a few keys) by O(1) (tests/
test_te_kernel_check.py runs the check on CPU with the reference kernel in TE's place: each planted error makes
it FAIL). CODE ONLY for TE here (no GPU, no TE where this was written); the CPU side is executed in the suite.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from nemo_lpo.batch.shared_prompt import collate_shared_prompt
from nemo_lpo.model.attention import attention_layout
from nemo_lpo.model.varlen import (
    VarlenPlan,
    gathered_varlen_attention,
    packed_seq_params,
    reference_varlen_kernel,
    varlen_plan,
)


@dataclasses.dataclass(frozen=True)
class KernelSizes:
    """Shapes of the kernel check.

    Attributes:
        lists: shared-prompt rows (one list each); the packed call gets the same sequences back to back.
        heads: query heads. groups: key/value heads (GQA). head_dim: head size.
        prompt / k / response: inclusive ranges of prompt length, responses per list, response length.
    """

    lists: int = 3
    heads: int = 16
    groups: int = 4
    head_dim: int = 128
    prompt: tuple[int, int] = (50, 600)
    k: tuple[int, int] = (2, 8)
    response: tuple[int, int] = (20, 800)


CPU_SIZES = KernelSizes(lists=2, heads=4, groups=2, prompt=(5, 40), k=(2, 4), response=(3, 30))


def _lists(sizes: KernelSizes, rng: np.random.Generator) -> list[dict]:
    items = []
    for index in range(sizes.lists):
        k = int(rng.integers(sizes.k[0], sizes.k[1] + 1))
        items.append({"prompt_ids": np.ones(int(rng.integers(sizes.prompt[0], sizes.prompt[1] + 1)), np.int64),
                      "response_ids": [np.ones(int(rng.integers(sizes.response[0], sizes.response[1] + 1)), np.int64)
                                       for _ in range(k)],
                      "rewards": np.zeros(k, np.float32), "ref_logps": None, "index": index})
    return items


def _max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max()) if out.shape == ref.shape else math.inf


def kernel_errors(gathered_call, packed_call, sizes: KernelSizes, device, seed: int = 0) -> dict:
    """Max abs error of both project calls against the fp32 reference on random bf16 GQA inputs.

    Args:
        gathered_call: ``(q, k, v [S, R, heads|groups, dim], layout) -> [S, R, heads * dim]``.
        packed_call: ``(q, k, v [t, heads|groups, dim], PackedSeqParams) -> [t, heads * dim]``.
        sizes: the shapes (``KernelSizes``).
        device: where the inputs are made.
        seed: seeds the lengths and the values.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = collate_shared_prompt(_lists(sizes, rng), pad_id=0)
    layout = attention_layout(batch["segment_ids"], batch["part_ids"]).to(device)
    rows, seq = batch["segment_ids"].shape
    scale = 1.0 / math.sqrt(sizes.head_dim)
    reference = reference_varlen_kernel(scale)

    def qkv(*lead):
        return [torch.randn(*lead, n, sizes.head_dim, generator=gen).to(device, torch.bfloat16)
                for n in (sizes.heads, sizes.groups, sizes.groups)]

    q, k, v = qkv(seq, rows)
    real = (layout[:, 0] >= 0).transpose(0, 1)  # [S, R]
    expected = gathered_varlen_attention(q.float(), k.float(), v.float(), varlen_plan(layout), reference)
    gathered = gathered_call(q, k, v, layout)
    errors = {"gathered": _max_abs_err(gathered[real], expected[real]) if gathered.shape == expected.shape
              else math.inf}
    # the packed path: every (prompt + response) sequence back to back, one THD row
    lengths = (batch["prompt_lengths"][:, None] + batch["response_lengths"])[batch["response_lengths"] > 0]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    params = packed_seq_params(cu.to(device), int(cu[-1]))
    qp, kp, vp = qkv(int(cu[-1]))
    plan = VarlenPlan(torch.empty(0), torch.empty(0), params.cu_seqlens_q, params.cu_seqlens_kv,
                      params.max_seqlen_q, params.max_seqlen_kv)
    expected_packed = reference(qp.float(), kp.float(), vp.float(), plan).reshape(qp.shape[0], -1)
    errors["packed"] = _max_abs_err(packed_call(qp, kp, vp, params), expected_packed)
    return {"max_abs_err": errors, "tokens": {"gathered": int(real.sum()), "packed": int(cu[-1])},
            "segments": {"gathered": int(varlen_plan(layout).cu_seqlens_q.numel() - 1),
                         "packed": int(params.cu_seqlens_q.numel() - 1)}}


def te_backend_that_ran() -> str:
    """The backend TE's last DotProductAttention call selected (its module-level ``_attention_backends``)."""
    from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as dpa

    chosen = getattr(dpa, "_attention_backends", None) or {}
    for name, key in (("flash", "use_flash_attention"), ("fused", "use_fused_attention"),
                      ("unfused", "use_unfused_attention")):
        if chosen.get(key):
            return name
    return f"unknown ({sorted(chosen)})"


def te_kernel_check(backend: str, sizes: KernelSizes = KernelSizes(), seed: int = 0) -> dict:
    """``kernel_errors`` through TE on the GPU, recording which backend ran for each call. CODE ONLY here."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_lpo.model.te_attention import TEGatheredDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=sizes.heads * sizes.head_dim, num_attention_heads=sizes.heads,
                               num_query_groups=sizes.groups, kv_channels=sizes.head_dim, attention_dropout=0.0,
                               bf16=True, params_dtype=torch.bfloat16)
    module = TEGatheredDotProductAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                           attention_type="self").cuda()
    ran = {}

    def gathered(q, k, v, layout):
        out = module(q, k, v, layout)
        ran["gathered"] = te_backend_that_ran()
        return out

    def packed(q, k, v, params):
        out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
        ran["packed"] = te_backend_that_ran()
        return out

    with torch.no_grad():
        result = kernel_errors(gathered, packed, sizes, torch.device("cuda", torch.cuda.current_device()), seed)
    return {**result, "backend": backend, "backends_ran": ran}


def reference_kernel_check(sizes: KernelSizes = CPU_SIZES, seed: int = 0, mask=None) -> dict:
    """``kernel_errors`` on the CPU with the bf16 reference kernel in TE's place (``mask``: a planted error)."""
    kernel = reference_varlen_kernel(1.0 / math.sqrt(sizes.head_dim), **({"mask": mask} if mask else {}))

    def packed(q, k, v, params):
        plan = VarlenPlan(torch.empty(0), torch.empty(0), params.cu_seqlens_q, params.cu_seqlens_kv,
                          params.max_seqlen_q, params.max_seqlen_kv)
        return kernel(q, k, v, plan).reshape(q.shape[0], -1)

    def gathered(q, k, v, layout):
        return gathered_varlen_attention(q, k, v, varlen_plan(layout), kernel)

    with torch.no_grad():
        return kernel_errors(gathered, packed, sizes, torch.device("cpu"), seed)
