# The tiny study's mid-training on CPU: from out/tiny_base (op 2..3, forward mode), 20% U(op 2..3) +
# 80% U(op 4..5), the tiny analogue of the paper's 20% U(2..10) + 80% U(11..14). Data built with the
# base's tokenizer.
#   python midtrain.py tiny_midtrain                      (~5 minutes on 2 cores)
#   python midtrain.py tiny_midtrain --flops_budget=2e13  (a compute budget instead of a token budget)
init_from = 'out/tiny_base'
out_dir = 'out/tiny_mid'
data_dir = 'data_cache/tiny_mid_fwd_op4-5'
mixture = 'tiny_mid'                   # data.MIXTURES: 20% U(op 2..3) + 80% U(op 4..5), forward mode
data_tokens = 1_500_000
seq_len = 1024                         # as the base: whole problems, each attending to itself
micro_batch = 4
doc_mask = True
loss_on = 'solution'
batch_tokens = 4096
max_tokens = 983_040                   # 240 steps
lr = 1e-3
min_lr = 1e-4
warmup_frac = 0.15
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 40
eval_tokens = 65536
log_interval = 20
ckpt_interval = 40
