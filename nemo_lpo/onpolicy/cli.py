"""``nemo-lpo generate``, ``score`` and ``iterate`` (cheap to import: the work is imported inside the commands)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``generate``, ``score`` and ``iterate`` commands."""
    g = subparsers.add_parser(
        "generate", help="K sampled responses per prompt from a policy (HF transformers on CPU/GPU; vLLM on GPU)",
        description="Samples K responses per prompt with an inference engine; one JSON line per prompt in input "
                    "order (+ OUT.meta.json). Data-parallel under torchrun / srun (prompts sharded, one merged "
                    "file); a killed run resumes where it stopped when rerun with the same arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", required=True, help="the policy as a local HF model folder (nemo-lpo convert mcore-to-hf)")
    g.add_argument("--prompts", required=True, help="prompts JSONL ('prompt' or 'messages') or any dataset pack reads")
    g.add_argument("--out", required=True, help="output JSONL")
    g.add_argument("-k", "--k", type=int, default=4, help="responses per prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=64, help="longer responses are truncated and marked so")
    g.add_argument("--prompts-per-batch", type=int, default=8,
                   help="prompts sampled together (batches are fixed by input position: same samples on any rank count)")
    g.add_argument("--seed", type=int, default=None, help="base seed (default: a fresh one, recorded in the output)")
    g.add_argument("--tokenizer", default="mistral", help="'mistral' or a local HF tokenizer folder (as pack)")
    g.add_argument("--chat-template", default=None, help="built-in name or Jinja file for an HF tokenizer (as pack)")
    g.add_argument("--format", default="auto", help="format of --prompts when it is a dataset (as pack)")
    g.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="inference engine (vllm: GPU only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=run_generate_command)

    s = subparsers.add_parser(
        "score", help="a reward for every generated response (HF reward model or module:function) -> listwise JSONL",
        description="Scores generate's output with a reward function or an HF sequence-classification reward "
                    "model; writes the listwise JSONL pack reads (+ OUT.meta.json with generator, sampling and "
                    "reward). NaN / inf rewards stop the run naming the prompts (or --on-bad-reward drop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--generated", required=True, help="generate's output JSONL")
    s.add_argument("--out", required=True, help="output listwise JSONL")
    s.add_argument("--reward-fn", default=None, metavar="MODULE:FUNCTION", help="function(prompt, response) -> float")
    s.add_argument("--reward-model", default=None, metavar="DIR", help="local HF AutoModelForSequenceClassification")
    s.add_argument("--batch-size", type=int, default=16, help="responses per reward-model forward")
    s.add_argument("--max-length", type=int, default=2048, help="reward-model input limit (tokens)")
    s.add_argument("--on-bad-reward", default="error", choices=("error", "drop"))
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_score_command)

    i = subparsers.add_parser(
        "iterate", help="on-policy rounds: generate -> score -> pack -> ref-logps -> train -> export, N times",
        description="Runs the rounds of an iterate config (YAML, nemo_lpo.onpolicy.iterate.IterateConfig); every "
                    "step's output is kept under the run folder and reused when present.")
    i.add_argument("config", help="iterate config YAML")
    i.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    i.add_argument("--round", type=int, default=None, help="with --step: the round (default: the final policy's)")
    i.add_argument("--step", default=None, choices=("generate", "score", "pack", "ref-logps", "train", "export"),
                   help="run only this step (recipes/iterate_lpo.sbatch runs one step per job)")
    i.set_defaults(func=run_iterate_command)


def run_generate_command(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo generate``."""
    from nemo_lpo.onpolicy.engines import SamplingSettings
    from nemo_lpo.onpolicy.generate import GenerateConfig, generate, resolve_seed

    sampling = SamplingSettings(k=args.k, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=resolve_seed(args.seed),
                                prompts_per_batch=args.prompts_per_batch)
    cfg = GenerateConfig(model=args.model, prompts=args.prompts, out=args.out, sampling=sampling,
                         tokenizer=args.tokenizer, chat_template=args.chat_template, format=args.format,
                         backend=args.backend, progress=not args.no_progress)
    result = generate(cfg)
    if result is None:
        print(f"nemo-lpo generate: {args.out} is complete with these settings; nothing to do")
    else:
        rate = result["tokens"] / max(result["seconds"], 1e-9)
        print(f"nemo-lpo generate: {result['sampled']} prompts sampled ({result['resumed']} done before), "
              f"{result['tokens']} tokens, {rate:.1f} tokens/s on this rank -> {args.out}")
    return 0


def run_score_command(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo score``."""
    from nemo_lpo.onpolicy.score import ScoreConfig, ScoreError, score

    try:
        cfg = ScoreConfig(generated=args.generated, out=args.out, reward_fn=args.reward_fn,
                          reward_model=args.reward_model, batch_size=args.batch_size, max_length=args.max_length,
                          on_bad_reward=args.on_bad_reward, progress=not args.no_progress)
        meta = score(cfg)
    except ScoreError as err:
        print(f"nemo-lpo score: {err}")
        return 1
    if meta is None:
        print(f"nemo-lpo score: {args.out} is complete with these settings; nothing to do")
    elif "mean_reward" in meta:
        print(f"nemo-lpo score: {meta['responses']} responses, mean reward {meta['mean_reward']:.4f} -> {args.out}")
    return 0


def run_iterate_command(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo iterate``."""
    from nemo_lpo.onpolicy.iterate import load_iterate_config, run_rounds

    summary = run_rounds(load_iterate_config(args.config, args.overrides), args.round, args.step)
    if args.step is None:
        for row in summary["rounds"]:
            print(f"{row['policy']}: mean reward of its fresh samples {row['mean_reward']:.4f}")
    return 0
