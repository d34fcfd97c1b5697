"""The paper's experiment configs (conf/experiments/).

They load, validate, name real losses and layouts, document their source and data, and the baselines
differ from their LPO run only in the loss and data.
"""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from nemo_lpo.config import CONF_DIR, load_config
from nemo_lpo.losses import LOSSES
from nemo_lpo.model.presets import PRESETS

EXPERIMENTS = sorted((CONF_DIR / "experiments").glob("*.yaml"))
# model preset -> (parallel layout it runs with, world size of that layout)
LAYOUTS = {"mistral-7b": ((2, 1, 1), 8), "mixtral-8x7b": ((1, 4, 8), 64)}
# each baseline -> (its LPO-family run, the loss type it must use)
BASELINES = {
    "uf_lpo_abs": ("uf_lpo", "lpo_abs"), "uf_dpo": ("uf_lpo", "dpo"), "uf_dpo_1vs0": ("uf_lpo", "dpo_1vs0"),
    "uf_dpo_pw": ("uf_lpo", "dpo_pw"), "uf_ipo": ("uf_lpo", "ipo"), "uf_kto": ("uf_lpo", "kto"),
    "ui_dpo": ("ui_lpo_abs", "dpo"), "uf_listmle": ("uf_lpo", "listmle"), "uf_kpo": ("uf_lpo", "kpo"),
}
ALLOWED_DIFF = {"name", "logging.run_dir", "loss.type", "data.train_prefix"}
OPTION_DIFF = {"uf_kpo": {"k": 2}}  # baselines whose loss takes options: exactly these


FIXTURES = CONF_DIR.parent / "tests" / "fixtures" / "data"


def _pack_args(path) -> list[str]:
    """The arguments of the `nemo-lpo pack` command in the file's header comment."""
    comments = " ".join(line.lstrip("# ").rstrip("\\ ") for line in path.read_text().splitlines()
                        if line.lstrip().startswith("#"))
    found = re.search(r"nemo-lpo pack (.*?--output-prefix \S+)", comments)
    assert found, f"{path.name}: no `nemo-lpo pack ... --output-prefix` command in the comments"
    return shlex.split(found.group(1))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_paper_run_has_a_config():
    names = {p.stem for p in EXPERIMENTS}
    assert names == {"uf_lpo", "ui_lpo_abs", *BASELINES}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.loss.type in LOSSES
    assert cfg.model.preset in PRESETS and cfg.model.params_dtype == "bf16"
    layout, world = LAYOUTS[cfg.model.preset]
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == layout
    cfg.data_parallel_size(world)  # the global batch splits over the layout's data-parallel ranks
    if cfg.parallel.tp > 1:
        assert cfg.parallel.sequence_parallel
    # the NCA recipe numbers the comments attribute to Chen et al. 2024
    assert (cfg.loss.beta, cfg.optim.lr, cfg.optim.decay_style) == (0.01, 5e-6, "cosine")
    assert (cfg.data.global_batch_size, cfg.train.epochs, cfg.train.max_steps) == (32, 1, None)
    assert cfg.reference.mode == "precomputed"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_documents_source_and_data(path):
    text = path.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "LPO paper" in comments and "NCA paper" in comments and "our choice" in comments.lower()
    args = _pack_args(path)
    flags = " ".join(args)
    assert "--max-length 1024" in flags
    cfg = load_config(path)
    assert args[args.index("--output-prefix") + 1] == cfg.data.train_prefix  # the pack writes what the run reads
    pairs = "--pairs zephyr" in flags
    if cfg.loss.type in ("dpo", "ipo") and path.stem.startswith("uf_"):
        assert pairs  # K = 2 losses on UltraFeedback train on Zephyr pairs
    if path.stem.startswith("uf_") and not pairs:
        assert "--format ultrafeedback" in flags and "--max-k 4" in flags
    if path.stem.startswith("ui_"):
        assert "--format ultrainteract" in flags


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Run each header's pack command on the small fixture of its format; {train_prefix: written prefix}."""
    from nemo_lpo.cli import main

    out, root = {}, tmp_path_factory.mktemp("experiments")
    for path in EXPERIMENTS:
        args = _pack_args(path)
        prefix = args[args.index("--output-prefix") + 1]
        if prefix in out:
            continue
        fixture = {"ultrafeedback": "ultrafeedback_raw", "ultrainteract": "ultrainteract"}[
            args[args.index("--format") + 1]]
        args[args.index("--input") + 1] = str(FIXTURES / f"{fixture}.jsonl")
        args[args.index("--output-prefix") + 1] = str(root / prefix)
        assert main(["pack", *args, "--no-progress"]) == 0
        out[prefix] = root / prefix
    return out


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_loss_runs_on_the_data_its_pack_command_writes(path, packed):
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.losses import listwise_loss

    cfg = load_config(path)
    dataset = ListwiseDataset(packed[cfg.data.train_prefix])
    batch = ListwiseCollator(dataset.pad_id)([dataset[i] for i in range(len(dataset))])
    mask = batch["response_mask"]
    assert mask.shape[1] == (2 if "--pairs" in _pack_args(path) or path.stem.startswith("ui_") else 4)
    torch.manual_seed(0)
    policy, reference = torch.randn(mask.shape), torch.randn(mask.shape)
    per_list, metrics = listwise_loss(cfg.loss.type, policy, reference, batch["rewards"], mask, cfg.loss.beta,
                                      **cfg.loss.options)
    assert per_list.shape == (len(dataset),) and torch.isfinite(per_list).all()
    assert metrics["lists/valid"] == len(dataset)


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_baseline_differs_from_lpo_only_in_loss_and_data(baseline):
    lpo_name, loss_type = BASELINES[baseline]
    base = _flat(load_config(CONF_DIR / "experiments" / f"{lpo_name}.yaml").to_dict())
    other = _flat(load_config(CONF_DIR / "experiments" / f"{baseline}.yaml").to_dict())
    assert base.keys() == other.keys()
    differ = {key for key in base if base[key] != other[key]}
    assert other["loss.options"] == OPTION_DIFF.get(baseline, base["loss.options"])
    differ.discard("loss.options")
    assert differ <= ALLOWED_DIFF, f"{baseline} also changes {sorted(differ - ALLOWED_DIFF)}"
    assert {"name", "logging.run_dir", "loss.type"} <= differ  # own name, own run folder, own loss
    assert other["loss.type"] == loss_type


def test_group_swap_reaches_through_experiment_defaults():
    cfg = load_config(CONF_DIR / "experiments" / "uf_dpo.yaml", ["model=mixtral_8x7b", "parallel=mixtral_8x7b_h100_64"])
    assert cfg.model.preset == "mixtral-8x7b" and cfg.parallel.ep == 8 and cfg.loss.type == "dpo"
