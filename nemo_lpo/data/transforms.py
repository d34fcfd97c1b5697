"""Pack-time conversions: reward transforms, pair / max-K baselines, and length limits with a policy."""

from __future__ import annotations

import dataclasses

import numpy as np

from nemo_lpo.data.examples import BAD_REWARD, InvalidRecord, ListwiseExample

REWARD_TRANSFORMS = ("none", "affine", "logodds", "rank")
PAIR_MODES = ("zephyr", "1vs0", "all")
OVERFLOW_POLICIES = ("truncate_prompt", "truncate_response", "drop")


@dataclasses.dataclass(frozen=True)
class RewardTransform:
    """How annotated rewards become the stored rewards (recorded in the manifest).

    Attributes:
        kind: ``none``; ``affine`` (``scale * r + shift``); ``logodds`` (``log(p / (1 - p))`` for rewards that
            are probabilities, ``p`` clipped to ``[eps, 1 - eps]``); ``rank`` (0 = worst ... K-1 = best within
            the list, ties get their average rank).
        scale: affine scale.
        shift: affine shift.
        eps: log-odds clipping.
    """

    kind: str = "none"
    scale: float = 1.0
    shift: float = 0.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in REWARD_TRANSFORMS:
            raise ValueError(f"reward transform {self.kind!r} not in {REWARD_TRANSFORMS}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"log-odds eps must be in (0, 0.5), got {self.eps}")

    def __call__(self, rewards: list[float]) -> list[float]:
        """Return the transformed rewards of one list.

        Raises:
            InvalidRecord: ``logodds`` on a reward outside [0, 1].
        """
        if self.kind == "none":
            return [float(x) for x in rewards]
        r = np.asarray(rewards, dtype=np.float64)
        if self.kind == "affine":
            r = self.scale * r + self.shift
        elif self.kind == "logodds":
            if np.any((r < 0) | (r > 1)):
                raise InvalidRecord(BAD_REWARD, f"log-odds transform needs rewards in [0, 1], got {rewards}")
            p = np.clip(r, self.eps, 1 - self.eps)
            r = np.log(p) - np.log1p(-p)
        elif self.kind == "rank":
            order = np.argsort(r, kind="stable")
            ranks = np.empty(len(r))
            ranks[order] = np.arange(len(r), dtype=np.float64)
            for value in np.unique(r):  # average the ranks of ties
                tied = r == value
                ranks[tied] = ranks[tied].mean()
            r = ranks
        return [float(x) for x in r]

    def describe(self) -> dict:
        """Manifest entry."""
        return dataclasses.asdict(self)


def list_rng(seed: int, ordinal: int) -> np.random.Generator:
    """Random stream of one input list: depends only on the seed and the list's position in the input."""
    return np.random.default_rng([seed, ordinal])


def _best(rewards: list[float]) -> int:
    return int(np.argmax(rewards))  # first of the tied best


def pair_indices(rewards: list[float], mode: str, rng: np.random.Generator) -> tuple[list[tuple[int, int]], int]:
    """The (better, worse) response indices of ``to_pairs`` and the number of tied candidate pairs left out."""
    r = rewards
    k = len(r)
    if mode == "all":
        candidates = [(i, j) for i in range(k) for j in range(i + 1, k)]
        pairs = [(i, j) if r[i] > r[j] else (j, i) for i, j in candidates if r[i] != r[j]]
        return pairs, len(candidates) - len(pairs)
    best = _best(r)
    others = [j for j in range(k) if j != best]
    worse = [j for j in others if r[j] < r[best]]
    if mode == "zephyr":
        return ([(best, worse[int(rng.integers(len(worse)))])], 0) if worse else ([], 1)
    if mode == "1vs0":
        return [(best, j) for j in worse], len(others) - len(worse)
    raise ValueError(f"pairs mode {mode!r} not in {PAIR_MODES}")


def to_pairs(example: ListwiseExample, mode: str, rng: np.random.Generator) -> tuple[list[ListwiseExample], int]:
    """Convert a K-list into preference pairs (the paper's pairwise baselines).

    ``zephyr``: the best response vs one random strictly worse one; ``1vs0``: the best vs each strictly
    worse one; ``all``: every pair with different rewards. Pairs are (better, worse) with their rewards.

    Returns:
        The pairs and the number of candidate pairs left out because their rewards tie.
    """
    pairs, tied = pair_indices(example.rewards, mode, rng)
    r = example.rewards
    out = [dataclasses.replace(example, responses=[example.responses[i], example.responses[j]],
                               rewards=[r[i], r[j]], id=f"{example.id}#{i}>{j}") for i, j in pairs]
    return out, tied


def keep_indices(rewards: list[float], max_k: int, rng: np.random.Generator) -> list[int]:
    """The response indices ``limit_k`` keeps, in their original order (all of them when K <= max_k)."""
    k = len(rewards)
    if k <= max_k:
        return list(range(k))
    best = _best(rewards)
    others = [j for j in range(k) if j != best]
    return sorted([best, *rng.choice(others, size=max_k - 1, replace=False).tolist()])


def limit_k(example: ListwiseExample, max_k: int, rng: np.random.Generator) -> ListwiseExample:
    """Keep the best response and ``max_k - 1`` random others (original order kept) when K > max_k."""
    if len(example.rewards) <= max_k:
        return example
    keep = keep_indices(example.rewards, max_k, rng)
    return dataclasses.replace(example, responses=[example.responses[j] for j in keep],
                               rewards=[example.rewards[j] for j in keep])


@dataclasses.dataclass(frozen=True)
class LengthLimits:
    """Token limits and what happens to a list that exceeds them.

    Attributes:
        max_prompt_length: longest prompt; longer prompts are cut from the left (BOS kept), or the list is
            dropped under ``overflow="drop"``.
        max_response_length: longest response; longer ones are cut at the end (they then end without EOS,
            so the model is not taught to stop there), or the list is dropped under ``drop``.
        max_length: longest prompt + response sequence. ``truncate_prompt`` cuts the prompt from the left,
            ``truncate_response`` cuts the too-long responses, ``drop`` drops the list; a list that cannot
            fit while keeping at least one prompt and one response token is dropped.
        overflow: one of ``truncate_prompt``, ``truncate_response``, ``drop``.
    """

    max_prompt_length: int | None = None
    max_response_length: int | None = None
    max_length: int | None = None
    overflow: str = "truncate_prompt"

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow policy {self.overflow!r} not in {OVERFLOW_POLICIES}")
        for name in ("max_prompt_length", "max_response_length", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}")

    def apply(self, prompt, responses, bos_id: int | None):
        """Return (prompt, responses, prompt_truncated, responses_truncated), or None when the list is dropped.

        The ids are lists of ints or 1-D numpy arrays; cut ones come back as the same type.
        """
        drop = self.overflow == "drop"
        prompt_cut = 0
        responses = list(responses)
        response_cuts = [False] * len(responses)

        def starts_with_bos() -> bool:
            return len(prompt) > 0 and prompt[0] == bos_id

        def cut_prompt(keep: int):
            if starts_with_bos():
                rest = prompt[len(prompt) - keep + 1:]
                return np.concatenate([prompt[:1], rest]) if isinstance(prompt, np.ndarray) else prompt[:1] + rest
            return prompt[len(prompt) - keep:]

        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            if drop:
                return None
            prompt, prompt_cut = cut_prompt(self.max_prompt_length), 1
        if self.max_response_length is not None:
            for k, ids in enumerate(responses):
                if len(ids) > self.max_response_length:
                    if drop:
                        return None
                    responses[k], response_cuts[k] = ids[:self.max_response_length], True
        if self.max_length is not None:
            longest = max(len(ids) for ids in responses)
            if len(prompt) + longest > self.max_length:
                if drop:
                    return None
                if self.overflow == "truncate_prompt":
                    keep = self.max_length - longest
                    if keep < (2 if starts_with_bos() else 1):
                        return None
                    prompt, prompt_cut = cut_prompt(keep), 1
                else:
                    cap = self.max_length - len(prompt)
                    if cap < 1:
                        return None
                    for k, ids in enumerate(responses):
                        if len(ids) > cap:
                            responses[k], response_cuts[k] = ids[:cap], True
        return prompt, responses, prompt_cut, sum(response_cuts)

    def describe(self) -> dict:
        """Manifest entry."""
        return dataclasses.asdict(self)
