"""
Checkpoints and run directories: what one stage leaves for the next, and for its own resume.

  save_checkpoint / load_checkpoint   one atomic, torch.load(weights_only=True)-safe format for every
                   stage (weights, model config, run config, tokenizer identity, step, optimizer,
                   data-loader / RNG state). A file that is not one is a one-line UsageError.
  rng_state / set_rng_state           Python / numpy / torch (/ CUDA) RNG states, weights_only-safe.
  resolve_ckpt / checkpoint_step / run_tokenizer_path / load_run   a run directory ({out_dir}/ckpt.pt,
                   tokenizer.json, the logs) or a ckpt.pt -> its checkpoint, and (model, tokenizer,
                   checkpoint) with the tokenizer identity checked.
  resume_checkpoint / restore_training_state / config_diff   continuing {out_dir}/ckpt.pt: one routine
                   for pretrain.py and rl.py, each stage passing its own resume-safe keys.

Imports common.py, model.py and tokenizer.py.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from common import UsageError, plain, unwrap
from model import ModelConfig, Qwen2
from tokenizer import check_identity, load_tokenizer

# -----------------------------------------------------------------------------
# Checkpoints

_SAFE_TYPES = (type(None), bool, int, float, str, bytes, torch.Tensor)


def _check_safe(obj, where):
    """Fail at save time (not at load time) when something would not pass weights_only=True."""
    if isinstance(obj, _SAFE_TYPES) or isinstance(obj, torch.dtype) or isinstance(obj, torch.Size):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not checkpoint-safe")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} has type {type(obj).__name__}, which torch.load(weights_only=True) refuses; "
                    f"convert it to tensors/lists/dicts/primitives (see rng_state for RNG states)")


def clean_state_dict(sd: dict) -> dict:
    """Strip `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, in any order."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in ('_orig_mod.', 'module.'):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    return out


def rng_state() -> dict:
    """Python/numpy/torch(/cuda) RNG states as weights_only-safe values."""
    v, inner, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {'python': [v, list(inner), gauss],
             'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Put back rng_state()'s values. The states are byte tensors read on the CPU whatever device a
    checkpoint was loaded for (torch.set_rng_state and numpy take CPU bytes only)."""
    v, inner, gauss = state['python']
    random.setstate((v, tuple(inner), gauss))
    n = state['numpy']
    np.random.set_state((n[0], n[1].cpu().numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def save_checkpoint(path, model, run_config: dict, tokenizer_identity: str, step: int, optimizer=None,
                    extra: dict | None = None):
    """Write everything needed to resume or to start the next stage, atomically: the file is
    written to path + '.tmp', fsynced, then os.replace'd over `path`, so a crash leaves either the
    old or the new checkpoint, never half of one. Everything inside is torch.load(weights_only=True)
    safe (checked here, so a bad `extra` fails now rather than at resume time)."""
    m = unwrap(model)
    ckpt = {
        'format': 'qwen2-ckpt-v1',
        'model': clean_state_dict(m.state_dict()),
        'model_config': m.config.to_dict(),
        'config': plain(run_config),
        'tokenizer_identity': tokenizer_identity,
        'step': int(step),
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'extra': plain(extra) if extra is not None else {},
    }
    for key in ('config', 'extra', 'model_config'):
        _check_safe(ckpt[key], key)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read(path, mmap=False) -> dict:
    """The dict a checkpoint file holds (torch.load with weights_only=True). A file that is not one --
    truncated by a full disk, corrupt, or not written by save_checkpoint -- is one UsageError, naming
    the file and the fix, whichever command reads it."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # (torch raises RuntimeError, UnpicklingError, EOFError, ... with long messages)
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__} from torch.load: truncated or "
                         f"corrupt); train that run again or point at another ckpt.pt") from None
    missing = [k for k in ('model', 'model_config', 'tokenizer_identity', 'step') if not isinstance(ckpt, dict)
               or k not in ckpt]
    if missing:
        raise UsageError(f"{path} is not a checkpoint written by this code (no {', '.join(missing)}); point at a "
                         f"run directory's ckpt.pt, or import a Hugging Face model with interop.py import_hf")
    return ckpt


def load_checkpoint(path, device='cpu', expect_tokenizer: str | None = None,
                    expect_model_config: ModelConfig | dict | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint. Returns
    {'model': Qwen2 on device, 'config': run config, 'model_config': ModelConfig,
     'tokenizer_identity', 'step', 'optimizer': state dict or None, 'extra': dict}.
    Raises ValueError when the tokenizer identity or the model config differ from the expected, and
    a UsageError when the file is not a readable checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # read on the CPU whatever `device` is: only the model moves there (the optimizer state follows its
    # parameters in load_state_dict), and the RNG states must stay CPU tensors (set_rng_state)
    ckpt = _read(path)
    mcfg = ModelConfig.from_dict(ckpt['model_config'])
    if expect_tokenizer is not None:
        check_identity(expect_tokenizer, ckpt['tokenizer_identity'], f"checkpoint {path}")
    if expect_model_config is not None:
        want = expect_model_config if isinstance(expect_model_config, dict) else expect_model_config.to_dict()
        have = mcfg.to_dict()
        diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
        if diff:
            desc = ', '.join(f"{k}: checkpoint={a!r} vs expected={b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"model config mismatch for {path}: {desc}; pick the model preset the "
                             f"checkpoint was trained with (or drop the expectation to use the checkpoint's)")
    model = Qwen2(mcfg)
    model.load_state_dict(clean_state_dict(ckpt['model']))
    model.to(device)
    return {'model': model, 'config': ckpt.get('config', {}), 'model_config': mcfg,
            'tokenizer_identity': ckpt['tokenizer_identity'], 'step': ckpt['step'],
            'optimizer': ckpt.get('optimizer'), 'extra': ckpt.get('extra') or {}}


# -----------------------------------------------------------------------------
# Run directories: {out_dir}/ckpt.pt, tokenizer.json (a copy of the data's) and the logs


def resolve_ckpt(path, what='checkpoint', fix='train it first or fix the path') -> str:
    """The checkpoint file of `path` (a ckpt.pt or a run directory holding one); a missing one is a
    UsageError saying what is missing and `fix`."""
    path = os.fspath(path)
    p = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(p):
        why = 'the directory has no ckpt.pt' if os.path.isdir(path) else f'{p} does not exist'
        raise UsageError(f"no {what} at {path}: {why}; {fix}")
    return p


def checkpoint_step(path) -> int | None:
    """The step a checkpoint (a ckpt.pt or a run directory) was saved at, read without building the
    model (memory-mapped: the weights stay on disk); None where there is no checkpoint."""
    try:
        p = resolve_ckpt(path)
    except UsageError:
        return None
    return int(_read(p, mmap=True)['step'])


def run_tokenizer_path(ckpt_path, ckpt_config: dict) -> str | None:
    """Where a run's tokenizer lives: the run directory's tokenizer.json, else its data_dir's."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    for cand in (os.path.join(run_dir, 'tokenizer.json'),
                 os.path.join(ckpt_config.get('data_dir') or '', 'tokenizer.json')):
        if os.path.isfile(cand):
            return cand
    return None


def load_run(path, device='cpu', tokenizer=None, what='checkpoint',
             fix='give the data directory it was trained on'):
    """(model, tokenizer, checkpoint dict + 'path': its file) of a run directory or checkpoint file.
    The tokenizer is `tokenizer` (a Tokenizer, a tokenizer.json or a dataset directory) when
    given, else the run's own (run_tokenizer_path); its identity must be the checkpoint's. Every
    failure is a UsageError ending in `fix` (how the command names the tokenizer)."""
    ckpt_path = resolve_ckpt(path, what)
    ck = load_checkpoint(ckpt_path, device=device)
    source = tokenizer or run_tokenizer_path(ckpt_path, ck['config'])
    if not source:
        raise UsageError(f"no tokenizer for {ckpt_path} (no tokenizer.json beside it or in its data_dir); {fix}")
    try:
        tok = load_tokenizer(source)
        check_identity(tok.identity, ck['tokenizer_identity'], f"checkpoint {ckpt_path}")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{e} ({fix})") from None
    ck['path'] = ckpt_path
    return ck['model'], tok, ck


# -----------------------------------------------------------------------------
# Resuming a run: pretrain.py (and midtrain.py) and rl.py continue {out_dir}/ckpt.pt the same way


def config_diff(old: dict, new: dict, safe_keys=()) -> dict:
    """{key: (old value, new value)} of the keys whose values differ between two run configs, but for
    safe_keys (the stage's keys that cannot change its trajectory: how often it logs, evaluates, ...)."""
    keys = (set(old) | set(new)) - set(safe_keys)
    return {k: (old.get(k, '<missing>'), new.get(k, '<missing>')) for k in sorted(keys) if old.get(k) != new.get(k)}


def resume_checkpoint(path, config: dict, safe_keys, tokenizer_identity: str, say=print, device='cpu',
                      defaults=None):
    """The checkpoint of a run to continue (load_checkpoint's dict), or None when `path` does not exist
    (a new run). Its tokenizer must be `tokenizer_identity`, and its run config `config` but for the
    stage's safe_keys (a key the checkpoint lacks counts as its value in `defaults`, the stage's
    defaults): a changed key is a UsageError naming it, unless config['resume_override'] (then a
    console line says what changed)."""
    if not os.path.exists(path):
        return None
    try:
        ck = load_checkpoint(path, device=device, expect_tokenizer=tokenizer_identity)
    except ValueError as e:
        raise UsageError(str(e)) from None
    # a key the checkpoint's config lacks was added to the stage later: it counts as its default (the
    # value that keeps the old behaviour), so a run written before the key existed still resumes
    old = {**{k: v for k, v in (defaults or {}).items() if k in config and k not in ck['config']}, **ck['config']}
    diff = config_diff(old, config, safe_keys)
    lines = '; '.join(f"{k}: checkpoint {a!r} != now {b!r}" for k, (a, b) in diff.items())
    if diff and not config.get('resume_override'):
        raise UsageError(f"{path} was written by a different config ({lines}); use the checkpoint's values, "
                         f"another --out_dir, or --resume_override=True")
    if diff:
        say(f"resume_override: continuing {path} with a changed config ({lines})")
    return ck


def restore_training_state(ck: dict, optimizer, rank: int, world_size: int, say=print) -> int:
    """Put back what a checkpoint holds besides the weights and the stage's own state: the optimizer,
    and this rank's RNG state (ck['extra']['rng'], one per rank: save_checkpoint gets them from
    common.all_gather). Returns the step to continue from."""
    optimizer.load_state_dict(ck['optimizer'])
    rngs = ck['extra']['rng'] if isinstance(ck['extra']['rng'], list) else [ck['extra']['rng']]
    if len(rngs) != world_size:
        say(f"note: the checkpoint was written by {len(rngs)} process(es), resuming with {world_size}: "
            f"same data order, but bitwise equality with an uninterrupted run is not guaranteed")
    set_rng_state(rngs[rank % len(rngs)])
    return ck['step']
