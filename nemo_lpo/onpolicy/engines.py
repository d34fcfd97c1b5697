"""Inference engines behind one interface: K sampled responses for one tokenised prompt.

- ``hf``: Hugging Face transformers' ``generate`` on an HF model folder (a model exported by ``nemo-lpo convert
  mcore-to-hf`` or any causal LM). Runs on CPU and GPU (bf16 on GPU); one prompt per call, its K samples as
  ``num_return_sequences``. Executed on CPU by the tests and the demonstration.
- ``vllm``: vLLM's offline ``LLM.generate`` with ``SamplingParams(n=K, seed=...)`` on the same HF folder, for
  GPU runs at scale (continuous batching, paged attention, tensor parallelism). Code only here: vLLM needs a
  GPU and is not installed in this environment; not executed.

Why not megatron-core's own engine (``megatron.core.inference``): it would sample the trained dist checkpoint
under TP / PP / EP without an export, but 0.19.2's text-generation controller and engines allocate on
``torch.cuda.current_device()`` at dozens of sites (sampling RNG, token buffers, KV cache), so it does not run
on CPU without patching each of them, and it does not batch per-request seeds the way vLLM does. Both backends
here take the exported HF model, which the round exports anyway (docs/onpolicy.md).

Reproducibility: prompts are sampled in fixed batches of consecutive prompts (``prompts_per_batch``), each from
its own seed (``batch_seed``), so the samples do not depend on which rank draws a batch or on a resumed run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch
import transformers

BACKENDS = ("hf", "vllm")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled (recorded in the output's ``.meta.json``).

    Attributes:
        k: responses per prompt.
        temperature: softmax temperature (> 0).
        top_p: nucleus sampling mass (1.0: off).
        max_new_tokens: the length limit of a response; one that reaches it is marked ``truncated``.
        seed: base seed; batch ``b`` of prompts samples from ``batch_seed(seed, b)``.
        prompts_per_batch: prompts sampled together (batch ``b`` holds prompts ``b*B .. b*B+B-1`` of the input,
            whatever the number of ranks, so the samples depend on the seed and B only).
    """

    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    prompts_per_batch: int = 8

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {self.prompts_per_batch}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass
class Sample:
    """One sampled response: its token ids without EOS, and whether it stopped at EOS or at the length limit."""

    ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (truncated at max_new_tokens)


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``: a hash of (base seed, index), independent of ranks and order."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def local_device() -> str:
    """This rank's GPU (``cuda:$LOCAL_RANK``, one GPU per rank of a torchrun / srun launch), or the CPU."""
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def split_at_eos(new_ids: list[int], eos_id: int, max_new_tokens: int) -> Sample:
    """Cut a generated continuation at its first EOS; without one it was truncated at the limit."""
    if eos_id in new_ids:
        return Sample(new_ids[:new_ids.index(eos_id)], "stop")
    return Sample(new_ids[:max_new_tokens], "length")


class HFEngine:
    """transformers ``generate`` on a local HF causal-LM folder (CPU fp32, GPU bf16)."""

    name = "hf"

    def __init__(self, model_dir: str, eos_id: int, pad_id: int, device: str | None = None) -> None:
        self.device = torch.device(device or local_device())
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        self.model.to(self.device).eval()
        self.model_dir, self.eos_id, self.pad_id = str(model_dir), eos_id, pad_id

    def identity(self) -> dict:
        """What generated the samples (for the output's ``.meta.json``)."""
        return {"engine": "hf", "model": self.model_dir, "transformers": transformers.__version__,
                "dtype": str(self.model.dtype).removeprefix("torch."), "device": self.device.type}

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> list[list[Sample]]:
        """K samples for each of a batch of prompts (left-padded together), from ``seed``."""
        torch.manual_seed(seed)
        width = max(len(p) for p in prompts)
        inputs = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(inputs, attention_mask=mask, do_sample=True, temperature=settings.temperature,
                                  top_p=settings.top_p, top_k=0, max_new_tokens=settings.max_new_tokens,
                                  num_return_sequences=settings.k, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        rows = [split_at_eos(row[width:].tolist(), self.eos_id, settings.max_new_tokens) for row in out]
        return [rows[i * settings.k:(i + 1) * settings.k] for i in range(len(prompts))]


class VLLMEngine:
    """vLLM's offline engine on a local HF folder (GPU only; code only: not executed in this repository's tests).

    One ``LLM.generate`` call per batch of prompts, each prompt with its own seed (``SamplingParams.seed``); vLLM
    batches the K samples (``n=K``) and runs the model under ``tensor_parallel_size``.
    """

    name = "vllm"

    def __init__(self, model_dir: str, eos_id: int, pad_id: int, tensor_parallel_size: int = 1) -> None:
        import vllm  # GPU-only optional dependency

        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel_size, dtype="bfloat16",
                            seed=0, skip_tokenizer_init=True)
        self.model_dir, self.eos_id, self.pad_id = str(model_dir), eos_id, pad_id

    def identity(self) -> dict:
        """What generated the samples (for the output's ``.meta.json``)."""
        return {"engine": "vllm", "model": self.model_dir, "vllm": self._vllm.__version__, "dtype": "bfloat16"}

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> list[list[Sample]]:
        """K samples for each of a batch of prompts; prompt i of the batch samples from ``seed + i``."""
        params = [self._vllm.SamplingParams(n=settings.k, temperature=settings.temperature, top_p=settings.top_p,
                                            max_tokens=settings.max_new_tokens, seed=seed + i,
                                            stop_token_ids=[self.eos_id], detokenize=False)
                  for i in range(len(prompts))]
        results = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[Sample([t for t in c.token_ids if t != self.eos_id], "length" if c.finish_reason == "length" else "stop")
                 for c in result.outputs] for result in results]


def load_engine(backend: str, model_dir: str, eos_id: int, pad_id: int):
    """The engine named ``backend`` (``BACKENDS``) on ``model_dir``."""
    if backend == "hf":
        return HFEngine(model_dir, eos_id, pad_id)
    if backend == "vllm":
        return VLLMEngine(model_dir, eos_id, pad_id)
    raise ValueError(f"--backend {backend!r} not in {BACKENDS}")
