# slurm/lib.sh - the body shared by distill.sbatch (one allocation split by node role) and
# distill-het.sbatch (heterogeneous job). Sourced by them after they have set:
#   TEACHER_NODES_LIST, STUDENT_NODES_LIST   node names of each role (first teacher = this batch host)
#   TEACHER_SRUN, STUDENT_SRUN               srun options (arrays) that select each role's nodes
#   RANKS_PER_NODE, GPUS_PER_NODE            student ranks per student node; GPUs per node
# Steps: prepare the run dir -> Ray head here (+ workers on the other teacher nodes, + a resource-less
# raylet on each student node) -> teacher pool (launch.teacher, here) -> student ranks (srun, one task
# per rank) -> summary. SIGUSR1 (the --signal warning) is forwarded to the ranks, which checkpoint and
# exit with 75; the job then requeues itself and the next start resumes (trainer.resume=auto).
# With teacher.source=none or cached (the run's config.yaml) no Ray and no teacher pool start: the
# teacher nodes stay idle, so give such runs one small teacher node.
set -euo pipefail

PYTHON=${PYTHON:-python3}
JOB_KEY=${SLURM_HET_JOB_ID:-$SLURM_JOB_ID}           # the same after `scontrol requeue`
RUN_DIR=${RUN_DIR:-$DISTILL_ROOT/runs/slurm-$JOB_KEY}  # stable across requeues: resume finds it
RAY_TMP=${RAY_TMP:-/tmp/ray-distill-$JOB_KEY}        # private Ray dir: never someone else's session
PREEMPTED_EXIT=75                                      # launch/student.py: checkpointed on SIGUSR1
export PYTHONPATH=$DISTILL_ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0  # token auth on: nodes share ~/.ray/auth_token
cd "$DISTILL_ROOT"

say() { echo "[distill-slurm $(date +%H:%M:%S)] $*"; }
node_ip() {  # a node's address as Slurm knows it (NodeAddr), as an IPv4 address
    local addr
    addr=$(scontrol show node "$1" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}'
}
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

read -r -a TEACHERS <<< "$TEACHER_NODES_LIST"
read -r -a STUDENTS <<< "$STUDENT_NODES_LIST"
NUM_RANKS=$(( ${#STUDENTS[@]} * RANKS_PER_NODE ))
HEAD_IP=$(node_ip "${TEACHERS[0]}")
HEAD=$HEAD_IP:${RAY_PORT:-$(free_port)}
say "job $JOB_KEY (restart ${SLURM_RESTART_COUNT:-0}): teachers ${TEACHERS[*]}, students ${STUDENTS[*]}" \
    "x $RANKS_PER_NODE ranks, run dir $RUN_DIR"

PIDS=()
cleanup() {  # always: stop the teacher pool, then every Ray process this job started
    set +e
    touch "$RUN_DIR/teacher.stop" 2> /dev/null
    [ -n "${TEACHER_PID:-}" ] && wait "$TEACHER_PID"
    for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null; done
    wait
    rm -rf "$RAY_TMP"
}
trap cleanup EXIT
PREEMPTED=0
SRUN_PID=
on_warning() {
    PREEMPTED=1
    say "SIGUSR1: time is nearly up; asking the ranks to checkpoint"
    [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2> /dev/null || true  # srun forwards it to every task
}
trap on_warning USR1
requeue() { say "requeueing job $JOB_KEY"; scontrol requeue "$JOB_KEY"; exit 0; }

# 1. check everything and write the run directory (resumes from its newest checkpoint if it has one)
"$PYTHON" -m launch.train launch.mode=prepare trainer.resume=auto "$@" \
    run_dir="$RUN_DIR" hydra.run.dir="$RUN_DIR/hydra" trainer.num_ranks="$NUM_RANKS"
[ "$PREEMPTED" = 1 ] && requeue
TEACHER_SOURCE=$("$PYTHON" -c 'import sys; from omegaconf import OmegaConf
print(OmegaConf.load(sys.argv[1]).teacher.source)' "$RUN_DIR/config.yaml")

if [ "$TEACHER_SOURCE" != live ]; then
    say "teacher.source=$TEACHER_SOURCE: no Ray and no teacher pool"
else
    # 2. Ray: head here, workers on the other teacher nodes, an empty raylet on every student node
    ray start --head --node-ip-address="$HEAD_IP" --port="${HEAD##*:}" --temp-dir="$RAY_TMP" \
        --num-cpus="${TEACHER_CPUS:-${SLURM_CPUS_ON_NODE:-1}}" --num-gpus="$GPUS_PER_NODE" \
        --include-dashboard=false --block > "$RUN_DIR/ray-head.log" 2>&1 &
    PIDS+=($!)
    if [ ${#TEACHERS[@]} -gt 1 ]; then
        srun "${TEACHER_SRUN[@]}" --overlap --nodes=$((${#TEACHERS[@]} - 1)) --ntasks=$((${#TEACHERS[@]} - 1)) --relative=1 \
            ray start --address="$HEAD" --num-cpus="${TEACHER_CPUS:-${SLURM_CPUS_ON_NODE:-1}}" \
            --num-gpus="$GPUS_PER_NODE" --block > "$RUN_DIR/ray-teacher-workers.log" 2>&1 &
        PIDS+=($!)
    fi
    srun "${STUDENT_SRUN[@]}" --overlap --ntasks="${#STUDENTS[@]}" --ntasks-per-node=1 \
        ray start --address="$HEAD" --num-cpus=0 --num-gpus=0 --block > "$RUN_DIR/ray-students.log" 2>&1 &
    PIDS+=($!)

    # 3. the teacher pool (waits for all nodes to join Ray, loads the teacher, writes teacher.json)
    rm -f "$RUN_DIR/teacher.json"
    until "$PYTHON" -c 'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR")' "$HEAD" \
        > /dev/null 2>&1; do
        kill -0 "${PIDS[0]}" 2> /dev/null || { cat "$RUN_DIR/ray-head.log"; exit 1; }
        sleep 1
    done
    DISTILL_RAY_ADDRESS=$HEAD DISTILL_RAY_NODES=$((${#TEACHERS[@]} + ${#STUDENTS[@]})) \
        "$PYTHON" -m launch.teacher "$RUN_DIR" &
    TEACHER_PID=$!
    until [ -f "$RUN_DIR/teacher.json" ]; do
        kill -0 "$TEACHER_PID" 2> /dev/null || { say "the teacher pool failed to start"; exit 1; }
        [ "$PREEMPTED" = 1 ] && requeue
        sleep 1
    done
fi

# 4. the student ranks: one srun task per rank; rank 0's node hosts the torch.distributed store
export MASTER_ADDR=$(node_ip "${STUDENTS[0]}") MASTER_PORT=${MASTER_PORT:-$(free_port)}
srun "${STUDENT_SRUN[@]}" --overlap --ntasks="$NUM_RANKS" --ntasks-per-node="$RANKS_PER_NODE" --kill-on-bad-exit=1 \
    "$PYTHON" -m launch.student "$RUN_DIR" &
SRUN_PID=$!
while :; do  # `wait` returns early when a signal trap runs; wait again until srun is gone
    rc=0
    wait "$SRUN_PID" || rc=$?
    kill -0 "$SRUN_PID" 2> /dev/null || break
done
say "student step exited with $rc"
if [ "$rc" = "$PREEMPTED_EXIT" ]; then requeue; fi
[ "$rc" = 0 ] || exit "$rc"

# 5. summary (summary.json, exported student under $RUN_DIR/student)
"$PYTHON" -m launch.summary "$RUN_DIR"
