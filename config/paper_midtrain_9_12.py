# Mid-training variant of STUDY.md §4: 20% U(op 2..10) + 80% U(op 9..12); everything else as paper_midtrain.
from config.paper_midtrain import *  # noqa: F401,F403  (the repo root is on sys.path when running midtrain.py)
out_dir = 'out/mid_9_12'
data_dir = 'data_cache/mid_9_12'
mixture = 'mid_9_12'
