# GRPO on CPU for the tiny study (2 cores, minutes): the paper's recipe (rl.py defaults) scaled down --
# 16 prompts x 6 samples per step in 2 mini-batches, shorter responses, 40 steps, a much larger lr
# (a 1M-parameter model barely moves at 1e-6; 1e-3 made it collapse within 4 steps, KL > 1; 1e-4..3e-4
# learned, measured from a base mid-trained on op 2) and a larger KL coefficient (0.1, not 0.001: RL at
# op 5 from a weaker base cost op 4 33 points with it, 46 without; RESEARCH.md). runs/tiny.sh sets the
# ops and the reward per run.
#   python rl.py tiny_rl                                            # from out/tiny/base, the edge ops
#   python rl.py tiny_rl --init_from=out/tiny/mid --out_dir=out/tiny/mid_rl
#   torchrun --standalone --nproc_per_node=2 rl.py tiny_rl          # gloo, 2 processes
# The RL range should sit at the base's edge of competence: check `python evaluate.py tiny_eval
# --ckpts=out/tiny/base` and pick the ops where pass@k is above 0 but pass@1 is low.
init_from = 'out/tiny/base'     # pretrain.py tiny_pretrain (op 2-4 + 5% op 5-6 of the tiny world, forward mode)
out_dir = 'out/tiny/rl'
world = 'tiny'                  # prompts from the base's world (data.WORLDS['tiny'])
op_min = 5                      # the tiny base's edge of competence, op 5-6 (process-verified pass@1 19 / 4%,
op_max = 6                      # pass@8 73 / 10%, measured on fresh problems; RESEARCH.md)
reverse_frac = 0.0              # the tiny world is forward mode only
reward = 'strict'               # process-aware: 1 only if the answer and every step are right. The blend
                                # (0.2 outcome + 0.8 process score) pays a right answer with wrong steps and
                                # gained less at the edge (op 5 pass@1 19 -> 36% vs 45%, 20 steps)
group_size = 6
prompts_per_step = 16
minibatch_prompts = 8           # 2 updates per rollout
micro_batch_tokens = 8192       # padded tokens per forward/backward
max_prompt_len = 512
max_response_len = 192          # gold forward solutions of the tiny world: ~60 tokens at op 6
temperature = 0.7               # rollouts at the evaluation temperature: at T = 1 this model gets op 5 right in
                                # ~6% of samples and 88-94% of groups had no signal (measured, first steps)
lr = 2e-4
kl_coef = 0.1
skip_no_signal = True           # at this lr, AdamW turns the KL term's noise into full steps when no group
                                # has signal (RESEARCH.md): such mini-batches are skipped
max_steps = 40
eval_every = 0                  # evaluate.py reports every model on the same problems
eval_modes = 'normalforward'
ckpt_every = 20
sample_every = 10
