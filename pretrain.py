"""
Pre-train a Qwen2 language model from scratch on packed GSM-Infinite training texts (STUDY.md §4).

Commands (run from the repository root):

    # CPU, a few minutes: builds the tiny dataset on first use, then trains the tiny model
    python pretrain.py tiny_pretrain

    # one GPU, the paper recipe (10B tokens on op 2..10). Build the data first, once, with many workers:
    python pretrain.py paper_pretrain --prepare_only=True --data_workers=16
    python pretrain.py paper_pretrain

    # 8 GPUs on one node (same global batch of 512k tokens; fewer gradient-accumulation steps)
    torchrun --standalone --nproc_per_node=8 pretrain.py paper_pretrain

    # two nodes of 8 GPUs (run on both; set MASTER to the first node's address)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 pretrain.py paper_pretrain
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 pretrain.py paper_pretrain

    # any key can be overridden (--help lists them); presets are config/NAME.py
    python pretrain.py tiny_pretrain --max_tokens=500_000 --out_dir=out/try

The device is CUDA when one is visible (CUDA_VISIBLE_DEVICES= forces the CPU); bf16 autocast on CUDA.

Re-running the same command continues from {out_dir}/ckpt.pt: same data order, same RNG, and the
same final weights as a run that was never interrupted. A different config on resume is an error
(naming the keys) unless --resume_override=True.

What ends up in out_dir: ckpt.pt (model + run config + tokenizer identity + optimizer + data-loader and
RNG state), tokenizer.json (a copy, so the run directory is self-contained for evaluate.py / rl.py),
log.json (every step's loss/lr/tok/s/MFU and every held-out evaluation), loss.png (common.RunLog writes
them; --logger=wandb or tensorboard also sends every record there).

midtrain.py reuses train() below with its own defaults (init_from a base run, fresh optimizer/schedule).
"""
import dataclasses
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import model
from checkpoint import (load_checkpoint, resolve_ckpt, restore_training_state, resume_checkpoint, rng_state,
                        save_checkpoint)
from tokenizer import ShardLoader, Tokenizer, mask_question_targets

# -----------------------------------------------------------------------------------------------
# default config (values for the paper run live in config/paper_pretrain.py; these are CPU-sized)
defaults = dict(
    # I/O
    out_dir='out/base',                  # ckpt.pt, log.json, loss.png, tokenizer.json go here
    data_dir='data_cache/pretrain_uniform',  # tokenizer.json, train_*.bin, val.bin, meta.json, eval.jsonl
    mixture='pretrain_uniform',          # builds a missing data_dir: a data.MIXTURES name or ops ('2-4:0.5,5-7:0.5')
    data_tokens=0,                       # training tokens to generate when building data_dir (0: max_tokens)
    data_seed=0,                         # generator seed for building data_dir
    data_workers=1,                      # generator processes when building data_dir
    tokenizer='',                        # tokenizer to build data_dir with: a tokenizer.json or a dataset dir
                                         # ('': data.py's standard tokenizer, shared by every dataset)
    prepare_only=False,                  # build data_dir (single process) and exit
    init_from='scratch',                 # 'scratch', or a checkpoint (ckpt.pt or its run dir) to start from
    # model
    model='tiny',                        # preset in model.MODEL_PRESETS; the overrides below win when > 0
    n_layer=0,
    hidden_size=0,
    n_head=0,
    n_kv_head=0,
    intermediate_size=0,
    # batch: one optimizer step sees batch_tokens tokens = grad_accum * world_size * micro_batch * seq_len
    batch_tokens=16 * 512,               # global batch in tokens
    micro_batch=16,                      # sequences per process per forward/backward
    seq_len=512,                         # packed block length
    doc_mask=False,                      # attend only within each packed document (block-diagonal causal
                                         # mask): no window mixes problems; SDPA leaves its fastest kernels
    whole_docs=False,                    # windows hold whole documents (rest padded, no loss) instead of cutting
                                         # the stream every seq_len tokens: no problem loses its question, so
                                         # short windows (cheap attention, esp. with doc_mask on a CPU) are safe
    loss_on='all',                       # 'all': loss on every token (plain pre-training); 'solution': not on
                                         # the question's tokens (solutions and answers only; val loss too)
    max_tokens=2_000_000,                # training budget in tokens -> max_steps = max_tokens // batch_tokens
    max_steps=0,                         # if > 0, overrides the token budget (tests, smoke runs)
    allow_epochs=False,                  # allow a budget larger than data_dir (problems seen twice); else an error
    # AdamW + schedule
    lr=1e-3,                             # peak learning rate
    min_lr=1e-4,                         # cosine floor
    warmup_frac=0.05,                    # linear warmup over this fraction of max_steps, then cosine to min_lr
    weight_decay=0.1,                    # applied to 2-D weights (matmuls, embeddings) only, not norms/biases
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                       # max global grad norm (0 disables)
    # evaluation, logging, checkpoints
    eval_interval=100,                   # held-out val loss every N steps (and at step 0 and at the end)
    eval_tokens=64 * 512,                # val tokens per evaluation (all processes together)
    log_interval=10,                     # one log line every N steps
    ckpt_interval=200,                   # checkpoint every N steps (and at the end)
    # system
    seed=1337,                           # model init and torch RNG
    compile=False,                       # torch.compile the model (GPU runs)
    peak_flops=0.0,                      # per-device peak FLOP/s for MFU; 0: look up the GPU name (none on CPU)
    progress=True,                       # tqdm progress bar on rank 0
    logger='',                           # also log to 'wandb' or 'tensorboard' (if installed); '' = files only
    resume_override=False,               # allow resuming {out_dir}/ckpt.pt with a different config
)

# keys that may change on resume without changing the trajectory (how often we look, not what we do);
# midtrain.py shares them (checkpoint.resume_checkpoint ignores them when it compares configs)
RESUME_SAFE_KEYS = {'resume_override', 'allow_epochs', 'log_interval', 'progress', 'compile', 'prepare_only', 'eval_interval',
                    'eval_tokens', 'ckpt_interval', 'data_workers', 'peak_flops', 'logger'}


# -----------------------------------------------------------------------------------------------
# helpers

def lr_at(step, cfg, max_steps):
    """Linear warmup for warmup_frac of the run, then cosine from lr to min_lr at the last step."""
    warmup = int(cfg['warmup_frac'] * max_steps)
    if step < warmup:
        return cfg['lr'] * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg['lr'] - cfg['min_lr'])


def model_config_for(cfg, vocab_size):
    """The model preset with the config's dimension overrides, sized for the tokenizer and seq_len."""
    if cfg['model'] not in model.MODEL_PRESETS:
        raise common.UsageError(f"unknown model preset {cfg['model']!r}; choose one of {sorted(model.MODEL_PRESETS)}")
    mc = model.MODEL_PRESETS[cfg['model']]
    over = {k: cfg[k] for k in ('n_layer', 'hidden_size', 'n_head', 'n_kv_head', 'intermediate_size') if cfg[k] > 0}
    return dataclasses.replace(mc, vocab_size=vocab_size, max_seq_len=max(mc.max_seq_len, cfg['seq_len']), **over)


def grad_accum_steps(cfg, world_size):
    per_micro = cfg['micro_batch'] * cfg['seq_len'] * world_size
    if cfg['batch_tokens'] % per_micro:
        raise common.UsageError(
            f"batch_tokens={cfg['batch_tokens']} is not a multiple of micro_batch * seq_len * world_size = "
            f"{cfg['micro_batch']} * {cfg['seq_len']} * {world_size} = {per_micro}; set --batch_tokens to a multiple "
            f"of {per_micro} (e.g. {max(1, round(cfg['batch_tokens'] / per_micro)) * per_micro}) "
            f"or change --micro_batch")
    return cfg['batch_tokens'] // per_micro


def ensure_dataset(cfg, tokenizer=None):
    """Build data_dir (tokenizer, shards, val, held-out eval set) with data.build_dataset if it is missing."""
    if os.path.exists(os.path.join(cfg['data_dir'], 'meta.json')):
        return
    budget = cfg['data_tokens'] or cfg['max_tokens']
    print(f"building {cfg['data_dir']}: mixture {cfg['mixture']!r}, {budget:,} training tokens", flush=True)
    tokenizer = tokenizer or cfg.get('tokenizer') or None
    try:
        mixture = data.parse_mixture(cfg['mixture'])
    except ValueError as e:
        raise common.UsageError(f"--mixture={cfg['mixture']}: {e}") from None
    data.build_dataset(cfg['data_dir'], mixture, budget, seed=cfg['data_seed'], tokenizer=tokenizer,
                       workers=cfg['data_workers'])


def doc_ids(x, cfg, eos_id):
    """Document index of each token for the doc_mask attention (None: plain causal attention)."""
    return model.document_ids(x, eos_id) if cfg['doc_mask'] else None


def targets(x, y, cfg, tok):
    """The next-token targets the loss sees: all of y, or (loss_on='solution') not the questions'."""
    return mask_question_targets(x, y, tok) if cfg['loss_on'] == 'solution' else y


@torch.no_grad()
def estimate_val_loss(m, cfg, dist, tok):
    """Mean next-token loss per target token on the first eval_tokens of val.bin, identical on every call
    (fixed loader seed)."""
    loader = ShardLoader(cfg['data_dir'], 'val', cfg['micro_batch'], cfg['seq_len'],
                         rank=dist.rank, world_size=dist.world_size, seed=0, whole_docs=cfg['whole_docs'])
    per_batch = cfg['micro_batch'] * cfg['seq_len'] * dist.world_size
    n = max(1, min(cfg['eval_tokens'], loader.n_tokens - cfg['seq_len']) // per_batch)  # no window twice
    if cfg['whole_docs']:
        n = max(1, min(n, loader.windows_per_epoch() // (cfg['micro_batch'] * dist.world_size)))
    m.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, target count)
    for _, (x, y) in zip(range(n), loader):
        x, y = x.to(dist.device), y.to(dist.device)
        y = targets(x, y, cfg, tok)
        with common.autocast_ctx(dist.device):
            _, tok_loss = m(x, y, loss_reduction='none', doc_ids=doc_ids(x, cfg, tok.eos_id))
        total += torch.stack([tok_loss.sum().float(), (y != -100).sum().float()])
    m.train()
    common.all_reduce(total, dist.world_size)
    return (total[0] / total[1].clamp(min=1)).item()


def load_model(cfg, tok, ckpt_path, say):
    """The model to train, on the CPU, and the checkpoint to resume (None for a new run):
    {out_dir}/ckpt.pt if it exists (checkpoint.resume_checkpoint: same tokenizer, same config but for
    RESUME_SAFE_KEYS), else the weights of init_from, else a fresh init. The tokenizer identity of
    either checkpoint must be the data's."""
    ck = resume_checkpoint(ckpt_path, cfg, RESUME_SAFE_KEYS, tok.identity, say, defaults=defaults)
    if ck is not None:
        return ck['model'], ck
    if cfg['init_from'] != 'scratch':
        # weights only: the optimizer, LR schedule and data order start fresh
        try:
            init = load_checkpoint(resolve_ckpt(cfg['init_from'], 'init_from checkpoint'),
                                   expect_tokenizer=tok.identity)
        except ValueError as e:
            raise common.UsageError(str(e)) from None
        if init['model'].config.max_seq_len < cfg['seq_len']:
            raise common.UsageError(f"seq_len={cfg['seq_len']} exceeds the base model's max_seq_len="
                                    f"{init['model'].config.max_seq_len}")
        return init['model'], None
    torch.manual_seed(cfg['seed'])  # same init on every rank (DDP also broadcasts rank 0's weights)
    return model.Qwen2(model_config_for(cfg, tok.vocab_size)), None


def restore_state(ck, cfg, optimizer, loader, dist, say):
    """Continue a run from its checkpoint: optimizer and this rank's RNG state
    (checkpoint.restore_training_state), data-loader position and the log so far (the history of the
    run's RunLog). Returns (start step, log)."""
    step = restore_training_state(ck, optimizer, dist.rank, dist.world_size, say)
    # the loader state is global (any rank's resumes every rank, at any world size); RNG states are per rank
    loader.load_state_dict(ck['extra']['loader'])
    log = ck['extra']['log']
    log['config'] = cfg
    return step, log


def summarize(log, cfg, raw, max_steps, peak, world_size):
    """The end-of-run numbers (log['summary']): budget, FLOPs, losses, throughput and MFU. The first
    step is left out of the throughput: it pays for compilation and warm-up."""
    tr = log['train'][1:] or log['train']
    n_params, tokens, fpt = raw.num_params(), max_steps * cfg['batch_tokens'], raw.flops_per_token(cfg['seq_len'])
    tok_s = len(tr) * cfg['batch_tokens'] / max(1e-9, sum(r['dt'] for r in tr))
    return {
        'steps': max_steps, 'tokens': tokens, 'params': n_params,
        'flops_per_token': fpt, 'train_flops': fpt * tokens,
        'train_flops_6n': 6 * n_params * tokens,  # STUDY.md §4's budget accounting
        'final_train_loss': log['train'][-1]['loss'] if log['train'] else None,
        'final_val_loss': log['val'][-1]['loss'], 'initial_val_loss': log['val'][0]['loss'],
        'tok_s': tok_s,
        'mfu': raw.estimate_mfu(tok_s / world_size, peak, seq_len=cfg['seq_len']),
        'train_s': sum(r['dt'] for r in log['train']),  # optimizer steps only (no eval / checkpoint time)
    }


# -----------------------------------------------------------------------------------------------
# the training loop

def check_run(cfg, dist):
    """The data's tokenizer, the gradient-accumulation steps and the number of optimizer steps; a
    missing dataset, a batch that does not divide or a budget under one batch is a UsageError now."""
    data_dir = cfg['data_dir']
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        raise common.UsageError(f"{data_dir}/meta.json not found; build the data first (single process): "
                                f"python {os.path.basename(sys.argv[0])} ... --prepare_only=True")
    tok = Tokenizer.load(os.path.join(data_dir, 'tokenizer.json'))
    grad_accum = grad_accum_steps(cfg, dist.world_size)
    if cfg['loss_on'] not in ('all', 'solution'):
        raise common.UsageError(f"loss_on={cfg['loss_on']!r}: use 'all' (every token) or 'solution' "
                                f"(not the questions)")
    max_steps = cfg['max_steps'] or cfg['max_tokens'] // cfg['batch_tokens']
    if max_steps < 1:
        raise common.UsageError(f"max_tokens={cfg['max_tokens']} is less than one batch of "
                                f"batch_tokens={cfg['batch_tokens']}")
    return tok, grad_accum, max_steps


def make_optimizer(raw, cfg, device):
    """AdamW: weight decay on 2-D tensors only; fused kernel on CUDA."""
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg['weight_decay']},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']), fused=device.type == 'cuda')


def make_loader(cfg, dist, tok, max_steps, grad_accum):
    """The training loader (each rank reads its share of every global batch); a budget that would read
    the data more than once is a UsageError unless allow_epochs."""
    try:
        loader = ShardLoader(cfg['data_dir'], 'train', cfg['micro_batch'], cfg['seq_len'], rank=dist.rank,
                             world_size=dist.world_size, seed=cfg['seed'], tokenizer_identity=tok.identity,
                             whole_docs=cfg['whole_docs'])
    except ValueError as e:  # shards of another tokenizer than their tokenizer.json
        raise common.UsageError(str(e)) from None
    epochs = max_steps * grad_accum * dist.world_size * cfg['micro_batch'] / loader.windows_per_epoch()
    if epochs > 1 and not cfg['allow_epochs']:
        raise common.UsageError(f"{max_steps} steps would read {cfg['data_dir']} {epochs:.2f} times (repeated "
                                f"problems confound the study); build more data (--data_tokens), lower --max_tokens, "
                                f"or pass --allow_epochs=True")
    return loader


def train_step(m, raw, optimizer, batches, cfg, dist, tok, grad_accum, lr):
    """One optimizer step on the next global batch -> (loss, grad norm). The step's loss is the mean over
    every target token of the global batch, however the targets are spread over micro-steps and
    processes (loss_on='solution' leaves uneven counts): each micro-step backpropagates its token sum /
    the global count (x world_size: DDP averages)."""
    device = torch.device(dist.device)
    for g in optimizer.param_groups:
        g['lr'] = lr
    micro_batches = [next(batches) for _ in range(grad_accum)]
    ys = [targets(x, y, cfg, tok) for x, y in micro_batches]
    n_targets = sum((y != -100).sum() for y in ys).to(device=device, dtype=torch.float32)
    n_targets = common.all_reduce(n_targets, dist.world_size).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for micro, ((x, _), y) in enumerate(zip(micro_batches, ys)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # gradients are all-reduced only on the last micro-step (the context wraps forward AND backward)
        sync = dist.world_size == 1 or micro == grad_accum - 1
        with (nullcontext() if sync else m.no_sync()):
            with common.autocast_ctx(device):  # bf16 on CUDA (fp32 master weights), fp32 on CPU
                _, tok_loss = m(x, y, loss_reduction='none', doc_ids=doc_ids(x, cfg, tok.eos_id))
            loss = tok_loss.sum() / n_targets
            (loss * dist.world_size).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg['grad_clip'] or float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # each process holds its share of the global mean (a scalar all-reduce; negligible next to the step)
    return common.all_reduce(loss_sum, dist.world_size).item(), float(grad_norm)  # .item() waits for the GPU


def train(cfg):
    """Train per cfg (a resolved config dict); resumes {out_dir}/ckpt.pt if present. Returns the log dict."""
    dist = common.setup_distributed()
    device, master = torch.device(dist.device), dist.is_master
    out_dir, data_dir = cfg['out_dir'], cfg['data_dir']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    # console, log.json (every step's record, in 'train' and 'val'), loss.png, and W&B / TensorBoard if asked
    logger = common.RunLog(out_dir, cfg, 'pretrain', cfg['logger'], master,
                           history={'config': cfg, 'train': [], 'val': []})
    say = logger.print

    # data, model (resume > init_from > scratch), optimizer, loader: one tokenizer identity for the
    # shards, the init checkpoint and a resumed run
    tok, grad_accum, max_steps = check_run(cfg, dist)
    raw, ck = load_model(cfg, tok, ckpt_path, say)
    raw.to(device)
    optimizer = make_optimizer(raw, cfg, device)
    loader = make_loader(cfg, dist, tok, max_steps, grad_accum)
    start_step = 0
    if ck is not None:
        start_step, logger.history = restore_state(ck, cfg, optimizer, loader, dist, say)
        say(f"resuming {ckpt_path} at step {start_step}/{max_steps}")
    log = logger.history
    del ck
    batches = iter(loader)

    m = torch.compile(raw) if cfg['compile'] else raw
    if dist.world_size > 1:
        m = DDP(m, device_ids=[dist.local_rank] if device.type == 'cuda' else None)

    # per-device peak FLOP/s for MFU (None on CPU and unknown GPUs: no MFU)
    peak = cfg['peak_flops'] or common.peak_flops_per_s(device)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(os.path.join(data_dir, 'tokenizer.json'), os.path.join(out_dir, 'tokenizer.json'))
    say(f"model: {raw.num_params() / 1e6:.2f}M params, {raw.config}")
    say(f"{max_steps} steps x {cfg['batch_tokens']:,} tokens = {max_steps * cfg['batch_tokens'] / 1e6:.1f}M tokens; "
        f"{dist.world_size} process(es) x {grad_accum} micro-steps x {cfg['micro_batch']} x {cfg['seq_len']}; "
        f"device {device}")

    def checkpoint(step):
        rngs = common.all_gather(rng_state(), dist.world_size)
        if master:
            save_checkpoint(ckpt_path, raw, run_config=cfg, tokenizer_identity=tok.identity, step=step,
                            optimizer=optimizer, extra={'loader': loader.state_dict(), 'rng': rngs, 'log': log})
            logger.write_json('log.json', log)

    def validate(step):
        val = estimate_val_loss(m, cfg, dist, tok)
        logger.log('val', {'step': step, 'loss': val, 'tokens': step * cfg['batch_tokens']})
        say(f"step {step}: val loss {val:.4f}")

    if start_step == 0:
        validate(0)
    if cfg['progress']:
        logger.progress(max_steps, start_step)
    m.train()
    for step in range(start_step, max_steps):
        t0 = time.time()
        lr = lr_at(step, cfg, max_steps)
        loss_val, grad_norm = train_step(m, raw, optimizer, batches, cfg, dist, tok, grad_accum, lr)
        dt = time.time() - t0  # the step alone: evaluations and checkpoints are not charged to tok/s
        tok_s = cfg['batch_tokens'] / dt
        mfu = raw.estimate_mfu(tok_s / dist.world_size, peak, seq_len=cfg['seq_len'])  # None on CPU
        done = step + 1
        logger.log('train', {'step': done, 'loss': loss_val, 'lr': lr, 'grad_norm': grad_norm,
                             'tok_s': tok_s, 'mfu': mfu, 'dt': dt})
        logger.advance(loss=loss_val)
        if done % cfg['log_interval'] == 0 or done == max_steps or done == start_step + 1:
            say(f"step {done}/{max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | norm {grad_norm:.2f} | "
                f"{tok_s / 1e3:.1f}k tok/s | mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | "
                f"{1000 * dt:.0f} ms")
        if done % cfg['eval_interval'] == 0 or done == max_steps:
            validate(done)
        if done % cfg['ckpt_interval'] == 0 or done == max_steps:
            checkpoint(done)

    if master:
        log['summary'] = summarize(log, cfg, raw, max_steps, peak, dist.world_size)
        logger.write_json('log.json', log)
        logger.plot('loss.png', 'loss', {'train': 'train', 'val': 'held-out val'}, 'loss (nats/token)', logy=True)
        say(f"done: val loss {log['val'][0]['loss']:.4f} -> {log['val'][-1]['loss']:.4f}; {out_dir}/ckpt.pt")
    logger.close()
    if dist.world_size > 1:
        del m  # (the DDP wrapper goes first: common.cleanup_distributed)
        common.cleanup_distributed()
    return log


def main(argv):
    cfg = common.configure(defaults, argv)
    common.tracker_package(cfg['logger'])  # a missing package is an error now, not after building the data
    if cfg['prepare_only']:
        ensure_dataset(cfg)
        return None
    if int(os.environ.get('WORLD_SIZE', '1')) == 1:
        ensure_dataset(cfg)  # under torchrun the data must exist already (one process builds it, see above)
    return train(cfg)


if __name__ == '__main__':
    common.cli('pretrain.py', main)
