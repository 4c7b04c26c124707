# The one-GPU study's evaluation (runs/small.sh): op 2-14, 60 problems per op (20 per template, both
# modes), 32 samples at T = 0.7 (128 on the edge); the small world's bands.
#   python evaluate.py small_eval --ckpts=out/small/base,out/small/rl_edge_outcome --labels=base,rl
ckpts = 'out/small/base'
out_dir = 'out/small/report'
eval_file = 'generate'
eval_ops = list(range(2, 15))
bands = {'ID': (2, 6), 'OOD-edge': (7, 9), 'OOD-hard': (10, 14)}
eval_per_op_template = 20
n_samples = 32                         # pass@1 .. pass@32
n_samples_by_op = {'OOD-edge': 128}    # the edge to the paper's k (its first 32 samples are the n_samples draws)
temperature = 0.7
max_new_tokens = 512
batch_size = 0                         # one generate() call per rank (generate schedules memory)
workers = 8
