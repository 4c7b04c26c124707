# GRPO on CPU for the tiny study (2 cores, minutes): the paper's recipe (rl.py defaults) scaled down --
# 12 prompts x 6 samples per step in 2 mini-batches, shorter responses, 16 steps, and a much larger lr
# (a 1M-parameter model barely moves at 1e-6; 1e-3 made it collapse within 4 steps, KL > 1; 1e-4..3e-4
# learned, measured from a base mid-trained on op 2).
#   python rl.py tiny_rl                                            # from out/tiny_base
#   python rl.py tiny_rl --init_from=out/tiny_mid --out_dir=out/tiny_rl_mid
#   torchrun --standalone --nproc_per_node=2 rl.py tiny_rl          # gloo, 2 processes
# The RL range should sit at the base's edge of competence: check `python evaluate.py tiny_eval
# --ckpts=out/tiny_base` and pick the ops where pass@k is above 0 but pass@1 is low.
# On a busy machine OMP_NUM_THREADS=1 can be much faster (tiny matmuls, threads spin-waiting).
init_from = 'out/tiny_base'     # pretrain.py tiny_pretrain (op 2-3, forward mode)
out_dir = 'out/tiny_rl'
op_min = 4                      # the tiny base's edge of competence
op_max = 5
reverse_frac = 0.0              # the tiny world is forward mode only
group_size = 6
prompts_per_step = 12
minibatch_prompts = 6           # 2 updates per rollout
micro_batch_tokens = 8192        # padded tokens per forward/backward (~16 prompt + response rows)
max_prompt_len = 512
max_response_len = 192          # gold forward solutions: ~50 tokens at op 4, ~120 at op 10
lr = 2e-4
max_steps = 16                  # ~2 min on 2 cores (~7 s a step)
eval_every = 16                 # before the first step and after the last
eval_data = 'generate'          # fresh held-out problems at the RL ops (the base run's eval.jsonl is excluded too)
eval_per_op_template = 6        # 2 ops x 3 templates x 6 = 36 forward problems x 4 samples
eval_samples = 4
eval_modes = 'normalforward'
ckpt_every = 8
sample_every = 8
