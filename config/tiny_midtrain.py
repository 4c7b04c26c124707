# The tiny study's mid-training on CPU: from out/tiny_base (op 2..6), 20% U(op 2..6) + 80% U(op 7..9),
# the tiny analogue of the paper's 20% U(2..10) + 80% U(11..14). Data built with the base's tokenizer.
#   python midtrain.py tiny_midtrain                      (a few minutes on 2 cores)
#   python midtrain.py tiny_midtrain --flops_budget=2e13  (a compute budget instead of a token budget)
init_from = 'out/tiny_base'
out_dir = 'out/tiny_mid'
data_dir = 'data_cache/tiny_mid_op7-9'
mixture = '2-6:0.2,7-9:0.8'
data_tokens = 1_000_000
seq_len = 512
micro_batch = 16
batch_tokens = 8192
max_tokens = 500_000
lr = 1e-3
min_lr = 1e-4
warmup_frac = 0.15
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 20
eval_tokens = 65536
log_interval = 10
ckpt_interval = 20
