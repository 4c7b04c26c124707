# Contextual generalization (STUDY.md §5.2), the release's appendix setting: pre-train on op 2..10 with 10% school, 90% zoo
# (movie never appears); everything else as paper_pretrain.
#   python pretrain.py paper_pretrain_ctx_school_10pct --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain_ctx_school_10pct
from config.paper_pretrain import *  # noqa: F401,F403  (the repo root is on sys.path when running pretrain.py)
out_dir = 'out/base_ctx_school_10pct'
data_dir = 'data_cache/ctx_school_10pct'
mixture = 'ctx_school_10pct'
