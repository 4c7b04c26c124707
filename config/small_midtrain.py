# The one-GPU study (runs/small.sh), mid-training: from the op 2-6 base, 20% U(op 2-6) + 80% U(op 7-9)
# (its OOD edge), fresh AdamW, 15% warmup + cosine, 300M fresh tokens (never repeated).
#   python midtrain.py small_midtrain --prepare_only=True --data_workers=16
#   python midtrain.py small_midtrain
init_from = 'out/small/base'
out_dir = 'out/small/mid'
data_dir = 'data_cache/small_mid_op7-9'
mixture = '2-6:0.2,7-9:0.8'
data_tokens = 300_000_000
seq_len = 1024
micro_batch = 64
doc_mask = True
loss_on = 'solution'
batch_tokens = 262_144
max_tokens = 300_000_000               # 1,144 steps
lr = 3e-4
min_lr = 3e-5
warmup_frac = 0.15
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 200
eval_tokens = 1_048_576
log_interval = 20
ckpt_interval = 200
compile = True
