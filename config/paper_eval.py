# The paper's evaluation protocol (SPEC §4): 200 held-out problems per op 2..20 (67 per template),
# 128 samples each at temperature 0.7, pass@1..128, outcome and process-verified.
#   python evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14 --labels=base,rl
#   torchrun --standalone --nproc_per_node=8 evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14 --labels=base,rl
ckpts = 'out/base'
out_dir = 'out/eval'
eval_ops = list(range(2, 21))
eval_per_op_template = 67
n_samples = 128
temperature = 0.7
max_new_tokens = 1024           # prompt and response up to 1024 tokens each (as in RL)
batch_size = 512                # sequences per generate() call; lower it if a GPU runs out of memory
workers = 4                     # verification processes per rank
