#!/usr/bin/env bash
# SPEC §5.3, mid-training vs RL at a fixed compute budget: from the op 2-10 base, spend BUDGET FLOPs
# as (mid-training share, RL share) = (100,0) (80,20) (50,50) (20,80) (0,100); mid-training on
# 20% U(2-10) + 80% U(11-14), RL on op 11-14. Figure: out/eval_midtrain_vs_rl/passk_by_band.png
# (the paper: more mid-training + light RL is best on OOD-edge, heavier RL on OOD-hard).
source "$(dirname "$0")/common.sh"
BUDGET=${BUDGET:-2e18}   # total FLOPs per configuration (~1 paper RL run of 200 steps)
plan "Mid-training vs RL: 4 mid-training runs and 4 RL runs sharing BUDGET=$BUDGET FLOPs per
configuration (~2-4 h per configuration on 8 H100s), then evaluation of 5 checkpoints (~1-2 h each).
Needs out/base from runs/paper_extrapolation.sh."
python midtrain.py paper_midtrain --prepare_only=True --data_workers=16
ckpts=""; labels=""
for rl_pct in 0 20 50 80 100; do
  mid=$(python -c "print(f'{$BUDGET * (100 - $rl_pct) / 100:.4g}')")
  rlf=$(python -c "print(f'{$BUDGET * $rl_pct / 100:.4g}')")
  start=out/base
  if [ "$rl_pct" -lt 100 ]; then
    launch midtrain.py paper_midtrain --flops_budget="$mid" --out_dir=out/mid_rl$rl_pct
    start=out/mid_rl$rl_pct
  fi
  final=$start
  if [ "$rl_pct" -gt 0 ]; then
    launch rl.py paper_rl_op11-14 --init_from=$start --flops_budget="$rlf" --max_steps=100000 --out_dir=out/rl_rl$rl_pct
    final=out/rl_rl$rl_pct
  fi
  ckpts="$ckpts,$final"; labels="$labels,rl${rl_pct}pct"
done
launch evaluate.py paper_eval --ckpts="${ckpts#,}" --labels="${labels#,}" --out_dir=out/eval_midtrain_vs_rl
