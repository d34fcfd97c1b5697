"""``nemo-lpo score``: a reward for every sampled response, written as the listwise JSONL ``pack`` reads.

Rewards come from a reward function ``module:function`` (``function(prompt, response) -> float``: the prompt's
last user turn and the response text; rule-based rewards such as answer checking) or from a Hugging Face reward
model (``AutoModelForSequenceClassification`` with one label, the format of the public reward models: batched,
bf16 on GPU, fp32 on CPU). Prompts are sharded across the ranks of a launch and the output is resumable, as in
``generate`` (``shards``). The output's ``.meta.json`` records the generator and sampling settings (copied from
the input's ``.meta.json``) and the reward.

A reward that is NaN or infinite is never written: by default the run stops naming every such prompt (id, line,
response); with ``on_bad_reward="drop"`` those responses are dropped, counted per prompt in the record
(``dropped_rewards``) and in the meta. A reward function that raises stops the run naming the prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from nemo_lpo.onpolicy import shards
from nemo_lpo.onpolicy.engines import local_device
from nemo_lpo.onpolicy.prompts import prompt_text

ON_BAD_REWARD = ("error", "drop")


class ScoreError(RuntimeError):
    """A reward could not be computed or is not finite (the message names the prompt)."""


@dataclasses.dataclass
class ScoreConfig:
    """Options of one ``score`` run (recorded in the output's ``.meta.json``).

    Attributes:
        generated: ``generate``'s output JSONL.
        out: output listwise JSONL.
        reward_fn: ``module:function`` called as ``function(prompt, response) -> float``; or None.
        reward_model: a local HF ``AutoModelForSequenceClassification`` folder (one label); or None.
        batch_size: responses per reward-model forward.
        max_length: reward-model inputs are truncated to this many tokens.
        on_bad_reward: ``error`` (stop, naming every prompt with a NaN / inf reward) or ``drop`` those responses.
        progress: show a progress bar (rank 0).
    """

    generated: str
    out: str
    reward_fn: str | None = None
    reward_model: str | None = None
    batch_size: int = 16
    max_length: int = 2048
    on_bad_reward: str = "error"
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.reward_fn is None) == (self.reward_model is None):
            raise ScoreError("give exactly one of --reward-fn MODULE:FUNCTION and --reward-model DIR")
        if self.on_bad_reward not in ON_BAD_REWARD:
            raise ScoreError(f"--on-bad-reward {self.on_bad_reward!r} not in {ON_BAD_REWARD}")


def load_reward_fn(spec: str):
    """The function named ``module:function`` (``module.sub:function`` imported with importlib)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ScoreError(f"--reward-fn {spec!r}: expected MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ScoreError(f"--reward-fn {spec!r}: {err}") from None
    if not callable(fn):
        raise ScoreError(f"--reward-fn {spec!r}: not callable")
    return fn


class RewardFunction:
    """Rewards from a Python function, one call per response."""

    def __init__(self, spec: str) -> None:
        self.spec, self.fn = spec, load_reward_fn(spec)

    def identity(self) -> dict:
        """The reward, for the output's ``.meta.json``."""
        return {"kind": "function", "function": self.spec}

    def score(self, items: list[tuple[list[dict], str]]) -> list[float]:
        """One reward per (prompt messages, response text); a raising function raises with the response index."""
        out = []
        for k, (messages, response) in enumerate(items):
            try:
                out.append(float(self.fn(prompt_text(messages), response)))
            except Exception as err:  # noqa: BLE001 - any user error is reported with the prompt it happened on
                raise ScoreError(f"response {k}: reward function {self.spec} raised "
                                 f"{type(err).__name__}: {err}") from err
        return out


class RewardModel:
    """A Hugging Face sequence-classification reward model (one label): the score of the whole conversation.

    The conversation is rendered with the reward model's own chat template (the prompt turns and the response
    as the assistant turn); without a template, the turns' texts joined by blank lines.
    """

    def __init__(self, model_dir: str, batch_size: int, max_length: int, device: str | None = None) -> None:
        self.device = torch.device(device or local_device())
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True)
        if self.model.config.num_labels != 1:
            raise ScoreError(f"{model_dir}: a reward model has one label, this one has {self.model.config.num_labels}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.model_dir, self.batch_size, self.max_length = str(model_dir), batch_size, max_length

    def identity(self) -> dict:
        """The reward, for the output's ``.meta.json``."""
        return {"kind": "model", "model": self.model_dir, "dtype": str(self.model.dtype).removeprefix("torch."),
                "transformers": transformers.__version__}

    def render(self, messages: list[dict], response: str) -> str:
        """The text the reward model scores for one response."""
        conversation = [*messages, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n\n".join(m["content"] for m in conversation)

    @torch.inference_mode()
    def score(self, items: list[tuple[list[dict], str]]) -> list[float]:
        """One reward per (prompt messages, response text), ``batch_size`` responses per forward."""
        out = []
        for start in range(0, len(items), self.batch_size):
            texts = [self.render(m, r) for m, r in items[start:start + self.batch_size]]
            # a chat template writes the special tokens itself; plain text gets the tokenizer's (BOS)
            templated = bool(getattr(self.tokenizer, "chat_template", None))
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_length, add_special_tokens=not templated).to(self.device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out


def load_scorer(cfg: ScoreConfig):
    """The reward of ``cfg``: a ``RewardFunction`` or a ``RewardModel``."""
    if cfg.reward_fn:
        return RewardFunction(cfg.reward_fn)
    return RewardModel(cfg.reward_model, cfg.batch_size, cfg.max_length)


def read_generated(path: str) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every record of ``generate``'s output."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append((number, json.loads(line)))
    if not records:
        raise ScoreError(f"{path}: no generated records")
    return records


def settings_record(cfg: ScoreConfig) -> dict:
    """What makes two score runs the same run (pinned for resume, recorded in ``.meta.json``)."""
    digest = hashlib.sha256(Path(cfg.generated).read_bytes()).hexdigest()  # a regenerated input is a new run
    return {"generated": str(Path(cfg.generated).resolve()), "generated_sha256": digest, "reward_fn": cfg.reward_fn,
            "reward_model": cfg.reward_model, "max_length": cfg.max_length, "on_bad_reward": cfg.on_bad_reward}


def _bad_rewards(rewards: list[float]) -> list[int]:
    return [k for k, r in enumerate(rewards) if not math.isfinite(r)]


def _scored_record(record: dict, rewards: list[float], drop: bool) -> dict:
    """``record`` with each response's reward; under ``drop`` the non-finite ones removed and listed."""
    scored = dict(record)
    bad = _bad_rewards(rewards)
    scored["responses"] = [dict(r, reward=v) for k, (r, v) in enumerate(zip(record["responses"], rewards,
                                                                                  strict=True)) if k not in bad]
    if drop and bad:
        scored["dropped_rewards"] = [{"response": k, "reward": str(rewards[k])} for k in bad]
    return scored


def run_score(cfg: ScoreConfig, rank: int = 0, world: int = 1) -> dict:
    """Score this rank's share of the generated prompts (appended to ``cfg.out``'s parts).

    Raises:
        ScoreError: the reward function raised (naming the prompt), or, unless ``on_bad_reward="drop"``,
            NaN / inf rewards (naming every such prompt and response; those prompts are not written).
    """
    out = Path(cfg.out)
    records = read_generated(cfg.generated)
    settings = settings_record(cfg)
    shards.check_settings(out, settings, rank)
    done = shards.done_records(out)
    todo = [(n, r) for n, r in records if r["index"] % world == rank and r["index"] not in done]
    scorer = load_scorer(cfg) if todo else None
    writer, bad, items_scored, t0 = shards.PartWriter(out, rank), [], 0, time.perf_counter()
    try:
        for number, record in tqdm(todo, desc=f"score (rank {rank})", disable=not cfg.progress or rank != 0):
            items = [(record["messages"], r["text"]) for r in record["responses"]]
            try:
                rewards = scorer.score(items)
            except ScoreError as err:
                raise ScoreError(f"{cfg.generated}:{number} (prompt id {record['id']!r}): {err}") from err.__cause__
            items_scored += len(items)
            problems = _bad_rewards(rewards)
            if problems and cfg.on_bad_reward == "error":
                bad.append(f"{cfg.generated}:{number} (prompt id {record['id']!r}): "
                           + ", ".join(f"response {k} reward {rewards[k]}" for k in problems))
                continue
            writer.write(_scored_record(record, rewards, drop=True))
    finally:
        writer.close()
    if bad:
        raise ScoreError(f"{len(bad)} prompt(s) got non-finite rewards (not written; --on-bad-reward drop drops "
                         f"those responses):\n  " + "\n  ".join(bad))
    return {"scored_prompts": len(todo), "items": items_scored, "seconds": time.perf_counter() - t0,
            "prompts": len(records), "reward": scorer.identity() if scorer else None, "settings": settings}


def merge_score(cfg: ScoreConfig, result: dict, world: int) -> dict:
    """Merge every rank's part into ``cfg.out`` with a ``.meta.json`` (generator, sampling, reward, drops)."""
    generated_meta = shards.meta_path(Path(cfg.generated))
    source = json.loads(generated_meta.read_text()) if generated_meta.is_file() else {}
    done = shards.done_records(Path(cfg.out))
    dropped = {r["id"]: len(r["dropped_rewards"]) for r in done.values() if r.get("dropped_rewards")}
    rewards = [x["reward"] for r in done.values() for x in r["responses"]]
    meta = {"kind": "nemo-lpo score", **result["settings"],
            "reward": result["reward"] or {"function": cfg.reward_fn, "model": cfg.reward_model},
            "generator": source.get("generator"), "sampling": source.get("sampling"),
            "prompts_file": source.get("prompts"), "chat_template": source.get("chat_template"),
            "tokenizer": source.get("tokenizer"), "dropped_rewards_per_prompt": dropped,
            "mean_reward": sum(rewards) / max(len(rewards), 1), "responses": len(rewards), "world_size": world}
    shards.merge_parts(Path(cfg.out), result["prompts"], meta)
    return meta


def score(cfg: ScoreConfig) -> dict | None:
    """The whole command on this rank: reuse a finished output, else score this rank's share, wait, merge.

    Returns:
        The output's meta (rank 0), or None when ``cfg.out`` is already there with the same settings.
    """
    rank, world = shards.dist_rank_world()
    if shards.finished(Path(cfg.out), settings_record(cfg)):
        return None
    result = run_score(cfg, rank, world)
    shards.barrier(world)
    meta = merge_score(cfg, result, world) if rank == 0 else result
    shards.barrier(world)
    return meta
