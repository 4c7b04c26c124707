# GRPO at paper scale (STUDY.md §4): the defaults of rl.py are the paper's values (group 6, 1024 prompts
# per step in 4 mini-batches of 256, lr 1e-6 constant, wd 0.01, clip 1.0, PPO clip 0.2 / dual clip 3.0,
# k3 KL 0.001, no entropy bonus, token-mean (loss_type='paper'), temperature 1.0, prompt/response up to 1024 tokens,
# ~200 steps). This preset sets the run around them: RL on the OOD edge, op 11-14 (STUDY.md §5.1).
#   python rl.py paper_rl                                               # one GPU
#   torchrun --standalone --nproc_per_node=8 rl.py paper_rl
# Other ranges: paper_rl_op7-10, paper_rl_op9-12, paper_rl_op11-14 (= this), paper_rl_op17-20.
# Rewards (STUDY.md §5.4):   --reward=blend_0.2_0.8 | blend_0.5_0.5 | strict  (and a matching --out_dir)
# Contexts (STUDY.md §5.2):  --templates="{'crazy_zootopia': 1.0, 'teachers_in_school': 1.0, 'movie_festival_awards': 0.0}"
# Mid-training vs RL at one FLOP budget (STUDY.md §5.3):
#   python rl.py paper_rl --init_from=out/mid_80 --flops_budget=1.2e17 --max_steps=100000 --out_dir=out/rl_20
init_from = 'out/base'          # the op 2-10 pre-trained base (pretrain.py paper_pretrain)
out_dir = 'out/rl_op11-14'
op_min = 11
op_max = 14
max_steps = 200                 # ~1 epoch of 200k prompts
micro_batch_tokens = 32768      # padded tokens per forward/backward per GPU (16 sequences of up to 2048)
eval_every = 20
eval_per_op_template = 16       # 4 ops x 3 templates x 16 = 192 held-out problems x 4 samples
eval_samples = 4
ckpt_every = 20
sample_every = 10
