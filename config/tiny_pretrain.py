# The tiny study's base model on CPU (2 cores): the tiny Qwen2 (1.41M parameters) on op 2..4 of the
# tiny world (data.WORLDS["tiny"]: 3 places x 3 items, no distractor statements), all templates,
# forward mode only. Builds its data dir on first use (~30 s), then trains on 4.5M tokens (1100 steps
# of 4096 tokens).
#   python pretrain.py tiny_pretrain
# What it reaches is measured in README.md ("Results"); what was tried to get there, negatives
# included, is in RESEARCH.md (tiny study). Departures from plain pre-training, each measured:
# - the tiny world: on the paper's world this model found op 3's two-hop chain among the distractor
#   statements in ~3% of samples after 16 CPU minutes; in the tiny world the same proxy reached
#   op 2 / 3 / 4 = 68 / 11 / 3% process-verified pass@1 after 1.7M tokens, against 0 / 0 / 0%.
# - doc_mask + whole_docs: each problem attends only to itself, and windows hold whole problems
#   (padded), so 512-token windows lose no question and attention costs half of 1024's.
# - loss_on='solution': no loss on the questions, whose statements are random draws (the model still
#   reads them): 16.9% at step 600 instead of 12.8% (paper world, op 2-4).
out_dir = 'out/tiny/base'
data_dir = 'out/tiny/data_base'
mixture = 'tiny_pretrain'              # data.MIXTURES: U(op 2..4), forward mode, tiny world
data_tokens = 5_200_000                # more than the budget (with padding), so no problem is seen twice
model = 'tiny'
seq_len = 512                          # tiny-world op 2..4 forward texts: mean ~130 tokens, p90 ~200
micro_batch = 8
doc_mask = True
whole_docs = True
loss_on = 'solution'
batch_tokens = 4096
max_tokens = 4_505_600                 # 1100 steps
lr = 2e-3
min_lr = 2e-4
warmup_frac = 0.03                     # 33 steps
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 100
eval_tokens = 65536
log_interval = 20
ckpt_interval = 100
