# The one-GPU study (runs/small.sh), GRPO: the paper's recipe (rl.py's defaults: group 6, PPO clip 0.2 /
# dual clip 3, k3 KL 0.001, token-mean) at a quarter of its batch, on the small base's edge (op 7-9).
#   python rl.py small_rl --reward=strict --out_dir=out/small/rl_edge_strict
init_from = 'out/small/base'
out_dir = 'out/small/rl_edge'
op_min = 7
op_max = 9
prompts_per_step = 256
minibatch_prompts = 64                 # 4 updates per rollout, as the paper
micro_batch_tokens = 32768     # padded tokens per forward/backward per GPU
max_prompt_len = 1024
max_response_len = 512                 # gold solutions: ~230 tokens at op 9, ~330 at op 14
lr = 2e-6                              # the paper's 1e-6 over 200 steps; 2x for 40 steps
max_steps = 40
eval_every = 20
eval_data = 'generate'
eval_per_op_template = 8               # 3 ops x 3 templates x 8 = 72 problems x 4 samples
eval_samples = 4
ckpt_every = 20
sample_every = 10
