#!/usr/bin/env bash
# STUDY.md §5.3, mid-training vs RL at a fixed budget, split as the original did (STUDY.md §6): a total of
# BUDGET_TOKENS (1B) where RL at full share is RL_FULL_STEPS (50) steps of 1024 prompts x 6; an arm
# with mid-training share s mid-trains on s x BUDGET_TOKENS tokens (20% U(op 2-10) + 80% U(op 11-14),
# fresh problems, never repeated: the data is built once for the largest share and every arm reads a
# prefix of it) and then runs (1 - s) x RL_FULL_STEPS GRPO steps on op 11-14. Shares 0 (RL alone),
# 0.2, 0.5, 0.8. Needs out/base from runs/paper_extrapolation.sh. Figure:
# out/eval_midtrain_vs_rl/passk_by_band.png (the paper: more mid-training + light RL is best on
# OOD-edge, heavier RL on OOD-hard, every mix with mid-training beats RL alone).
#   PLAN=1 NGPU=8 bash runs/paper_midtrain_vs_rl.sh     # the plan only: configs, tokens, FLOPs, hours
#   SHARES="0 0.2 0.5 0.8 1" bash runs/paper_midtrain_vs_rl.sh     # add a mid-training-only arm
source "$(dirname "$0")/common.sh"
BUDGET_TOKENS=${BUDGET_TOKENS:-1e9}
RL_FULL_STEPS=${RL_FULL_STEPS:-50}
SHARES=${SHARES:-0 0.2 0.5 0.8}
# the mid-training data: fresh tokens for the largest share, built once
DATA_TOKENS=$(python -c "print(int(max(float(s) for s in '$SHARES'.split()) * float('$BUDGET_TOKENS')))")
plan "Mid-training vs RL: shares '$SHARES' of $BUDGET_TOKENS tokens (RL full share = $RL_FULL_STEPS steps),
mid-training data $DATA_TOKENS tokens, evaluation of every arm."
if [ "$DATA_TOKENS" -gt 0 ]; then
  prepare midtrain.py paper_midtrain --data_tokens="$DATA_TOKENS" --max_tokens="$DATA_TOKENS" --prepare_only=True \
    --data_workers=16
fi
ckpts=""; labels=""
for s in $SHARES; do
  mid_tokens=$(python -c "print(int(float('$s') * float('$BUDGET_TOKENS')))")
  rl_steps=$(python -c "print(round((1 - float('$s')) * $RL_FULL_STEPS))")
  start=out/base
  if [ "$mid_tokens" -gt 0 ]; then
    launch midtrain.py paper_midtrain --data_tokens="$DATA_TOKENS" --max_tokens="$mid_tokens" --out_dir=out/mid_share$s
    start=out/mid_share$s
  fi
  final=$start
  if [ "$rl_steps" -gt 0 ]; then
    launch rl.py paper_rl_op11-14 --init_from=$start --max_steps="$rl_steps" --out_dir=out/rl_share$s
    final=out/rl_share$s
  fi
  ckpts="$ckpts,$final"; labels="$labels,mid$s"
done
launch evaluate.py paper_eval --ckpts="${ckpts#,}" --labels="${labels#,}" --out_dir=out/eval_midtrain_vs_rl
finish
