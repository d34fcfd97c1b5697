"""One on-policy round on CPU: generation tokens/s, scoring items/s, training lists/s, and each step's share.

Runs the on-policy demonstration (``nemo_lpo.demo.onpolicy``: tiny Mixtral after 4 SFT steps, the target-length
reward) for one round plus the final sampling, in one process, and prints from that one run, side by side:

  generate   tokens sampled per second (HF transformers ``generate`` on the exported model, fp32 CPU)
  score      responses scored per second (a reward function, and a tiny HF reward model on the same responses)
  train      lists trained per second (the megatron-core trainer, LPO-abs)
  share      each step's part of the round's wall time (generate, score, pack, ref-logps, train, export)

Ratios and shares come from the same run; absolute rates depend on the machine and its load.

    .venv/bin/python bench/bench_onpolicy.py [--prompts 32] [--k 4] [--max-new-tokens 16] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import print_table  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast  # noqa: E402

from nemo_lpo.demo.onpolicy import OnPolicyDemoConfig, iterate_config, run_onpolicy_demo  # noqa: E402
from nemo_lpo.onpolicy.iterate import round_paths  # noqa: E402
from nemo_lpo.onpolicy.score import ScoreConfig, score  # noqa: E402


def tiny_reward_model(directory: Path, texts: list[str]) -> Path:
    """A randomly initialised one-label Llama classifier with a byte-level BPE (trained on ``texts``) beside it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    """Run one round and print the rates and shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "round"
        cfg = OnPolicyDemoConfig(out_dir=out, rounds=1, prompts=args.prompts, eval_prompts=0, k=args.k,
                                 max_new_tokens=args.max_new_tokens, sft_steps=4, steps=args.steps)
        summary = run_onpolicy_demo(cfg)
        paths = round_paths(iterate_config(cfg, out, out / "start", out / "prompts_train.jsonl",
                                           out / "prompts_heldout.jsonl"), 0)
        seconds = summary["rounds"][0]["step_seconds"]
        records = [json.loads(line) for line in paths.generated.read_text().splitlines()]
        tokens = sum(r["num_tokens"] + (r["finish_reason"] == "stop") for rec in records for r in rec["responses"])
        responses = sum(len(rec["responses"]) for rec in records)
        rm = tiny_reward_model(Path(tmp) / "rm", [r["text"] for rec in records for r in rec["responses"]])
        t0 = time.perf_counter()
        score(ScoreConfig(generated=str(paths.generated), out=str(Path(tmp) / "rm_scored.jsonl"),
                          reward_model=str(rm), batch_size=32, progress=False))
        rm_seconds = time.perf_counter() - t0
        lists = args.steps * min(8, args.prompts)
        rows = [["generate", f"{tokens / seconds['generate']:.1f} tokens/s", f"{tokens} tokens", seconds["generate"]],
                ["score (reward function)", f"{responses / seconds['score']:.0f} items/s", f"{responses} responses",
                 seconds["score"]],
                ["score (tiny HF reward model)", f"{responses / rm_seconds:.1f} items/s", f"{responses} responses",
                 round(rm_seconds, 2)],
                ["train", f"{lists / seconds['train']:.2f} lists/s", f"{lists} lists", seconds["train"]]]
        print_table("one on-policy round on CPU (tiny Mixtral)", ["step", "rate", "work", "seconds"], rows)
        total = sum(seconds.values())
        print_table("share of the round's wall time", ["step", "seconds", "share"],
                    [[step, s, f"{100 * s / total:.1f}%"] for step, s in seconds.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
