#!/usr/bin/env bash
# The short proxy for RL ideas at tiny scale (RESEARCH.md, issue #28): RL from a tiny base at its edge,
# then pass@k on a proxy set of fresh problems (seed 777, 30 per op) that is never the report's
# held-out set and that the RL run excludes. One thread per run: two proxies fit 2 cores side by side.
#
#   bash runs/tiny_proxy.sh base                                 # once first: the base on the proxy set
#   bash runs/tiny_proxy.sh pods64_8 --group_size=64 --update_size=8      # RL with these rl.py keys
#   bash runs/tiny_proxy.sh passk8 --group_size=64 --update_size=8 --adv_estimator=passk --passk_k=8
#
# Another base: set BASE (its checkpoint dir), DATA (its data dir), P (where the proxy's runs go),
# EVAL_OPS, BANDS and RL_OPS, e.g. the wider base of RESEARCH.md (pre-trained on op 2-6):
#   E="BASE=out/wide/base DATA=out/wide/data_base P=out/wide EVAL_OPS=[2,3,4,5,6,7,8,9] RL_OPS=6-7"
#   env $E BANDS="{'ID':(2,6),'OOD-edge':(7,8),'OOD-hard':(9,9)}" bash runs/tiny_proxy.sh base
# Each run writes $P/NAME/ (the RL run, its log.jsonl), $P/NAME.log and $P/eval_NAME/ (summary.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
BASE=${BASE:-out/tiny/base}
DATA=${DATA:-out/tiny/data_base}
P=${P:-out/proxy}
EVAL_OPS=${EVAL_OPS:-[2,3,4,5,6]}
BANDS=${BANDS:-"{'ID':(2,4),'OOD-edge':(5,6),'OOD-hard':(7,8)}"}
RL_OPS=${RL_OPS:-5-6}
NAME=${1:?usage: bash runs/tiny_proxy.sh NAME [rl.py keys...]  (NAME=base: evaluate the base)}; shift
mkdir -p "$P"
# the edge band is sampled 64 times (pass@64), the others 16 times, at the study's temperature
EV=(tiny_eval --data_dir="$DATA" --eval_ops="$EVAL_OPS" --bands="$BANDS" "--n_samples_by_op={'OOD-edge':64}"
    --progress=False)
table() { sed -n '/^## pass@k by band, unbiased/,/^## /p' "$1/summary.md" | grep '^| ' | cut -d'|' -f2,3,5,8,9,11; }
if [ "$NAME" = base ]; then
  python evaluate.py "${EV[@]}" --eval_file=generate --world=tiny --eval_seed=777 --eval_per_op_template=10 \
    --ckpts="$BASE" --labels=base --out_dir="$P/eval_base" > "$P/eval_base.log" 2>&1
  table "$P/eval_base"
  exit 0
fi
SET=$P/eval_base/eval_set.jsonl
[ -f "$SET" ] || { echo "no proxy set at $SET: run 'bash runs/tiny_proxy.sh base' first"; exit 1; }
t0=$(date +%s)
python rl.py tiny_rl --init_from="$BASE" --out_dir="$P/$NAME" --op_min="${RL_OPS%-*}" --op_max="${RL_OPS#*-}" \
  --reward=strict --eval_data="$DATA/eval.jsonl" --exclude="$SET" --sample_every=0 "$@" > "$P/$NAME.log" 2>&1
t1=$(date +%s)
python evaluate.py "${EV[@]}" --eval_file="$SET" --eval_per_op_template=0 --ckpts="$P/$NAME" --labels="$NAME" \
  --out_dir="$P/eval_$NAME" > "$P/eval_$NAME.log" 2>&1
echo "$NAME: RL $(( t1 - t0 )) s, evaluation $(( $(date +%s) - t1 )) s (process / outcome, %):"
table "$P/eval_$NAME"
