#!/bin/bash
# A SLURM batch job that trains for as long as it takes, a few hours at a time: submit it once
# with `sbatch examples/slurm_requeue.sh`. Every start (the first, a requeue after the time
# limit or a preemption, a torchrun restart after a lost worker) runs the same command, and
# `--resume auto` decides: a fresh run, or the exact continuation of the checkpoint.
#
# Five minutes before the time limit SLURM sends SIGUSR1 to this script (--signal=B:...); the
# script forwards SIGTERM to the training (srun passes it to torchrun, torchrun to its
# workers), which finishes the current step, writes checkpoints/latest.pt and exits with 75;
# the script then puts the job back in the queue with `scontrol requeue`. A preemption
# (PreemptMode=REQUEUE) sends SIGTERM to every process of the job: the same happens, and SLURM
# requeues the job itself. Ctrl-C-like SIGINT works too (exit 130).
#
#SBATCH --job-name=mcsc-acdc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -u
RUN=${RUN:-runs/acdc}        # on storage every node (and every requeued job) can read
DATA=${DATA:-/data/ACDC}

# torchrun gives its workers this long to stop after forwarding SIGTERM, then SIGKILLs them:
# a step, the checkpoint write (seconds at the paper recipe's size) and a margin.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120

srun --kill-on-bad-exit=1 \
  torchrun --standalone --nproc_per_node=4 --max-restarts=3 \
  -m mcsc train --data "$DATA" --resume auto --no-progress --out "$RUN" &
child=$!

stop_requested=0
stop() {
  stop_requested=1
  echo "$(date -u +%T) stop requested: the training checkpoints after its current step"
  kill -TERM "$child" 2>/dev/null
}
trap stop USR1 TERM INT

# `wait` returns early when a trapped signal arrives: wait again until the training is gone
wait "$child"
status=$?
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
  status=$?
done

if [ -f "$RUN/metrics.json" ] && [ "$stop_requested" = 0 ]; then
  echo "training finished (status $status)"
  exit "$status"
fi
if [ "$stop_requested" = 1 ]; then
  echo "$(date -u +%T) stopped (status $status); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || true  # a preempted job is requeued by SLURM already
  exit 0
fi
# status 4: a lost rank or loader worker after torchrun's restarts ran out; 2: bad input;
# 3: a NaN loss. Resubmitting this script continues from the last checkpoint (--resume auto).
echo "training failed with status $status"
exit "$status"
