#!/usr/bin/env bash
# STUDY.md §5.1, extrapolation (depth): pre-train the ~100M model on op 2-10 (10B tokens), then GRPO on
# op 7-10 / 9-12 / 11-14 / 17-20, and evaluate base and the four RL models on op 2-20 (pass@1..128).
# Figure: out/eval_extrapolation/passk_by_band.png and acc_vs_op.png (the paper's Fig. "RL on each
# op range": gains on OOD-edge for 11-14, none for 7-10 in OOD and none for 17-20).
#   PLAN=1 NGPU=8 bash runs/paper_extrapolation.sh      # the plan only: configs, tokens, FLOPs, hours
source "$(dirname "$0")/common.sh"
plan "Extrapolation: pretrain on op 2-10, 4 RL runs (op 7-10, 9-12, 11-14, 17-20), evaluation of 5 checkpoints."
prepare pretrain.py paper_pretrain --prepare_only=True --data_workers=16
launch pretrain.py paper_pretrain
for r in 7-10 9-12 11-14 17-20; do
  launch rl.py paper_rl_op$r --init_from=out/base --out_dir=out/rl_op$r
done
launch evaluate.py paper_eval --ckpts=out/base,out/rl_op7-10,out/rl_op9-12,out/rl_op11-14,out/rl_op17-20 \
  --labels=base,rl_7-10,rl_9-12,rl_11-14,rl_17-20 --out_dir=out/eval_extrapolation
finish
[ "$PLAN" = 1 ] || echo "figures: out/eval_extrapolation/*.png, table: out/eval_extrapolation/summary.md"
