#!/usr/bin/env bash
# The whole study on ONE GPU in about an hour (estimates: PLAN=1 bash runs/small.sh prints every stage's
# wall time; NOT yet run on a GPU): the 'small' Qwen2 (18M) pre-trained on op 2-6 (1.5B tokens), mid-trained
# on 20% op 2-6 + 80% op 7-9 (300M tokens), GRPO (40 steps of 256 prompts x 6) with an outcome and a
# strict process reward on its edge (op 7-9; the strict arm also with 64 samples per prompt and pass@k
# advantages) and on too-hard ops (11-13), and after mid-training; every model evaluated on op 2-14
# (pass@1..32, the edge to pass@128, both estimators). Bands: ID 2-6, OOD-edge 7-9, OOD-hard 10-14.
#   bash runs/small.sh                     # plan first, then the study; report in out/small/report/
#   PLAN=1 bash runs/small.sh              # only the plan
# Estimates assume MFU 25% for training (a small model's matmuls are small) and 3% for sampling; put the
# numbers runs/gpu_check.sh measured in MFU_TRAIN / MFU_SAMPLE.
export PLAN_MODEL=small MFU_TRAIN=${MFU_TRAIN:-0.25} MFU_SAMPLE=${MFU_SAMPLE:-0.03} NGPU=${NGPU:-1}
source "$(dirname "$0")/common.sh"
O=out/small
plan "One-GPU study: small (18M) base on op 2-6, mid-training on op 7-9, 5 RL runs, evaluation of 7 models."
prepare pretrain.py small_pretrain --prepare_only=True --data_workers=16
launch pretrain.py small_pretrain
prepare midtrain.py small_midtrain --prepare_only=True --data_workers=16
launch midtrain.py small_midtrain
launch rl.py small_rl --init_from=$O/base --out_dir=$O/rl_edge_outcome --reward=outcome
launch rl.py small_rl --init_from=$O/base --out_dir=$O/rl_edge_strict --reward=strict
# issue #28's levers on the edge: 64 samples per prompt, an update on the 8 of each group with the largest
# reward variance (PODS), pass@8 advantages -- the one lever that widened pass@64 at tiny scale (RESEARCH.md)
launch rl.py small_rl --init_from=$O/base --out_dir=$O/rl_edge_strict_passk --reward=strict --prompts_per_step=64 \
  --minibatch_prompts=16 --group_size=64 --update_size=8 --adv_estimator=passk --passk_k=8
launch rl.py small_rl --init_from=$O/base --out_dir=$O/rl_hard_outcome --op_min=11 --op_max=13 --reward=outcome
launch rl.py small_rl --init_from=$O/mid --out_dir=$O/mid_rl_edge_outcome --reward=outcome
launch evaluate.py small_eval --out_dir=$O/report \
  --ckpts=$O/base,$O/mid,$O/rl_edge_outcome,$O/rl_edge_strict,$O/rl_edge_strict_passk,$O/rl_hard_outcome,$O/mid_rl_edge_outcome \
  --labels=base,mid,rl_edge_outcome,rl_edge_strict,rl_edge_strict_passk,rl_hard_outcome,mid+rl_edge
finish
[ "$PLAN" = 1 ] || echo "report: $O/report/summary.md and $O/report/*.png"
