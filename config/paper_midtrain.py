# Paper mid-training (STUDY.md §4): from the op 2..10 base, the same objective on 20% U(op 2..10) + 80%
# U(op 11..14), fresh AdamW and a 15% warmup + cosine schedule. The paper does not state the token
# budget; 1B tokens is about the compute of one paper RL run (STUDY.md §5.3: pass --flops_budget to split a
# budget between mid-training and RL instead).
#   python midtrain.py paper_midtrain --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 midtrain.py paper_midtrain
init_from = 'out/base'
out_dir = 'out/mid'
data_dir = 'data_cache/mid_11_14'
mixture = 'mid_11_14'
data_tokens = 1_000_000_000
seq_len = 2048
batch_tokens = 524_288
micro_batch = 16
max_tokens = 1_000_000_000
lr = 1e-4
min_lr = 3e-5
warmup_frac = 0.15
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 200
eval_tokens = 1_048_576
ckpt_interval = 500
compile = True
