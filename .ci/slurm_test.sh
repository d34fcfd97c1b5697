#!/usr/bin/env bash
# A real single-node Slurm on localhost, then the tiny CPU recipe submitted to it with sbatch.
#
#   bash .ci/slurm_test.sh            # needs root and Debian's package registry (apt)
#
# What it does (docs/megatron-notes.md §3 has the measured bring-up it follows):
#   1. installs Debian's slurmctld slurmd slurm-client munge (--no-install-recommends) when missing;
#   2. starts munged, slurmctld and slurmd in the foreground, in the background, on 127.0.0.1,
#      with every state/spool/log/pid path under $NEMO_LPO_SLURM_DIR (default /tmp/nemo-lpo-slurm);
#   3. a trivial batch job (2 tasks through srun) proves the cluster runs jobs;
#   4. the tiny CPU recipe (recipes/tiny_cpu.sbatch, no container, the repo's .venv): the job must
#      complete and write metrics and a checkpoint; then it is requeued (scontrol requeue) and the
#      second run must resume from that checkpoint and train further; then the same recipe runs again
#      without a signal, and the requeued run's per-step metrics must equal that uninterrupted run's exactly;
#   5. stops the daemons it started, by PID, always (trap), and prints the daemons' logs on failure.
# Idempotent: daemons left by an earlier killed run are stopped (by their recorded PIDs) first.
# Environment: NEMO_LPO_SLURM_DIR (state folder), NEMO_LPO_SLURM_KEEP=1 (keep the folder afterwards),
# NEMO_LPO_SLURM_ONLY_SMOKE=1 (stop after step 3), NEMO_LPO_SLURM_TIMEOUT (seconds per job, default 600).
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NEMO_LPO_SLURM_DIR:-/tmp/nemo-lpo-slurm}"
JOB_TIMEOUT="${NEMO_LPO_SLURM_TIMEOUT:-600}"
PY="${NEMO_LPO_PYTHON:-$REPO/.venv/bin/python}"
NODE="$(hostname -s)"
T0=$SECONDS

log() { printf '[slurm_test %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts munged/slurmctld/slurmd)"

# ---- stop what an earlier run of this script left (only PIDs it recorded, only if still that daemon)
stop_recorded() {
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        pidfile="$STATE/pids/$name.pid"
        [[ -f $pidfile ]] || continue
        pid="$(<"$pidfile")"
        if [[ -n $pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

dump_logs() {
    local f
    for f in "$STATE"/log/*.log; do
        [[ -f $f ]] || continue
        echo "----- $f (last 60 lines)"
        tail -n 60 "$f"
    done
}

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        log "exit status $rc; daemon logs follow"
        dump_logs || true
        squeue 2>/dev/null || true
    fi
    [[ -n ${HOLD_PID:-} ]] && kill "$HOLD_PID" 2>/dev/null
    stop_recorded || true
    if [[ $rc -eq 0 && "${NEMO_LPO_SLURM_KEEP:-0}" != 1 ]]; then rm -rf "$STATE"; fi
    log "daemons stopped (rc=$rc)"
    exit "$rc"
}

stop_recorded
rm -rf "$STATE"
mkdir -p "$STATE"/{pids,log,ctld,spool,munge,jobs}
trap on_exit EXIT
trap 'exit 143' TERM INT HUP

# ---- 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (apt, --no-install-recommends)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >"$STATE/log/apt.log" 2>&1 \
        || { cat "$STATE/log/apt.log"; die "apt-get install failed"; }
fi
log "slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo '?'), munge $(dpkg-query -W -f '${Version}' munge 2>/dev/null || echo '?')"

# ---- 2a. munged, on a socket of its own so a system munged (if any) is left alone
MUNGE_SOCKET="$STATE/munge/munge.socket.2"
chown munge:munge "$STATE/munge"
chmod 0755 "$STATE/munge"
[[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (Debian's munge post-install writes it)"
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --force --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" \
    >"$STATE/log/munged.log" 2>&1 &
echo $! >"$STATE/pids/munged.pid"
for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
    || { cat "$STATE/munge/munged.log" 2>/dev/null; die "munge round trip failed"; }
log "munged up"

# ---- 2b. slurm.conf: one node (this machine), one partition
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | head -n1 | sed -E \
    's/.*CPUs=([0-9]+).*SocketsPerBoard=([0-9]+).*CoresPerSocket=([0-9]+).*ThreadsPerCore=([0-9]+).*RealMemory=([0-9]+).*/\1 \2 \3 \4 \5/')
[[ $CPUS =~ ^[0-9]+$ && $MEM =~ ^[0-9]+$ ]] || die "could not parse 'slurmd -C': $(slurmd -C | head -n1)"
MEM=$((MEM * 9 / 10))
export SLURM_CONF="$STATE/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=nemolpo
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=5,bf_interval=5
MailProg=/bin/true
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 2c. daemons in the foreground, in the background; PIDs recorded for the trap
slurmctld -D -c -f "$SLURM_CONF" >"$STATE/log/slurmctld.out.log" 2>&1 &
echo $! >"$STATE/pids/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >"$STATE/log/slurmd.out.log" 2>&1 &
echo $! >"$STATE/pids/slurmd.pid"
state=""
for _ in $(seq 150); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
    [[ $state == idle ]] && break
    sleep 0.2
done
[[ $state == idle ]] || die "node $NODE not idle after 30 s (state '${state:-none}')"
log "cluster up: node $NODE idle ($CPUS CPUs, ${MEM} MB)"

# ---- 3. a trivial job: batch script + a 2-task srun step
cd "$STATE/jobs"
# shellcheck disable=SC2016  # expanded by the job's shell
out="$(sbatch --parsable --wait -n 2 -t 2 -o smoke-%j.out --wrap 'srun -l bash -c "echo task \$SLURM_PROCID of \$SLURM_NTASKS"')" \
    || die "trivial job failed: $(cat smoke-*.out 2>/dev/null)"
jid="${out%%;*}"
grep -q "task 1 of 2" "smoke-$jid.out" || die "trivial job $jid: srun did not run 2 tasks: $(cat "smoke-$jid.out")"
log "trivial job $jid completed (2 srun tasks)"

[[ "${NEMO_LPO_SLURM_ONLY_SMOKE:-0}" == 1 ]] && { log "PASS (smoke only)"; exit 0; }
if [[ "${NEMO_LPO_SLURM_HOLD:-0}" == 1 ]]; then  # developer aid: keep the cluster up until killed
    log "holding the cluster: export SLURM_CONF=$SLURM_CONF; kill $$ to stop it"
    sleep infinity &
    HOLD_PID=$!
    wait "$HOLD_PID"
fi

# ---- 4. the tiny CPU recipe: train, USR1 (as at the time limit) -> checkpoint + requeue -> resume -> done
[[ -x $REPO/.venv/bin/nemo-lpo ]] || die "$REPO/.venv/bin/nemo-lpo missing: run 'make setup' first"
WORK="$STATE/work"
RUN="$WORK/runs/tiny"
MAX_STEPS=8
SAVE_INTERVAL=3
mkdir -p "$WORK"
cd "$WORK"
# At USR1 the launcher creates $NEMO_LPO_STOP_FILE; the trainer checks it after each step, saves a
# checkpoint of that step and exits 0, then the launcher requeues the job.

log "packing the demo's listwise data (nemo-lpo pack) for the job"
"$REPO/.venv/bin/nemo-lpo" pack --input "$REPO/nemo_lpo/demo/data/train.jsonl" --output-prefix "$WORK/data/train" \
    --no-progress >"$WORK/pack.log" 2>&1 \
    || { cat "$WORK/pack.log"; die "packing the demo data failed"; }

export NEMO_LPO_OUTPUT_ROOT="$WORK/runs" NEMO_LPO_RUN_NAME=tiny NEMO_LPO_CONTAINER=""
export NEMO_LPO_OVERRIDES="data.train_prefix=$WORK/data/train reference.mode=online train.max_steps=$MAX_STEPS \
checkpoint.save_interval=$SAVE_INTERVAL logging.tensorboard=false"
unset NEMO_LPO_STOP_SIGNAL  # the launcher's default: the stop file only
jid="$(sbatch --parsable "$REPO/recipes/tiny_cpu.sbatch")" || die "sbatch of recipes/tiny_cpu.sbatch failed"
jid="${jid%%;*}"
log "submitted recipes/tiny_cpu.sbatch as job $jid (2 tasks, $MAX_STEPS steps, checkpoint every $SAVE_INTERVAL)"

show_job_logs() {
    local f
    for f in "$WORK"/slurm-*.out "$RUN"/logs/*/launcher.log "$RUN"/logs/*/tasks.log; do
        [[ -f $f ]] || continue
        echo "----- $f (last 40 lines)"
        tail -n 40 "$f"
    done
}
job_field() {  # job_field JOBID Field -> value from `scontrol show job` ('' once the job is gone)
    scontrol show job "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

# wait for the first periodic checkpoint while the job is still running, then signal the batch shell
deadline=$((SECONDS + JOB_TIMEOUT))
while [[ ! -f $RUN/checkpoints/latest ]]; do
    state="$(job_field "$jid" JobState)"
    [[ $state == RUNNING || $state == PENDING || $state == CONFIGURING ]] \
        || { show_job_logs; die "job $jid is '$state' before its first checkpoint"; }
    ((SECONDS < deadline)) || { show_job_logs; die "no checkpoint after ${JOB_TIMEOUT}s"; }
    sleep 0.5
done
at_signal="$(<"$RUN/checkpoints/latest")"
[[ "$(job_field "$jid" JobState)" == RUNNING ]] || { show_job_logs; die "job $jid ended before it could be signalled"; }
scancel --batch --signal=USR1 "$jid"
log "checkpoint $at_signal written; sent USR1 to the batch shell (what --signal=B:USR1@60 does before the limit)"

# wait for the requeued job to finish
while :; do
    state="$(job_field "$jid" JobState)"
    restarts="$(job_field "$jid" Restarts)"
    case "$state" in
        "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) break ;;
    esac
    ((SECONDS < deadline)) || { show_job_logs; die "job $jid not finished after ${JOB_TIMEOUT}s (state $state)"; }
    sleep 1
done
exit_code="$(job_field "$jid" ExitCode)"
log "job $jid: state ${state:-gone} restarts ${restarts:-?} exit ${exit_code:-?}"

# ---- checks
fail=()
[[ $state == COMPLETED ]] || fail+=("job state is '${state:-gone}', expected COMPLETED")
[[ ${restarts:-} == 1 ]] || fail+=("Restarts=${restarts:-?}, expected 1 (one requeue)")
launcher_log="$RUN/logs/$jid/launcher.log"
tasks_log="$RUN/logs/$jid/tasks.log"
grep -q "requeueing job $jid" "$launcher_log" 2>/dev/null || fail+=("launcher.log has no requeue")
grep -q "job $jid restart 1\] start" "$launcher_log" 2>/dev/null || fail+=("launcher.log has no second start")
grep -q "job $jid restart 0\] tasks finished with status 0" "$launcher_log" 2>/dev/null \
    || fail+=("the trainer did not exit cleanly (status 0) on the stop request")
stop_step="$(sed -n 's/^0: stop requested: checkpointing step \([0-9]*\).*/\1/p' "$tasks_log" 2>/dev/null | head -n1)"
[[ -n $stop_step ]] || fail+=("the trainer did not report 'stop requested: checkpointing step N' in tasks.log")
resumed="$(sed -n 's/^0: resumed from .*\(step_[0-9]*\) at step \([0-9]*\).*/\1 \2/p' "$tasks_log" 2>/dev/null | tail -n1)"
read -r resumed_dir resumed_step <<<"${resumed:-none 0}"
if [[ $resumed_dir == none ]]; then
    fail+=("the requeued run did not resume from a checkpoint (no 'resumed from' in tasks.log)")
elif ((resumed_step < 10#${at_signal#step_} || resumed_step >= MAX_STEPS)); then
    fail+=("resumed at step $resumed_step: expected >= ${at_signal#step_} (checkpoint at the signal) and < $MAX_STEPS")
elif [[ -n $stop_step && $resumed_step != "$stop_step" ]]; then
    fail+=("resumed at step $resumed_step, but the trainer checkpointed step $stop_step when asked to stop")
fi
"$PY" - "$RUN" "$MAX_STEPS" <<'PYEOF' || fail+=("metrics/checkpoint check failed (above)")
import json, math, pathlib, sys
run, max_steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [rec["step"] for rec in lines]
assert steps == list(range(1, max_steps + 1)), f"metrics.jsonl steps {steps}, expected 1..{max_steps} once each"
for rec in lines:
    assert math.isfinite(rec["loss"]) and "rewards/accuracies" in rec, f"bad metrics line {rec}"
latest = (run / "checkpoints" / "latest").read_text().strip()
assert latest == f"step_{max_steps:07d}", f"latest checkpoint {latest}, expected step_{max_steps:07d}"
assert (run / "checkpoints" / latest / "metadata.json").is_file(), f"{latest} has no metadata.json"
print(f"metrics.jsonl: steps 1..{max_steps}, finite losses; latest checkpoint {latest}")
PYEOF
# ---- the same job again without a signal: the requeued run's per-step metrics must equal it exactly
STRAIGHT="$WORK/runs/tiny_straight"
export NEMO_LPO_RUN_NAME=tiny_straight
jid2="$(sbatch --parsable "$REPO/recipes/tiny_cpu.sbatch")" || die "sbatch of the uninterrupted run failed"
jid2="${jid2%%;*}"
log "submitted the same recipe without a signal as job $jid2 (the uninterrupted curve)"
while :; do
    state2="$(job_field "$jid2" JobState)"
    case "$state2" in
        "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) break ;;
    esac
    ((SECONDS < deadline + JOB_TIMEOUT)) || { show_job_logs; die "job $jid2 not finished (state $state2)"; }
    sleep 1
done
[[ $state2 == COMPLETED ]] || fail+=("the uninterrupted job $jid2 is '${state2:-gone}', expected COMPLETED")
"$PY" - "$RUN" "$STRAIGHT" <<'PYEOF' || fail+=("the requeued run's metrics differ from the uninterrupted run's (above)")
import json, pathlib, sys
def lines(run):
    timing = lambda k: k.startswith("time/") or k in ("step_time", "tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if not timing(k)}
            for line in (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
requeued, straight = lines(sys.argv[1]), lines(sys.argv[2])
for got, want in zip(requeued, straight, strict=True):
    assert got == want, f"step {want['step']}: requeued {got} vs uninterrupted {want}"
print(f"requeued == uninterrupted on every metric of steps 1..{len(straight)} "
      f"(losses {[round(line['loss'], 6) for line in straight]})")
PYEOF
if ((${#fail[@]})); then
    show_job_logs
    for f in "${fail[@]}"; do log "check failed: $f"; done
    die "${#fail[@]} check(s) failed"
fi
log "job $jid: USR1 after $at_signal; the trainer checkpointed step $stop_step and exited 0; requeued;"
log "resumed from $resumed_dir (step $resumed_step); completed $MAX_STEPS steps (metrics 1..$MAX_STEPS, latest step_$(printf %07d "$MAX_STEPS"))"
log "the requeued run's metrics equal the uninterrupted job $jid2's on every step"
log "PASS"
