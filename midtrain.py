"""
Mid-training (STUDY.md §4): continue the pre-training objective from a base checkpoint on a mixture aimed
at the edge of the base model's competence (paper: 20% uniform over op 2..10 + 80% uniform over op
11..14), with a fresh AdamW state and a fresh warmup (15%) + cosine schedule. The training loop is
pretrain.train(); this file only changes the defaults, loads the base, and converts a compute budget.

    python midtrain.py tiny_midtrain                                   # CPU, from out/tiny_base
    python midtrain.py paper_midtrain --prepare_only=True --data_workers=16
    python midtrain.py paper_midtrain                                  # one GPU, from out/base
    torchrun --standalone --nproc_per_node=8 midtrain.py paper_midtrain

Compute budget: --flops_budget=F (training FLOPs of this stage) sets the token budget to F / 6N,
N = the base model's parameters (STUDY.md §4's accounting; rl.py charges 6N per trained and 2N per
forward-only token). This is how one FLOP budget is split between mid-training and RL (STUDY.md §5.3):

    python midtrain.py paper_midtrain --flops_budget=4.8e17 --out_dir=out/mid_80

The mid-training data must be tokenized with the base run's tokenizer: if data_dir is missing it is
built with {init_from}/tokenizer.json; a data_dir built with another tokenizer is a clear error.
Re-running the same command resumes {out_dir}/ckpt.pt exactly, as in pretrain.py.
"""
import json
import os

import common
import pretrain
from checkpoint import load_checkpoint, resolve_ckpt, run_tokenizer_path

defaults = {k: v for k, v in pretrain.defaults.items()
            # the architecture comes from the base checkpoint, so the model keys do not apply here
            # and the tokenizer is the base run's
            if k not in ('model', 'n_layer', 'hidden_size', 'n_head', 'n_kv_head', 'intermediate_size', 'tokenizer')}
defaults.update(
    out_dir='out/mid',                   # this stage's run directory
    init_from='out/base',                # base run directory (or its ckpt.pt): weights + tokenizer
    data_dir='data_cache/mid_11_14',     # built from `mixture` with the base tokenizer if missing
    mixture='mid_11_14',                 # 20% U(op 2..10) + 80% U(op 11..14) (STUDY.md §4)
    warmup_frac=0.15,                    # the paper's mid-training warmup
    flops_budget=0.0,                    # if > 0: this stage's training FLOPs; max_tokens = flops_budget / (6N)
)


def tokens_for_flops(flops, n_params):
    """Training tokens that cost `flops` at 6N FLOPs per token (STUDY.md §4)."""
    return int(flops // (6 * n_params))


def resolve(cfg):
    """Check the base checkpoint and turn a FLOP budget into a token budget (in place); returns cfg."""
    if cfg.init_from == 'scratch':
        raise common.UsageError("config error: mid-training starts from a base checkpoint: set --init_from=out/RUN")
    ckpt = resolve_ckpt(cfg.init_from, 'base checkpoint')
    if cfg.flops_budget > 0:
        n = load_checkpoint(ckpt, device='cpu')['model'].num_params()
        cfg.max_tokens = tokens_for_flops(cfg.flops_budget, n)
        if cfg.max_tokens < cfg.batch_tokens:
            raise common.UsageError(f"config error: flops_budget={cfg.flops_budget:.3g} buys {cfg.max_tokens:,} "
                                    f"tokens (6N = {6 * n:,} FLOPs/token), less than one batch of "
                                    f"{cfg.batch_tokens:,}")
    return cfg


def ensure_dataset(cfg):
    """Build the mid-training data with the base run's tokenizer if it is missing."""
    if os.path.exists(os.path.join(cfg.data_dir, 'meta.json')):
        return
    ckpt = resolve_ckpt(cfg.init_from, 'base checkpoint')
    tok_path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), 'tokenizer.json')
    if not os.path.exists(tok_path):  # a checkpoint outside a run directory: its data_dir's tokenizer
        tok_path = run_tokenizer_path(ckpt, load_checkpoint(ckpt)['config'])
    if tok_path is None:
        raise common.UsageError(f"no tokenizer for the base checkpoint {ckpt} (none beside it or in its data_dir)")
    pretrain.ensure_dataset(cfg, tokenizer=tok_path)


def main(argv):
    cfg = resolve(common.configure(defaults, argv))
    common.tracker_package(cfg.logger)  # a missing package is an error now, not after building the data
    if cfg.prepare_only or int(os.environ.get('WORLD_SIZE', '1')) == 1:
        ensure_dataset(cfg)
    if cfg.prepare_only:
        return None
    log = pretrain.train(cfg)
    if log is not None and 'summary' in log:
        print(json.dumps({k: log['summary'][k] for k in ('tokens', 'train_flops_6n', 'final_val_loss')}))
    return log


if __name__ == '__main__':
    common.cli('midtrain.py', main)
