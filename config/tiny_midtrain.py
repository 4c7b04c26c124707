# The tiny study's mid-training on CPU: from the tiny base (op 2..4 of the tiny world, forward mode),
# 20% U(op 2..4) + 80% U(op 5..6), the tiny analogue of the paper's 20% U(2..10) + 80% U(11..14).
# Same objective and window layout as the base (whole problems in 512-token windows, each attending to
# itself, loss on solutions).
#   python midtrain.py tiny_midtrain                      (~4 minutes on 2 cores)
#   python midtrain.py tiny_midtrain --flops_budget=2e13  (a compute budget instead of a token budget)
init_from = 'out/tiny/base'
out_dir = 'out/tiny/mid'
data_dir = 'out/tiny/data_mid'
mixture = 'tiny_mid'                   # data.MIXTURES: 20% U(op 2..4) + 80% U(op 5..6), forward, tiny world
data_tokens = 1_200_000
seq_len = 512
micro_batch = 8
doc_mask = True
whole_docs = True
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
