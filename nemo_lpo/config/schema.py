"""The training configuration schema: one dataclass per section, a docstring per field.

Values are validated at construction (``Config.__post_init__``); ``nemo_lpo.config.loader`` builds these
from layered YAML and ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nemo_lpo.config.errors import ConfigError
from nemo_lpo.config.loss_options import check_loss
from nemo_lpo.config.peft import PeftConfig, check_peft
from nemo_lpo.config.sources import parse_blend, valid_prefixes


def _choices(*values: str) -> dict:
    return {"choices": values}


# megatron-core 0.19.2 TransformerConfig.fp8_recipe accepts these and "custom" (which needs a quantizer factory
# module path, not exposed here)
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        preset: Name in ``nemo_lpo.model.presets.PRESETS`` (tiny-mixtral, mixtral-8x7b, mistral-7b, ...), or
            ``from_checkpoint``: the architecture recorded by the converted ``init_checkpoint`` (its
            ``nemo_lpo_model.json``; else ``reference.checkpoint``'s), for models that match no preset. A
            named preset must agree with a converted checkpoint's description.
        params_dtype: Parameter / compute dtype: fp32 or bf16 (bf16 keeps fp32 main grads and weights).
        recompute: Activation recompute: none, full (every layer) or selective (attention core).
        fp8: FP8 format (hybrid or e4m3) with Transformer Engine; None disables FP8.
        fp8_recipe: Transformer Engine FP8 scaling recipe, megatron-core's ``TransformerConfig.fp8_recipe``:
            delayed, tensorwise (per-tensor current scaling), blockwise, or mxfp8 (Blackwell only); None
            means megatron's default (delayed). Needs ``fp8``.
        moe_grouped_gemm: Run a MoE layer's local experts as one grouped GEMM (Transformer Engine's
            ``TEGroupedMLP``) instead of one GEMM per expert (``SequentialMLP``); same checkpoint keys. None:
            true when Transformer Engine imports (its layer spec is then used) and the model is MoE, else
            false. true without Transformer Engine stops at model build (megatron's local spec has no
            grouped GEMM).
        moe_aux_loss_coeff: Router load-balancing loss coefficient; None keeps the preset's value.
        moe_token_dispatcher: MoE token dispatcher: alltoall or allgather.
        init_checkpoint: Megatron dist checkpoint of the starting policy (the SFT model, also the
            reference); None initialises randomly from ``train.seed`` (tests, demo).
        transformer_impl: Layer implementation, as Megatron-LM's ``--transformer-impl``: auto (Transformer
            Engine when it imports, else local), transformer_engine, or local (megatron's local spec with the
            gathered core attention, which serves every batch layout). TE's attention serves padded batches only:
            packed and shared-prompt batches on it stop at start-up (``nemo_lpo.batch.layouts``) unless
            ``te_varlen_attention`` is set.
        te_varlen_attention: Serve packed and shared-prompt batches on Transformer Engine through its varlen (THD)
            attention: packed rows through megatron's ``PackedSeqParams``, shared-prompt rows through
            ``TEGatheredDotProductAttention`` (each response's prompt K/V gathered, bottom-right causal). Their index
            plans are tested on CPU against the dense masks; the TE kernels themselves have not run in this
            repository's tests: run ``tools/container_check.sh`` in your image before relying on it.
    """

    preset: str = "tiny-mixtral"
    params_dtype: str = field(default="fp32", metadata=_choices("fp32", "bf16"))
    recompute: str = field(default="none", metadata=_choices("none", "full", "selective"))
    fp8: str | None = field(default=None, metadata=_choices("hybrid", "e4m3"))
    fp8_recipe: str | None = field(default=None, metadata=_choices(*FP8_RECIPES))
    moe_grouped_gemm: bool | None = None
    moe_aux_loss_coeff: float | None = None
    moe_token_dispatcher: str = field(default="alltoall", metadata=_choices("alltoall", "allgather"))
    init_checkpoint: str | None = None
    transformer_impl: str = field(default="auto", metadata=_choices("auto", "transformer_engine", "local"))
    te_varlen_attention: bool = False


@dataclass
class ParallelConfig:
    """The parallel layout; data parallelism is whatever the world size leaves.

    Attributes:
        tp: Tensor-parallel size.
        pp: Pipeline-parallel size.
        vpp: Virtual pipeline stages (model chunks) per pipeline rank: Megatron's interleaved 1F1B schedule
            (``--num-layers-per-virtual-pipeline-stage`` = num_layers / (pp * vpp)); 1 disables it. Needs
            pp > 1, num_layers divisible by pp * vpp and micro-batches per step (per data-parallel rank) a
            multiple of pp; every micro-batch of a step is padded to the step's longest sequence.
        ep: Expert-parallel size (MoE models).
        etp: Expert tensor-parallel size; None means megatron's default, equal to tp (set 1 to keep experts whole under TP).
        sequence_parallel: Shard activations along the sequence over TP (required for MoE with tp > 1).
        distributed_optimizer: Megatron's DistributedOptimizer (optimizer state sharded over DP).
        overlap_grad_reduce: Overlap the DP gradient reduce with backward.
        overlap_param_gather: Overlap the distributed optimizer's parameter all-gather.
        backend: torch.distributed backend; None picks nccl on GPU and gloo on CPU.
        allow_cpu: Run on the CPU on purpose although the machine has GPUs. By default a process whose machine
            has GPUs (nvidia-smi lists one, or CUDA_VISIBLE_DEVICES / Slurm GPU variables are set) but whose
            CUDA does not work stops with an error instead of training on the CPU (``NEMO_LPO_ALLOW_CPU=1``
            does the same for every command).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    backend: str | None = field(default=None, metadata=_choices("gloo", "nccl"))
    allow_cpu: bool = False


@dataclass
class DataConfig:
    """The packed listwise dataset and batching.

    Attributes:
        train_prefix: Prefix of the packed dataset (``nemo-lpo pack`` output); relative paths are
            resolved against the current directory. A blend of several is Megatron's notation
            ``[w1, prefix1, w2, prefix2, ...]``: each global batch draws lists from the sources in proportion
            to the weights (``nemo_lpo.data.blend``; docs/training.md).
        valid_prefix: Validation dataset prefix, or a list of them; None disables validation (see
            ``train.eval_interval``). Lists are taken in order (no shuffle), capped by ``train.eval_lists``.
        global_batch_size: Lists per optimizer step, over all data-parallel ranks.
        micro_batch_size: Lists per forward/backward micro-batch on one rank.
        shuffle: Shuffle lists every epoch (seeded by ``seed``).
        seed: Sampler seed.
        pad_to_multiple_of: Round the padded sequence length up to this (times tp under sequence parallel).
        packed: Pack the sequences of a micro-batch back to back (each attends to itself only: the local
            spec's gathered core attention); with ``shared_prompt``, all lists of a micro-batch in one row.
        shared_prompt: Shared-prompt rows (``nemo_lpo.batch.shared_prompt``): each list is one row
            [prompt, y_1, ..., y_K] and its prompt is computed once (the MoE aux-loss statistics then
            count the prompt's tokens once instead of K times).
    """

    train_prefix: str | list | None = None
    valid_prefix: str | list | None = None
    global_batch_size: int = 4
    micro_batch_size: int = 1
    shuffle: bool = True
    seed: int = 1234
    pad_to_multiple_of: int = 8
    packed: bool = False
    shared_prompt: bool = False


@dataclass
class LossConfig:
    """The listwise loss (``nemo_lpo.losses.LOSSES``).

    Attributes:
        type: Registry name: lpo, lpo_abs, dpo, dpo_pw, ipo, kto, nca, infonca, lipo_lambda, listmle, kpo ...
        beta: Implicit-reward scale β.
        length_average: Average token log-probs over the response instead of summing them.
        options: Keyword options of the loss (e.g. preference, alpha, sft_weight, k); checked when the config
            loads against the options that ``type`` reads (``nemo_lpo.losses.LOSS_SPECS``) and their types.
    """

    type: str = "lpo"
    beta: float = 0.1
    length_average: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class ReferenceConfig:
    """Where the reference log-probs μ(y|x) come from.

    Attributes:
        mode: precomputed (the dataset's sidecar from ``nemo-lpo ref-logps``; no reference model in
            training), online (a frozen copy of the starting policy) or base (adapter runs, ``peft``: the policy
            itself with its adapters switched off, a no-grad forward in the step; no second model).
        offload: Online mode: keep the frozen copy on CPU between uses (GPU memory saving).
        checkpoint: Reference checkpoint; None means ``model.init_checkpoint``.
    """

    mode: str = field(default="precomputed", metadata=_choices("precomputed", "online", "base"))
    offload: bool = False
    checkpoint: str | None = None


@dataclass
class OptimConfig:
    """Megatron optimizer and OptimizerParamScheduler.

    Attributes:
        lr: Peak learning rate.
        min_lr: Final learning rate of the decay.
        warmup_steps: Linear warm-up steps from 0.
        decay_style: constant, linear or cosine.
        decay_steps: Steps of warm-up + decay; None means the run's total steps.
        weight_decay: AdamW weight decay.
        adam_beta1: Adam β1.
        adam_beta2: Adam β2.
        adam_eps: Adam ε.
        clip_grad: Clip the global gradient norm to this (0 disables).
    """

    lr: float = 5e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = field(default="cosine", metadata=_choices("constant", "linear", "cosine"))
    decay_steps: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    """Length of the run and its seed.

    Attributes:
        max_steps: Optimizer steps; None means ``epochs`` passes over the dataset.
        epochs: Passes over the data when ``max_steps`` is None.
        seed: Seed of initialisation and dropout.
        eval_interval: Validate every N steps (needs ``data.valid_prefix``; validation always runs before the
            first step of a fresh run and after the last step); None: only then.
        eval_lists: Validate on at most this many lists (the first ones of ``data.valid_prefix``, in order);
            None: all of them.
    """

    max_steps: int | None = None
    epochs: int = 1
    seed: int = 1234
    eval_interval: int | None = None
    eval_lists: int | None = None


@dataclass
class CheckpointConfig:
    """Megatron dist checkpoints of the whole training state.

    Attributes:
        dir: Checkpoint folder; None means ``<logging.run_dir>/checkpoints``.
        save_interval: Save every N steps (None: only at the end).
        save_at_end: Save after the last step.
        keep_last: Keep the newest N checkpoints (0 keeps all).
        resume: Continue from ``<dir>/latest`` when it exists; false starts fresh (its checkpoints are replaced).
        resume_despite_changes: Resume even when the config changed in a way that breaks an exact continuation
            (the start-up check lists the changes and otherwise refuses; docs/troubleshooting.md).
        keep_best: A validation metric (``val/loss``, ``val/implicit/accuracy``, ...): a validation that
            improves it saves a checkpoint (if that step has none) that ``keep_last`` never deletes, named
            in ``<dir>/best.json``; None disables it. Needs ``data.valid_prefix``.
        keep_best_mode: min or max: whether a lower or a higher ``keep_best`` value is better.
    """

    dir: str | None = None
    save_interval: int | None = None
    save_at_end: bool = True
    keep_last: int = 2
    resume: bool = True
    resume_despite_changes: bool = False
    keep_best: str | None = None
    keep_best_mode: str = field(default="min", metadata=_choices("min", "max"))


@dataclass
class LoggingConfig:
    """Metrics JSONL, console, TensorBoard and W&B.

    Attributes:
        run_dir: Folder of the run: metrics.jsonl, config.yaml, tensorboard/, checkpoints/.
        log_interval: Console progress line every N steps (the JSONL gets every step).
        tensorboard: Write TensorBoard events.
        wandb_project: W&B project; None disables W&B (imported lazily only when set).
        wandb_name: W&B run name.
    """

    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_name: str | None = None


@dataclass
class Config:
    """One training / reference-pass run.

    Attributes:
        name: Name of the run (W&B, console).
        model: The policy model.
        parallel: The parallel layout.
        data: Dataset and batching.
        loss: The listwise loss.
        reference: Reference log-prob source.
        optim: Optimizer and schedule.
        train: Length and seed.
        checkpoint: Checkpointing.
        logging: Logging.
        peft: LoRA / DoRA adapters on a frozen base (Megatron-Bridge's PEFT); type none trains every weight.
    """

    name: str = "lpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    def __post_init__(self) -> None:
        """Check the cross-field constraints that single values cannot express."""
        p, d = self.parallel, self.data
        for name in ("tp", "pp", "vpp", "ep"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        if p.vpp > 1:
            self._check_virtual_pipeline()
        if d.micro_batch_size < 1 or d.global_batch_size % d.micro_batch_size:
            raise ConfigError(
                f"data.global_batch_size ({d.global_batch_size}) must be a positive multiple of "
                f"data.micro_batch_size ({d.micro_batch_size})"
            )
        if self.loss.beta <= 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.loss.beta}")
        check_loss(self.loss)
        if self.optim.lr < 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr, got {self.optim.min_lr}, {self.optim.lr}")
        if p.overlap_param_gather and not p.distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather needs parallel.distributed_optimizer=true")
        if self.model.preset == "from_checkpoint" and not (self.model.init_checkpoint or self.reference.checkpoint):
            raise ConfigError("model.preset=from_checkpoint needs model.init_checkpoint (a converted checkpoint)")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.train.max_steps}")
        self._check_precision_and_experts()
        self._check_data_sources()
        check_peft(self.peft, self.reference.mode)

    def _check_precision_and_experts(self) -> None:
        m = self.model
        if m.fp8_recipe is not None and m.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"model.fp8_recipe: {m.fp8_recipe!r} is not one of {list(FP8_RECIPES)}")
        if m.fp8_recipe is not None and m.fp8 is None:
            raise ConfigError(f"model.fp8_recipe={m.fp8_recipe} needs model.fp8 (hybrid or e4m3); without it the "
                              "model runs in model.params_dtype and the recipe would be ignored")
        if m.moe_grouped_gemm is not None and not isinstance(m.moe_grouped_gemm, bool):
            raise ConfigError(f"model.moe_grouped_gemm must be true, false or null, got {m.moe_grouped_gemm!r}")

    def _check_data_sources(self) -> None:
        """Blend notation of ``data.train_prefix``, the validation prefixes and the fields that need them."""
        d, t = self.data, self.train
        if d.train_prefix is not None:
            parse_blend(d.train_prefix, "data.train_prefix")  # raises ConfigError on a malformed blend
        valid = valid_prefixes(d.valid_prefix)
        for name in ("eval_interval", "eval_lists"):
            value = getattr(t, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be >= 1 (or null), got {value}")
        if not valid and t.eval_interval is not None:
            raise ConfigError("train.eval_interval is set but data.valid_prefix is not: give the validation dataset")
        best = self.checkpoint.keep_best
        if best is not None:
            if not valid:
                raise ConfigError("checkpoint.keep_best needs data.valid_prefix (the best is a validation metric)")
            if not best.startswith("val/"):
                raise ConfigError(f"checkpoint.keep_best: {best!r} is not a validation metric (val/loss, "
                                  "val/implicit/accuracy, ...)")

    def _check_virtual_pipeline(self) -> None:
        p = self.parallel
        if p.pp < 2:
            raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp > 1 (virtual stages interleave a pipeline), "
                              f"got pp={p.pp}")
        # the layer count must divide by pp*vpp: checked with the architecture (nemo_lpo.model.resolve), since a
        # from_checkpoint preset is only known from its checkpoint and config stays below model in the imports

    def to_dict(self) -> dict:
        """Return the config as plain nested dicts (YAML / checkpoint friendly)."""
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        """Return the checkpoint folder (``checkpoint.dir`` or ``<run_dir>/checkpoints``)."""
        return Path(self.checkpoint.dir or Path(self.logging.run_dir) / "checkpoints")

    def data_parallel_size(self, world_size: int) -> int:
        """Return the data-parallel size the layout leaves at ``world_size``; raise when it does not divide."""
        model_parallel = self.parallel.tp * self.parallel.pp
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp = {model_parallel}")
        dp = world_size // model_parallel
        if (dp * self.parallel.tp) % self.parallel.ep:
            raise ConfigError(f"parallel.ep={self.parallel.ep} must divide dp*tp = {dp * self.parallel.tp}")
        if self.data.global_batch_size % (self.data.micro_batch_size * dp):
            raise ConfigError(
                f"data.global_batch_size ({self.data.global_batch_size}) must be a multiple of "
                f"micro_batch_size*dp = {self.data.micro_batch_size * dp}"
            )
        microbatches = self.data.global_batch_size // (self.data.micro_batch_size * dp)
        if self.parallel.vpp > 1 and microbatches % self.parallel.pp:
            # megatron's interleaved schedule runs micro-batches in groups of pp per virtual stage
            raise ConfigError(
                f"parallel.vpp={self.parallel.vpp}: the {microbatches} micro-batches per step "
                f"(global_batch_size / (micro_batch_size*dp) = {self.data.global_batch_size} / "
                f"({self.data.micro_batch_size}*{dp})) must be a multiple of parallel.pp={self.parallel.pp}"
            )
        return dp
