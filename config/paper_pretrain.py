# Paper pre-training (STUDY.md §3-§4): the ~100M Qwen2 from scratch on 10B tokens of op 2..10 (uniform over
# op, template and mode), packed 2048-token blocks, 512k tokens per step (19,073 steps), AdamW lr 1e-4
# with 5% warmup and cosine to 3e-5, wd 0.1, clip 1.0, bf16 autocast.
#   python pretrain.py paper_pretrain --prepare_only=True --data_workers=16    # build the data once
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain
out_dir = 'out/base'
data_dir = 'data_cache/pretrain_uniform'
mixture = 'pretrain_uniform'          # data.MIXTURES: op 2..10 uniform, all templates, half forward / half reverse
data_tokens = 10_000_000_000          # one pass over fresh problems (no repeats)
model = 'paper'
seq_len = 2048
batch_tokens = 524_288                # 256 blocks of 2048
micro_batch = 16                      # 1 GPU: 16 accumulation steps; 8 GPUs: 2 (fits 40 GB cards)
max_tokens = 10_000_000_000
lr = 1e-4
min_lr = 3e-5
warmup_frac = 0.05
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95                          # not stated by the paper; the usual choice for LM pre-training
grad_clip = 1.0
eval_interval = 500
eval_tokens = 1_048_576
log_interval = 10
ckpt_interval = 1000
compile = True
