"""
Shared fixtures.

  tiny_data   a small op 2..6 dataset (tokenizer, shards, val, held-out eval.jsonl), built once per session
  tiny_base   the tiny model pre-trained on it just long enough to be a usable base for the evaluation and
              RL tests (well below its initial loss: it writes the format, it does not solve problems yet);
              returns {'ckpt', 'data_dir', 'out_dir'}. Built once per session (~2 min on 2 idle cores).
              Developers on a shared machine can set TINY_BASE_CACHE=/some/dir to reuse both across sessions
              (keyed by a hash of the code that builds them).
  run_pretrain(argv)  run pretrain.py's main in a fresh process (a crash there cannot take pytest down)
  StubWandb   stands in for the wandb package (sys.modules['wandb'] = StubWandb()) in the logger tests
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data  # noqa: E402


def run_pretrain(argv, script='pretrain.py', env=None, timeout=900, check=True, nproc=1):
    """Run a training script in a fresh process from the repo root (torchrun when nproc > 1)."""
    cmd = [sys.executable, script] + list(argv)
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               script] + list(argv)
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.setdefault('OMP_NUM_THREADS', '1' if nproc > 1 else '2')  # 2 cores: one thread per DDP process
    e.update(env or {})
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-4000:]}")
    return p


class StubWandb:
    """The part of the wandb package common.RunLog uses: records init's arguments and every log call."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, metrics, step=None):
        self.logged.append((metrics, step))

    def finish(self):
        self.finished += 1


# the tiny base: tiny_pretrain's model and optimizer, shortened to fit the test budget
TINY_BASE_MIXTURE = '2-6'
TINY_BASE_TOKENS = 400_000     # data (the run trains on 50 * 4096 of it)
# (a higher, flatter learning rate than the preset's: 50 steps is only the start of its schedule)
TINY_BASE_ARGS = ['tiny_pretrain', '--seq_len=512', '--micro_batch=8', '--batch_tokens=4096', '--max_steps=50',
                  '--lr=3e-3', '--min_lr=1e-3', '--warmup_frac=0.1', '--eval_interval=25', '--ckpt_interval=1000',
                  '--eval_tokens=16384', '--progress=False', '--log_interval=10']


def _build_tiny_data(d):
    data.build_dataset(d, TINY_BASE_MIXTURE, TINY_BASE_TOKENS, seed=0, eval_ops=range(2, 21), eval_n=2, val_n=256)


def _build_tiny_base(data_dir, out):
    run_pretrain(TINY_BASE_ARGS + [f'--data_dir={data_dir}', f'--out_dir={out}'])
    with open(os.path.join(out, 'log.json')) as f:
        log = json.load(f)
    assert log['val'][-1]['loss'] < 0.5 * log['val'][0]['loss'], log['val']


def _cached(kind, build):
    """Opt-in cache across pytest sessions for developers on a shared machine: with TINY_BASE_CACHE=DIR,
    the tiny data / base live in DIR/<sha1 of the code that makes them> and are rebuilt whenever that code
    changes. Off by default (CI always builds them from scratch)."""
    import hashlib
    import shutil
    import tempfile
    h = hashlib.sha1(repr((TINY_BASE_MIXTURE, TINY_BASE_TOKENS, TINY_BASE_ARGS)).encode())
    for f in ('data.py', 'verifier.py', 'model.py', 'pretrain.py', 'config/tiny_pretrain.py', 'tests/conftest.py'):
        with open(os.path.join(ROOT, f), 'rb') as fh:
            h.update(fh.read())
    final = os.path.join(os.environ['TINY_BASE_CACHE'], f'{kind}-{h.hexdigest()[:16]}')
    if not os.path.exists(final):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f'.{kind}-', dir=os.path.dirname(final))
        build(tmp)
        try:
            os.rename(tmp, final)      # atomic; another session may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    if os.environ.get('TINY_BASE_CACHE'):
        return _cached('tiny_data', _build_tiny_data)
    d = str(tmp_path_factory.mktemp('tiny_data'))
    _build_tiny_data(d)
    return d


@pytest.fixture(scope='session')
def tiny_base(tiny_data, tmp_path_factory):
    """{'ckpt', 'data_dir', 'out_dir'} of a tiny model pre-trained for 50 steps (200k tokens) on op 2..6:
    held-out loss ~2.4 from 7.9 (it has the format and vocabulary, it does not solve problems yet)."""
    if os.environ.get('TINY_BASE_CACHE'):
        out = _cached('tiny_base', lambda d: _build_tiny_base(tiny_data, d))
    else:
        out = str(tmp_path_factory.mktemp('tiny_base'))
        _build_tiny_base(tiny_data, out)
    return {'ckpt': os.path.join(out, 'ckpt.pt'), 'data_dir': tiny_data, 'out_dir': out}


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models: a second thread only adds sync cost, and on a shared 2-core box OpenMP threads
    waiting for each other made a test file 5x slower. Restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
