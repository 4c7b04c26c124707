#!/usr/bin/env bash
# STUDY.md §5.4, process rewards: GRPO on op 11-14 and 17-20 with the outcome reward, the blended rewards
# (0.2/0.8 and 0.5/0.5) and the strict reward; evaluate outcome vs process-verified pass@k and the
# reward-hacking rate (right answer, wrong steps). Needs out/base from runs/paper_extrapolation.sh.
#   PLAN=1 NGPU=8 bash runs/paper_rewards.sh            # the plan only: configs, tokens, FLOPs, hours
source "$(dirname "$0")/common.sh"
plan "Rewards: 8 RL runs (2 op ranges x 4 rewards), evaluation of 9 checkpoints."
ckpts="out/base"; labels="base"
for r in 11-14 17-20; do
  for rw in outcome blend_0.2_0.8 blend_0.5_0.5 strict; do
    launch rl.py paper_rl_op$r --init_from=out/base --reward=$rw --out_dir=out/rl_op${r}_$rw
    ckpts="$ckpts,out/rl_op${r}_$rw"; labels="$labels,rl_${r}_$rw"
  done
done
launch evaluate.py paper_eval --ckpts="$ckpts" --labels="$labels" --out_dir=out/eval_rewards
finish
