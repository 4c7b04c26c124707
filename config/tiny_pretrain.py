# The tiny study's base model on CPU (2 cores): the tiny Qwen2 (~1.3M parameters) on op 2..4, all
# templates, forward mode only (a third of the tokens per problem of reverse mode, so three times the
# problems per token). Builds its data dir on first use (~30 s), then trains on 4.9M tokens (1200 steps
# of 4096 tokens): ~16 minutes on 2 idle cores (~5k tok/s).
#   python pretrain.py tiny_pretrain
# What it reaches is measured in README.md ("Results"). Why these settings: at this width the model
# first has to learn to copy the variable letter it has just defined ("as E; so E"); that takes
# 1.2-2.4M tokens with model.MODEL_PRESETS['tiny'] (initializer_range 0.06) and never happened in 2.5M
# tokens with the usual 0.02 init, or with op 2..6 in both modes (0% process-verified either way).
out_dir = 'out/tiny_base'
data_dir = 'data_cache/tiny_fwd_op2-4'
mixture = 'tiny_pretrain'              # data.MIXTURES: U(op 2..4), forward mode
data_tokens = 5_500_000                # more than the budget, so the run never repeats a problem
model = 'tiny'
seq_len = 256                          # op 2..4 forward texts are ~60-300 tokens
micro_batch = 16
batch_tokens = 4096
max_tokens = 4_915_200                 # 1200 steps
lr = 2e-3
min_lr = 2e-4
warmup_frac = 0.025
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 100
eval_tokens = 65536
log_interval = 20
ckpt_interval = 100
