"""The training loop: set up parallel state, model, data, optimizer; resume; step, log, checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from nemo_lpo.config import Config, dump_config
from nemo_lpo.io import latest_checkpoint
from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
from nemo_lpo.train.checkpoint import describe_layout, layout, load_checkpoint, save_checkpoint, saved_layout
from nemo_lpo.train.feeder import BatchFeeder
from nemo_lpo.train.flops import step_flops
from nemo_lpo.train.lpo_model import LPOModel, layout_of
from nemo_lpo.train.metrics import MetricsLogger, peak_tflops
from nemo_lpo.train.optimizer import build_optimizer, total_steps
from nemo_lpo.train.step import train_step
from nemo_lpo.train.validation import ValidationSchedule
from nemo_lpo.train.worker_errors import check_finite_loss, mark


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(cfg: Config) -> None:
    """Initialise torch.distributed and megatron's groups for ``cfg.parallel`` (gloo on CPU)."""
    p = cfg.parallel
    initialize_parallel(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, seed=cfg.train.seed, backend=p.backend,
                       vpp=p.vpp, allow_cpu=p.allow_cpu)
    cfg.data_parallel_size(torch.distributed.get_world_size())  # clear error for an impossible layout


STOP_FILE_ENV = "NEMO_LPO_STOP_FILE"  # the Slurm launcher creates this file when the time limit is near


class StopRequest:
    """Graceful stop: SIGUSR1 or the file named by $NEMO_LPO_STOP_FILE; decided collectively after a step."""

    def __init__(self) -> None:
        self.signalled = False
        self.stop_file = os.environ.get(STOP_FILE_ENV)
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (embedded use): the stop file still works
            pass

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (an all-reduce, so every rank agrees)."""
        local = self.signalled or bool(self.stop_file and Path(self.stop_file).exists())
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    """Everything one rank needs to train; ``run()`` does the steps (call ``init_parallel`` first).

    Args:
        cfg: the validated configuration.
    """

    def __init__(self, cfg: Config) -> None:

        self.cfg = cfg
        self.rank = torch.distributed.get_rank()
        self.device = _device()
        layout = layout_of(cfg)
        self.feeder = BatchFeeder(cfg, layout, dp_rank=ps.get_data_parallel_rank(),
                                  dp_size=ps.get_data_parallel_world_size(), device=self.device)
        if cfg.reference.mode == "precomputed" and not self.feeder.dataset.has_ref_logps:
            raise ValueError(f"reference.mode=precomputed but {cfg.data.train_prefix} has no reference log-probs: "
                             "run `nemo-lpo ref-logps` on it first, or set reference.mode=online")
        self.lpo = LPOModel(cfg, layout=layout)
        self.total_steps = total_steps(cfg, self.feeder.steps_per_epoch)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.lpo.model, self.total_steps)
        self.ckpt_root = cfg.checkpoint_dir()
        self.step = 0
        self.saved_step: int | None = None  # the step of this run's newest complete checkpoint (same on every rank)
        self.run_dir = Path(cfg.logging.run_dir)
        self.logger = MetricsLogger(self.run_dir, self.total_steps, self.rank, tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project, wandb_name=cfg.logging.wandb_name,
                                    config=cfg.to_dict(), log_interval=cfg.logging.log_interval)
        self.validation = ValidationSchedule(self)  # validation, keep_best, the end-of-run summary

    def resume(self) -> int:
        """Load ``<checkpoint dir>/latest`` when resuming is on and it exists; returns the step reached."""
        path = latest_checkpoint(self.ckpt_root) if self.cfg.checkpoint.resume else None
        if path is not None:
            self._warn_random_reference(path)
            self.step = load_checkpoint(path, self.lpo, self.optimizer, self.scheduler, self.feeder)
            self.saved_step = self.step
            if self.rank == 0:
                print(f"resumed from {path} at step {self.step}", flush=True)
        self.logger.truncate_after(self.step)
        self.validation.resumed(self.step, from_checkpoint=path is not None)
        return self.step

    def _warn_random_reference(self, path: Path) -> None:
        """Warn when an online reference is a random init that the new layout draws differently.

        The reference is not in the checkpoint: it is rebuilt from ``model.init_checkpoint`` (layout-free), or,
        without one, from the seeded random init, which differs between pipeline / expert layouts.
        """
        if self.lpo.reference is None or self.cfg.model.init_checkpoint or self.cfg.reference.checkpoint:
            return
        saved, now = saved_layout(path), layout()
        if self.rank == 0 and any(saved[k] != now[k] for k in ("tp", "pp", "ep")):
            print(f"WARNING: resuming {path} ({describe_layout(saved)}) under {describe_layout(now)} with "
                  "reference.mode=online and no model.init_checkpoint: the reference is this layout's seeded random "
                  "init, not the saved run's; set model.init_checkpoint for a layout-independent reference",
                  flush=True)

    def save(self, protect: tuple[str, ...] | None = None) -> Path:
        """Save a checkpoint of the current step (collective); ``protect``: folders keep-last-N keeps (the best)."""
        path = save_checkpoint(self.ckpt_root, self.step, self.lpo, self.optimizer, self.scheduler, self.feeder,
                               self.cfg.to_dict(), keep_last=self.cfg.checkpoint.keep_last,
                               protect=self.validation.protect() if protect is None else protect)
        self.saved_step = self.step
        return path

    def record(self, result) -> dict:
        """The metrics line of one step (throughput, and TFLOP/s + MFU on GPU)."""
        rec = {**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr, "tokens": result.tokens,
               "tokens_per_s": result.tokens / max(result.step_time, 1e-9), "step_time": result.step_time}
        rec.update({f"time/{k}": v for k, v in result.timings.items()})
        rec.update(self.lpo.param_counts)  # params/trainable (adapters only under peft) and params/total
        peak = peak_tflops()
        if peak is not None:
            flops = step_flops(self.lpo.preset, result.tokens, result.attended_pairs,
                               reference_forward=self.lpo.computes_reference,
                               recompute=self.cfg.model.recompute == "full")
            tflops = flops / result.step_time / torch.distributed.get_world_size() / 1e12
            rec.update(tflops_per_gpu=tflops, mfu=tflops / peak)
        return rec

    def run(self, max_steps: int | None = None) -> dict:
        """Train up to the run's last step (or ``max_steps``, for tests); returns the last metrics line."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        last_step = min(self.total_steps, max_steps or self.total_steps)
        ck = self.cfg.checkpoint
        record: dict = {}
        stop = StopRequest()
        start_metrics = self.validation.at_start(self.step)
        if start_metrics is not None:
            self.logger.log(self.step, start_metrics)
        while self.step < last_step:
            microbatches = self.feeder.next_global_batch()
            result = train_step(self.lpo, self.optimizer, self.scheduler, microbatches)
            check_finite_loss(result.metrics)  # before a NaN step is logged or checkpointed
            self.step += 1
            record = self.record(result)
            record.update(self.feeder.source_counts)
            self.validation.after_step(self.step, last_step, record)
            self.logger.log(self.step, record)
            if ck.save_interval and self.step % ck.save_interval == 0 and self.step < self.total_steps:
                self.save()
            self.validation.keep_best(self.step, record)
            if stop.requested(self.device):
                if self.rank == 0:
                    print(f"stop requested: checkpointing step {self.step} and exiting", flush=True)
                if self.saved_step != self.step:
                    self.save()
                break
        if ck.save_at_end and self.step == self.total_steps and self.step > 0 \
                and self.saved_step != self.step:
            self.save()
        self.logger.close()
        self.validation.finish(self.step)
        return record


def train(cfg: Config) -> dict:
    """Run training for ``cfg`` in this process (one rank of torchrun / srun, or a single process)."""
    init_parallel(cfg)
    trainer, stage = None, "start-up"
    try:
        trainer = Trainer(cfg)
        stage = "resume"
        trainer.resume()
        stage = None
        return trainer.run()
    except BaseException as err:  # the step it happened at, for the one-line report (train.worker_errors)
        mark(err, stage or f"step {trainer.step + 1}")
        raise
    finally:
        destroy_parallel()
