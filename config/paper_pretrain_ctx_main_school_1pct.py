# Contextual generalization (STUDY.md §5.2), the release's main-text setting (its context_pretrain_2
# checkpoints): zoo at op 2..20 and 1% school problems, school only at op 2 (the primitives); movie never
# appears; everything else as paper_pretrain. The appendix setting (zoo at op 2..10): paper_pretrain_ctx_school_*.
#   python pretrain.py paper_pretrain_ctx_main_school_1pct --prepare_only=True --data_workers=16
#   torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain_ctx_main_school_1pct
from config.paper_pretrain import *  # noqa: F401,F403  (the repo root is on sys.path when running pretrain.py)
out_dir = 'out/base_ctx_main_school_1pct'
data_dir = 'data_cache/ctx_main_school_1pct'
mixture = 'ctx_main_school_1pct'
