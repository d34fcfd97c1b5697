"""The canonical in-memory list every reader produces, and the error a bad record raises."""

from __future__ import annotations

import dataclasses
import math

# Reasons a whole input record (list) is rejected; the keys of the manifest's ``skipped`` counts.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
BAD_REWARD = "bad_reward"
EMPTY_RESPONSE = "empty_response"
TOO_FEW_RESPONSES = "too_few_responses"
DUPLICATE_ID = "duplicate_id"
TOKENIZER_ERROR = "tokenizer_error"
TOO_LONG = "too_long"
TIED_REWARDS = "tied_rewards"  # every reward of the list is equal: skipped only under ``--drop-tied``


class InvalidRecord(ValueError):
    """A record that cannot become a list; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, message: str, dropped: list[str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.dropped = dropped or []  # reasons of responses dropped before the record was rejected


@dataclasses.dataclass
class ListwiseExample:
    """One prompt with K scored responses.

    Attributes:
        prompt: chat messages ``{"role": "system"|"user"|"assistant", "content": str}``, ending with a user turn.
        responses: the K responses. A response is the assistant's reply as plain text, or, when it goes on for
            several turns (an HH-RLHF pair that differs before its last reply), the turns that follow the
            prompt as chat messages: assistant and user turns alternating, first and last an assistant turn.
            ``response_turns`` gives either form as messages.
        rewards: one float per response, higher is better (readers store the raw values; ``validate`` parses
            them: numbers or numeric strings, finite). Preference data without scores gets
            rewards derived from the order (best = K-1 ... worst = 0) and ``reward_kind = "order"``.
        id: unique id of the list within the packed dataset.
        source: ``file:line`` (or ``file:row``) the list was read from.
        reward_kind: ``"score"`` (annotated rewards) or ``"order"`` (derived from a preference order).
    """

    prompt: list[dict]
    responses: list[str | list[dict]]
    rewards: list[float]
    id: str
    source: str = ""
    reward_kind: str = "score"

    def validate(self, skip_invalid: bool = False) -> list[str]:
        """Check rewards and responses; with ``skip_invalid`` drop bad responses instead of raising.

        Returns:
            The reasons of the responses dropped (empty unless ``skip_invalid``).

        Raises:
            InvalidRecord: a bad reward or empty response (unless skipped), or fewer than 2 usable responses.
        """
        if len(self.responses) != len(self.rewards):
            raise InvalidRecord(MISSING_FIELD, f"{len(self.responses)} responses but {len(self.rewards)} rewards")
        if not self.prompt or not any(m.get("content") for m in self.prompt):
            raise InvalidRecord(MISSING_FIELD, "empty prompt")
        keep_responses, keep_rewards, dropped = [], [], []
        for k, (response, reward) in enumerate(zip(self.responses, self.rewards, strict=True)):
            problem = None
            try:
                reward = parse_reward(reward, f"response {k}")
            except InvalidRecord as err:
                problem = err
            if problem is None:
                problem = _response_problem(response, k)
            if problem is not None:
                if not skip_invalid:
                    raise problem
                dropped.append(problem.reason)
                continue
            keep_responses.append(response)
            keep_rewards.append(reward)
        if len(keep_responses) < 2:
            raise InvalidRecord(TOO_FEW_RESPONSES, f"{len(keep_responses)} usable responses (need at least 2)", dropped)
        self.responses, self.rewards = keep_responses, keep_rewards
        return dropped


def response_turns(response: str | list[dict]) -> list[dict]:
    """The chat messages of a response: one assistant turn for a text reply, else its turns as given."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return list(response)


def _response_problem(response, k: int) -> InvalidRecord | None:
    """Why response ``k`` cannot be trained on (empty, or turns that are not assistant/user alternating), or None."""
    if isinstance(response, str):
        return None if response.strip() else InvalidRecord(EMPTY_RESPONSE, f"response {k} is empty")
    if not isinstance(response, list) or not response:
        return InvalidRecord(EMPTY_RESPONSE, f"response {k} is empty")
    for i, turn in enumerate(response):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role != ("assistant", "user")[i % 2] or len(response) % 2 == 0:
            return InvalidRecord(MISSING_FIELD, f"response {k}: turns must alternate assistant / user, "
                                                f"first and last an assistant turn")
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            return InvalidRecord(EMPTY_RESPONSE, f"response {k}: turn {i} is empty")
    return None


def parse_reward(value, field: str) -> float:
    """Return ``value`` as a finite float.

    Raises:
        InvalidRecord: the value is missing, not numeric, NaN or infinite.
    """
    if value is None:
        raise InvalidRecord(BAD_REWARD, f"{field}: missing reward")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRecord(BAD_REWARD, f"{field}: reward {value!r} is not a number")
    try:
        result = float(value)
    except ValueError:
        raise InvalidRecord(BAD_REWARD, f"{field}: reward {value!r} is not a number") from None
    if not math.isfinite(result):
        raise InvalidRecord(BAD_REWARD, f"{field}: reward {value!r} is not finite")
    return result
