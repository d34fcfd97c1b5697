"""Start-up checks: everything a run will read, checked once before any worker starts (one line, exit 2).

``nemo-lpo train`` / ``ref-logps`` / ``bridge-train`` call :func:`preflight` after the config has loaded and before
the process group, the model or the data loader exist; under a launcher that started the ranks itself (torchrun,
srun) only rank 0 runs it, so a mistake is reported once, not once per rank. ``eval`` and ``convert`` call
:func:`check_packed_dataset` / :func:`check_dist_checkpoint` on their arguments. Each check raises
:class:`PreflightError`, whose one-line message names the setting, its value, what is wrong and what to do; the
table of these mistakes is docs/troubleshooting.md (``tests/test_preflight.py`` plants every row). The checks reuse
the readers the run itself uses (``ListwiseDataset``, ``resolve_preset``, ``Config.data_parallel_size``,
``checked_layout``, megatron's TransformerConfig) so that what passes here is what the workers then accept.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from nemo_lpo.config import Config
from nemo_lpo.config.errors import PreflightError
from nemo_lpo.config.sources import train_prefixes, valid_prefixes
from nemo_lpo.data import layout as data_files
from nemo_lpo.data.dataset import ListwiseDataset
from nemo_lpo.io import LATEST, resolve_checkpoint
from nemo_lpo.model.build import resolve_use_te
from nemo_lpo.model.presets import ModelPreset
from nemo_lpo.model.resolve import build_transformer_config, resolve_preset
from nemo_lpo.train.flops import parameter_count
from nemo_lpo.train.lpo_model import checked_layout
from nemo_lpo.train.resume_check import check_resume

DIST_METADATA = "metadata.json"  # megatron's marker of a dist checkpoint (written with its shards)


def launch_rank_and_world(environ=None) -> tuple[int, int]:
    """(rank, world size) of this process as the launcher set them (torchrun / srun after setup_distributed_env)."""
    env = os.environ if environ is None else environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def _prefixes_in(folder: Path) -> list[str]:
    return sorted(str(folder / p.name[:-len(data_files.MANIFEST_SUFFIX)])
                  for p in folder.glob("*" + data_files.MANIFEST_SUFFIX))


def _closest_prefixes(prefix: str) -> str:
    folder = Path(prefix).parent
    if not folder.is_dir():
        return f"; {folder} does not exist either"
    close = difflib.get_close_matches(prefix, _prefixes_in(folder), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_packed_dataset(prefix: str, setting: str, preset: ModelPreset | None = None) -> ListwiseDataset:
    """The packed dataset at ``prefix``, complete and (with ``preset``) with token ids the model's vocabulary holds."""
    pack_hint = f"create it with `nemo-lpo pack --input FILE --output-prefix {prefix}` or fix the path"
    if not data_files.manifest_path(prefix).is_file():
        tokens_bin = data_files.indexed_files(data_files.part_prefix(prefix, data_files.TOKENS))[0]
        if Path(prefix).is_file():
            raise PreflightError(setting, prefix, "is a file, not a packed dataset (a prefix P names P.manifest.json, "
                                 "P.tokens.bin/.idx, P.rewards.bin/.idx)",
                                 f"pack it first: nemo-lpo pack --input {prefix} --output-prefix OUT, then give OUT")
        if Path(tokens_bin).is_file():
            raise PreflightError(setting, prefix, "is an incomplete packed dataset (its parts are there but not "
                                 f"{data_files.manifest_path(prefix).name}: the pack was interrupted)",
                                 "run the same `nemo-lpo pack` again")
        if Path(prefix).is_dir():
            inside = _prefixes_in(Path(prefix))
            holds = f"; it holds {', '.join(inside[:3])}" if inside else ""
            raise PreflightError(setting, prefix, "is a folder; a dataset prefix is the path stem given to `nemo-lpo "
                                 "pack --output-prefix` (DIR/train for DIR/train.manifest.json)" + holds,
                                 "give the prefix, not the folder")
        raise PreflightError(setting, prefix, f"no packed dataset there ({data_files.manifest_path(prefix)} not "
                             f"found{_closest_prefixes(prefix)})", pack_hint)
    for part in (data_files.TOKENS, data_files.REWARDS):
        for path in data_files.indexed_files(data_files.part_prefix(prefix, part)):
            if not Path(path).is_file():
                raise PreflightError(setting, prefix, f"incomplete packed dataset: {path} is missing",
                                     "copy the whole dataset again or re-run `nemo-lpo pack`")
    try:
        dataset = ListwiseDataset(prefix)
    except (ValueError, KeyError, TypeError, OSError, AssertionError) as err:
        raise PreflightError(setting, prefix, f"unreadable packed dataset ({type(err).__name__}: {err})",
                             "re-run `nemo-lpo pack` with this version of nemo-lpo") from None
    if preset is not None:
        _check_vocabulary(dataset, prefix, setting, preset)
    return dataset


def _check_vocabulary(dataset: ListwiseDataset, prefix: str, setting: str, preset: ModelPreset) -> None:
    name = dataset.manifest.get("tokenizer", {}).get("name", "?")
    fix = "pack the data with the model's tokenizer, or choose the model that goes with it (model.preset)"
    for what, token in (("pad", dataset.pad_id), ("EOS", dataset.eos_id)):
        if not 0 <= token < preset.vocab_size:
            raise PreflightError(setting, prefix, f"its tokenizer ({name})'s {what} id {token} is not below the "
                                 f"vocabulary size {preset.vocab_size} of model.preset={preset.name}", fix)
    if dataset.vocab_size > preset.vocab_size:
        raise PreflightError(setting, prefix, f"its tokenizer ({name}) has {dataset.vocab_size} tokens, more than "
                             f"the vocabulary of model.preset={preset.name} ({preset.vocab_size})", fix)


def check_dist_checkpoint(path: str, setting: str) -> Path:
    """The complete megatron dist checkpoint ``path`` names (a run's checkpoints/ folder: its newest); returns it."""
    given = Path(path)
    if not given.exists():
        raise PreflightError(setting, path, "not found", "give a megatron dist checkpoint (`nemo-lpo convert "
                             "hf-to-mcore --out`, a run's checkpoints/ folder or one of its step_* folders)")
    if not given.is_dir():
        raise PreflightError(setting, path, "is a file, not a checkpoint folder",
                             "give the checkpoint's folder (the one holding metadata.json)")
    try:
        resolved = resolve_checkpoint(given)
    except FileNotFoundError as err:
        raise PreflightError(setting, path, f"its {LATEST} marker is broken ({err})",
                             "give one complete step_* folder of it") from None
    if not (resolved / DIST_METADATA).is_file():
        raise PreflightError(setting, path, *_why_not_a_checkpoint(resolved))
    try:
        shards = {item.relative_path for item in FileSystemReader(str(resolved)).read_metadata().storage_data.values()}
    except Exception as err:  # a torch_dist checkpoint without a readable .metadata: its save did not finish
        raise PreflightError(setting, path, f"incomplete checkpoint: {resolved}/.metadata is unreadable "
                             f"({type(err).__name__})", "copy it again or give another checkpoint") from None
    missing = sorted(name for name in shards if not (resolved / name).is_file())
    if missing:
        raise PreflightError(setting, path, f"incomplete checkpoint: {len(missing)} of {len(shards)} shard files "
                             f"missing in {resolved} ({', '.join(missing[:3])})", "copy it again or give another "
                             "checkpoint")
    return resolved


def _why_not_a_checkpoint(folder: Path) -> tuple[str, str]:
    """(problem, fix) for a folder without megatron's metadata.json."""
    if folder.name.endswith(".tmp"):
        return ("an unfinished save (a .tmp folder)", "give the run's checkpoints/ folder or a complete step_* folder")
    if (folder / "config.json").is_file():
        return ("a Hugging Face model folder, not a megatron dist checkpoint",
                f"convert it first: nemo-lpo convert hf-to-mcore --hf {folder} --out CKPT, then give CKPT")
    if (folder / "checkpoints" / LATEST).is_file():
        return ("a run folder, not a checkpoint", f"give its checkpoints folder, {folder / 'checkpoints'}")
    if any(folder.glob("step_*")):
        return (f"holds step_* folders but no {LATEST} marker", "give one complete step_* folder of it")
    return ("not a megatron dist checkpoint (no metadata.json)", "give a folder written by `nemo-lpo convert "
            "hf-to-mcore` or by training")


def reference_identity(cfg: Config) -> str | None:
    """The reference checkpoint of ``cfg`` as an absolute path (a run folder: its newest step), None: random init."""
    path = cfg.reference.checkpoint or cfg.model.init_checkpoint
    return str(resolve_checkpoint(path).resolve()) if path else None


def check_reference_sidecar(cfg: Config, dataset: ListwiseDataset, prefix: str, setting: str) -> None:
    """Under ``reference.mode=precomputed``: ``dataset`` has the log-probs of THIS run's reference."""
    rerun = "run `nemo-lpo ref-logps` with this run's config (it rewrites the sidecar)"
    if not dataset.has_ref_logps:
        raise PreflightError(setting, prefix, f"reference.mode=precomputed but it has no reference log-probs "
                             f"({data_files.ref_meta_path(prefix).name} not found)", f"{rerun}, or set "
                             "reference.mode=online")
    meta = dataset.ref_meta or {}
    expected = reference_identity(cfg)
    recorded = meta.get("checkpoint_path")
    if recorded is None and meta.get("checkpoint"):  # sidecars written before the absolute path was recorded
        recorded = str(Path(meta["checkpoint"]).resolve())
    if recorded != expected or (expected is None and meta.get("init_seed") not in (None, cfg.train.seed)):
        made_by = recorded or f"a random init (seed {meta.get('init_seed')})"
        this = expected or f"a random init (seed {cfg.train.seed})"
        raise PreflightError(setting, prefix, f"its reference log-probs were made by {made_by}, but this run's "
                             f"reference (reference.checkpoint / model.init_checkpoint) is {this}", rerun)
    if meta.get("length_average", cfg.loss.length_average) != cfg.loss.length_average:
        raise PreflightError(setting, prefix, f"its reference log-probs were made with loss.length_average="
                             f"{str(meta['length_average']).lower()}, this run has "
                             f"{str(cfg.loss.length_average).lower()}", rerun)


def check_layout(cfg: Config, preset: ModelPreset, world: int, training: bool = True) -> None:
    """The parallel layout fits ``world`` processes and the model (megatron's own checks run last).

    ``training``: the run trains (not ``ref-logps``'s forward-only pass), so MoE under tp > 1 needs sequence
    parallelism: megatron-core 0.19.2's ``MoELayer.forward`` raises ValueError in training mode without it
    (megatron/core/transformer/moe/moe_layer.py:629-633), at the first step, on every rank.
    """
    p = cfg.parallel
    if world % (p.tp * p.pp):
        setting, value = ("parallel.tp", p.tp) if p.tp > 1 else ("parallel.pp", p.pp)
        raise PreflightError(setting, value, f"tp*pp = {p.tp}*{p.pp} does not divide the {world} process(es) of "
                             "this launch (a plain `nemo-lpo train` is 1 process)", "start a multiple of tp*pp "
                             "processes (torchrun --nproc-per-node N, srun -n N) or lower it")
    for count, what in ((preset.num_attention_heads, "attention heads"), (preset.num_query_groups, "query groups"),
                        (preset.vocab_size, "vocabulary entries")):
        if count % p.tp:
            raise PreflightError("parallel.tp", p.tp, f"{preset.name} has {count} {what}, not divisible by tp",
                                 "choose a tp that divides it")
    if preset.num_layers % p.pp:
        raise PreflightError("parallel.pp", p.pp, f"{preset.name} has {preset.num_layers} layers, not divisible "
                             "by pp", "choose a pp that divides it")
    if p.ep > 1 and not preset.is_moe:
        raise PreflightError("parallel.ep", p.ep, f"{preset.name} is dense (no experts to spread)", "set parallel.ep=1")
    if preset.is_moe and preset.num_experts % p.ep:
        raise PreflightError("parallel.ep", p.ep, f"{preset.name} has {preset.num_experts} experts, not divisible "
                             "by ep", "choose an ep that divides it")
    if p.sequence_parallel and p.tp == 1:
        raise PreflightError("parallel.sequence_parallel", True, "sequence parallelism shards over tensor-parallel "
                             "ranks and needs parallel.tp > 1", "set it to false, or raise parallel.tp")
    if training and preset.is_moe and p.tp > 1 and not p.sequence_parallel:
        raise PreflightError("parallel.sequence_parallel", False, f"{preset.name} is MoE and tp={p.tp}: megatron's "
                             "MoE layers need sequence parallelism under tensor parallelism in training (they "
                             "raise at the first step)", "set it to true")
    cfg.data_parallel_size(world)  # ep vs dp*tp, batch sizes vs dp and micro-batch, vpp micro-batches (ConfigError)
    try:
        build_transformer_config(cfg)
    except ValueError as err:
        raise PreflightError("parallel", f"tp={p.tp},pp={p.pp},ep={p.ep}", f"megatron refuses this layout for "
                             f"{preset.name}: {err}", "change the layout") from None


def check_run_folder(cfg: Config, preset: ModelPreset) -> None:
    """The run folder and the checkpoint folder can be created and written, with room for one checkpoint."""
    ckpt_setting = "checkpoint.dir" if cfg.checkpoint.dir else "logging.run_dir"
    for setting, folder in (("logging.run_dir", Path(cfg.logging.run_dir)), (ckpt_setting, cfg.checkpoint_dir())):
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            raise PreflightError(setting, folder, f"{existing} is a file, not a folder", f"choose another {setting}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PreflightError(setting, folder, f"{existing} is not writable by this user", f"choose another "
                                 f"{setting} or fix its permissions")
    params = parameter_count(preset)
    bytes_per_param = (2 + 4 if cfg.model.params_dtype == "bf16" else 4) + 8  # weights (+ fp32 main) + Adam moments
    need, where = params * bytes_per_param, _nearest_existing(cfg.checkpoint_dir())
    free = shutil.disk_usage(where).free
    if free < need:
        raise PreflightError(ckpt_setting, cfg.checkpoint_dir(), f"one checkpoint of {preset.name} "
                             f"({params / 1e9:.2f} B parameters with the Adam state) needs about "
                             f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free on {where}",
                             f"free space or point {ckpt_setting} at a larger file system")


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_checkpoints(cfg: Config) -> None:
    for setting in ("model.init_checkpoint", "reference.checkpoint"):
        section, key = setting.split(".")
        path = getattr(getattr(cfg, section), key)
        if path:
            check_dist_checkpoint(path, setting)


def preflight(cfg: Config, command: str, world: int, prefixes: list[str] | None = None) -> list[str]:
    """Check what ``command`` (train, ref-logps, bridge-train) will read; returns notes (allowed resume changes).

    ``prefixes``: ref-logps's ``--prefix`` (default: the run's datasets). Raises PreflightError or ConfigError.
    """
    _check_checkpoints(cfg)
    preset = resolve_preset(cfg)  # the recorded architecture of the checkpoints against model.preset (ConfigError)
    check_layout(cfg, preset, world, training=command != "ref-logps")
    checked_layout(cfg, resolve_use_te(cfg.model.transformer_impl))  # the batch layout the attention serves
    if cfg.data.train_prefix is None and not prefixes:
        raise PreflightError("data.train_prefix", None, "no training dataset given", "set data.train_prefix="
                             "PREFIX (a `nemo-lpo pack --output-prefix`)")
    train = [(f"data.train_prefix{_index(cfg.data.train_prefix, i)}", p)
             for i, p in enumerate(train_prefixes(cfg.data.train_prefix))]
    valid = [("data.valid_prefix", p) for p in valid_prefixes(cfg.data.valid_prefix)]
    sources = [("--prefix", p) for p in prefixes] if prefixes else train + valid
    datasets = [(setting, prefix, check_packed_dataset(prefix, setting, preset)) for setting, prefix in sources]
    if command == "ref-logps":
        for setting, prefix, _ in datasets:
            folder = _nearest_existing(Path(prefix).parent)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PreflightError(setting, prefix, f"its folder {folder} is not writable (the reference "
                                     "log-probs are written beside the dataset)", "copy the dataset somewhere "
                                     "writable")
        return []
    if cfg.reference.mode == "precomputed":
        for setting, prefix, dataset in datasets:
            check_reference_sidecar(cfg, dataset, prefix, setting)
    check_run_folder(cfg, preset)
    return check_resume(cfg)


def _index(value, i: int) -> str:
    """``[k]``: the position of a blend's i-th prefix in its ``[w1, p1, w2, p2, ...]`` list ('' for one prefix)."""
    return f"[{2 * i + 1}]" if isinstance(value, list) and len(value) > 1 else ""
