# Shared by the runs/*.sh scripts: launch a stage on NGPU GPUs (torchrun) or one process.
#   NGPU=8 bash runs/paper_extrapolation.sh     (default: all visible GPUs, else 1 process)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
launch() {  # launch SCRIPT ARGS...: torchrun on NGPU processes, or plain python for one
  local script=$1; shift
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" "$script" "$@"
  else
    python "$script" "$@"
  fi
}
plan() {  # plan "text": print what the script is about to do, and how long it should take
  echo "================================================================================"
  echo "$1"
  echo "GPUs: $NGPU (set NGPU=... to change). Estimates assume H100s at ~40% MFU for training"
  echo "and are dominated by sampling for RL and evaluation; scale by 8/NGPU."
  echo "================================================================================"
}
