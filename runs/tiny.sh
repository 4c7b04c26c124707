#!/usr/bin/env bash
# The whole study in miniature, on a CPU (2 cores): the tiny Qwen2 (1.41M parameters) pre-trained on
# op 2-4 of the tiny world (3 places x 3 items, no distractor statements; forward mode) with a 5%
# exposure to op 5-6, mid-trained on 20% op 2-4 + 80% op 5-6, then GRPO on its edge of competence
# (op 5-6) with a process-aware reward (strict: answer and every step right) and with the outcome
# reward, on its own ID ops (2-4) and on far-too-hard ops (8-10), and after mid-training; every model
# evaluated on the base's held-out forward problems of op 2-8 (pass@k, outcome and process-verified,
# 95% intervals). The tiny bands: ID = op 2-4, OOD-edge = op 5-6, OOD-hard = op 7-8 (the paper's:
# 2-10 / 11-14 / 15-20). Timings: README.
#
#   bash runs/tiny.sh                  # writes out/tiny/report/ (summary.md + plots)
#   SMOKE=1 OUT=/tmp/t bash runs/tiny.sh   # every stage for a few steps (CI's end-to-end check)
# Re-running resumes: a finished stage says so and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/tiny}
SMOKE=${SMOKE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$SMOKE" = 1 ]; then   # a few steps of each stage, on a small dataset
  PRE="--max_tokens=40960 --data_tokens=200000 --eval_interval=5 --ckpt_interval=5 --progress=False"
  MID="--max_tokens=16384 --data_tokens=100000 --eval_interval=2 --ckpt_interval=2 --progress=False"
  RL="--max_steps=2 --prompts_per_step=4 --minibatch_prompts=4 --max_response_len=96"
  EVAL="--eval_ops=[2,3,5,8] --n_samples=2 --n_samples_by_op={} --max_new_tokens=96 --bootstrap=50 --progress=False"
else
  PRE=""; MID=""; RL=""; EVAL=""
fi
echo "== tiny study: outputs in $OUT (SMOKE=$SMOKE) =="
stage() { echo "== $1 ($(date +%H:%M:%S))"; }
# Two 1-thread runs at a time use 2 cores better than one 2-thread run for matrices this small; each
# backgrounded run writes $OUT/logs/NAME.log and a failure stops the script, naming the log.
PIDS=(); NAMES=()
bg() { local name=$1; shift; mkdir -p "$OUT/logs"; OMP_NUM_THREADS=1 "$@" > "$OUT/logs/$name.log" 2>&1 &
       PIDS+=($!); NAMES+=("$name"); echo "   $name: $OUT/logs/$name.log"; }
join() { for i in "${!PIDS[@]}"; do wait "${PIDS[$i]}" || { echo "${NAMES[$i]} failed:"; tail -n 20 "$OUT/logs/${NAMES[$i]}.log"; exit 1; }
         tail -n 1 "$OUT/logs/${NAMES[$i]}.log"; done; PIDS=(); NAMES=(); }
stage "1. pre-training on op 2-4 (builds $OUT/data_base first)"
python pretrain.py tiny_pretrain --out_dir=$OUT/base --data_dir=$OUT/data_base $PRE
stage "2. mid-training on the edge of competence (20% op 2-4 + 80% op 5-6) | RL on the edge, strict (process-aware) reward"
bg mid python midtrain.py tiny_midtrain --init_from=$OUT/base --out_dir=$OUT/mid --data_dir=$OUT/data_mid $MID
bg rl_edge_strict python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_edge_strict --op_min=5 --op_max=6 --reward=strict $RL
join
stage "3. RL on the edge with the outcome reward | RL on the ID ops"
bg rl_edge_outcome python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_edge_outcome --op_min=5 --op_max=6 --reward=outcome $RL
bg rl_id python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_id --op_min=2 --op_max=4 --reward=strict $RL
join
stage "4. RL on far-too-hard ops | RL on the edge after mid-training"
bg rl_hard python rl.py tiny_rl --init_from=$OUT/base --out_dir=$OUT/rl_hard --op_min=8 --op_max=10 --reward=strict $RL
bg mid_rl_edge python rl.py tiny_rl --init_from=$OUT/mid --out_dir=$OUT/mid_rl_edge --op_min=5 --op_max=6 --reward=strict $RL
join
stage "5. evaluation of every model on the same held-out problems (two processes), and the report"
EV="tiny_eval --data_dir=$OUT/data_base --out_dir=$OUT/report $EVAL"
bg eval_a python evaluate.py $EV --ckpts=$OUT/base,$OUT/mid,$OUT/rl_edge_strict,$OUT/rl_edge_outcome \
  --labels=base,mid,rl_edge_strict,rl_edge_outcome
bg eval_b python evaluate.py $EV --ckpts=$OUT/rl_id,$OUT/rl_hard,$OUT/mid_rl_edge --labels=rl_id,rl_hard,mid+rl_edge
join
# one report over all seven from the saved generations (verification only, no sampling)
python evaluate.py $EV --rescore=True \
  --ckpts=$OUT/base,$OUT/mid,$OUT/rl_edge_strict,$OUT/rl_edge_outcome,$OUT/rl_id,$OUT/rl_hard,$OUT/mid_rl_edge \
  --labels=base,mid,rl_edge_strict,rl_edge_outcome,rl_id,rl_hard,mid+rl_edge
stage "done"
echo "report: $OUT/report/summary.md and $OUT/report/*.png"
