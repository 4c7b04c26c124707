#!/usr/bin/env bash
# The tiny study's RL on the edge at far more volume than runs/tiny.sh's arm (80x the samples drawn,
# 10x those trained on), with the levers of issue #28 (RESEARCH.md): 64 samples per prompt, an update
# on the 8 of each group with the largest reward variance (PODS), pass@4 advantages (pass@k training),
# the strict reward, 300 steps of 16 prompts. It starts
# from runs/tiny.sh's base (pre-trained here if missing) and reports it beside the base on the same
# held-out problems (the edge sampled 64 times). Timings: README.
#
#   bash runs/tiny_long.sh                  # writes out/tiny/report_long/ (summary.md + plots)
#   SMOKE=1 OUT=/tmp/t bash runs/tiny_long.sh   # a few steps of each stage (CI, after runs/tiny.sh's smoke)
# Re-running resumes: a finished stage says so and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/tiny}
SMOKE=${SMOKE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$SMOKE" = 1 ]; then
  PRE="--max_tokens=40960 --data_tokens=200000 --eval_interval=5 --ckpt_interval=5 --progress=False"
  RL="--max_steps=2 --prompts_per_step=4 --minibatch_prompts=4 --max_response_len=96 --group_size=8"
  EVAL="--eval_ops=[2,3,5,8] --n_samples=2 --n_samples_by_op={} --max_new_tokens=96 --bootstrap=50 --progress=False"
else
  PRE=""; RL=""; EVAL=""
fi
echo "== tiny study, long RL on the edge: outputs in $OUT (SMOKE=$SMOKE) =="
stage() { echo "== $1 ($(date +%H:%M:%S))"; }
stage "1. the base (runs/tiny.sh's: pre-training on op 2-4 + 5% op 5-6; skipped when finished)"
python pretrain.py tiny_pretrain --out_dir=$OUT/base --data_dir=$OUT/data_base $PRE
stage "2. RL on the edge (op 5-6), strict reward: G 64, update on 8 per group, pass@4 advantages, 300 steps"
python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_edge_long --op_min=5 --op_max=6 --reward=strict \
  --group_size=64 --update_size=8 --adv_estimator=passk --passk_k=4 --max_steps=300 $RL
stage "3. evaluation of the base and the long run on the held-out problems, and the report"
python evaluate.py tiny_eval --data_dir=$OUT/data_base --out_dir=$OUT/report_long $EVAL \
  --ckpts=$OUT/base,$OUT/rl_edge_long --labels=base,rl_edge_long
stage "done"
echo "report: $OUT/report_long/summary.md and $OUT/report_long/*.png"
