"""Ranking metrics of scores (e.g. the implicit reward) against annotated rewards, per list.

All functions take ``[B, K]`` tensors -- ``scores`` (what the model says), ``rewards`` (what the annotation
says) and a boolean ``mask`` of valid slots (lists may be ragged) -- and return one value per list ``[B]``,
NaN where the metric is undefined for that list; :func:`ranking_metrics` averages over the lists where it
is defined and reports how many those were. Ties in the scores count as a coin flip everywhere (half a
correct pair; the expected DCG over the orders of tied items), so a model whose scores are all equal -- the
policy at step 0, when it still equals the reference and every implicit reward is 0 -- scores exactly what
a random ranking scores in expectation: accuracy 0.5, Kendall τ 0. Pairs tied in reward carry no order and
are left out of the accuracy.
"""

from __future__ import annotations

import math

import torch

from nemo_lpo.losses import listwise_loss


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the implicit reward ``beta * (log pi - log mu)`` per response, ``[B, K]``."""
    return beta * (policy_logps - reference_logps)


def _pair_signs(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
    """Return sign(s_i - s_j), sign(r_i - r_j) and the valid-pair mask (i != j), each ``[B, K, K]``."""
    mask = mask.bool()
    s = torch.sign(scores.unsqueeze(-1) - scores.unsqueeze(-2))
    r = torch.sign(rewards.unsqueeze(-1) - rewards.unsqueeze(-2))
    pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pair &= ~torch.eye(scores.shape[-1], dtype=torch.bool, device=scores.device)
    return s.double(), r.double(), pair


def pairwise_accuracy(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the pairs with ``r_i > r_j`` that the scores order the same way (a score tie counts 1/2).

    Returns ``[B]``; NaN for a list with no pair of different rewards.
    """
    s, r, pair = _pair_signs(scores, rewards, mask)
    ordered = pair & (r > 0)
    credit = torch.where(s > 0, 1.0, torch.where(s == 0, 0.5, 0.0)).double()
    count = ordered.sum(dim=(-1, -2)).double()
    correct = (credit * ordered).sum(dim=(-1, -2))
    return torch.where(count > 0, correct / count.clamp_min(1), torch.full_like(count, math.nan))


def num_ordered_pairs(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Number of pairs ``(i, j)`` of valid responses with ``r_i > r_j`` per list, ``[B]``."""
    _, r, pair = _pair_signs(rewards, rewards, mask)
    return (pair & (r > 0)).sum(dim=(-1, -2))


def kendall_tau(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kendall's τ-b between scores and rewards over the valid responses of each list, ``[B]``.

    τ-b = (C - D) / sqrt((n0 - n1)(n0 - n2)) with C / D the concordant / discordant pairs, n0 all pairs,
    n1 / n2 the pairs tied in scores / in rewards (scipy's default). NaN where the rewards are all equal
    (nothing to rank); 0 where the rewards differ but the scores are all equal (no association).
    """
    s, r, pair = _pair_signs(scores, rewards, mask)
    prod = s * r
    concordant = ((prod > 0) & pair).sum(dim=(-1, -2)).double()
    discordant = ((prod < 0) & pair).sum(dim=(-1, -2)).double()
    n0 = pair.sum(dim=(-1, -2)).double()
    n1 = ((s == 0) & pair).sum(dim=(-1, -2)).double()
    n2 = ((r == 0) & pair).sum(dim=(-1, -2)).double()
    denom = torch.sqrt((n0 - n1) * (n0 - n2))
    tau = torch.where(denom > 0, (concordant - discordant) / denom.clamp_min(1e-30), torch.zeros_like(denom))
    return torch.where(n0 - n2 > 0, tau, torch.full_like(tau, math.nan))


def ndcg(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """NDCG@k of the order the scores give against the rewards, per list ``[B]``.

    Gains are the rewards shifted so that the list's worst valid response gains 0 (``r - min r``), which
    works for any reward scale (including negative rewards); the discount at rank p is ``1 / log2(p + 1)``,
    0 beyond rank ``k`` (default: the whole list). Tied scores get the mean discount of the ranks they
    share (the expected DCG over their orders). NaN where all valid rewards are equal.
    """
    mask = mask.bool()
    num_slots = scores.shape[-1]
    k = num_slots if k is None else k
    ranks = torch.arange(1, num_slots + 1, dtype=torch.float64, device=scores.device)
    discount = torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1), torch.zeros_like(ranks))
    cum = torch.cat([discount.new_zeros(1), discount.cumsum(0)])  # cum[p] = sum of the first p discounts

    big = torch.finfo(torch.float64).max
    min_reward = torch.where(mask, rewards.double(), torch.full_like(rewards, big, dtype=torch.float64)).amin(-1)
    gains = torch.where(mask, rewards.double() - min_reward.unsqueeze(-1), torch.zeros_like(rewards, dtype=torch.float64))

    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)  # [B, i, j]
    higher = ((scores.unsqueeze(-2) > scores.unsqueeze(-1)) & both).sum(-1)  # items scored above i
    tied = ((scores.unsqueeze(-2) == scores.unsqueeze(-1)) & both).sum(-1).clamp_min(1)  # i's tie group
    expected_discount = (cum[higher + tied] - cum[higher]) / tied
    dcg = (gains * expected_discount).sum(-1)

    ideal_gains = gains.masked_fill(~mask, -1.0).sort(dim=-1, descending=True).values.clamp_min(0.0)
    idcg = (ideal_gains * discount).sum(-1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-30), torch.full_like(idcg, math.nan))


def best_worst_logps(logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
    """Return the log-likelihood of each list's best and worst response (by annotated reward), ``[B]`` each.

    Ties go to the first such slot. NaN for a list with no valid response.
    """
    mask = mask.bool()
    big = torch.finfo(rewards.dtype).max
    best = torch.where(mask, rewards, torch.full_like(rewards, -big)).argmax(-1, keepdim=True)
    worst = torch.where(mask, rewards, torch.full_like(rewards, big)).argmin(-1, keepdim=True)
    has_any = mask.any(-1)
    nan = torch.full_like(logps[:, 0], math.nan)
    return (
        torch.where(has_any, logps.gather(-1, best).squeeze(-1), nan),
        torch.where(has_any, logps.gather(-1, worst).squeeze(-1), nan),
    )


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.double().mean()) if x.numel() else math.nan


def ranking_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    response_lengths: torch.Tensor | None = None,
    ndcg_k: int | None = None,
) -> dict[str, float]:
    """Return the held-out summary: ranking metrics of the implicit reward and of log π itself.

    Keys: ``implicit/{accuracy,kendall_tau,ndcg}`` rank by ``beta * (log pi - log mu)``;
    ``likelihood/{accuracy,kendall_tau,ndcg}`` rank by the policy's own log-likelihood per token (meaningful
    also before training, when the implicit reward is 0 everywhere); ``logps/best``, ``logps/worst``: the
    mean summed log-likelihood of the best and the worst response (and ``logps_per_token/*`` when
    ``response_lengths`` is given); ``lists``, ``pairs``; ``*_lists``: how many lists each metric was
    defined on. Averages are over lists (each list weighs the same).
    """
    mask = mask.bool()
    scores = implicit_rewards(policy_logps, reference_logps, beta)
    out: dict[str, float] = {"lists": int(mask.any(-1).sum()), "pairs": int(num_ordered_pairs(rewards, mask).sum())}
    rankings = {"implicit": scores}
    if response_lengths is not None:
        rankings["likelihood"] = policy_logps / response_lengths.clamp_min(1)
    else:
        rankings["likelihood"] = policy_logps
    for name, s in rankings.items():
        acc = pairwise_accuracy(s, rewards, mask)
        out[f"{name}/accuracy"] = _nanmean(acc)
        out[f"{name}/kendall_tau"] = _nanmean(kendall_tau(s, rewards, mask))
        out[f"{name}/ndcg"] = _nanmean(ndcg(s, rewards, mask, k=ndcg_k))
    out["ranked_lists"] = int((~torch.isnan(pairwise_accuracy(scores, rewards, mask))).sum())
    best, worst = best_worst_logps(policy_logps, rewards, mask)
    out["logps/best"], out["logps/worst"] = _nanmean(best), _nanmean(worst)
    if response_lengths is not None:
        per_token = policy_logps / response_lengths.clamp_min(1)
        best_t, worst_t = best_worst_logps(per_token, rewards, mask)
        out["logps_per_token/best"], out["logps_per_token/worst"] = _nanmean(best_t), _nanmean(worst_t)
    return out


def loss_metrics(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    response_lengths: torch.Tensor | None = None,
    loss_options: dict | None = None,
) -> dict[str, float]:
    """The training loss and its metrics (``rewards/*``, ``logps/chosen`` ...) on a whole set of lists as ONE batch.

    ``loss`` is the sum of the per-list losses over the valid lists (>= 2 valid responses) divided by their
    number, as a training step reduces it; the other keys are the loss module's means over the valid lists
    (``rewards/accuracies`` counts a tied implicit reward as wrong, where ``implicit/accuracy`` counts 1/2).
    A loss that uses batch statistics (``kto``'s reference point) sees the whole set here.

    Raises:
        ValueError: the loss does not accept these lists (e.g. ``dpo`` with K != 2).
    """
    options = dict(loss_options or {})
    if response_lengths is not None:  # read by the per-token NLL terms (sft_weight, sft) only
        options["response_lengths"] = response_lengths
    per_list, metrics = listwise_loss(loss_type, policy_logps.double(), reference_logps.double(), rewards.double(),
                                      mask.bool(), beta, **options)
    valid = float(metrics.pop("lists/valid"))
    out = {"loss": float(per_list.sum()) / max(valid, 1.0)}
    out.update({name: float(value) for name, value in sorted(metrics.items())})
    out["lists/valid"] = int(valid)
    return out


def heldout_metrics(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    response_lengths: torch.Tensor | None = None,
    ndcg_k: int | None = None,
    loss_type: str | None = None,
    loss_options: dict | None = None,
) -> dict[str, float]:
    """What ``nemo-lpo eval`` and the trainer's validation report: ranking plus (with ``loss_type``) loss metrics.

    :func:`ranking_metrics` and :func:`loss_metrics`; both callers go through this one function, so their
    numbers agree.
    """
    out = ranking_metrics(policy_logps, reference_logps, rewards, mask, beta=beta,
                          response_lengths=response_lengths, ndcg_k=ndcg_k)
    if loss_type is not None:
        out.update(loss_metrics(loss_type, policy_logps, reference_logps, rewards, mask, beta,
                                response_lengths=response_lengths, loss_options=loss_options))
    return out
