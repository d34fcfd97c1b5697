"""The warnings a CPU run prints before its first useful line and that are known to be harmless, hidden here.

Every ``nemo-lpo`` command (each torchrun / srun rank of ``train`` and ``ref-logps`` too: they all start in
``nemo_lpo.cli.main``) calls :func:`install` before it imports megatron or torch. Only the messages listed in
``HARMLESS`` are hidden, each matched by its source and the start of its text; any other warning or log
record still shows. ``nemo-lpo --verbose COMMAND`` or ``NEMO_LPO_VERBOSE=1`` shows them all; ``--verbose``
sets the variable, so processes the command starts see it too.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import warnings

VERBOSE_ENV = "NEMO_LPO_VERBOSE"


@dataclasses.dataclass(frozen=True)
class Harmless:
    """One known-harmless message.

    Attributes:
        source: the module that warns (a Python warning: regex on the warning's module) or the logger name
            (a log record: that exact logger, where megatron and torch log it).
        message: regex matched at the start of the message.
        why: why it can be hidden.
        category: the warning class for a Python warning; None for a log record.
        cpu_only: harmless only without a GPU (a performance hint that matters on one): shown when a GPU is seen.
    """

    source: str
    message: str
    why: str
    category: type[Warning] | None = UserWarning
    cpu_only: bool = False


HARMLESS = (
    Harmless(r"megatron\.core\.", r"Transformer Engine and Apex are not installed",
             "no TE / Apex on CPU: megatron falls back to torch's optimizers and local multi-tensor kernels, which "
             "is the path nemo-lpo runs and tests on CPU"),
    Harmless(r"megatron\.core\.", r"Apex is not installed\. Falling back to Torch Norm",
             "the same fallback for the layer norms: torch's own norm, what the local layer spec builds"),
    Harmless(r"megatron\.core\.transformer\.transformer_config", r"moe_ffn_hidden_size is not set",
             "the presets give the expert width as ffn_hidden_size, which megatron then uses: the intended size"),
    Harmless(r"megatron\.core\.transformer\.transformer_config", r"full scope is deprecated",
             "megatron's own default cuda_graph_scope triggers its deprecation notice; no CUDA graph is captured"),
    Harmless(r"megatron\.core\.models\.mimo", r"MimoModelConfig is experimental",
             "printed when megatron imports its multimodal package; nemo-lpo does not use it"),
    Harmless(r"megatron\.core\._rank_utils", r"Could not determine rank from torch\.distributed",
             "asked before the process group exists in a one-process run (eval, convert); rank 0 is right there"),
    Harmless(r"torch\.distributed\.checkpoint\.", r"torch\.distributed is (disabled, )?unavailable or uninitialized",
             "megatron loads checkpoint shards with no_dist=True on purpose: each rank reads its own, megatron "
             "coordinates them"),
    Harmless(r"torch\.distributed\.checkpoint\.", r"The argument order of (load|save) has been changed",
             "torch's notice that megatron-core 0.19.2 passes the storage reader / writer by position; it still works"),
    Harmless(r"torch\.distributed\.", r"Please use DTensor instead and we are deprecating ShardedTensor",
             "torch's deprecation of the ShardedTensor type megatron's torch_dist checkpoint format is built on",
             category=FutureWarning),
    Harmless(r"torch\.distributed\.c10d_logger", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
             r"is deprecated", "torch's renaming of two collectives megatron-core 0.19.2 calls; they still work",
             category=FutureWarning),
    Harmless(r"megatron\.core\.tensor_parallel\.layers", r"When using sequence parallelism it is recommended to set "
             r"the environment variable CUDA_DEVICE_MAX_CONNECTIONS", "a CUDA stream setting (the GPU recipes set it); "
             "nothing to tune on CPU", cpu_only=True),
    Harmless("torch.utils.cpp_extension", r"No CUDA runtime is found",
             "a CPU machine has no CUDA runtime; no CUDA extension is built", category=None),
    Harmless("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED",
             "megatron-core 0.19.2 points new features to HybridModel; GPTModel is the supported model nemo-lpo "
             "is pinned on and tested with", category=None),
    Harmless("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated",
             "printed on every save; megatron's own save path is what 0.19.2 ships and the checkpoints are "
             "tested with (its replacement needs NVIDIA Resiliency Extension)", category=None),
)


class _HideHarmless(logging.Filter):
    """Drops the listed log records of one logger; every other record passes."""

    def __init__(self, patterns: list[re.Pattern]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def _gpu_visible() -> bool:
    """Whether this process can see an NVIDIA GPU (its device files; without importing torch)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and bool(glob.glob("/dev/nvidia[0-9]*"))


def verbose_requested() -> bool:
    """Whether ``NEMO_LPO_VERBOSE`` asks for every warning (any value but empty / 0 / false / no)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def install(verbose: bool = False) -> bool:
    """Hide the ``HARMLESS`` messages unless ``verbose`` or ``NEMO_LPO_VERBOSE``; returns whether they are hidden.

    Call it before megatron / torch are imported (some warn at import). Calling it again adds nothing.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose_requested():
        return False
    by_logger: dict[str, list[re.Pattern]] = {}
    gpu = _gpu_visible()
    for item in HARMLESS:
        if item.cpu_only and gpu:
            continue
        if item.category is None:
            by_logger.setdefault(item.source, []).append(re.compile(item.message))
        else:
            warnings.filterwarnings("ignore", message=item.message, category=item.category, module=item.source)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideHarmless) for f in logger.filters):
            logger.addFilter(_HideHarmless(patterns))
    return True
