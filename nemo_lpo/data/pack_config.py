"""Options of one ``nemo-lpo pack`` run: read by the packer (``pack``) and by its workers (``chunk_worker``)."""

from __future__ import annotations

import dataclasses

from nemo_lpo.data.readers import FORMATS
from nemo_lpo.data.transforms import LengthLimits, RewardTransform


class PackError(RuntimeError):
    """Packing stopped on bad input (``file:line: reason``) or bad options."""


@dataclasses.dataclass
class PackConfig:
    """Options of one ``pack`` run (every field is recorded in the manifest).

    Attributes:
        inputs: JSONL(.gz) / JSON / parquet files (or hub dataset names when online).
        output_prefix: prefix ``P`` of the packed dataset.
        tokenizer: ``mistral`` or a local Hugging Face tokenizer directory.
        chat_template: for a Hugging Face tokenizer, a built-in template name (``chat_templates``) or a Jinja
            file used instead of the tokenizer's own; required when the tokenizer has none. None: its own.
        format: one of ``readers.FORMATS`` or ``auto`` (detected per file, reported).
        ultrafeedback_score: which raw UltraFeedback score is the reward.
        reward_transform: applied to each list's rewards after the pair / max-K conversion.
        pairs: ``zephyr`` / ``1vs0`` / ``all`` to convert lists into pairs, or None.
        max_k: keep the best and max_k - 1 random other responses, or None.
        limits: token length limits and overflow policy.
        skip_invalid: skip bad records (counted per reason) instead of stopping at the first.
        drop_tied: skip lists whose rewards all tie (no ordered pair), counted as ``tied_rewards``; by default
            they are kept (LPO-abs still learns from them) and counted in ``counts.tied_lists``.
        seed: seed of every random choice (per list: seed + the list's input position).
        workers: tokenising processes, the main process one of them (1 = the main process alone).
        progress: show a tqdm progress bar.
    """

    inputs: list[str]
    output_prefix: str
    tokenizer: str = "mistral"
    chat_template: str | None = None
    format: str = "auto"
    ultrafeedback_score: str = "overall"
    reward_transform: RewardTransform = dataclasses.field(default_factory=RewardTransform)
    pairs: str | None = None
    max_k: int | None = None
    limits: LengthLimits = dataclasses.field(default_factory=LengthLimits)
    skip_invalid: bool = False
    drop_tied: bool = False
    seed: int = 1234
    workers: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.format not in (*FORMATS, "auto"):
            raise PackError(f"--format {self.format!r} not in {('auto', *FORMATS)}")
        if self.pairs is not None and self.max_k is not None:
            raise PackError("--pairs and --max-k are exclusive")
        if self.max_k is not None and self.max_k < 2:
            raise PackError(f"--max-k must be >= 2, got {self.max_k}")
        if self.workers < 1:
            raise PackError(f"--workers must be >= 1, got {self.workers}")
