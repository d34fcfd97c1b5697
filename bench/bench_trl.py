"""LPO on K=4 lists vs TRL's DPOTrainer running DPO on the same lists expanded to pairs; same model, same tokens.

- Model: the tiny Mixtral of conf/tiny_cpu.yaml built by megatron; its weights saved as a dist checkpoint and
  exported with ``nemo_lpo.convert.convert_mcore_to_hf`` -> the HF twin (MixtralForCausalLM) that TRL trains.
- Data: real K=4 lists (AlpacaEval 2 from the --data folder, best + 3 others via ``nemo-lpo pack --max-k 4``,
  real Mistral tokenizer); the embedded demo lists when the shared data is absent. TRL gets the SAME token
  ids: its text tokenisation step (``_prepare_dataset``) is replaced by the pre-tokenised pairs, everything
  else (collator, forward passes, loss, optimizer) is TRL's own.
- Variants, each a full pass over the same lists, interleaved (rotating order, medians over --reps):
  LPO (trainer step, online reference), LPO with shared-prompt rows, TRL DPO-pw (every pair r_i > r_j) and
  TRL DPO-1vs0 (best vs each other), all with an online frozen reference.
The paper's cost model: 12 (DPO-pw) or 6 (DPO-1vs0) sequence passes per K=4 list vs 4 for LPO.

    .venv/bin/python bench/bench_trl.py [--lists 8] [--reps 2] [--max-length 384]
Needs the bench extra: pip install trl==1.16.0 accelerate==1.15.0 (transformers 5.24.0, datasets 5.2.0).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_utils import add_data_argument  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path("alpacaeval2") / "alpacaeval2_gpt4turbo_k8_a.jsonl"  # under --data
DEMO = REPO / "nemo_lpo" / "demo" / "data" / "train.jsonl"
LR, BETA, SEED = 1e-5, 0.1, 1234


def load_lists(tmp: Path, n: int, max_length: int, data: Path | None) -> tuple[list[dict], str]:
    """The first ``n`` K=4 lists, packed with the real Mistral tokenizer (real data when present)."""
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.transforms import LengthLimits

    real = data is not None and (data / ALPACA).is_file()
    src, name = (data / ALPACA, "alpacaeval2 (best + 3 others)") if real else (DEMO, "demo (embedded)")
    pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp / "data" / "lists"), max_k=4 if real else None,
                    skip_invalid=True, limits=LengthLimits(max_length=max_length, overflow="truncate_response")),
         log=lambda m: None)
    ds = ListwiseDataset(tmp / "data" / "lists")
    items = [ds[i] for i in range(min(n, len(ds)))]
    if any(len(it["response_ids"]) != 4 for it in items):
        raise SystemExit(f"{src}: expected K=4 lists")
    return items, name


def pairs_of(items: list[dict], mode: str) -> list[dict]:
    """DPO pairs: ``pw`` every (i, j) with r_i > r_j; ``1vs0`` the best vs each strictly worse response."""
    out = []
    for it in items:
        r, resp, prompt = list(map(float, it["rewards"])), it["response_ids"], [int(t) for t in it["prompt_ids"]]
        best = max(range(len(r)), key=r.__getitem__)
        for i in range(len(r)):
            for j in range(len(r)):
                if r[i] > r[j] and (mode == "pw" or i == best):
                    out.append({"prompt_ids": prompt, "chosen_ids": [int(t) for t in resp[i]],
                                "rejected_ids": [int(t) for t in resp[j]]})
    return out


def hf_processing_class():
    """An HF fast tokenizer over the Mistral v1 sentencepiece vocabulary (TRL reads pad/eos ids from it)."""
    import os

    import mistral_common
    from tokenizers import Tokenizer, models
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    kw = SentencePieceExtractor(path).extract(BPE)
    tok = Tokenizer(models.BPE(vocab=kw["vocab"], merges=kw["merges"], unk_token="<unk>", byte_fallback=True))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


class Counter:
    """Forward pre-hook counting sequences, tensor slots and real tokens of every model call."""

    def __init__(self) -> None:
        self.calls = self.sequences = self.slots = self.real = 0

    def __call__(self, module, args, kwargs):
        """Count one forward call (megatron and HF models alike)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.sequences += ids.shape[0]
        self.slots += ids.numel()
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:  # HF
            self.real += int(kwargs["attention_mask"].sum())
        elif kwargs.get("padding_mask") is not None:  # megatron MoE
            self.real += int((~kwargs["padding_mask"]).sum())
        else:
            self.real += ids.numel()


def make_lpo_variant(cfg_online, items, shared: bool, init_state):
    """(setup, run, counters) for LPO over ``items``: global batch 4 lists, micro-batch 1 list."""
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PaddedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.train.lpo_model import LPOModel
    from nemo_lpo.train.optimizer import build_optimizer
    from nemo_lpo.train.step import train_step

    lpo = LPOModel(cfg_online, layout=SharedPromptLayout() if shared else PaddedLayout())
    policy, ref = Counter(), Counter()
    lpo.module.register_forward_pre_hook(policy, with_kwargs=True)
    lpo.reference.register_forward_pre_hook(ref, with_kwargs=True)
    state = {}

    def setup():
        lpo.module.load_state_dict(init_state)
        lpo.reference.load_state_dict(init_state)
        state["opt"] = build_optimizer(cfg_online, lpo.model, 1000)
        collate = (lambda c: collate_shared_prompt(c, 0)) if shared else ListwiseCollator(0)
        state["steps"] = [[collate([it]) for it in items[s:s + 4]] for s in range(0, len(items), 4)]

    def run():
        optimizer, scheduler = state["opt"]
        for microbatches in state["steps"]:
            train_step(lpo, optimizer, scheduler, microbatches)

    return setup, run, (policy, ref)


def make_trl_variant(hf_dir, pairs, lists: int, tmp: Path, tag: str):
    """(setup, run, counters) for TRL's DPOTrainer (sigmoid loss) over the pre-tokenised ``pairs``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed the pairs' token ids directly (the same ids the LPO side trains on)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    per_list = max(1, round(len(pairs) / lists))
    policy, ref = Counter(), Counter()
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    tokenizer = hf_processing_class()
    dataset = Dataset.from_list(pairs)
    state = {}

    def setup():
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        model.register_forward_pre_hook(policy, with_kwargs=True)
        ref_model.register_forward_pre_hook(ref, with_kwargs=True)
        args = DPOConfig(output_dir=str(tmp / f"trl_{tag}"), per_device_train_batch_size=per_list,
                         gradient_accumulation_steps=4, num_train_epochs=1, learning_rate=LR, beta=BETA,
                         lr_scheduler_type="constant", warmup_steps=0, use_cpu=True, bf16=False, report_to="none",
                         save_strategy="no", logging_strategy="no", max_length=None, seed=SEED,
                         dataloader_num_workers=0, disable_tqdm=True)
        state["trainer"] = PretokenizedDPOTrainer(model=model, ref_model=ref_model, args=args,
                                                  train_dataset=dataset, processing_class=tokenizer)

    def run():
        state["trainer"].train()

    return setup, run, (policy, ref)


def main() -> int:
    """Build everything, run the variants interleaved, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=384)
    add_data_argument(parser)
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        print("SKIP: TRL is not installed (bench extra: pip install trl==1.16.0 accelerate==1.15.0)")
        return 0

    from bench_utils import print_table

    from nemo_lpo.config import load_config
    from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
    from nemo_lpo.convert.verify import hf_logits, megatron_logits
    from nemo_lpo.model.parallel import initialize_parallel
    from nemo_lpo.train.checkpoint import save_model_weights
    from nemo_lpo.train.lpo_model import LPOModel

    torch.set_num_threads(1)
    initialize_parallel(seed=SEED)
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp_name:
        tmp = Path(tmp_name)
        items, data_name = load_lists(tmp, args.lists, args.max_length, args.data)
        cfg = load_config(REPO / "conf" / "tiny_cpu.yaml",
                          ["reference.mode=online", f"optim.lr={LR}", "optim.warmup_steps=0", f"loss.beta={BETA}",
                           "loss.type=lpo", "logging.tensorboard=false"])
        seed_model = LPOModel(cfg, train=False)
        init_state = copy.deepcopy(seed_model.module.state_dict())
        save_model_weights(seed_model.module, tmp / "mcore")
        convert_mcore_to_hf(tmp / "mcore", tmp / "hf", preset_name=cfg.model.preset)
        probe = torch.tensor([[int(t) for t in items[0]["prompt_ids"][:32]]])
        with torch.no_grad():
            twin = (megatron_logits(seed_model.module.eval(), probe) - hf_logits(tmp / "hf", probe)).abs().max().item()
        del seed_model

        variants = {"LPO": make_lpo_variant(cfg, items, False, init_state),
                    "LPO shared-prompt": make_lpo_variant(cfg, items, True, init_state)}
        n_pairs = {}
        for mode in ("pw", "1vs0"):
            pairs = pairs_of(items, mode)
            n_pairs[mode] = len(pairs)
            variants[f"TRL DPO-{mode}"] = make_trl_variant(tmp / "hf", pairs, len(items), tmp, mode)
        names = list(variants)
        times = {name: [] for name in names}
        cpu_times = {name: [] for name in names}
        for rep in range(args.reps + 1):  # the first round is the warm-up
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                setup, run, counters = variants[name]
                setup()
                if rep == 1:  # count the timed rounds only
                    for c in counters:
                        c.__init__()
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                if rep > 0:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
            print(f"  round {rep} done", file=sys.stderr, flush=True)

    med = {name: statistics.median(times[name]) for name in names}
    cpu = {name: statistics.median(cpu_times[name]) for name in names}
    n, rows = len(items), []
    for name in names:
        policy, ref = variants[name][2]
        r = args.reps
        passes = policy.sequences / r / n
        label = f"{passes:.2f} rows (4 responses)" if name == "LPO shared-prompt" else f"{passes:.2f}"
        real = (policy.real + ref.real) / r / n
        rows.append([name, 1000 * med[name] / n, med[name] / med["LPO"], cpu[name] / cpu["LPO"], label, real,
                     (policy.slots + ref.slots) / r / n, None, 1e6 * cpu[name] / n / real])
    lpo_tokens = rows[0][5]
    for row in rows:
        row[7] = row[5] / lpo_tokens
    print(f"data: {data_name}, {n} lists of K=4 ({n_pairs['pw']} DPO-pw pairs, {n_pairs['1vs0']} DPO-1vs0 pairs), "
          f"max_length {args.max_length}; model tiny-mixtral (megatron) and its HF twin via the converter "
          f"(max |logit diff| {twin:.1e}); TRL {trl.__version__}; CPU, 1 thread; medians of {args.reps} interleaved rounds")
    print_table("Training pass over the same lists (policy forward+backward + online reference forward)",
                ["variant", "ms per list (wall)", "wall vs LPO", "cpu vs LPO", "policy seq passes per list",
                 "real tokens per list", "tensor slots per list", "tokens vs LPO", "cpu ms per 1k real tokens"], rows)
    print("\nPaper cost model (sequence passes per K=4 list): LPO 4, DPO-1vs0 6 (1.5x), DPO-pw 12 (3x); with ties "
          "fewer pairs exist. 'real tokens' count policy + reference inputs without padding. cpu vs LPO = "
          "(tokens vs LPO) x (cpu ms per 1k tokens vs LPO's): the algorithmic cost times the per-token cost of the "
          "framework (megatron local path vs HF eager Mixtral + TRL's extra metrics).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
