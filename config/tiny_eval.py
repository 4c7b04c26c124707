# CPU-sized evaluation of the tiny study's checkpoints (runs/tiny.sh; a few minutes on 2 cores):
#   python evaluate.py tiny_eval --ckpts=out/tiny/base,out/tiny/rl_edge_blend --labels=base,rl
# The tiny base is pre-trained on op 2-4 of the tiny world in forward mode, so its bands are shifted
# down from the paper's (ID 2-10 / OOD-edge 11-14 / OOD-hard 15-20) and only forward problems are
# evaluated. The problems are the base data dir's held-out eval.jsonl (the first checkpoint's
# data_dir; runs/tiny.sh passes --data_dir), never in any training stream: op 2 of the tiny world has
# only ~900 distinct problems, so a freshly generated set would overlap the training data.
ckpts = 'out/tiny/base'
out_dir = 'out/tiny/eval'
eval_ops = list(range(2, 9))        # the hard band stops at op 8: op 9-10 only cost time (0% for every model)
bands = {'ID': (2, 4), 'OOD-edge': (5, 6), 'OOD-hard': (7, 8)}
eval_modes = 'normalforward'
eval_per_op_template = 0        # all of them: the data dir holds 10 forward problems per op and template (30 per op)
n_samples = 16                  # pass@1, 2, 4, 8, 16
n_samples_by_op = {'OOD-edge': 64}  # the edge band at larger k (pass@32, 64; the paper's effect is at 128);
                                # its first 16 samples are those n_samples=16 draws
temperature = 0.7
max_new_tokens = 256            # gold forward solutions of op 10: ~120 tokens
batch_size = 192                # sequences decoded at once (one generate() call either way)
bootstrap = 1000                # 95% intervals over problems in every table
