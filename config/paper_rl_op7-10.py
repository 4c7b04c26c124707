# GRPO on op 7-10 from the op 2-10 base: in-distribution for the op 2-10 base: pass@1 up in ID, no OOD gain (SPEC §5.1).
#   python rl.py paper_rl_op7-10        (rewards: add --reward=strict --out_dir=out/rl_op7-10-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
init_from = 'out/base'
out_dir = 'out/rl_op7-10'
op_min = 7
op_max = 10
max_steps = 200
micro_batch = 16
gen_batch = 128
eval_every = 20
eval_per_op_template = 16
eval_samples = 4
ckpt_every = 20
sample_every = 10
