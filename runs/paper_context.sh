#!/usr/bin/env bash
# STUDY.md §5.2, contextual generalization (breadth): pre-train on zoo with a school share of 0 / 0.1% /
# 1% / 10% (and 1% with school only at op 2), then GRPO on a 50/50 zoo/school mix over op 2-20 and
# evaluate per template. Figure: out/eval_context/acc_vs_op.png and the per-template tables of
# summary.md (the paper: >= 1% exposure is needed; 0% and 0.1% fail to transfer).
#   PLAN=1 NGPU=8 bash runs/paper_context.sh            # the plan only: configs, tokens, FLOPs, hours
source "$(dirname "$0")/common.sh"
shares="0pct 0.1pct 1pct 10pct 1pct_op2"
plan "Context: 5 pre-training runs, 5 RL runs on a 50/50 zoo/school mix, evaluation of 10 checkpoints."
ckpts=""; labels=""
for s in $shares; do
  prepare pretrain.py paper_pretrain_ctx_school_$s --prepare_only=True --data_workers=16
  launch pretrain.py paper_pretrain_ctx_school_$s --out_dir=out/base_ctx_$s
  launch rl.py paper_rl --init_from=out/base_ctx_$s --out_dir=out/rl_ctx_$s --mixture=rl_ctx_zoo0.5
  ckpts="$ckpts,out/base_ctx_$s,out/rl_ctx_$s"; labels="$labels,base_$s,rl_$s"
done
launch evaluate.py paper_eval --ckpts="${ckpts#,}" --labels="${labels#,}" --out_dir=out/eval_context
finish
