"""``nemo-lpo train`` and ``nemo-lpo ref-logps``: thin commands over the trainer (cheap to import).

Both run as one rank of a torchrun or srun launch (or a plain single process): torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK; under srun they are taken from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with
MASTER_ADDR / MASTER_PORT from the environment (the sbatch script exports them; default: the first node
of the job, port 29500).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def setup_distributed_env(environ: dict | None = None) -> dict:
    """Fill torch.distributed's env variables from SLURM's when not launched by torchrun; returns the env."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 1:
        return env
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = "127.0.0.1"
        if nodelist:
            try:
                hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                       text=True, check=True).stdout.split()
                addr = hosts[0] if hosts else addr
            except (OSError, subprocess.CalledProcessError):
                addr = nodelist.split(",")[0]
        env["MASTER_ADDR"] = addr
    env.setdefault("MASTER_PORT", "29500")
    return env


def _load(args):
    from nemo_lpo.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "checkpoint", None):
        overrides.append(f"reference.checkpoint={args.checkpoint}")
    return load_config(args.config, overrides)


def _run(args, body) -> int:
    """Load the config, run the start-up check (rank 0 of a launch only), then ``body(cfg)`` with one-line errors."""
    from nemo_lpo import quiet
    from nemo_lpo.config import ConfigError

    setup_distributed_env()
    try:
        cfg = _load(args)
        from nemo_lpo.batch.layouts import UnsupportedLayoutError
        from nemo_lpo.model.parallel import check_cuda_or_cpu_allowed
        from nemo_lpo.train.adapters import require_peft
        from nemo_lpo.train.preflight import launch_rank_and_world, preflight

        check_cuda_or_cpu_allowed(cfg.parallel.allow_cpu)  # no silent CPU fallback on a GPU machine
        require_peft(cfg.peft, cfg.model.init_checkpoint)  # adapters need Megatron-Bridge's PEFT and a base: before any launch
        rank, world = launch_rank_and_world()
        if rank == 0 or args.check:  # once per launch: the other ranks wait in the process group, the launcher stops them
            prefixes = [args.prefix] if getattr(args, "prefix", None) else None
            for note in preflight(cfg, args.command, world, prefixes):
                print(f"nemo-lpo {args.command}: {note}", flush=True)
        if args.check:
            print(f"nemo-lpo {args.command}: start-up check passed for {world} process(es)")
            return 0
    except ConfigError as err:
        print(f"nemo-lpo {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except (UnsupportedLayoutError, RuntimeError) as err:
        print(f"nemo-lpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    from nemo_lpo.train.worker_errors import report_worker_error

    try:
        body(cfg)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException; one line from the failing rank
        return report_worker_error(err, args.command, cfg.logging.run_dir, rank, quiet.verbose_requested())
    return 0


def _train(args) -> int:
    def body(cfg):
        from nemo_lpo.train.loop import train

        train(cfg)

    return _run(args, body)


def _ref_logps(args) -> int:
    def body(cfg):
        from nemo_lpo.model.parallel import destroy_parallel
        from nemo_lpo.train.loop import init_parallel
        from nemo_lpo.train.reference import write_reference

        init_parallel(cfg)
        try:
            write_reference(cfg, [args.prefix] if args.prefix else None)
        finally:
            destroy_parallel()

    return _run(args, body)


CHECK_HELP = ("only run the start-up check (datasets, checkpoints, layout, run folder; docs/troubleshooting.md) and "
              "exit: e.g. on a login node before sbatch, with WORLD_SIZE=N for the layout of N processes")


def register(subparsers) -> None:
    """Add the ``train`` and ``ref-logps`` commands."""
    train = subparsers.add_parser(
        "train", help="train a policy with a listwise loss (LPO, LPO-abs, DPO, ...)",
        description="Train with megatron-core; launch with torchrun or srun for several processes. "
                    "Example: nemo-lpo train conf/tiny_cpu.yaml data.train_prefix=data/lists parallel=tp2",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("config", help="YAML config (may list `defaults:` layers from conf/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides (optim.lr=1e-5) or group=name (parallel=tp2)")
    train.add_argument("--check", action="store_true", help=CHECK_HELP)
    train.set_defaults(func=_train)

    ref = subparsers.add_parser(
        "ref-logps", help="store the reference model's log-probs of every response beside a packed dataset",
        description="Run the frozen reference (model.init_checkpoint, or --checkpoint) over the run's datasets (the "
                    "train prefix or every source of a blend, and the validation prefixes) with the config's "
                    "parallel layout and write the sidecars read by reference.mode=precomputed.",
    )
    ref.add_argument("config", help="YAML config (the training config of the run)")
    ref.add_argument("overrides", nargs="*", help="key=value overrides")
    ref.add_argument("--prefix", help="only this packed dataset prefix (default: every source of data.train_prefix, "
                                      "then data.valid_prefix)")
    ref.add_argument("--checkpoint", help="reference dist checkpoint (default: model.init_checkpoint)")
    ref.add_argument("--check", action="store_true", help=CHECK_HELP)
    ref.set_defaults(func=_ref_logps)
