# Shared by the runs/*.sh scripts: launch a stage on NGPU GPUs (torchrun) or one process, and plan.
#   NGPU=8 bash runs/paper_extrapolation.sh     (default: all visible GPUs, else 1 process)
#   PLAN=1 bash runs/paper_extrapolation.sh     only the plan: every stage's resolved config, tokens,
#                                               FLOPs, estimated hours, data coverage (runs/plan.py)
# Without PLAN=1 a script first prints its plan (and stops if a stage would repeat its data, unless
# ALLOW_EPOCHS=1), then runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
export NGPU
PLAN=${PLAN:-0}
if [ "$PLAN" = 1 ]; then
  PLAN_FILE=$(mktemp)
  trap 'rm -f "$PLAN_FILE"' EXIT
elif [ -z "${PLANNED:-}" ]; then   # print the whole plan up front; a bad stage stops the run here
  PLANNED=1 PLAN=1 bash "$0" "$@"
fi
launch() {  # launch SCRIPT ARGS...: torchrun on NGPU processes, or plain python for one; PLAN=1: record it
  if [ "$PLAN" = 1 ]; then
    printf '%q ' "$@" >> "$PLAN_FILE"; echo >> "$PLAN_FILE"
    return
  fi
  local script=$1; shift
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" "$script" "$@"
  else
    python "$script" "$@"
  fi
}
prepare() {  # prepare SCRIPT ARGS...: one process (data building); skipped by PLAN=1
  if [ "$PLAN" != 1 ]; then python "$@"; fi
}
plan() {  # plan "text": what the script is about to do; with PLAN=1, then exit after the stage table
  if [ "$PLAN" = 1 ]; then
    echo "================================================================================"
    echo "$1"
    echo "================================================================================"
  fi
}
finish() {  # end of a script: PLAN=1 prints the stage table (runs/plan.py); an error stops a run
  if [ "$PLAN" = 1 ]; then python runs/plan.py "$PLAN_FILE"; fi
}
