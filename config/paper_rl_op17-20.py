# GRPO on op 17-20 from the op 2-10 base: too hard for the base: no reward signal, no gain expected (SPEC §5.1).
#   python rl.py paper_rl_op17-20        (rewards: add --reward=strict --out_dir=out/rl_op17-20-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
init_from = 'out/base'
out_dir = 'out/rl_op17-20'
op_min = 17
op_max = 20
max_steps = 200
micro_batch = 16
gen_batch = 128
eval_every = 20
eval_per_op_template = 16
eval_samples = 4
ckpt_every = 20
sample_every = 10
