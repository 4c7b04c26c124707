# Contextual generalization (STUDY.md §5.2), the release's appendix setting: pre-train on op 2..10 with zoo only (0% school)
# (movie never appears); everything else as paper_pretrain.
#   python pretrain.py paper_pretrain_ctx_school_0pct --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain_ctx_school_0pct
from config.paper_pretrain import *  # noqa: F401,F403  (the repo root is on sys.path when running pretrain.py)
out_dir = 'out/base_ctx_school_0pct'
data_dir = 'data_cache/ctx_school_0pct'
mixture = 'ctx_school_0pct'
