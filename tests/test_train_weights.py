"""load_model_weights reads the model out of a full training checkpoint as well as a weights-only one."""

from __future__ import annotations

import torch


def _tiny_model(seed: int):
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import PRESETS, transformer_config

    torch.manual_seed(seed)
    preset = PRESETS["tiny-mixtral"]
    return build_gpt_model(preset, transformer_config(preset))


def test_model_weights_load_from_a_checkpoint_with_training_state(megatron_single, tmp_path):
    """A training-checkpoint layout loads into a fresh model, and every parameter equals the saved one.

    The layout is the one save_checkpoint writes: the model under "model", plus step, scheduler, config.
    """
    from megatron.core import dist_checkpointing

    from nemo_lpo.train.checkpoint import load_model_weights

    source = _tiny_model(seed=1)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.5)  # make sure the target's own init cannot equal it by chance
    state = {
        "model": source.sharded_state_dict(),
        "step": 3,
        "scheduler": {"num_steps": 3},
        "config": {"model": {"preset": "tiny-mixtral"}},
        "format_version": 1,
    }
    (tmp_path / "step_0000003").mkdir()
    dist_checkpointing.save(state, str(tmp_path / "step_0000003"))
    (tmp_path / "latest").write_text("step_0000003\n")

    target = _tiny_model(seed=2)
    load_model_weights(target, tmp_path)  # through the `latest` marker, as init_checkpoint=RUN/checkpoints does

    saved = dict(source.named_parameters())
    for name, param in target.named_parameters():
        assert torch.equal(param, saved[name]), name
