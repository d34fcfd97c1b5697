#!/usr/bin/env bash
# The launcher every recipe (recipes/*.sbatch) execs inside its Slurm allocation.
#
# It starts one task per GPU (or per CPU slot) with srun, in an NGC/pyxis container or directly in the
# repository's virtual environment, and runs `nemo-lpo $NEMO_LPO_COMMAND $NEMO_LPO_CONFIG key=value...`.
# Each task gets the torch.distributed variables from Slurm's own:
#   MASTER_ADDR = first host of $SLURM_JOB_NODELIST, MASTER_PORT (derived from the job id),
#   RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID.
# Time limit: the sbatch line `--signal=B:USR1@SECS` makes Slurm send USR1 to this shell; the trap then
# asks the trainer to checkpoint and exit: it creates $NEMO_LPO_STOP_FILE (exported to every task; the
# trainer checks it after every step, all ranks agree, it saves a checkpoint and exits 0). No signal goes
# to the tasks by default: Slurm signals every process of a step, and the helper processes of the trainer
# (megatron's checkpoint writer, data workers) die of a USR1 they do not handle, breaking the very save
# that was asked for (seen on the local Slurm test). NEMO_LPO_STOP_SIGNAL=USR1 sends one anyway.
# Once the tasks are gone the launcher requeues the job (`scontrol requeue`). The requeued job runs this script again and the trainer resumes from the
# latest checkpoint in the run folder (`checkpoint.resume=true`).
#
# Settings (environment; the recipes set topology defaults, anything here can be overridden):
#   NEMO_LPO_CONFIG        config YAML (resolved in the working directory)              [required]
#   NEMO_LPO_OVERRIDES     extra `key=value` overrides, space separated                 ['']
#   NEMO_LPO_COMMAND       nemo-lpo sub-command: train, ref-logps, ...                  [train]
#   NEMO_LPO_CONTAINER     container image for `srun --container-image` (pyxis); empty: no container
#   NEMO_LPO_CONTAINER_MOUNTS   extra pyxis mounts SRC:DST[,SRC:DST...] (the output root is always mounted)
#   NEMO_LPO_CONTAINER_WORKDIR  working directory inside the container                  [/workspace/nemo-lpo]
#   NEMO_LPO_HOME          the repository checkout (no-container runs, output default)  [this script's ../]
#   NEMO_LPO_VENV          virtual environment used without a container                 [$NEMO_LPO_HOME/.venv]
#   NEMO_LPO_OUTPUT_ROOT   where run folders go (a shared file system on a cluster)     [$NEMO_LPO_HOME/runs]
#   NEMO_LPO_RUN_NAME      run folder name; a new job with the same name resumes it     [$SLURM_JOB_NAME]
#   NEMO_LPO_STOP_SIGNAL   also send this signal to every task process on USR1          ['': file only]
#   NEMO_LPO_MAX_RESTARTS  stop requeueing after this many restarts                     [50]
#   NEMO_LPO_MASTER_ADDR / NEMO_LPO_MASTER_PORT   rendezvous [first node of the job / 20000 + job id % 20000]
#   NEMO_LPO_DRY_RUN=1     print the srun command instead of running it
# Layout: $NEMO_LPO_OUTPUT_ROOT/$NEMO_LPO_RUN_NAME/ is the run folder (logging.run_dir: checkpoints,
# metrics); its logs/$SLURM_JOB_ID/ holds this job's logs (launcher.log, tasks.log, job.txt), appended to
# across requeues.
set -Eeuo pipefail

: "${SLURM_JOB_ID:?recipes/launch.sh runs inside a Slurm job: submit a recipe with sbatch (recipes/*.sbatch)}"
: "${NEMO_LPO_CONFIG:?set NEMO_LPO_CONFIG to a config YAML (the recipes set one)}"

HOME_DIR="${NEMO_LPO_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
COMMAND="${NEMO_LPO_COMMAND:-train}"
CONTAINER="${NEMO_LPO_CONTAINER:-}"
OUTPUT_ROOT="${NEMO_LPO_OUTPUT_ROOT:-$HOME_DIR/runs}"
mkdir -p "$OUTPUT_ROOT"
OUTPUT_ROOT="$(cd "$OUTPUT_ROOT" && pwd)"  # absolute (a relative one is taken from the submit folder)
RUN_NAME="${NEMO_LPO_RUN_NAME:-${SLURM_JOB_NAME:-nemo-lpo}}"
RUN_DIR="$OUTPUT_ROOT/$RUN_NAME"
LOG_DIR="$RUN_DIR/logs/$SLURM_JOB_ID"
STOP_FILE="$LOG_DIR/stop-requested"
STOP_SIGNAL="${NEMO_LPO_STOP_SIGNAL:-}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
MAX_RESTARTS="${NEMO_LPO_MAX_RESTARTS:-50}"
DRY_RUN="${NEMO_LPO_DRY_RUN:-0}"

mkdir -p "$LOG_DIR"
# Everything this shell prints also goes to the job's log folder (Slurm's own --output stays as set).
if [[ $DRY_RUN != 1 ]]; then
    exec > >(tee -a "$LOG_DIR/launcher.log") 2>&1
fi
log() { printf '[nemo-lpo launch %(%F %T)T job %s restart %s] %s\n' -1 "$SLURM_JOB_ID" "$RESTARTS" "$*"; }

# Not MASTER_ADDR/MASTER_PORT from the environment: sbatch exports the submitting shell's, which may be stale.
MASTER_ADDR="${NEMO_LPO_MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" | head -n1)}"
MASTER_PORT="${NEMO_LPO_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
export NEMO_LPO_STOP_FILE="$STOP_FILE" NEMO_LPO_LOG_DIR="$LOG_DIR" NEMO_LPO_RUN_DIR="$RUN_DIR"
rm -f "$STOP_FILE"  # a requeued job starts without the previous run's stop request

# The trainer's arguments: the config, the run folder and resume (same on every requeue), then the user's.
read -r -a user_overrides <<<"${NEMO_LPO_OVERRIDES:-}"
train_args=("$COMMAND" "$NEMO_LPO_CONFIG")
if [[ $COMMAND == train ]]; then
    train_args+=("logging.run_dir=$RUN_DIR" "checkpoint.resume=true")
fi
train_args+=("${user_overrides[@]}")

srun_args=(--kill-on-bad-exit=1 --label --unbuffered --output="$LOG_DIR/tasks.log" --open-mode=append)
if [[ -n $CONTAINER ]]; then
    mounts="$OUTPUT_ROOT:$OUTPUT_ROOT${NEMO_LPO_CONTAINER_MOUNTS:+,$NEMO_LPO_CONTAINER_MOUNTS}"
    srun_args+=(--container-image="$CONTAINER" --container-mounts="$mounts"
        --container-workdir="${NEMO_LPO_CONTAINER_WORKDIR:-/workspace/nemo-lpo}" --no-container-mount-home)
else
    venv="${NEMO_LPO_VENV:-$HOME_DIR/.venv}"
    if [[ -x $venv/bin/nemo-lpo ]]; then
        export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
    elif [[ $DRY_RUN != 1 ]] && ! command -v nemo-lpo >/dev/null; then
        log "no container and no nemo-lpo: neither $venv/bin/nemo-lpo nor one on PATH (run 'make setup')"
        exit 2
    fi
    cd "$HOME_DIR"
fi
# Per task: torch.distributed's variables from Slurm's, then the trainer replaces the shell.
# shellcheck disable=SC2016  # expanded by each task's bash, not here
task_env='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'
cmd=(srun "${srun_args[@]}" bash -c "$task_env" nemo-lpo nemo-lpo "${train_args[@]}")

if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

{
    echo "command: ${cmd[*]}"
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT nodes=${SLURM_JOB_NODELIST:-} ntasks=${SLURM_NTASKS:-}"
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null || true
} >>"$LOG_DIR/job.txt"

stop_requested=0
srun_pid=""
# shellcheck disable=SC2329  # invoked by the USR1 trap
on_usr1() {
    stop_requested=1
    log "USR1 (time limit near): asking the trainer to checkpoint and exit ($STOP_FILE${STOP_SIGNAL:+, SIG$STOP_SIGNAL})"
    touch "$STOP_FILE"
    if [[ -n $STOP_SIGNAL && -n $srun_pid ]]; then
        # without --batch/--full, scancel signals the job's steps (the tasks), not this shell
        scancel --signal="$STOP_SIGNAL" "$SLURM_JOB_ID" 2>/dev/null \
            || kill -s "$STOP_SIGNAL" "$srun_pid" 2>/dev/null || true
    fi
}
trap on_usr1 USR1

log "start: ${cmd[*]}"
log "run folder $RUN_DIR, logs $LOG_DIR, master $MASTER_ADDR:$MASTER_PORT"
"${cmd[@]}" &
srun_pid=$!
# wait returns early (status > 128) when a trap runs; keep waiting for srun itself.
rc=0
wait "$srun_pid" || rc=$?
while ((rc > 128)) && kill -0 "$srun_pid" 2>/dev/null; do
    rc=0
    wait "$srun_pid" || rc=$?
done
log "tasks finished with status $rc"

if ((stop_requested)); then
    if ((RESTARTS >= MAX_RESTARTS)); then
        log "not requeueing: $RESTARTS restarts reached NEMO_LPO_MAX_RESTARTS=$MAX_RESTARTS"
        exit 1
    fi
    ((rc == 0)) || log "the trainer did not exit cleanly (status $rc): resuming from its last saved checkpoint"
    log "requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1))); it resumes from $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
