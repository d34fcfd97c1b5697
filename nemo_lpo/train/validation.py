"""Validation during training: the policy over held-out lists under the run's own parallel layout.

The validation lists (``data.valid_prefix``, the first ``train.eval_lists`` of them, in order) are cut into
micro-batches of ``data.micro_batch_size``; micro-batch j goes to data-parallel rank j % dp, and every rank runs
the same number of them (a rank short of one repeats its first and drops the result), because expert-parallel
all-to-alls span data-parallel ranks. Each rank runs megatron's forward-only schedule (the reference pass's
``run_forward_only``): the online reference first when ``reference.mode=online``, else the sets' reference
sidecars (``nemo-lpo ref-logps``). Under pipeline parallelism only the last stage has log-probs: those of its
tensor-parallel rank 0 are scattered into dense ``[lists, K]`` arrays that one all-reduce over the world sums,
so every rank holds all of them and computes the same metrics with ``nemo_lpo.metrics.heldout_metrics`` --
the function ``nemo-lpo eval`` reports with, so the numbers agree with it on the same checkpoint and lists.
"""

from __future__ import annotations

import numpy as np
import torch
from megatron.core import parallel_state as ps

from nemo_lpo.config import Config
from nemo_lpo.config.sources import source_names, valid_prefixes
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.io import latest_checkpoint
from nemo_lpo.metrics import heldout_metrics
from nemo_lpo.train.best import BestCheckpoint
from nemo_lpo.train.checkpoint import prune_checkpoints, step_dir_name
from nemo_lpo.train.feeder import CHUNK_MICROBATCHES, collate_uniform, microbatch_plan, run_pad_multiple
from nemo_lpo.train.summary import RunSummary, print_summary, write_summary

PREFIX = "val/"


class ValidationSet:
    """The capped validation lists of ``data.valid_prefix``: which lists, and their rewards / lengths.

    Args:
        cfg: the run configuration (``data.valid_prefix``, ``train.eval_lists``, ``reference.mode``).

    Raises:
        ValueError: a set has no reference sidecar under ``reference.mode=precomputed``.
    """

    def __init__(self, cfg: Config) -> None:

        prefixes = valid_prefixes(cfg.data.valid_prefix)
        self.names = source_names(prefixes)
        self.datasets = [ListwiseDataset(p) for p in prefixes]
        if cfg.reference.mode == "precomputed":
            missing = [p for p, ds in zip(prefixes, self.datasets, strict=True) if not ds.has_ref_logps]
            if missing:
                raise ValueError(f"reference.mode=precomputed but the validation set {missing[0]} has no reference "
                                 "log-probs: run `nemo-lpo ref-logps` with the same config (it covers "
                                 "data.valid_prefix too), or set reference.mode=online")
        cap = cfg.train.eval_lists
        self.members: list[tuple[int, int]] = []  # (set, list index), in order
        for s, ds in enumerate(self.datasets):
            take = len(ds) if cap is None else min(len(ds), cap - len(self.members))
            self.members += [(s, i) for i in range(take)]
        if not self.members:
            raise ValueError(f"data.valid_prefix {prefixes}: no validation lists")
        counts = [int(self.datasets[s].num_responses()[i]) for s, i in self.members]
        self.k_max = max(counts)
        n = len(self.members)
        self.rewards = np.zeros((n, self.k_max), dtype=np.float64)
        self.mask = np.zeros((n, self.k_max), dtype=bool)
        self.lengths = np.zeros((n, self.k_max), dtype=np.int64)
        for row, (s, i) in enumerate(self.members):
            item = self.datasets[s][i]
            k = len(item["response_ids"])
            self.rewards[row, :k] = item["rewards"]
            self.mask[row, :k] = True
            self.lengths[row, :k] = [len(r) for r in item["response_ids"]]
        self.set_of_row = np.array([s for s, _ in self.members])

    def __len__(self) -> int:
        return len(self.members)

    def describe(self) -> str:
        """Which lists these are, for the summary: ``the first 16 of 64 lists of valid (train.eval_lists)``."""
        total = sum(len(ds) for ds in self.datasets)
        which = f"all {total} lists" if len(self.members) == total else \
            f"the first {len(self.members)} of {total} lists (train.eval_lists)"
        return f"{which} of {', '.join(self.names)}"

    def items(self, rows: range) -> list[dict]:
        """The dataset items of ``rows`` (positions in the validation order)."""
        return [self.datasets[s][i] for s, i in (self.members[r] for r in rows)]


class Validator:
    """Runs the validation of one training run (call :meth:`run` on every rank at the same step).

    Args:
        cfg: the run configuration.
        lpo: the run's ``LPOModel`` (its policy chunks, and the online reference when configured).
        device: where batches go.
    """

    def __init__(self, cfg: Config, lpo, device: torch.device) -> None:
        self.cfg = cfg
        self.lpo = lpo
        self.device = device
        self.lists = ValidationSet(cfg)
        self.pad_id = self.lists.datasets[0].pad_id
        self.multiple = run_pad_multiple(cfg)
        self.collator = lpo.layout.collator(self.pad_id, self.multiple)
        self.plan = microbatch_plan(len(self.lists), cfg.data.micro_batch_size, ps.get_data_parallel_rank(),
                                    ps.get_data_parallel_world_size())
        self.contributes = lpo.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
        zeros = np.zeros(self.lists.rewards.shape, dtype=np.float64)  # the loss takes these lists: known at start-up
        self.metrics(zeros, zeros, np.ones(len(self.lists), bool))

    def _batches(self, entries: list[range | None]) -> list[dict]:
        """Collated micro-batches on the device (a None entry repeats the rank's first real one)."""
        mbs = self.cfg.data.micro_batch_size
        fallback = next((e for e in self.plan if e is not None), range(min(mbs, len(self.lists))))
        groups = [self.lists.items(rows if rows is not None else fallback) for rows in entries]
        if self.cfg.parallel.vpp > 1:  # one shape per schedule call (see feeder.collate_uniform)
            groups = [items + [items[-1]] * (mbs - len(items)) for items in groups]
            collated = collate_uniform(self.lpo.layout, self.pad_id, self.multiple, groups)
        else:
            collated = [self.collator(items) for items in groups]
        online = self.lpo.computes_reference
        return [{k: v.to(self.device) for k, v in batch.items() if not (online and k == "ref_logps")}
                for batch in collated]

    def _forward(self) -> tuple[np.ndarray, np.ndarray]:
        """[lists, K] policy and reference log-probs, identical on every rank."""
        n, k_max = len(self.lists), self.lists.k_max
        dense = torch.zeros(2, n, k_max, dtype=torch.float64, device=self.device)
        length_average = self.cfg.loss.length_average
        for c in range(0, len(self.plan), CHUNK_MICROBATCHES):
            entries = self.plan[c:c + CHUNK_MICROBATCHES]
            batches = self._batches(entries)
            if self.lpo.computes_reference:
                self.lpo.attach_online_reference(batches)
            policy = self.lpo.task.run_forward_only(self.lpo.module, batches, length_average)
            if not self.contributes:
                continue
            for rows, batch, logps in zip(entries, batches, policy, strict=True):
                if rows is None:
                    continue
                b, k = len(rows), logps.shape[1]
                dense[0, rows.start:rows.stop, :k] = logps[:b].double()
                dense[1, rows.start:rows.stop, :k] = batch["ref_logps"][:b].double()
        torch.distributed.all_reduce(dense)  # one contributor per list: the sum is the value
        values = dense.cpu().numpy()
        return values[0], values[1]

    def run(self) -> dict[str, float]:
        """Validate the current policy; returns ``val/...`` metrics (per set too, ``val/NAME/...``, when several)."""
        was_training = [module.training for module in self.lpo.modules]
        for module in self.lpo.modules:
            module.eval()
        try:
            policy, reference = self._forward()
        finally:
            for module, mode in zip(self.lpo.modules, was_training, strict=True):
                module.train(mode)
        out = {f"{PREFIX}{k}": v for k, v in self.metrics(policy, reference, np.ones(len(self.lists), bool)).items()}
        if len(self.lists.names) > 1:
            for s, name in enumerate(self.lists.names):
                rows = self.lists.set_of_row == s
                if rows.any():
                    out.update({f"{PREFIX}{name}/{k}": v for k, v in self.metrics(policy, reference, rows).items()})
        return out

    def metrics(self, policy: np.ndarray, reference: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        """``heldout_metrics`` of the selected rows, with the run's loss and β."""
        lists, loss = self.lists, self.cfg.loss
        try:
            return heldout_metrics(
                torch.from_numpy(policy[rows]), torch.from_numpy(reference[rows]),
                torch.from_numpy(lists.rewards[rows]), torch.from_numpy(lists.mask[rows]), beta=loss.beta,
                response_lengths=torch.from_numpy(lists.lengths[rows]), loss_type=loss.type,
                loss_options=loss.options)
        except ValueError as err:
            raise ValueError(f"data.valid_prefix: the validation lists do not fit loss.type={loss.type}: {err}") \
                from None


class ValidationSchedule:
    """When the trainer validates, what it keeps (``checkpoint.keep_best``) and the end-of-run summary.

    Validation runs before the first step of a fresh run (step 0), after every ``train.eval_interval``-th step
    and after the run's last step; its ``val/`` metrics join that step's metrics line.

    Args:
        trainer: the ``loop.Trainer`` (its config, model, checkpoint folder, ``save``).
    """

    def __init__(self, trainer) -> None:

        cfg = trainer.cfg
        self.trainer = trainer
        self.validator = Validator(cfg, trainer.lpo, trainer.device) if valid_prefixes(cfg.data.valid_prefix) \
            else None
        ck = cfg.checkpoint
        self.best = BestCheckpoint(trainer.ckpt_root, ck.keep_best, ck.keep_best_mode, trainer.rank) \
            if ck.keep_best else None
        self.summary = RunSummary(0)
        self.last_validated: int | None = None

    def resumed(self, step: int, *, from_checkpoint: bool) -> None:
        """The run starts at ``step``: the summary counts from there; a resumed run reads its best record back.

        A fresh run in a folder that holds an older run's ``best.json`` starts a new record: the old one names weights
        this run may overwrite (the same step folder).
        """
        self.summary = RunSummary(step)
        if self.best is not None and from_checkpoint:
            self.best.load()

    def protect(self) -> tuple[str, ...]:
        """Checkpoint folder names keep-last-N must not delete (the best)."""
        return () if self.best is None or self.best.name is None else (self.best.name,)

    def validate(self, step: int) -> dict:
        """Run the validation now (every rank); returns its ``val/`` metrics."""
        metrics = self.validator.run()
        self.last_validated = step
        self.summary.add_validation(step, metrics)
        return metrics

    def at_start(self, step: int) -> dict | None:
        """The step-0 validation of a fresh run (None when there is nothing to do)."""
        if self.validator is None or step != 0:
            return None
        return self.validate(0)

    def after_step(self, step: int, last_step: int, record: dict) -> None:
        """Add the validation to ``record`` when ``step`` is due (interval or last step); count the step."""
        self.summary.add_step(record)
        if self.validator is None:
            return
        interval = self.trainer.cfg.train.eval_interval
        if step == last_step or (interval and step % interval == 0):
            record.update(self.validate(step))

    def keep_best(self, step: int, record: dict) -> None:
        """After the step's checkpointing: save (if not yet saved) and mark this step when it is the new best."""
        if self.best is None or self.last_validated != step or step == 0 or not self.best.improves(record):
            return
        trainer = self.trainer
        if trainer.saved_step != step:
            trainer.save(protect=(*self.protect(), step_dir_name(step)))
        self.best.accept(step, record[self.best.metric])
        if trainer.rank == 0:  # the previous best, if keep-last-N no longer covers it
            prune_checkpoints(trainer.ckpt_root, trainer.cfg.checkpoint.keep_last, self.protect())
        torch.distributed.barrier()

    def finish(self, step: int) -> dict:
        """The end-of-run summary (printed and written to ``<run_dir>/summary.json`` by rank 0)."""
        trainer = self.trainer
        latest = latest_checkpoint(trainer.ckpt_root) if (trainer.ckpt_root / "latest").is_file() else None
        checkpoints = {"dir": str(trainer.ckpt_root), "latest": str(latest) if latest else None,
                       "keep_best": self.best.summary() if self.best is not None else None}
        summary = self.summary.to_dict(step, checkpoints)
        summary["validation"]["lists"] = self.validator.lists.describe() if self.validator is not None else None
        summary["metrics"] = str(trainer.run_dir / "metrics.jsonl")
        if trainer.rank == 0:
            write_summary(summary, trainer.run_dir / "summary.json")
            print_summary(summary)
        return summary
