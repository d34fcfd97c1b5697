"""The listwise preference loss family (LPO, LPO-abs and baselines) over [B, K] sequence log-probs.

Pure tensor math: no process groups, no ``.item()`` or other host syncs, no Python loops over lists or
pairs. Every loss builds [B, K, K] pair tensors. Formulas, options and metric definitions: docs/losses.md.
:data:`LOSS_SPECS` is the registry: each loss's function and the options it reads (the config validates
``loss.options`` against it); the Plackett-Luce family's math lives in ``nemo_lpo.losses.plackett_luce``.

Inputs, all [B, K] (B lists, K slots; lists may be ragged and the valid slots may be anywhere in a row):
``policy_logps`` / ``reference_logps`` are SUMMED response log-probs, ``rewards`` are annotated scalars
(higher is better; NOT assumed sorted), ``mask`` marks the valid slots. A list with fewer than 2 valid
responses gets loss 0 and is not counted in ``lists/valid``.

dtype: computation is float32 (float64 when the log-probs are float64, so gradcheck works); bf16/fp16
inputs are upcast, and the loss and metrics are returned in that computation dtype (float32 for bf16).

Metrics are 0-dim detached tensors: means over the VALID lists of the batch (0 when there are none),
plus ``lists/valid``, the count, as a float tensor. To reduce them over micro-batches or data-parallel
ranks, multiply each mean by its ``lists/valid``, sum, and divide by the summed ``lists/valid``
(``lists/valid`` itself is summed).

Example:
    >>> loss, metrics = listwise_loss("lpo", pol, ref, rewards, mask, beta=0.1)
    >>> (loss.sum() / global_valid_lists).backward()
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nemo_lpo.losses.plackett_luce import plackett_luce_nll

# LiPO gains 2^r - 1 saturate at r = 100 (2^100 ~ 1.3e30) so that the pair weights stay finite in float32;
# only rewards above 100 are affected, and for them 2^r would overflow float32 (2^128) anyway.
LIPO_MAX_GAIN_EXPONENT = 100.0


class OptionError(ValueError):
    """A bad value of one :class:`LossOptions` field; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Options of :func:`listwise_loss` (passed as keyword arguments).

    Attributes:
        preference: rewards only order the responses (preference data): pair weights m(i, j) = 1 in the
            LPO family and |G_i - G_j| = 1 in LiPO-lambda.
        alpha: reward temperature of the soft labels p = softmax(r / alpha) in ``nca`` and ``infonca``.
        sft_weight: weight of the NLL term -policy_logp(best) / length(best) added to each valid list.
        response_lengths: [B, K] token counts of the responses; required when ``sft_weight > 0`` and for ``sft``.
        kto_z: KTO reference point (log-ratio units) to use instead of the micro-batch estimate, e.g. a
            global-batch estimate computed by the caller; detached either way.
        desirable_weight: KTO lambda_D, weight of the desirable (best) response's term.
        undesirable_weight: KTO lambda_U, weight of each undesirable response's term.
        k: ``kpo``'s top positions of the annotated order that are modelled, an int >= 1 (1: softmax-DPO).
    """

    preference: bool = False
    alpha: float = 1.0
    sft_weight: float = 0.0
    response_lengths: torch.Tensor | None = None
    kto_z: float | torch.Tensor | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    k: int = 1

    def __post_init__(self) -> None:
        """Check the values that do not depend on the batch (the config checks them the same way)."""
        if not self.alpha > 0:
            raise OptionError("alpha", f"option alpha (reward temperature) must be > 0, got {self.alpha}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise OptionError("k", f"option k (kpo's top positions) must be an int >= 1, got {self.k!r}")


@dataclasses.dataclass(frozen=True)
class ListBatch:
    """Validated inputs in the computation dtype plus the pair structure every loss shares.

    Attributes:
        policy: [B, K] policy log-probs (0 in invalid slots).
        logratio: [B, K] policy - reference log-probs (0 in invalid slots).
        reward_theta: [B, K] implicit rewards beta * logratio.
        rewards: [B, K] annotated rewards (0 in invalid slots).
        mask: [B, K] bool, valid slots.
        count: [B] number of valid responses per list (computation dtype).
        pairs: [B, K, K] bool, (i, j) both valid and rewards[i] > rewards[j].
        margin: [B, K, K] reward_theta[i] - reward_theta[j].
        best: [B, K] bool one-hot of the best valid response (highest reward, lowest slot on ties).
        beta: the KL coefficient.
    """

    policy: torch.Tensor
    logratio: torch.Tensor
    reward_theta: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    count: torch.Tensor
    pairs: torch.Tensor
    margin: torch.Tensor
    best: torch.Tensor
    beta: float


LossFn = Callable[[ListBatch, LossOptions], torch.Tensor]


def _pair_sum(lists: ListBatch, pairs: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the selected pairs of weight * -log sigma(margin); [B]."""
    terms = -F.logsigmoid(lists.margin)
    if weight is not None:
        terms = weight * terms
    return torch.where(pairs, terms, torch.zeros_like(terms)).sum(dim=(1, 2))


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(dim=-1)


def _reward_margin_weight(lists: ListBatch, opts: LossOptions) -> torch.Tensor | None:
    """m(i, j) = |r_i^2 - r_j^2|, or None (weight 1) for preference data."""
    if opts.preference:
        return None
    squared = lists.rewards.square()
    return (squared.unsqueeze(-1) - squared.unsqueeze(-2)).abs()


def _lpo(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    return _pair_sum(lists, lists.pairs, _reward_margin_weight(lists, opts))


def _lpo_abs(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    anchor = _masked_sum(F.logsigmoid(-lists.reward_theta), lists.mask) / lists.count.clamp(min=1)
    return _lpo(lists, opts) + anchor


def _lpo_abs_table1(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    anchor = _masked_sum(torch.sigmoid(-lists.reward_theta), lists.mask) / lists.count.clamp(min=1)
    return _lpo(lists, opts) + anchor


def _require_pairs(name: str, lists: ListBatch) -> None:
    if lists.mask.shape[1] != 2:
        raise ValueError(
            f"loss_type={name!r} needs exactly K=2 responses per list (got K={lists.mask.shape[1]}); "
            "prune the lists to pairs first (Zephyr: best vs one other) or use 'dpo_1vs0' / 'dpo_pw' / 'lpo'"
        )


def _dpo(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    _require_pairs("dpo", lists)
    return _pair_sum(lists, lists.pairs)


def _dpo_1vs0(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    return _pair_sum(lists, lists.pairs & lists.best.unsqueeze(-1))


def _dpo_pw(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    return _pair_sum(lists, lists.pairs)


def _ipo(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    _require_pairs("ipo", lists)
    h = lists.logratio.unsqueeze(-1) - lists.logratio.unsqueeze(-2)
    terms = (h - 1.0 / (2.0 * lists.beta)).square()
    return torch.where(lists.pairs, terms, torch.zeros_like(terms)).sum(dim=(1, 2))


def _kto(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    if opts.kto_z is None:
        # Micro-batch KL estimate from the valid responses of the valid lists (TRL: mismatched pairs).
        counted = lists.mask & (lists.count >= 2).unsqueeze(-1)
        n = counted.sum().clamp(min=1).to(lists.logratio.dtype)
        z = (_masked_sum(lists.logratio, counted).sum() / n).clamp(min=0)
    else:
        z = torch.as_tensor(opts.kto_z, dtype=lists.logratio.dtype, device=lists.logratio.device)
    z = z.detach()
    desirable = opts.desirable_weight * torch.sigmoid(-lists.beta * (lists.logratio - z))
    undesirable = opts.undesirable_weight * torch.sigmoid(-lists.beta * (z - lists.logratio))
    terms = torch.where(lists.best, desirable, undesirable)
    return _masked_sum(terms, lists.mask)


def _soft_labels(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    labels = torch.softmax(_fill_invalid(lists.rewards / opts.alpha, lists.mask), dim=-1)
    return torch.where(lists.mask, labels, torch.zeros_like(labels))


def _fill_invalid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Invalid slots get the most negative finite value: softmax gives them 0, and no row is all -inf (nan)."""
    return torch.where(mask, values, torch.full_like(values, torch.finfo(values.dtype).min))


def _infonca(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    log_probs = torch.log_softmax(_fill_invalid(lists.reward_theta, lists.mask), dim=-1)
    return -_masked_sum(_soft_labels(lists, opts) * log_probs, lists.mask)


def _nca(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    attract = _masked_sum(_soft_labels(lists, opts) * F.logsigmoid(lists.reward_theta), lists.mask)
    anchor = _masked_sum(F.logsigmoid(-lists.reward_theta), lists.mask) / lists.count.clamp(min=1)
    return -attract - anchor


def _lipo_lambda(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    with torch.no_grad():
        score = lists.reward_theta
        slot = torch.arange(score.shape[1], device=score.device)
        # tau_i = 1 + number of valid j ranked above i (higher score, or equal score and lower slot).
        above = (score.unsqueeze(-2) > score.unsqueeze(-1)) | (
            (score.unsqueeze(-2) == score.unsqueeze(-1)) & (slot.unsqueeze(0) < slot.unsqueeze(1))
        )
        tau = 1 + (above & lists.mask.unsqueeze(-2)).sum(dim=-1).to(score.dtype)
        inv_discount = 1.0 / torch.log1p(tau)
        weight = (inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)).abs()
        if not opts.preference:
            gain = torch.exp2(lists.rewards.clamp(max=LIPO_MAX_GAIN_EXPONENT)) - 1.0
            weight = weight * (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs()
    return _pair_sum(lists, lists.pairs, weight)


def _sft(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    # Supervised fine-tuning on each list's best response: its NLL per token (needs response_lengths).
    return _best_nll_per_token(lists, opts, "loss_type='sft'")


def _listmle(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    return plackett_luce_nll(lists.margin, lists.pairs, lists.mask)


def _kpo(lists: ListBatch, opts: LossOptions) -> torch.Tensor:
    return plackett_luce_nll(lists.margin, lists.pairs, lists.mask, top_k=opts.k)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One registry entry: ``fn`` (ListBatch, LossOptions) -> [B]; ``options``: the fields it reads (+ COMMON)."""

    fn: LossFn
    options: tuple[str, ...] = ()


COMMON_OPTIONS = ("sft_weight", "response_lengths")
"""Options every loss takes (the SFT term)."""
RUNTIME_OPTIONS = ("response_lengths",)
"""Options the trainer hands over from the batch (tensors): never set in a config."""

LOSS_SPECS: dict[str, LossSpec] = {
    "lpo": LossSpec(_lpo, ("preference",)),
    "lpo_abs": LossSpec(_lpo_abs, ("preference",)),
    "lpo_abs_table1": LossSpec(_lpo_abs_table1, ("preference",)),
    "dpo": LossSpec(_dpo),
    "dpo_1vs0": LossSpec(_dpo_1vs0),
    "dpo_pw": LossSpec(_dpo_pw),
    "ipo": LossSpec(_ipo),
    "kto": LossSpec(_kto, ("kto_z", "desirable_weight", "undesirable_weight")),
    "nca": LossSpec(_nca, ("alpha",)),
    "infonca": LossSpec(_infonca, ("alpha",)),
    "lipo_lambda": LossSpec(_lipo_lambda, ("preference",)),
    "sft": LossSpec(_sft),
    "listmle": LossSpec(_listmle),
    "kpo": LossSpec(_kpo, ("k",)),
}
"""The declarative registry: loss name -> its function and the options it reads."""

LOSSES: dict[str, LossFn] = {name: spec.fn for name, spec in LOSS_SPECS.items()}
"""Registry: loss name -> fn(ListBatch, LossOptions) -> per-list loss [B] (before the SFT term)."""


def _prepare(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> ListBatch:
    named = {"policy_logps": policy_logps, "reference_logps": reference_logps, "rewards": rewards, "mask": mask}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, K], got shape {tuple(policy_logps.shape)}")
    for name, value in named.items():
        if value.shape != policy_logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected [B, K] = {tuple(policy_logps.shape)} "
                "like policy_logps"
            )
    if not policy_logps.is_floating_point():
        raise TypeError(f"policy_logps must be a floating tensor, got {policy_logps.dtype}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    mask = mask if mask.dtype == torch.bool else mask != 0
    zeros = torch.zeros(policy_logps.shape, dtype=dtype, device=policy_logps.device)
    policy = torch.where(mask, policy_logps.to(dtype), zeros)
    logratio = torch.where(mask, policy_logps.to(dtype) - reference_logps.to(dtype), zeros)
    rewards = torch.where(mask, rewards.to(dtype), zeros)
    reward_theta = beta * logratio
    pair_valid = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pairs = pair_valid & (rewards.unsqueeze(-1) > rewards.unsqueeze(-2))
    masked_rewards = torch.where(mask, rewards, torch.full_like(rewards, -math.inf))
    best_slot = masked_rewards.argmax(dim=-1)  # first maximum = lowest slot on ties
    slots = torch.arange(mask.shape[1], device=mask.device)
    best = (slots == best_slot.unsqueeze(-1)) & mask  # not F.one_hot: it range-checks the indices (a host sync)
    return ListBatch(
        policy=policy,
        logratio=logratio,
        reward_theta=reward_theta,
        rewards=rewards,
        mask=mask,
        count=mask.sum(dim=-1).to(dtype),
        pairs=pairs,
        margin=reward_theta.unsqueeze(-1) - reward_theta.unsqueeze(-2),
        best=best,
        beta=float(beta),
    )


def _best_nll_per_token(lists: ListBatch, opts: LossOptions, needed_by: str) -> torch.Tensor:
    """Length-normalised NLL of the best response, -policy(best) / length(best), [B]."""
    lengths = opts.response_lengths
    if lengths is None:
        raise ValueError(f"{needed_by} needs response_lengths ([B, K] token counts of the responses)")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != lists.mask.shape:
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"response_lengths must be a [B, K] = {tuple(lists.mask.shape)} tensor, got {shape}")
    dtype = lists.logratio.dtype
    best_logp = _masked_sum(lists.policy, lists.best)
    best_length = _masked_sum(lengths.to(dtype), lists.best).clamp(min=1)
    return -best_logp / best_length


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_sum(values, mask) / mask.sum(dim=-1).clamp(min=1).to(values.dtype)


@torch.no_grad()
def _metrics(lists: ListBatch, policy_logps: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    dtype = lists.logratio.dtype
    policy = torch.where(lists.mask, policy_logps.detach().to(dtype), torch.zeros_like(lists.logratio))
    others = lists.mask & ~lists.best
    chosen = _masked_sum(lists.reward_theta, lists.best)
    rejected = _masked_mean(lists.reward_theta, others)
    n_pairs = lists.pairs.sum(dim=(1, 2)).to(dtype)
    agree = (lists.pairs & (lists.margin > 0)).sum(dim=(1, 2)).to(dtype)
    per_list = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": agree / n_pairs.clamp(min=1),
        "logps/chosen": _masked_sum(policy, lists.best),
        "logps/rejected": _masked_mean(policy, others),
        "rewards/kendall_tau": _kendall_tau_b(lists),
    }
    n_valid = valid.sum().to(dtype)
    metrics = {name: _masked_sum(value, valid) / n_valid.clamp(min=1) for name, value in per_list.items()}
    metrics["lists/valid"] = n_valid
    return metrics


def _kendall_tau_b(lists: ListBatch) -> torch.Tensor:
    """Per-list Kendall tau-b between implicit and annotated rewards over the valid slots; 0 when undefined."""
    upper = torch.ones(lists.mask.shape[1], lists.mask.shape[1], dtype=torch.bool, device=lists.mask.device).triu(1)
    pair = lists.mask.unsqueeze(-1) & lists.mask.unsqueeze(-2) & upper
    annotated = torch.sign(lists.rewards.unsqueeze(-1) - lists.rewards.unsqueeze(-2))
    implicit = torch.sign(lists.margin)
    dtype = lists.logratio.dtype
    concordance = _masked_sum((annotated * implicit).flatten(1), pair.flatten(1))
    untied_annotated = (pair & (annotated != 0)).sum(dim=(1, 2)).to(dtype)
    untied_implicit = (pair & (implicit != 0)).sum(dim=(1, 2)).to(dtype)
    denominator = torch.sqrt(untied_annotated * untied_implicit)
    return torch.where(denominator > 0, concordance / denominator.clamp(min=1), torch.zeros_like(denominator))


def listwise_loss(
    loss_type: str,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-list loss of ``loss_type`` and the batch metrics.

    Args:
        loss_type: a key of :data:`LOSSES`.
        policy_logps: [B, K] summed response log-probs under the policy (differentiable).
        reference_logps: [B, K] summed response log-probs under the frozen reference.
        rewards: [B, K] annotated rewards, higher is better, any order.
        mask: [B, K] bool (or 0/1), valid slots.
        beta: KL coefficient, > 0; implicit reward r_theta = beta * (policy - reference).
        **options: fields of :class:`LossOptions` (preference, alpha, sft_weight, response_lengths, kto_z,
            desirable_weight, undesirable_weight, k).

    Returns:
        (per_list_loss [B], metrics): the loss is 0 for lists with fewer than 2 valid responses; the
        metrics are detached 0-dim means over the valid lists plus ``lists/valid`` (see module docstring).

    Raises:
        ValueError: unknown loss_type (the message lists the registry), mismatched shapes, K != 2 for
            dpo / ipo, bad beta / alpha / k, or sft_weight > 0 / ``sft`` without response_lengths.
        TypeError: unknown option names or non-tensor inputs.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of: {', '.join(LOSSES)}")
    known = {field.name for field in dataclasses.fields(LossOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for listwise_loss; known: {', '.join(sorted(known))}")
    opts = LossOptions(**options)
    lists = _prepare(policy_logps, reference_logps, rewards, mask, beta)
    loss = LOSSES[loss_type](lists, opts)
    if opts.sft_weight != 0:
        loss = loss + opts.sft_weight * _best_nll_per_token(lists, opts, "option sft_weight > 0")
    valid = lists.count >= 2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, _metrics(lists, policy_logps, valid)
