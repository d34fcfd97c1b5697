"""``nemo-lpo generate``: K sampled responses per prompt from a policy, through an inference engine (``engines``).

Output: one JSON line per prompt, in input order, ``{"index", "id", "messages", "seed", "responses": [{"text",
"finish_reason", "num_tokens", "truncated"}]}`` (``score`` adds each response's ``reward``, which makes it the
listwise JSONL ``pack`` reads), and ``<out>.meta.json`` with the generator and the sampling settings. Prompts are
sharded across the ranks of a torchrun / srun launch and merged into one file; a killed run resumes where it
stopped (``shards``).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path

from tqdm import tqdm

from nemo_lpo.data.templates import load_tokenizer
from nemo_lpo.killpoint import kill_point
from nemo_lpo.onpolicy import shards
from nemo_lpo.onpolicy.engines import SamplingSettings, batch_seed, load_engine
from nemo_lpo.onpolicy.prompts import read_prompts


@dataclasses.dataclass
class GenerateConfig:
    """Options of one ``generate`` run (all but ``progress`` recorded in the output's ``.meta.json``).

    Attributes:
        model: the policy as a local HF model folder (``nemo-lpo convert mcore-to-hf`` exports a checkpoint).
        prompts: prompts JSONL (``prompt`` or ``messages``) or any dataset ``pack`` reads (its prompts are used).
        out: output JSONL.
        sampling: K, temperature, top-p, max new tokens, seed.
        tokenizer: ``mistral`` or a local HF tokenizer folder, as ``pack --tokenizer`` (the same chat template
            renders prompts here and in ``pack``).
        chat_template: ``pack --chat-template`` for an HF tokenizer.
        format: format of ``prompts`` when it is not a prompts JSONL (``pack --format``).
        backend: ``hf`` (transformers, CPU / GPU) or ``vllm`` (GPU; code only here).
        progress: show a progress bar (rank 0).
    """

    model: str
    prompts: str
    out: str
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    tokenizer: str = "mistral"
    chat_template: str | None = None
    format: str = "auto"
    backend: str = "hf"
    progress: bool = True


def settings_record(cfg: GenerateConfig) -> dict:
    """What makes two runs the same run (pinned for resume, recorded in ``.meta.json``)."""
    return {"model": str(Path(cfg.model).resolve()), "prompts": str(Path(cfg.prompts).resolve()),
            "sampling": dataclasses.asdict(cfg.sampling), "tokenizer": cfg.tokenizer,
            "chat_template": cfg.chat_template, "format": cfg.format, "backend": cfg.backend}


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one (recorded in the output, so the run can be repeated)."""
    return secrets.randbits(31) if seed is None else seed


def _record(tokenizer, prompt, samples, seed: int) -> dict:
    """One output line: the prompt and its K responses (text, why it ended, length)."""
    return {"index": prompt.index, "id": prompt.id, "messages": prompt.messages, "seed": seed,
            "responses": [{"text": tokenizer.decode(s.ids), "finish_reason": s.finish_reason,
                           "num_tokens": len(s.ids), "truncated": s.finish_reason == "length"} for s in samples]}


def run_generate(cfg: GenerateConfig, rank: int | None = None, world: int | None = None) -> dict:
    """Sample this rank's batches of prompts (batch b when b % world == rank) into ``cfg.out``'s part files.

    ``merge_generate`` joins the parts once every rank is done.

    Args:
        cfg: the run's options.
        rank: this process' shard; None: from the launcher's environment (``RANK``).
        world: the number of shards; None: from the launcher's environment (``WORLD_SIZE``).

    Returns:
        Counts of this call: prompts sampled now, prompts found done, tokens generated and seconds.
    """
    env_rank, env_world = shards.dist_rank_world()
    rank, world = env_rank if rank is None else rank, env_world if world is None else world
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.chat_template)
    prompts = read_prompts(cfg.prompts, cfg.format)
    settings = settings_record(cfg)
    shards.check_settings(out, settings, rank)
    done = shards.done_records(out)
    size = cfg.sampling.prompts_per_batch
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    todo = [b for b in mine if any(p.index not in done for p in batches[b])]
    engine = load_engine(cfg.backend, cfg.model, tokenizer.eos_id, tokenizer.pad_id) if todo else None
    writer = shards.PartWriter(out, rank)
    tokens, sampled, t0 = 0, 0, time.perf_counter()
    try:
        for b in tqdm(todo, desc=f"generate (rank {rank})", unit="batch", disable=not cfg.progress or rank != 0):
            seed = batch_seed(cfg.sampling.seed, b)
            ids = [list(map(int, tokenizer.encode_list(p.messages, [])[0])) for p in batches[b]]
            for prompt, samples in zip(batches[b], engine.sample(ids, cfg.sampling, seed), strict=True):
                tokens += sum(len(s.ids) + (s.finish_reason == "stop") for s in samples)
                if prompt.index in done:  # a batch cut by a kill: its finished prompts are not written twice
                    continue
                writer.write(_record(tokenizer, prompt, samples, seed))
                sampled += 1
                kill_point("generate/after_prompt")  # test hook: a kill between two prompts (tests/test_onpolicy.py)
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    return {"sampled": sampled, "resumed": sum(len(batches[b]) for b in mine) - sampled,
            "prompts": len(prompts), "tokens": tokens, "seconds": seconds,
            "engine": engine.identity() if engine else {"engine": cfg.backend, "model": cfg.model},
            "settings": settings}


def merge_generate(cfg: GenerateConfig, result: dict, world: int) -> None:
    """Merge every rank's part into ``cfg.out`` with its ``.meta.json`` (once all ranks are done)."""
    meta = {"kind": "nemo-lpo generate", "generator": result["engine"], **result["settings"],
            "prompts_count": result["prompts"], "world_size": world}
    shards.merge_parts(Path(cfg.out), result["prompts"], meta)


def generate(cfg: GenerateConfig) -> dict | None:
    """The whole command on this rank: reuse a finished output, else sample this rank's share, wait, merge.

    Returns:
        This rank's counts (``run_generate``), or None when ``cfg.out`` is already there with the same settings.
    """
    rank, world = shards.dist_rank_world()
    if shards.finished(Path(cfg.out), settings_record(cfg)):
        return None
    result = run_generate(cfg, rank, world)
    shards.barrier(world)
    if rank == 0:
        merge_generate(cfg, result, world)
    shards.barrier(world)
    return result
