# CPU-sized evaluation of the tiny study's checkpoints (seconds to a few minutes on 2 cores):
#   python evaluate.py tiny_eval --ckpts=out/tiny_base,out/tiny_rl --labels=base,rl
ckpts = 'out/tiny_base'
out_dir = 'out/tiny_eval'
eval_ops = list(range(2, 21))   # every band, so the OOD columns are filled (a tiny model scores ~0 there)
eval_per_op_template = 2        # x3 templates = 6 problems per op (~half forward, half reverse)
n_samples = 8                   # pass@1, 2, 4, 8
temperature = 0.7
max_new_tokens = 512            # also capped by the model's context
batch_size = 64
