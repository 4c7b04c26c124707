# Contextual generalization (STUDY.md §5.2), appendix setting, the op-2 variant: 99% zoo at op 2..10 and 1% school, the school
# problems only at op 2 (the basic primitives); movie never appears; everything else as paper_pretrain.
#   python pretrain.py paper_pretrain_ctx_school_1pct_op2 --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain_ctx_school_1pct_op2
from config.paper_pretrain import *  # noqa: F401,F403  (the repo root is on sys.path when running pretrain.py)
out_dir = 'out/base_ctx_school_1pct_op2'
data_dir = 'data_cache/ctx_school_1pct_op2'
mixture = 'ctx_school_1pct_op2'
