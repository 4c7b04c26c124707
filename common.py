"""
The plumbing every command shares; imports no file of the project.

  configure / Config / UsageError / cli   the one command-line parser of every command (preset files +
                   --key=value, type-checked; cfg.lr or cfg['lr']), its one-line errors (exit status 2),
                   and the dispatch of subcommands (cli(prog, {'build': build_main, ...})).
  write_json / append_jsonl / trim_jsonl   files a reader never sees half of.
  RunLog           the one logger of every stage: console lines and its progress bar (progress_bar,
                   also used for the loops outside a run), JSONL / JSON records, PNG plots, and
                   optionally Weights & Biases or TensorBoard (--logger=).
  setup_distributed / cleanup_distributed, and the collectives the stages use (all_gather,
                   all_reduce, global_std): each is the identity in a single process.
  autocast_ctx / seed_everything / peak_flops_per_s / unwrap   precision, seeding, a GPU's peak FLOP/s,
                   the plain model inside DDP / torch.compile wrappers.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import random
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Command lines: one error style, one configurator (nanoGPT style)


class UsageError(SystemExit):
    """A mistake in how a command was called or configured (a bad argument, a missing file, a
    mismatched run). Every command reports it as one line and exit status 2 (see `cli`); it is a
    SystemExit, so even code that does not catch it ends with that line rather than a traceback."""


def cli(prog: str, main, argv=None):
    """Run the command `prog`: main(argv), or, with a table {name: main} of subcommands, the one
    argv[0] names with the rest (none or an unknown name: a usage line listing them). A UsageError
    prints 'prog: message' and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not isinstance(main, dict):
            return main(argv)
        if not argv or argv[0] not in main:
            got = f"unknown command {argv[0]!r}; " if argv and not argv[0].startswith('-') else ''
            raise UsageError(f"{got}usage: python {prog} {{{'|'.join(main)}}} --key=value ... "
                             f"(COMMAND --help lists its keys)")
        return main[argv[0]](argv[1:])
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)


class Config(dict):
    """A resolved run config: a plain dict (saved in checkpoints and logs as such) whose keys also
    read as attributes, so a stage may write cfg.lr or cfg['lr']."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no config key {key!r}") from None

    def __setattr__(self, key, value):
        self[key] = value


def _fail(msg):
    raise UsageError(f"config error: {msg}")


def _coerce(key, value, default, source):
    """Type-check `value` against the default's type (int -> float allowed, list <-> tuple)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        _fail(f"{source}: {key} must be True or False, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        _fail(f"{source}: {key} expects {type(default).__name__} (default {default!r}), "
              f"got {type(value).__name__} {value!r}")
    return value


def _unknown(key, known, source):
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    _fail(f"unknown config key {key!r} in {source}{hint} (--help lists the keys)")


def _preset_path(name):
    if os.path.isfile(name):
        return name
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), here):
        for cand in (os.path.join(base, 'config', name + '.py'), os.path.join(base, 'config', name)):
            if os.path.isfile(cand):
                return cand
    avail = sorted(f[:-3] for f in os.listdir(os.path.join(here, 'config')) if f.endswith('.py')) \
        if os.path.isdir(os.path.join(here, 'config')) else []
    close = difflib.get_close_matches(name, avail, n=3, cutoff=0.4)
    _fail(f"no preset {name!r} (looked for config/{name}.py and a path)"
          + (f"; did you mean {', '.join(close)}?" if close else ""))


def configure(defaults: dict, argv: list[str], presets: bool = True) -> Config:
    """Resolve a run config: start from `defaults`, apply presets (bare args: config/NAME.py or a
    path, executed with the current config as globals; assigning a name that is not a key is an
    error), then --key=value overrides (ast.literal_eval'd, str as a fallback; `--flag` alone sets
    a bool to True). Values are type-checked against the defaults. Errors raise UsageError (one
    line). --help / -h prints the keys and defaults and exits. presets=False: every argument must
    be --key=value (the commands of data.py and interop.py). Returns a Config (a dict)."""
    cfg = Config(defaults)
    for arg in argv:
        if arg in ('--help', '-h'):
            width = max((len(k) for k in defaults), default=0)
            print("config keys (default values); use PRESET or --key=value:")
            for k, v in defaults.items():
                print(f"  --{k.ljust(width)} = {v!r}")
            raise SystemExit(0)
        if not arg.startswith('--'):
            if not presets:
                _fail(f"argument {arg!r} is not --key=value (--help lists the keys)")
            path = _preset_path(arg)
            scope = dict(cfg)
            try:
                with open(path) as f:
                    code = compile(f.read(), path, 'exec')
                exec(code, scope)
            except SystemExit:
                raise
            except Exception as e:
                _fail(f"preset {path} raised {type(e).__name__}: {e}")
            for k, v in scope.items():
                if k.startswith('_') or isinstance(v, types.ModuleType) or callable(v) and not isinstance(v, type):
                    continue
                if k not in cfg:
                    _unknown(k, cfg, path)
                cfg[k] = _coerce(k, v, defaults[k], path)
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in cfg:
            _unknown(key, cfg, 'command line')
        if not eq:
            if isinstance(defaults[key], bool):
                cfg[key] = True
                continue
            _fail(f"--{key} needs a value: --{key}=VALUE")
        if isinstance(defaults[key], str):
            try:  # a quoted string literal is accepted, anything else is taken verbatim
                val = ast.literal_eval(raw)
                val = val if isinstance(val, str) else raw
            except (ValueError, SyntaxError):
                val = raw
        else:
            try:
                val = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw
        cfg[key] = _coerce(key, val, defaults[key], f'--{key}')
    return cfg



# -----------------------------------------------------------------------------
# Files: atomic JSON, JSONL logs


def write_json(obj, path, indent=1):
    """Write JSON atomically (a temporary file fsynced, then renamed), so a reader never sees half."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path, record):
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def trim_jsonl(path, last_step):
    """Drop the records of steps after last_step (a resumed run writes them again)."""
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            keep = [line for line in f if json.loads(line).get('step', 0) <= last_step]
        with open(path, 'w', encoding='utf-8') as f:
            f.writelines(keep)


def plain(obj):
    """dict subclasses (a Config) as plain dicts, recursively: weights_only=True loads only plain containers."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj



# -----------------------------------------------------------------------------
# Logging: one logger for every stage (console, JSON files, plots, optional W&B / TensorBoard)


PROGRESS_BAR = dict(dynamic_ncols=True, mininterval=1)


def progress_bar(iterable=None, total=None, desc=None, disable=False, **kw):
    """A tqdm progress bar: RunLog.progress's, and the one of every loop outside a run (data generation,
    sampling, verifying), so every bar of the project looks and behaves alike."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=disable, **{**PROGRESS_BAR, **kw})


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display), imported when a plot is drawn."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


class NullTracker:
    """The tracker of a run that asked for none: it takes everything and does nothing (nanochat's
    DummyWandb), so the stages never ask whether one is there."""

    def log(self, metrics, step=None):
        pass

    def close(self):
        pass


class WandbTracker:
    """A Weights & Biases run (the wandb package passed in: imported only when asked for)."""

    def __init__(self, wandb, project, name, config, out_dir, stage):
        self.run = wandb.init(project=project, name=name, config=dict(config), dir=out_dir, job_type=stage)

    def log(self, metrics, step=None):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class TensorBoardTracker:
    """A TensorBoard event file (torch.utils.tensorboard's SummaryWriter, passed in likewise)."""

    def __init__(self, summary_writer, log_dir, config):
        self.writer = summary_writer(log_dir=log_dir)
        self.writer.add_text('config', json.dumps(plain(config), indent=1, default=str))

    def log(self, metrics, step=None):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


TRACKERS = ('', 'wandb', 'tensorboard')
WANDB_PROJECT = 'reasoning-study'  # W&B project of every run (WANDB_PROJECT in the environment wins)


def tracker_package(kind):
    """The package tracker `kind` needs (None for ''), imported now: a stage may call this before it
    spends time (pretrain.py does, before building data). Unknown or not installed: a UsageError."""
    if kind not in TRACKERS:
        raise UsageError(f"config error: logger={kind!r}; choose one of {', '.join(map(repr, TRACKERS))}")
    try:
        if kind == 'wandb':
            import wandb
            return wandb
        if kind == 'tensorboard':
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
    except ImportError:
        raise UsageError(f"logger={kind!r} needs the {kind} package: pip install {kind}, "
                         f"or --logger='' (no tracker)") from None
    return None


def open_tracker(kind, out_dir, config, stage, master=True):
    """The tracker `kind` names on rank 0 (master), a NullTracker for '' and on the other ranks. W&B
    runs are named after out_dir, in project WANDB_PROJECT, job type `stage`; TensorBoard writes to
    out_dir/tb."""
    package = tracker_package(kind) if master else None
    if package is None:
        return NullTracker()
    os.makedirs(out_dir, exist_ok=True)
    if kind == 'wandb':
        name = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
        return WandbTracker(package, os.environ.get('WANDB_PROJECT') or WANDB_PROJECT, name, config, out_dir, stage)
    return TensorBoardTracker(package, os.path.join(out_dir, 'tb'), config)


class RunLog:
    """The one logger of every stage. A record is a dict of one step's numbers (its 'step' is the
    x axis) in a named stream ('train', 'val', 'eval', ...); each stream lives in one place:
      jsonl={stream: file}   a line appended to out_dir/file at once (a crash loses nothing; rl.py)
      otherwise              the list history[stream], kept in memory for the stage to save (pretrain.py
                             writes its history as log.json with its checkpoints) and to plot
    and every record's numbers also go to the tracker (`tracker`: '' none, 'wandb' or 'tensorboard',
    or any object with log(metrics, step) and close()) as 'stream/key'. print() writes a console
    line (above the progress bar, when there is one). Only rank 0 (master) writes, prints or tracks;
    every rank keeps the history, so every rank can summarise it."""

    def __init__(self, out_dir, config, stage, tracker='', master=True, jsonl=None, history=None):
        self.out_dir, self.stage, self.master = out_dir, stage, master
        self.jsonl = dict(jsonl or {})
        self.history = {} if history is None else history
        self.bar = None
        if isinstance(tracker, str):
            tracker = open_tracker(tracker, out_dir, config, stage, master)
        self.tracker = tracker if master else NullTracker()

    def print(self, line):
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, total, initial=0, desc=None):
        """A progress bar on rank 0 (advance() moves it; console lines print above it)."""
        if self.master:
            self.bar = progress_bar(total=total, initial=initial, desc=desc or self.stage, leave=False, mininterval=0.1)

    def advance(self, **postfix):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

    def log(self, stream, record, track=True):
        """Record one step's numbers in `stream` (see the class docstring); track=False keeps them from
        the tracker (texts, per-sample records)."""
        if stream in self.jsonl:
            if self.master:
                append_jsonl(os.path.join(self.out_dir, self.jsonl[stream]), record)
        else:
            self.history.setdefault(stream, []).append(record)
        if track:
            metrics = {k if k.startswith(stream + '/') else f'{stream}/{k}': v for k, v in record.items()
                       if k != 'step' and isinstance(v, (int, float))}
            self.tracker.log(metrics, step=record.get('step'))

    def trim(self, last_step):
        """A resumed run: drop the JSONL lines of steps after its checkpoint's."""
        if self.master:
            for name in self.jsonl.values():
                trim_jsonl(os.path.join(self.out_dir, name), last_step)

    def clear(self):
        """A new run: drop the JSONL files an earlier attempt left before its first checkpoint."""
        if self.master:
            for name in self.jsonl.values():
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.remove(os.path.join(self.out_dir, name))

    def write_json(self, name, obj):
        if self.master:
            write_json(obj, os.path.join(self.out_dir, name))

    def plot(self, name, key, streams, ylabel=None, logy=False):
        """out_dir/name: `key` against step for each history stream in `streams` ({stream: legend}),
        the first as a line, the others (evaluations) as points on a line."""
        if not self.master:
            return
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (stream, label) in enumerate(streams.items()):
            recs = [r for r in self.history.get(stream, []) if r.get(key) is not None]
            style = dict(lw=0.8, alpha=0.7) if i == 0 else dict(marker='o', ms=3)
            ax.plot([r['step'] for r in recs], [r[key] for r in recs], label=label, **style)
        ax.set_xlabel('step')
        ax.set_ylabel(ylabel or key)
        if logy:
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, name), dpi=120)
        plt.close(fig)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.tracker.close()



# -----------------------------------------------------------------------------
# Distributed setup and collectives, precision, seeding, FLOP/s


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    is_master: bool

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    """Read the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE). Under torchrun: init the
    process group (nccl on CUDA, gloo on CPU) and pick cuda:LOCAL_RANK. Otherwise a single
    process on cuda if available, else cpu."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        import torch.distributed as dist
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ.get('LOCAL_RANK', rank))
        if torch.cuda.is_available():
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
            backend = 'nccl'
        else:
            device, backend = 'cpu', 'gloo'
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        return Dist(rank, local_rank, world, device, rank == 0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return Dist(0, 0, 1, device, True)


def cleanup_distributed():
    """Tear the process group down once every rank has got here: a rank that destroys it while
    another still talks to the store dies with 'terminate called without an active exception'.
    Drop the DDP wrapper first (its reducer uses the group): the two-rank update test aborted that
    way in 3 of 18 runs with the barrier alone, 0 of 16 without the wrapper alive."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """The process group's size: what a function handed a model (not a Dist) asks; 1 outside torchrun."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj, world_size):
    """Every rank's obj (any picklable value), as a list indexed by rank ([obj] in one process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce(t, world_size, op='sum'):
    """t summed (op='max': the maximum) over every rank, in place; returned (a no-op in one process).
    On CUDA, t must be on the device (nccl)."""
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == 'max' else dist.ReduceOp.SUM)
    return t


def global_std(x, world_size, device='cpu'):
    """Unbiased std of x's entries over every rank."""
    x = x.double()
    s = torch.tensor([x.sum().item(), (x ** 2).sum().item(), x.numel()], dtype=torch.float64, device=device)
    all_reduce(s, world_size)
    return math.sqrt(max(0.0, (s[1] - s[0] ** 2 / s[2]).item() / max(s[2].item() - 1, 1)))


def autocast_ctx(device):
    """bf16 autocast on CUDA (fp32 master weights stay in the optimizer); plain fp32 on CPU."""
    if 'cuda' in str(device):
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops_per_s(device=None, dtype='bfloat16') -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the CUDA device from its name (None if unknown, on CPU, or
    for other dtypes: pass the peak to Qwen2.estimate_mfu yourself then)."""
    if not torch.cuda.is_available() or (device is not None and 'cuda' not in str(device)):
        return None
    if str(dtype).replace('torch.', '') not in ('bfloat16', 'float16'):
        return None
    name = torch.cuda.get_device_name(device if device is not None and ':' in str(device) else None)
    table = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12,
             'A10G': 125e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12}  # first match wins
    return next((peak for key, peak in table.items() if key in name), None)



def unwrap(model: nn.Module) -> nn.Module:
    """The plain Qwen2 inside DDP(...) and/or torch.compile(...) wrappers."""
    while True:
        if hasattr(model, 'module') and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model
