# The paper's evaluation protocol (STUDY.md §4): 200 held-out problems per op 2..20 (67 per template),
# 128 samples each at temperature 0.7, pass@1..128, outcome and process-verified, both estimators
# (unbiased and the original's ordered scorer, STUDY.md §6) with 95% bootstrap intervals; the plots use
# the ordered one, as the original's figures and the reference numbers in the README do.
#   python evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14 --labels=base,rl
#   torchrun --standalone --nproc_per_node=8 evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14 --labels=base,rl
ckpts = 'out/base'
out_dir = 'out/eval'
eval_ops = list(range(2, 21))
eval_per_op_template = 67
n_samples = 128
temperature = 0.7
max_new_tokens = 1024           # prompt and response up to 1024 tokens each (as in RL)
batch_size = 0                  # one generate() call per rank: generate schedules its own memory
workers = 4                     # verification processes per rank
estimator = 'ordered'           # the plots' pass@k; the tables show both
# the reference numbers' ID: easy (op 2-4) / medium (5-7) / hard (8-10) weighted 20/30/50 (an extra row)
weighted_bands = {'ID': '2-4:0.2,5-7:0.3,8-10:0.5'}
