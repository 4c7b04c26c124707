# CPU-sized evaluation of the tiny study's checkpoints (a few minutes on 2 cores):
#   python evaluate.py tiny_eval --ckpts=out/tiny/base,out/tiny/rl_edge_outcome --labels=base,rl
# The tiny world is pre-trained on op 2-3 in forward mode, so its bands are shifted down from the
# paper's (ID 2-10 / OOD-edge 11-14 / OOD-hard 15-20) and only forward problems are evaluated.
ckpts = 'out/tiny/base'
out_dir = 'out/tiny/eval'
eval_ops = list(range(2, 11))
bands = {'ID': (2, 3), 'OOD-edge': (4, 5), 'OOD-hard': (6, 10)}
eval_modes = 'normalforward'
eval_per_op_template = 5        # the data dir's eval.jsonl holds 5 forward problems per op and template: 15 per op
n_samples = 8                   # pass@1, 2, 4, 8
temperature = 0.7
max_new_tokens = 256            # gold forward solutions: ~120 tokens at op 10 (also capped by the model's context)
batch_size = 64
