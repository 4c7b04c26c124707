# The tiny study's base model on CPU (2 cores): the tiny Qwen2 (~1.3M parameters) on op 2..6, all
# templates, half forward / half reverse. Builds data_cache/tiny_op2-6 on first use (~20 s), then trains
# on 2.5M tokens (610 steps of 4096 tokens): ~8 minutes on 2 idle cores (5-6k tok/s), far longer on a
# busy machine. Measured: held-out loss 7.92 -> 0.43; it writes well-formed solutions in the right
# template but does not solve problems yet (process-verified pass@1 0% on op 2..6; the answer is right
# ~20-30% of the time, about what guessing a small number gives). Solving needs far more compute (GPU).
#   python pretrain.py tiny_pretrain
out_dir = 'out/tiny_base'
data_dir = 'data_cache/tiny_op2-6'
mixture = '2-6'
data_tokens = 5_000_000                # two passes' worth, so the run never repeats a problem
model = 'tiny'
seq_len = 512                          # op 2..6 texts are 135-930 tokens (mean ~270)
micro_batch = 8
batch_tokens = 4096
max_tokens = 2_500_000
lr = 2e-3
min_lr = 2e-4
warmup_frac = 0.05
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 50
eval_tokens = 65536
log_interval = 10
ckpt_interval = 50
