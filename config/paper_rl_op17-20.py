# GRPO on op 17-20 from the op 2-10 base: too hard for the base: no reward signal, no gain expected (STUDY.md §5.1).
#   python rl.py paper_rl_op17-20        (rewards: add --reward=strict --out_dir=out/rl_op17-20-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
from config.paper_rl import *  # noqa: F401,F403  (everything else as config/paper_rl.py)
out_dir = 'out/rl_op17-20'
op_min = 17
op_max = 20
