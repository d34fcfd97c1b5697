"""An adapter checkpoint (``peft.type`` lora / dora) as a whole policy: its base plus the adapters it holds.

An adapter run saves only the adapters (and their optimizer state) with a pointer to its base: the base checkpoint's
path and a checksum of its weights (``adapters.base_pointer``). ``load_adapter_model`` rebuilds the run's model in
one process (TP=PP=EP=1) from that base, checks the checksum, adds the run's adapters and loads them: what
``nemo-lpo eval`` scores and ``convert mcore-to-hf`` merges or exports.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from nemo_lpo.config.loader import from_dict
from nemo_lpo.train.adapters import adapter_sharded_state, check_base_pointer, load_adapter_state, require_peft
from nemo_lpo.train.checkpoint import model_sharded_state_dict
from nemo_lpo.train.lpo_model import LPOModel

SINGLE_PROCESS = {"tp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": None, "sequence_parallel": False,
                  "distributed_optimizer": False, "overlap_grad_reduce": False, "overlap_param_gather": False}


def adapter_pointer(ckpt: Path) -> dict | None:
    """The base pointer of an adapter checkpoint (``peft`` in its common state); None for any other checkpoint."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception:  # noqa: BLE001 - not a training checkpoint: no pointer
        return None
    return common.get("peft") if isinstance(common, dict) else None


def load_adapter_model(ckpt: Path) -> LPOModel:
    """The adapter run's policy at TP=PP=EP=1 (eval mode): the pointed-at base with the adapters of ``ckpt``.

    Megatron must be initialised at TP=PP=EP=1 in one process.

    Raises:
        FileNotFoundError: the base checkpoint is not there (the adapter checkpoint holds only the adapters).
        ValueError: the base there is another one (its weight checksum differs).
        ConfigError: Megatron-Bridge's PEFT does not import here (the message says what to install).
    """
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    pointer = common["peft"]
    saved = common["config"]
    saved["parallel"] = {**saved.get("parallel", {}), **SINGLE_PROCESS}
    saved["model"] = {**saved["model"], "init_checkpoint": pointer["base_checkpoint"]}
    if not Path(pointer["base_checkpoint"]).is_dir():
        raise FileNotFoundError(f"{ckpt}: the adapters' base checkpoint {pointer['base_checkpoint']} is not there "
                                "(the adapter checkpoint holds only the adapters)")
    cfg = from_dict(saved, source=f"{ckpt} (run config)")
    require_peft(cfg.peft, cfg.model.init_checkpoint)  # Megatron-Bridge's PEFT, as the run that trained it
    lpo = LPOModel(cfg, train=False)
    check_base_pointer(pointer, lpo.base, ckpt)
    request = adapter_sharded_state(lpo.peft, model_sharded_state_dict(lpo.module))
    loaded = dist_checkpointing.load(request, str(ckpt))  # with the checkpoint's common state: keep the model's
    load_adapter_state(lpo.module, {key: value for key, value in loaded.items() if key in request})
    for module in lpo.modules:
        module.eval()
    return lpo
