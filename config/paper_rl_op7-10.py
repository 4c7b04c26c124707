# GRPO on op 7-10 from the op 2-10 base: in-distribution for the op 2-10 base: pass@1 up in ID, no OOD gain (STUDY.md §5.1).
#   python rl.py paper_rl_op7-10        (rewards: add --reward=strict --out_dir=out/rl_op7-10-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
from config.paper_rl import *  # noqa: F401,F403  (everything else as config/paper_rl.py)
out_dir = 'out/rl_op7-10'
op_min = 7
op_max = 10
