#!/usr/bin/env bash
# The whole study in miniature, on a CPU (2 cores, ~33 minutes: pre-training 16, mid-training 5, RL
# 4 x 2.5, evaluation 3): the tiny Qwen2 (1.41M parameters) pre-trained on op 2-3 (forward mode),
# mid-trained on 20% op 2-3 + 80% op 4-5, then GRPO with an outcome reward and with the strict
# process reward on its edge of competence (op 4-5) and on too-hard ops (op 8-10), and every model
# evaluated on forward problems of op 2-10 (pass@k, outcome and process-verified). The tiny world's
# bands: ID = op 2-3, OOD-edge = op 4-5, OOD-hard = op 6-10 (the paper's: 2-10 / 11-14 / 15-20).
#
#   bash runs/tiny.sh                  # writes out/tiny/report/ (summary.md + plots)
#   SMOKE=1 OUT=/tmp/t bash runs/tiny.sh   # every stage for a few steps (CI's end-to-end check, ~3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/tiny}
SMOKE=${SMOKE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$SMOKE" = 1 ]; then   # a few steps of each stage, on a small dataset
  PRE="--max_tokens=40960 --data_tokens=200000 --eval_interval=5 --ckpt_interval=5 --progress=False"
  MID="--max_tokens=16384 --data_tokens=100000 --eval_interval=2 --ckpt_interval=2 --progress=False"
  RL="--max_steps=2 --prompts_per_step=4 --minibatch_prompts=4 --eval_every=0 --max_response_len=96"
  EVAL="--eval_ops=[2,3,5,8] --eval_per_op_template=1 --n_samples=2 --max_new_tokens=96 --progress=False"
else
  PRE=""; MID=""; RL=""; EVAL=""
fi
echo "== tiny study: outputs in $OUT (SMOKE=$SMOKE) =="
# 1. pre-training on op 2-3 (builds $OUT/data_op2-3 first)
python pretrain.py tiny_pretrain --out_dir=$OUT/base --data_dir=$OUT/data_op2-3 $PRE
# 2. mid-training on the edge of competence (same tokenizer as the base, checked)
python midtrain.py tiny_midtrain --init_from=$OUT/base --out_dir=$OUT/mid --data_dir=$OUT/data_mid $MID
# 3. RL: the edge (op 4-5) with an outcome and a strict process reward; too-hard ops (8-10); and
#    RL after mid-training
python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_edge_outcome --op_min=4 --op_max=5 --reward=outcome $RL
python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_edge_strict --op_min=4 --op_max=5 --reward=strict $RL
python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_hard_outcome --op_min=8 --op_max=10 --reward=outcome $RL
python rl.py tiny_rl --init_from=$OUT/mid --out_dir=$OUT/mid_rl_edge_outcome --op_min=4 --op_max=5 --reward=outcome $RL
# 4. evaluation of every model on the same held-out problems, and the report
python evaluate.py tiny_eval --data_dir=$OUT/data_op2-3 --out_dir=$OUT/report \
  --ckpts=$OUT/base,$OUT/mid,$OUT/rl_edge_outcome,$OUT/rl_edge_strict,$OUT/rl_hard_outcome,$OUT/mid_rl_edge_outcome \
  --labels=base,mid,rl_edge_outcome,rl_edge_strict,rl_hard_outcome,mid+rl_edge $EVAL
echo "report: $OUT/report/summary.md and $OUT/report/*.png"
