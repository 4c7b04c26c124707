# CPU-sized evaluation of the tiny study's checkpoints (a few minutes on 2 cores):
#   python evaluate.py tiny_eval --ckpts=out/tiny/base,out/tiny/rl_edge_outcome --labels=base,rl
# The tiny world is pre-trained on op 2-6, so its bands are shifted down from the paper's
# (ID 2-10 / OOD-edge 11-14 / OOD-hard 15-20).
ckpts = 'out/tiny/base'
out_dir = 'out/tiny/eval'
eval_ops = list(range(2, 15))
bands = {'ID': (2, 6), 'OOD-edge': (7, 9), 'OOD-hard': (10, 14)}
eval_per_op_template = 4        # x3 templates = 12 problems per op (half forward, half reverse)
n_samples = 8                   # pass@1, 2, 4, 8
temperature = 0.7
max_new_tokens = 512            # also capped by the model's context
batch_size = 64
