# The one-GPU study (runs/small.sh), stage 1: the 'small' Qwen2 (18M parameters, between tiny's 1.4M
# and the paper's 103M) pre-trained on op 2-6, both modes, with the two switches that made the tiny
# model learn (doc_mask, loss_on=solution; see config/tiny_pretrain.py). Bands of this world: ID op 2-6,
# OOD-edge 7-9, OOD-hard 10-14 (the paper's 2-10 / 11-14 / 15-20 shifted to what a model 6x smaller,
# on 7x fewer tokens, can be expected to learn). NOT RUN YET on a GPU: the op range and the budget are
# the plan's estimates (PLAN=1 bash runs/small.sh), to be checked by the first real run.
#   python pretrain.py small_pretrain --prepare_only=True --data_workers=16
#   python pretrain.py small_pretrain
out_dir = 'out/small/base'
data_dir = 'data_cache/small_op2-6'
mixture = '2-6'                        # U(op 2..6), all templates, half forward / half reverse
data_tokens = 1_500_000_000            # = the budget: one pass over fresh problems
model = 'small'
seq_len = 1024                         # op 2-6 texts: ~300 tokens, so a window holds a few whole problems
micro_batch = 64
doc_mask = True
loss_on = 'solution'
batch_tokens = 262_144                 # 256 windows of 1024
max_tokens = 1_500_000_000             # 5,722 steps
lr = 1e-3
min_lr = 1e-4
warmup_frac = 0.03
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 250
eval_tokens = 1_048_576
log_interval = 20
ckpt_interval = 500
compile = True
