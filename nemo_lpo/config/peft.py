"""The ``peft`` section: LoRA / DoRA adapters through Megatron-Bridge's PEFT (``megatron.bridge.peft``).

The fields are the ones Bridge's ``LoRA`` / ``DoRA`` dataclasses take under the same names, so the section maps
one to one onto them (``nemo_lpo.train.adapters``) and onto the ConfigContainer's ``peft`` under bridge-train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_lpo.config.errors import ConfigError

# megatron-core's linear layers of a GPT block that Bridge's LoRA / DoRA wrap (expert linears included: under a
# MoE layer ``linear_fc1`` / ``linear_fc2`` name every expert's). A pattern with ``*`` selects by full name.
TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: train low-rank adapters on a frozen base model.

    Attributes:
        type: none (full-parameter training), lora or dora (Bridge's ``LoRA`` / ``DoRA``). With adapters the
            base weights come from ``model.init_checkpoint`` and stay frozen; checkpoints hold the adapters and
            their optimizer state only, and ``reference.mode=base`` takes the reference from the same model with
            the adapters switched off.
        dim: Rank of the low-rank update (the inner size of A and B).
        alpha: Scale numerator: the update is ``alpha / dim * B @ A``.
        dropout: Dropout on the adapter input, in [0, 1).
        target_modules: Which linears get an adapter: any of linear_qkv, linear_proj, linear_fc1, linear_fc2, or
            full-name patterns with ``*`` (e.g. ``*.layers.0.*.linear_qkv``), as Bridge's ``target_modules``.
    """

    type: str = field(default="none", metadata={"choices": ("none", "lora", "dora")})
    dim: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(TARGET_MODULES))

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (``type`` is not none)."""
        return self.type != "none"


def check_peft(peft: PeftConfig, reference_mode: str) -> None:
    """Check the ``peft`` section and its interplay with ``reference.mode``.

    That adapters need ``model.init_checkpoint`` is checked at start-up (``train.adapters.require_peft``): recipe
    configs leave the checkpoint to the command line.
    """
    if reference_mode == "base" and not peft.enabled:
        raise ConfigError("reference.mode=base takes the reference from the policy with its adapters switched off: "
                          "it needs peft.type=lora or dora (full-parameter runs: online or precomputed)")
    if not peft.enabled:
        return
    if not isinstance(peft.dim, int) or isinstance(peft.dim, bool) or peft.dim < 1:
        raise ConfigError(f"peft.dim must be an integer >= 1, got {peft.dim!r}")
    if not isinstance(peft.alpha, (int, float)) or isinstance(peft.alpha, bool) or peft.alpha <= 0:
        raise ConfigError(f"peft.alpha must be > 0, got {peft.alpha!r}")
    if not 0.0 <= float(peft.dropout) < 1.0:
        raise ConfigError(f"peft.dropout must be in [0, 1), got {peft.dropout!r}")
    if not isinstance(peft.target_modules, list) or not peft.target_modules:
        raise ConfigError(f"peft.target_modules must be a non-empty list of {list(TARGET_MODULES)} "
                          f"or '*' patterns, got {peft.target_modules!r}")
    for name in peft.target_modules:
        if not isinstance(name, str) or (name not in TARGET_MODULES and "*" not in name):
            raise ConfigError(f"peft.target_modules: {name!r} is not one of {list(TARGET_MODULES)} "
                              "(or a full-name pattern with '*')")
