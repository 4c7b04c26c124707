# Headroom ablation (STUDY.md §5.1): pre-training op mix easy 49.5% / medium 49.5% / hard 1%
# (easy = op 2-4, medium = 5-7, hard = 8-10, uniform inside a band); everything else as paper_pretrain.
#   python pretrain.py paper_pretrain_headroom_49.5_49.5_1 --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain_headroom_49.5_49.5_1
from config.paper_pretrain import *  # noqa: F401,F403  (the repo root is on sys.path when running pretrain.py)
out_dir = 'out/base_headroom_49.5_49.5_1'
data_dir = 'data_cache/headroom_49.5_49.5_1'
mixture = 'headroom_.495/.495/.01'
