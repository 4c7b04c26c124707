#!/usr/bin/env bash
# STUDY.md §5.1, headroom ablation: pre-train on 8 easy(2-4)/medium(5-7)/hard(8-10) mixtures, RL each on
# op 11-14, evaluate all base and RL models. Figure: out/eval_headroom/acc_vs_op.png.
#   PLAN=1 NGPU=8 bash runs/paper_headroom.sh           # the plan only: configs, tokens, FLOPs, hours
source "$(dirname "$0")/common.sh"
mixes="uniform 50_30_20 20_30_50 49.95_49.95_0.1 49.5_49.5_1 47.5_47.5_5 40_40_20 25_25_50"
plan "Headroom ablation: 8 pre-training runs, 8 RL runs on op 11-14, evaluation of 16 checkpoints."
ckpts=""; labels=""
for m in $mixes; do
  prepare pretrain.py paper_pretrain_headroom_$m --prepare_only=True --data_workers=16
  launch pretrain.py paper_pretrain_headroom_$m --out_dir=out/base_headroom_$m
  launch rl.py paper_rl_op11-14 --init_from=out/base_headroom_$m --out_dir=out/rl_headroom_$m
  ckpts="$ckpts,out/base_headroom_$m,out/rl_headroom_$m"; labels="$labels,base_$m,rl_$m"
done
launch evaluate.py paper_eval --ckpts="${ckpts#,}" --labels="${labels#,}" --out_dir=out/eval_headroom
finish
