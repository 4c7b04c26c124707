#!/usr/bin/env bash
# The prepared one-GPU check (~6 minutes): a pass/fail table for the paper-scale paths (bf16 compiled MFU,
# per-document attention, sampling, one full paper RL step, a small end-to-end pipeline). See runs/gpu_check.py.
#   bash runs/gpu_check.sh                  # all checks
#   bash runs/gpu_check.sh doc_mask rl_step # some
set -euo pipefail
cd "$(dirname "$0")/.."
exec python runs/gpu_check.py "$@"
