# GRPO on op 9-12 from the op 2-10 base: straddles the edge of the op 2-10 base's competence (STUDY.md §5.1).
#   python rl.py paper_rl_op9-12        (rewards: add --reward=strict --out_dir=out/rl_op9-12-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
from config.paper_rl import *  # noqa: F401,F403  (everything else as config/paper_rl.py)
out_dir = 'out/rl_op9-12'
op_min = 9
op_max = 12
