# The tiny study's base model on CPU (2 cores): the tiny Qwen2 (1.41M parameters) on op 2..3, all
# templates, forward mode only (a third of the tokens per problem of reverse mode, so three times the
# problems per token). Builds its data dir on first use (~30 s), then trains on 3.3M tokens (800 steps
# of 4096): ~16 minutes on 2 idle cores (~3.5k tok/s).
#   python pretrain.py tiny_pretrain
# What it reaches is measured in README.md ("Results"). Two departures from plain pre-training, both
# measured on this model (800 steps, sampled process-verified accuracy on held-out op 2..4):
# - doc_mask: each problem attends only to itself. Packed windows of 256 tokens cut most problems
#   (mean 160 tokens, p90 280) from their question, and windows of 1024 without the mask never
#   learned the letter copy the model needs (see model.MODEL_PRESETS['tiny']) in 800 steps: too many
#   unrelated tokens to attend to. With the mask and 1024: copy by step ~300, 16.9% at step 800.
# - loss_on='solution': no loss on the questions, whose statements are random draws (the model still
#   reads them): 16.9% at step 600 instead of 12.8%.
out_dir = 'out/tiny_base'
data_dir = 'data_cache/tiny_fwd_op2-3'
mixture = 'tiny_pretrain'              # data.MIXTURES: U(op 2..3), forward mode
data_tokens = 3_800_000                # more than the budget, so the run never repeats a problem
model = 'tiny'
seq_len = 1024                         # op 2..3 forward texts: mean ~150 tokens, max ~650
micro_batch = 4
doc_mask = True
loss_on = 'solution'
batch_tokens = 4096
max_tokens = 3_276_800                 # 800 steps
lr = 2e-3
min_lr = 2e-4
warmup_frac = 0.0375               # 30 steps
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 100
eval_tokens = 65536
log_interval = 20
ckpt_interval = 100
