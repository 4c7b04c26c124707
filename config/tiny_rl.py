# GRPO on CPU for the tiny study (2 cores, minutes): the tiny base (pretrain.py tiny_pretrain, op 2-6)
# trained on prompts at its edge of competence. The paper's recipe scaled down: fewer prompts per step,
# shorter responses, and a much larger lr (a 1M-parameter model moves little at 1e-6).
#   python rl.py tiny_rl
#   torchrun --standalone --nproc_per_node=2 rl.py tiny_rl       # gloo, 2 processes
init_from = 'out/tiny_base'
out_dir = 'out/tiny_rl'
op_min = 2
op_max = 4
group_size = 6
prompts_per_step = 16
minibatch_prompts = 8           # 2 updates per rollout
micro_batch = 24
max_prompt_len = 512
max_response_len = 160
lr = 1e-3
kl_coef = 0.001
max_steps = 30
eval_every = 10
eval_data = 'generate'          # a fresh held-out set (the base run's eval.jsonl is excluded from prompts anyway)
eval_per_op_template = 8
eval_samples = 4
eval_batch = 192
ckpt_every = 10
sample_every = 10
log_every = 1
