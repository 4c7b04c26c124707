# GRPO on CPU for the tiny study (2 cores, minutes): the paper's recipe (rl.py defaults) scaled down --
# 16 prompts x 6 samples per step in 2 mini-batches, shorter responses, 40 steps, and a much larger lr
# (a 1M-parameter model barely moves at 1e-6; 1e-3 made it collapse within 4 steps, KL > 1; 1e-4..3e-4
# learned, measured from a base mid-trained on op 2).
#   python rl.py tiny_rl                                            # from out/tiny_base
#   python rl.py tiny_rl --init_from=out/tiny_mid --out_dir=out/tiny_rl_mid
#   torchrun --standalone --nproc_per_node=2 rl.py tiny_rl          # gloo, 2 processes
# The RL range should sit at the base's edge of competence: check `python evaluate.py tiny_eval
# --ckpts=out/tiny_base` and pick the ops where pass@k is above 0 but pass@1 is low.
# On a busy machine OMP_NUM_THREADS=1 can be much faster (tiny matmuls, threads spin-waiting).
init_from = 'out/tiny_base'     # pretrain.py tiny_pretrain (op 2-6)
out_dir = 'out/tiny_rl'
op_min = 4
op_max = 6
group_size = 6
prompts_per_step = 16
minibatch_prompts = 8           # 2 updates per rollout
micro_batch = 16
max_prompt_len = 512
max_response_len = 320          # gold reverse-mode solutions: ~205 tokens at op 6, ~240 at op 8 (a few over 256)
lr = 2e-4
max_steps = 40
eval_every = 10
eval_data = 'generate'          # fresh held-out problems at the RL ops (the base run's eval.jsonl is excluded too)
eval_per_op_template = 8        # 3 ops x 3 templates x 8 = 72 problems x 4 samples
eval_samples = 4
eval_batch = 192
ckpt_every = 10
sample_every = 10
