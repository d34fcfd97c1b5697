"""The Plackett-Luce family (ListMLE and its top-k form, KPO) as [B, K, K] pair-tensor math.

``nemo_lpo.losses`` registers them as ``listmle`` and ``kpo``; this module only holds the math, on the
pair tensors that every loss shares (``ListBatch.margin`` and ``ListBatch.pairs``), so it imports nothing
of the registry. Formulas, the tie rule and sources: docs/losses.md.

Plackett-Luce over the annotated order y_(1) > y_(2) > ... > y_(K) of the implicit rewards s:

    -log P(order) = sum_p -log( exp(s_(p)) / sum_{q >= p} exp(s_(q)) )
                  = sum_i log(1 + sum_{j below i} exp(s_j - s_i)),

written per response i over the responses ranked below it, so no sort is needed. Ties: tied responses
share a position and there is no term between them: neither enters the other's denominator, and each is
compared with the responses strictly below their shared position (with distinct rewards this is the plain
Plackett-Luce likelihood). A response's position is 1 + the number of valid responses rewarded strictly
higher (1, 2, 2, 4 for rewards 4, 3, 3, 1); the top-k form keeps the terms of positions 1..k.
"""

from __future__ import annotations

import torch


def plackett_luce_terms(margin: torch.Tensor, pairs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response i, -log of the probability that i comes first among itself and the responses below it.

    Args:
        margin: [B, K, K] s_i - s_j (implicit rewards).
        pairs: [B, K, K] bool, i and j both valid and i rewarded strictly higher than j.
        mask: [B, K] bool, valid slots.

    Returns:
        [B, K]: log(1 + sum_{j: pairs[i, j]} exp(s_j - s_i)); 0 in invalid slots and for the lowest-ranked.
    """
    num_slots = mask.shape[-1]
    itself = torch.eye(num_slots, dtype=torch.bool, device=mask.device)
    # log-sum-exp over {i} and the responses below i of s_j - s_i (the i-term is exp(0) = 1); the excluded
    # entries get the most negative finite value, not -inf, so no inf - inf can reach a gradient
    logits = torch.where(pairs | itself, -margin, torch.full_like(margin, torch.finfo(margin.dtype).min))
    terms = torch.logsumexp(logits, dim=-1)
    return torch.where(mask, terms, torch.zeros_like(terms))


def positions(pairs: torch.Tensor) -> torch.Tensor:
    """[B, K] position of each response in the annotated order: 1 + responses rewarded strictly higher."""
    return 1 + pairs.sum(dim=-2)


def plackett_luce_nll(
    margin: torch.Tensor, pairs: torch.Tensor, mask: torch.Tensor, top_k: int | None = None
) -> torch.Tensor:
    """ListMLE (``top_k=None``) or its top-k form: the summed terms of positions 1..top_k, [B].

    ``top_k = 1`` is softmax-DPO: -log softmax(s)_best over all valid responses (each tied best its own term).
    """
    terms = plackett_luce_terms(margin, pairs, mask)
    if top_k is not None:
        terms = torch.where(positions(pairs) <= top_k, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)
