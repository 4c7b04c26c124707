#!/usr/bin/env bash
# STUDY.md §5.2, contextual generalization (breadth): pre-train on zoo with a small share of school, then
# GRPO on a 50/50 zoo/school mix over op 2-20 and evaluate per template. Figure: out/eval_context*/acc_vs_op.png
# and the per-template tables of summary.md (the paper: >= 1% exposure is needed; 0.1% fails to transfer).
# Two settings of the original's release:
#   VARIANT=main (default)  its main text (the context_pretrain_2 checkpoints): zoo at op 2-20, school only at
#                           op 2, at 0.1 / 1 / 10% school
#   VARIANT=appendix        its appendix: zoo at op 2-10 with 0 / 0.1 / 1 / 10% school at op 2-10, and 1% school
#                           only at op 2
#   PLAN=1 NGPU=8 bash runs/paper_context.sh                     # the plan only: configs, tokens, FLOPs, hours
#   PLAN=1 VARIANT=appendix bash runs/paper_context.sh
source "$(dirname "$0")/common.sh"
VARIANT=${VARIANT:-main}
case "$VARIANT" in
  main)     prefix=paper_pretrain_ctx_main_school_; tag=ctx_main_; shares="0.1pct 1pct 10pct"; eval_dir=out/eval_context ;;
  appendix) prefix=paper_pretrain_ctx_school_; tag=ctx_; shares="0pct 0.1pct 1pct 10pct 1pct_op2"
            eval_dir=out/eval_context_appendix ;;
  *) echo "VARIANT=$VARIANT: use main (the release's main text) or appendix" >&2; exit 2 ;;
esac
n=$(echo $shares | wc -w)
plan "Context ($VARIANT setting): $n pre-training runs, $n RL runs on a 50/50 zoo/school mix, evaluation of $((2 * n)) checkpoints."
ckpts=""; labels=""
for s in $shares; do
  prepare pretrain.py $prefix$s --prepare_only=True --data_workers=16
  launch pretrain.py $prefix$s --out_dir=out/base_$tag$s
  launch rl.py paper_rl --init_from=out/base_$tag$s --out_dir=out/rl_$tag$s --mixture=rl_ctx_zoo0.5
  ckpts="$ckpts,out/base_$tag$s,out/rl_$tag$s"; labels="$labels,base_$s,rl_$s"
done
launch evaluate.py paper_eval --ckpts="${ckpts#,}" --labels="${labels#,}" --out_dir=$eval_dir
finish
