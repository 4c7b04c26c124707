# GRPO on op 11-14 from the op 2-10 base: the OOD edge: the paper's best setting, +42 points pass@128 on op 11-14 (STUDY.md §5.1).
#   python rl.py paper_rl_op11-14        (rewards: add --reward=strict --out_dir=out/rl_op11-14-strict, ...)
# Everything else as config/paper_rl.py (the paper's GRPO recipe is rl.py's defaults).
from config.paper_rl import *  # noqa: F401,F403  (everything else as config/paper_rl.py)
out_dir = 'out/rl_op11-14'
op_min = 11
op_max = 14
