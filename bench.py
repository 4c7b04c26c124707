"""
Benchmarks, side by side in one run on the same machine, config and batch:

  params        parameter count of every preset (the paper preset should be ~103M)
  train         training step (forward + backward) tokens/s: ours vs transformers' Qwen2
  sample        sampling tokens/s: our generate vs transformers' generate (its default KV cache),
                64 prompts of different lengths x 256 new tokens, both forced to the full length
  rollout       the generation engine on RL- and evaluation-shaped calls (task-world prompts, stops at
                </answer> / EOS, lengths as real responses have them: a trained tiny run at
                --rollout_init, else a random init with ~1% of the vocabulary as stops), useful (kept)
                tokens/s and wall time of the new engine and of the old one (model.py of git commit
                --rollout_old, loaded with `git show`), 1 and 2 threads; transformers' generate only
                when transformers is installed (it is not on the dev box); vLLM (vllm_sampler.py) beside
                them when vllm is installed (--vllm)
  stages        the tiny study's RL step and evaluation (rl.py, evaluate.py) with the new engine and
                with the old one patched in: wall times (~4 min, only when named in --only)
  rollout-gpu   CUDA only: paper preset, --gpu_rows rows (prompts x 6), stops, <= --gpu_new_tokens,
                bf16 + CUDA graphs: generated tokens/s and achieved memory bandwidth vs the peak; vLLM
                on the same call beside it when vllm is installed
  gemm          CPU, 1 thread: a training linear's three GEMMs through F.linear (MKL) vs oneDNN
  data          problems generated and solutions verified per second on one core (targets 1000 / 5000)
  sizes         per-op problem / solution characters and steps next to the original's table
  mfu           CUDA: model FLOPs utilisation of a bf16 training step of the `paper` preset (mark 40% on an
                H100 compiled, a healthy run: 43.5% measured; --compile=True to add torch.compile); on
                the CPU only when named in --only (tokens/s, no MFU: runs/gpu_check.py --smoke)

Each benchmark is a function registered with @benchmark(name, target); add rows (data generation,
verifier throughput, ...) the same way. Prints a table: name, measured, target, pass/fail.

  python bench.py                          # everything that applies to this machine
  python bench.py --only=train,sample      # a subset
  python bench.py --preset=mini --batch_size=4 --seq_len=1024
  python bench.py --only=mfu --compile=True   # on a GPU
  python bench.py --only=rollout --rollout_init=out/tiny/base   # CPU, ~3 min
  python bench.py --only=rollout-gpu           # one GPU, < 5 min (paper preset, 1024 rows, <= 1024 tokens)
  python bench.py --only=stages --rollout_init=out/tiny/base    # CPU, ~4 min: tiny RL step / evaluation

What was measured, when and on which machine -- the numbers behind the targets, the engine's history
from issue #13 on -- is in RESEARCH.md, "Benchmarks: what bench.py measured".
"""

import json
import os
import sys
import time
from contextlib import contextmanager

import torch

import common
import engine as E
import model as M
from checkpoint import load_run

ROOT = os.path.dirname(os.path.abspath(__file__))

config = dict(
    only='',               # comma-separated benchmark names (empty = all)
    preset='tiny',         # model preset for train/sample comparisons
    device='auto',         # auto = cuda if available else cpu
    threads=0,             # torch CPU threads (0 = torch's default)
    batch_size=8,          # train: sequences per step
    seq_len=512,           # train: tokens per sequence
    train_iters=5,         # train: timed steps per side (after 1 warm-up; best one counts)
    gen_prompts=64,        # sample: prompts in the batch
    gen_new_tokens=256,    # sample: new tokens per prompt (stopping disabled on both sides)
    gen_prompt_len=(64, 192),  # sample: prompt lengths drawn uniformly from this range
    rollout_init='out/tiny/base',  # rollout: a trained tiny run (realistic stops); missing -> random init
    rollout_old='281bfb1', # rollout: git commit whose model.py is the old engine ('' = skip it)
    rollout_threads=(1, 2),  # rollout: CPU thread counts to time
    vllm='auto',           # rollout, rollout-gpu: a vLLM row beside our engine (vllm_sampler.py): auto = when
                           # vllm is installed (requirements-vllm.txt), True = required, False = never
    stages_rl_steps=8,     # stages: RL steps timed (the median step counts)
    rollout_iters=5,       # rollout: timed calls per side (alternating; the fastest counts: on a shared
                           # box 2-3 calls left the 2-thread ratio swinging 2.4-2.7x)
    gpu_rows=1024,         # rollout-gpu: rows (prompts x 6 samples) of the paper-preset GPU row
    gpu_new_tokens=1024,   # rollout-gpu: max new tokens
    mfu_preset='paper',    # mfu: model preset
    mfu_batch_size=16,     # mfu: sequences per step
    mfu_seq_len=2048,      # mfu: tokens per sequence
    mfu_iters=10,          # mfu: timed steps
    compile=False,         # mfu: torch.compile the model
    seed=0,
)

BENCHMARKS = []  # (name, target description, function(cfg) -> rows)


def benchmark(name, target=''):
    """Register fn(cfg) -> list of (row name, measured text, target text, passed: bool | None)."""
    def wrap(fn):
        BENCHMARKS.append((name, target, fn))
        return fn
    return wrap


def sync(device):
    if 'cuda' in str(device):
        torch.cuda.synchronize()


def race(fns, device, iters, warmup=1):
    """Seconds per call of each fn: calls alternate (A B A B ...) and the fastest call of each
    counts, so load from other processes on a shared machine hits both sides alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float('inf')] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def hf_twin(ours):
    """A transformers Qwen2ForCausalLM with our weights (None when transformers is missing)."""
    try:
        import transformers
    except ImportError:
        return None
    import interop
    hcfg = {k: v for k, v in interop.hf_config_dict(ours.config).items() if k != 'architectures'}
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hcfg, attn_implementation='sdpa'))
    hf.load_state_dict(interop.to_hf_state_dict(ours))
    return hf.to(next(ours.parameters()).device)


# -----------------------------------------------------------------------------


@benchmark('params')
def bench_params(cfg):
    rows = []
    for name, mc in M.MODEL_PRESETS.items():
        with torch.device('meta'):
            n = M.Qwen2(mc).num_params()
        ok = abs(n - 103e6) / 103e6 < 0.02 if name == 'paper' else None
        rows.append((f'params/{name}', f'{n / 1e6:.2f}M', '~103M' if name == 'paper' else '', ok))
    return rows


@benchmark('train', target='ours >= 1.0x HF')
def bench_train(cfg):
    device = cfg['device']
    torch.manual_seed(cfg['seed'])
    ours = M.Qwen2(M.MODEL_PRESETS[cfg['preset']]).to(device).train()
    hf = hf_twin(ours)
    B, T = cfg['batch_size'], min(cfg['seq_len'], ours.config.max_seq_len)
    x = torch.randint(0, ours.config.vocab_size, (B, T + 1), device=device)

    def step_ours():
        with common.autocast_ctx(device):
            _, loss = ours(x[:, :-1], x[:, 1:])
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        with common.autocast_ctx(device):
            loss = hf(x[:, :-1], labels=x[:, :-1]).loss  # HF shifts labels itself: same #targets
        loss.backward()
        hf.zero_grad(set_to_none=True)

    tok = B * T
    if hf is None:
        t_ours = tok / race([step_ours], device, cfg['train_iters'])[0]
        return [(f'train/{cfg["preset"]} ours B{B}xT{T}', f'{t_ours:,.0f} tok/s', '', None),
                ('train HF', 'transformers missing', '', None)]
    t_ours, t_hf = (tok / t for t in race([step_ours, step_hf], device, cfg['train_iters']))
    rows = [(f'train/{cfg["preset"]} ours B{B}xT{T}', f'{t_ours:,.0f} tok/s', '', None)]
    rows.append((f'train/{cfg["preset"]} HF', f'{t_hf:,.0f} tok/s', '', None))
    rows.append(('train ours/HF', f'{t_ours / t_hf:.2f}x', '>= 1.0x', t_ours >= t_hf))
    return rows


@benchmark('sample', target='ours >= 2x HF')
def bench_sample(cfg):
    device = cfg['device']
    torch.manual_seed(cfg['seed'])
    ours = M.Qwen2(M.MODEL_PRESETS[cfg['preset']]).to(device).eval()
    hf = hf_twin(ours)
    N, new = cfg['gen_prompts'], cfg['gen_new_tokens']
    lo, hi = cfg['gen_prompt_len']
    g = torch.Generator().manual_seed(cfg['seed'])
    lens = torch.randint(lo, hi + 1, (N,), generator=g).tolist()
    V = ours.config.vocab_size
    prompts = [torch.randint(10, V, (n,), generator=g).tolist() for n in lens]

    def run_ours():
        with common.autocast_ctx(device):
            out = E.generate(ours, prompts, new, temperature=1.0, generator=torch.Generator(device).manual_seed(0),
                             logprobs=False)  # HF's side computes none either
        assert all(len(t) == new for t in out.tokens)

    with common.autocast_ctx(device):  # warm-up: first-call allocations and lazy initialisation
        E.generate(ours, prompts[:2], 2)
    t0 = time.perf_counter()
    run_ours()
    sync(device)
    dt = time.perf_counter() - t0
    rows = [(f'sample/{cfg["preset"]} ours {N}x{new}', f'{N * new / dt:,.0f} tok/s', '', None)]
    if hf is None:
        return rows + [('sample HF', 'transformers missing', '', None)]
    P = max(lens)
    ids = torch.zeros(N, P, dtype=torch.long)
    mask = torch.zeros(N, P, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF wants for decoder-only generation
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    hf.eval()

    def run_hf():
        with torch.no_grad(), common.autocast_ctx(device):
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=1,
                              eos_token_id=None)
        assert out.shape[1] == P + new

    with torch.no_grad(), common.autocast_ctx(device):
        hf.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=True, pad_token_id=1)
    t0 = time.perf_counter()
    run_hf()
    sync(device)
    dt_hf = time.perf_counter() - t0
    rows.append((f'sample/{cfg["preset"]} HF', f'{N * new / dt_hf:,.0f} tok/s', '', None))
    rows.append(('sample ours/HF', f'{dt_hf / dt:.2f}x', '>= 2.0x', dt_hf / dt >= 2.0))
    return rows


# -----------------------------------------------------------------------------
# Rollouts: the generation engine on RL- and evaluation-shaped calls, new vs old side by side


def old_engine_twin(ours, commit):
    """`ours` with the weights copied into the Qwen2 of model.py at git `commit` (read with `git show`
    into a throwaway module): the old generation engine, for side-by-side timings only."""
    import subprocess
    import types
    src = subprocess.check_output(['git', 'show', f'{commit}:model.py'], cwd=ROOT, text=True)
    mod = types.ModuleType(f'model_{commit}')
    mod.__file__ = os.path.join(ROOT, f'model_{commit}.py')
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, mod.__file__, 'exec'), mod.__dict__)
    old = mod.Qwen2(mod.ModelConfig(**ours.config.to_dict()))
    old.load_state_dict(ours.state_dict())
    return old.to(next(ours.parameters()).device).eval()


def rollout_setup(cfg, preset='tiny'):
    """(model, tokenizer, stop ids, what): the trained run at cfg.rollout_init when it exists (it
    stops where real responses do), else a random init whose stop set is ~1% of the vocabulary, so
    lengths are geometric (mean ~100) -- a stand-in, said so in the row name."""
    import data
    path = cfg['rollout_init'] if os.path.isabs(cfg['rollout_init']) else os.path.join(ROOT, cfg['rollout_init'])
    if preset == 'tiny' and os.path.exists(os.path.join(path, 'ckpt.pt')):
        m, tok, _ = load_run(path, device=cfg['device'])
        return m.eval(), tok, E.stop_ids(tok), 'trained'
    torch.manual_seed(cfg['seed'])
    tok = data.standard_tokenizer()
    m = M.Qwen2(M.ModelConfig(**{**M.MODEL_PRESETS[preset].to_dict(), 'vocab_size': tok.vocab_size}))
    g = torch.Generator().manual_seed(cfg['seed'])
    extra = torch.randperm(tok.vocab_size, generator=g)[:tok.vocab_size // 100].tolist()
    return m.to(cfg['device']).eval(), tok, (*E.stop_ids(tok), *extra), 'random init'


def task_prompts(tok, world, n, seed=0, ops=range(2, 7)):
    import data
    mix = data.mixture(ops, modes=['normalforward'], world=data.WORLDS[world])
    return [tok.encode(data.prompt_text(p.to_row())) for p in data.generate_problems(n, mix, seed=seed)]


class HFGenerate:
    """transformers' generate behind our generate's call (left padding, the same stops, G samples per
    prompt); kept tokens are counted up to and including each row's first stop."""

    def __init__(self, hf, pad_id):
        self.hf, self.pad_id = hf.eval(), pad_id

    def generate(self, prompts, new, temperature, stop_ids, num_samples, generator=None):
        import types
        dev = next(self.hf.parameters()).device
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        torch.manual_seed(0)
        with torch.no_grad():
            out = self.hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                                   do_sample=temperature > 0, temperature=temperature or None, top_k=0, top_p=1.0,
                                   num_return_sequences=num_samples, eos_token_id=list(stop_ids),
                                   pad_token_id=self.pad_id)
        stops, toks = set(stop_ids), []
        for row in out[:, P:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            toks.append(row[:cut])
        return types.SimpleNamespace(tokens=toks)


def generate_of_model(m):
    """The generate call of one side of a race: engine.generate for ours, the twin's own method otherwise
    (the old engine's Qwen2.generate, HFGenerate)."""
    return (lambda *a, **k: E.generate(m, *a, **k)) if isinstance(m, M.Qwen2) else m.generate


def vllm_twin(cfg, ours):
    """A vllm_sampler.VLLMSampler holding `ours`' weights, or None (--vllm=False, or auto without vllm)."""
    if cfg['vllm'] is False or cfg['vllm'] in ('False', 'false', '0'):
        return None
    import vllm_sampler
    if cfg['vllm'] == 'auto' and not vllm_sampler.available():
        print('vllm is not installed: its rows are skipped (requirements-vllm.txt)')
        return None
    vllm_sampler.check_sampler('vllm', flag='--vllm=True')
    return vllm_sampler.VLLMSampler(ours)


def timed_generate(models, prompts, G, new, temperature, stops, device, iters, kwargs=None):
    """Seconds (fastest of `iters`, calls alternating) and kept tokens of each model's generate
    (kwargs: extra arguments per model, e.g. logprobs=False where a generate takes it)."""
    kept = [0] * len(models)
    kwargs = kwargs or [{}] * len(models)

    def call(i):
        def fn():
            with common.autocast_ctx(device):
                out = generate_of_model(models[i])(prompts, new, temperature=temperature, stop_ids=stops,
                                                   num_samples=G, generator=torch.Generator().manual_seed(0),
                                                   **kwargs[i])
            kept[i] = sum(len(t) for t in out.tokens)
        return fn
    return race([call(i) for i in range(len(models))], device, iters, warmup=0), kept


@benchmark('gemm', 'where oneDNN beats F.linear (CPU)')
def bench_gemm(cfg):
    """CPU fp32, 1 thread: the three GEMMs of a linear layer in training (forward, input gradient,
    weight gradient) at the tiny preset's MLP shape and a training micro-batch of rows (8 x 512 = 4096
    tokens x 128 -> 512), through F.linear / matmul (MKL's sgemm) and through oneDNN's GEMM
    (torch.ops.mkldnn._linear_pointwise, the engine's path): the case for a oneDNN-backed training
    linear on CPUs where MKL is slow (on the AMD dev box it ran at about half oneDNN's speed)."""
    import torch.nn.functional as F
    if 'cuda' in cfg['device'] or not torch.backends.mkldnn.is_available():
        return [('gemm', 'skipped (CPU with oneDNN only)', '', None)]
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(cfg['seed'])
    N, K, O = cfg['batch_size'] * cfg['seq_len'], 128, 512
    x, w, dy = torch.randn(N, K, generator=g), torch.randn(O, K, generator=g), torch.randn(N, O, generator=g)
    wt, xt = w.t().contiguous(), x.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, N)
    dnn = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], '')  # noqa: E731
    pairs = [('forward x W^T', lambda: F.linear(x, w), lambda: dnn(x, packed)),
             ('input grad dY W', lambda: dy @ w, lambda: dnn(dy, wt)),
             ('weight grad dY^T X', lambda: dy.t() @ x, lambda: dnn(dy.t().contiguous(), xt))]
    rows = []
    for name, mkl, onednn in pairs:
        t_mkl, t_dnn = race([mkl, onednn], 'cpu', 10)
        rows.append((f'gemm/{name} [{N}x{K}x{O}] 1 thr',
                     f'MKL {t_mkl * 1e3:.2f} / oneDNN {t_dnn * 1e3:.2f} ms ({t_mkl / t_dnn:.2f}x)', '', None))
    torch.set_num_threads(n0)
    return rows


@benchmark('rollout', target='new >= 2.5x old tokens/s (CPU, 2 threads, tiny world)')
def bench_rollout(cfg):
    """RL-shaped rollouts (task-world prompts, 32 x 6 samples, stop at </answer> / EOS, <= 256 new
    tokens, T 1) in both worlds, plus an RL-step-shaped call (tiny world, 16 x 6, <= 192, T 0.7) and
    an evaluation-shaped call (30 problems x 16, <= 256, T 0.7): new engine vs the old one."""
    device = cfg['device']
    ours, tok, stops, what = rollout_setup(cfg)
    # ours is called as rl.py and evaluate.py call it: no per-token log-probs (RL recomputes them
    # with a forward pass); the old engine and transformers have no such switch
    models, names, kwargs = [ours], ['new'], [dict(logprobs=False)]
    if cfg['rollout_old']:
        models.append(old_engine_twin(ours, cfg['rollout_old']))
        names.append(f"old {cfg['rollout_old']}")
        kwargs.append({})
    hf = hf_twin(ours)
    if hf is None:
        print('rollout: transformers is not installed; its generate is skipped')
    else:
        models.append(HFGenerate(hf, tok.pad_id))
        names.append('transformers')
        kwargs.append({})
    vl = vllm_twin(cfg, ours)
    if vl is not None:
        models.append(vl)
        names.append('vllm')
        kwargs.append(dict(logprobs=False))
    shapes = [(f'rollout/{world} 32x6 <=256 T1', task_prompts(tok, world, 32), 6, 256, 1.0)
              for world in ('tiny', 'paper')]
    shapes += [('rl-step call tiny 16x6 <=192 T.7', task_prompts(tok, 'tiny', 16, seed=1), 6, 192, 0.7),
               ('eval call tiny 30x16 <=256 T.7', task_prompts(tok, 'tiny', 30, seed=2), 16, 256, 0.7)]
    threads = cfg['rollout_threads'] if 'cuda' not in device else (torch.get_num_threads(),)
    rows, n0 = [], torch.get_num_threads()
    for th in threads:
        torch.set_num_threads(th)
        for name, prompts, G, new, T in shapes:
            secs, kept = timed_generate(models, prompts, G, new, T, stops, device, cfg['rollout_iters'], kwargs)
            for nm, s, k in zip(names, secs, kept):
                print(f'  {name} {nm} {th} thr: {k / s:,.0f} tok/s, {s:.2f} s, {k} tokens', flush=True)
                rows.append((f'{name} {nm} ({what}, {th} thr)', f'{k / s:,.0f} tok/s, {s:.2f} s, '
                             f'mean len {k / (len(prompts) * G):.0f}', '', None))
            if cfg['rollout_old']:
                r = (kept[0] / secs[0]) / (kept[1] / secs[1])
                # the target row: the tiny world, the tiny preset's own (its RL and evaluation
                # prompts); the paper world's long, uneven prompts are a stress row, reported beside it
                target = name.startswith('rollout/tiny') and th == 2 and 'cuda' not in device
                rows.append((f'{name} new/old tok/s ({th} thr)', f'{r:.2f}x (wall {secs[1] / secs[0]:.2f}x)',
                             '>= 2.5x' if target else '', r >= 2.5 if target else None))
            if vl is not None:
                r = (kept[-1] / secs[-1]) / (kept[0] / secs[0])
                rows.append((f'{name} vllm/new tok/s ({th} thr)', f'{r:.2f}x (wall {secs[0] / secs[-1]:.2f}x)', '',
                             None))
    torch.set_num_threads(n0)
    if vl is not None:
        vl.close()
    return rows


@contextmanager
def generate_of(commit):
    """Inside: every engine.generate call (rl.py's, evaluate.py's, through engine.complete) runs on the
    old engine of git `commit` (a twin model given the caller's current weights at every call); commit
    '' = unchanged."""
    if not commit:
        yield
        return
    ours, twins = E.generate, {}

    def old_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                     generator=None, num_samples=1, pad_id=0, logprobs=True, **_):
        if id(model) not in twins:
            twins[id(model)] = old_engine_twin(model, commit)
        twin = twins[id(model)]
        twin.load_state_dict(model.state_dict())
        twin.train(model.training)
        return twin.generate(prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, generator,
                             num_samples, pad_id)
    E.generate = old_generate
    try:
        yield
    finally:
        E.generate = ours


@benchmark('stages', 'wall times, new vs old engine (only with --only=stages)')
def bench_stages(cfg):
    """The tiny study's RL step and evaluation as runs/tiny.sh runs them (1 thread): rl.py tiny_rl
    for stages_rl_steps steps and evaluate.py tiny_eval of one checkpoint, both from --rollout_init
    (its run's data dir holds the held-out problems), once with this engine and once with --rollout_old's
    patched in as engine.generate; everything else identical. ~4 minutes, so only when asked for."""
    import tempfile
    import evaluate
    import rl
    if 'stages' not in cfg['only'].split(','):
        return [('stages', 'skipped (run with --only=stages)', '', None)]
    init = cfg['rollout_init'] if os.path.isabs(cfg['rollout_init']) else os.path.join(ROOT, cfg['rollout_init'])
    if not os.path.exists(os.path.join(init, 'ckpt.pt')):
        return [('stages', f'skipped (no trained run at {init})', '', None)]
    rows, n0 = [], torch.get_num_threads()
    torch.set_num_threads(1)
    for name, commit in [('new', ''), (f"old {cfg['rollout_old']}", cfg['rollout_old'])]:
        with tempfile.TemporaryDirectory() as tmp, generate_of(commit):
            rl.main(['tiny_rl', f'--init_from={init}', f'--out_dir={tmp}/rl', f"--max_steps={cfg['stages_rl_steps']}",
                     '--ckpt_every=0', '--sample_every=0'])
            log = [json.loads(line) for line in open(os.path.join(tmp, 'rl', 'log.jsonl'))]
            t0 = time.perf_counter()
            evaluate.main(['tiny_eval', f'--ckpts={init}', f'--out_dir={tmp}/eval'])  # (its run's data dir)
            t_eval = time.perf_counter() - t0
        step = sorted(r['step_s'] for r in log)[len(log) // 2]
        gen = sum(r['gen_tok_per_s'] for r in log) / len(log)
        rows += [(f'stages/rl tiny_rl step {name} (1 thr)', f'{step:.2f} s, gen {gen:,.0f} tok/s', '', None),
                 (f'stages/evaluate tiny_eval, 1 ckpt, {name} (1 thr)', f'{t_eval:.1f} s', '', None)]
    torch.set_num_threads(n0)
    return rows


PEAK_BW = {'H200': 4.8e12, 'H100 PCIe': 2.0e12, 'H100': 3.35e12, 'A100': 2.0e12, 'L40S': 0.86e12,
           'RTX 4090': 1.0e12}  # bytes/s, first match of the device name wins


@benchmark('rollout-gpu', target='>= 200k generated tok/s (paper preset, H100/H200)')
def bench_rollout_gpu(cfg):
    """Paper preset (random init, ~1% of the vocabulary are stops: geometric lengths, mean ~100, cut
    at gpu_new_tokens), gpu_rows rows = prompts x 6, bf16. Achieved bandwidth counts, per decode step,
    the bf16 weights once plus the KV cache the step reads (each slot's prompt once, each row's own
    generated keys): a lower bound of what the step moves."""
    device = cfg['device']
    if 'cuda' not in device:
        return [('rollout-gpu', 'skipped (no CUDA)', '>= 200k tok/s', None)]
    ours, tok, stops, what = rollout_setup(cfg, preset='paper')
    G, new = 6, cfg['gpu_new_tokens']
    prompts = task_prompts(tok, 'paper', max(1, cfg['gpu_rows'] // G), ops=range(2, 21))
    # inference_mode, as engine.generate runs it: outside it the KV writes of eng.run() below would track
    # gradients and keep every prefill's activations alive
    with common.autocast_ctx(device), torch.inference_mode():
        E.generate(ours, prompts[:G], 8, stop_ids=stops, num_samples=G)  # warm-up, graph capture paths
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng = E.Engine(ours, prompts, G, new, 1.0, None, None, stops, torch.Generator().manual_seed(0),
                       False, None, None, 0, True)
        with E.generation_sdpa_backends(device):
            out = eng.run()
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    kept = sum(len(t) for t in out.tokens)
    c = ours.config
    per_token = 2 * c.n_layer * c.n_kv_head * c.head_dim * 2
    kv = sum(len(p) * max(len(t) for t in out.tokens[i * G:(i + 1) * G]) + sum(len(t) ** 2 / 2 for t in
             out.tokens[i * G:(i + 1) * G]) for i, p in enumerate(prompts)) * per_token
    moved = eng.steps * 2 * ours.num_params() + kv
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BW.items() if k in name), None)
    bw = f'{moved / dt / 1e9:,.0f} GB/s' + (f' = {moved / dt / peak:.0%} of {peak / 1e12:.2f} TB/s' if peak else '')
    rows = [(f'rollout-gpu paper {len(prompts)}x{G} <={new} ({what}, {eng.S} slots)',
             f'{kept / dt:,.0f} tok/s, {dt:.1f} s, {eng.steps} steps, {bw}', '>= 200k', kept / dt >= 200e3)]
    del eng, out
    vl = vllm_twin(cfg, ours)
    if vl is not None:  # the same call through vLLM (bf16, its CUDA graphs; compiled on the first call)
        t0 = time.perf_counter()
        vl.generate(prompts[:G], 8, stop_ids=stops, num_samples=G, logprobs=False)
        warm = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = vl.generate(prompts, new, temperature=1.0, stop_ids=stops, num_samples=G,
                          generator=torch.Generator().manual_seed(0), logprobs=False)
        torch.cuda.synchronize()
        dv = time.perf_counter() - t0
        kept_v = sum(len(t) for t in res.tokens)
        rows.append((f'rollout-gpu paper {len(prompts)}x{G} <={new} vllm', f'{kept_v / dv:,.0f} tok/s, {dv:.1f} s '
                     f'(warm-up {warm:.0f} s); ours/vllm {(kept / dt) / (kept_v / dv):.2f}x', '', None))
        vl.close()
    return rows


MFU_MARK = 0.40  # what a healthy compiled bf16 step reaches on an H100 (43.5% measured; eager ~27%)


@benchmark('mfu', target=f'>= {MFU_MARK:.0%} on H100 (bf16, compiled)')
def bench_mfu(cfg):
    device = cfg['device']
    if 'cuda' not in device and 'mfu' not in cfg['only'].split(','):
        return [('mfu', 'skipped (no CUDA; --only=mfu runs it on the CPU)', f'>= {MFU_MARK:.0%}', None)]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg['seed'])
    raw = M.Qwen2(M.MODEL_PRESETS[cfg['mfu_preset']]).to(device).train()
    model = torch.compile(raw) if cfg['compile'] else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused='cuda' in device)
    B, T = cfg['mfu_batch_size'], cfg['mfu_seq_len']
    x = torch.randint(0, raw.config.vocab_size, (B, T + 1), device=device)

    def step():
        with common.autocast_ctx(device):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg['mfu_iters']):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / cfg['mfu_iters']
    tps = B * T / dt
    mfu = raw.estimate_mfu(tps, common.peak_flops_per_s(device), seq_len=T)
    tag = f'mfu/{cfg["mfu_preset"]} B{B}xT{T}{" compiled" if cfg["compile"] else ""}'
    rows = [(f'{tag} tok/s', f'{tps:,.0f} tok/s', '', None)]
    if 'cuda' not in device:
        return rows
    name = torch.cuda.get_device_name()
    rows.append((f'{tag} ({name})', 'unknown peak' if mfu is None else f'{100 * mfu:.1f}%', f'>= {MFU_MARK:.0%}',
                 None if mfu is None else mfu >= MFU_MARK))
    rows.append(('peak memory', f'{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB', '', None))
    return rows


# -----------------------------------------------------------------------------
# The task world: sizes against the original's table, generation and verification speed (data.py)

def size_stats(problems) -> dict:
    """(mode, op) -> mean problem chars, solution chars, statements, steps."""
    acc = {}
    for p in problems:
        a = acc.setdefault((p.mode, p.op), [0, 0, 0, 0, 0])
        a[0] += len(p.problem)
        a[1] += len(p.solution)
        a[2] += p.problem.count('. ')
        a[3] += len(p.graph['order'])
        a[4] += 1
    return {k: tuple(x / a[4] for x in a[:4]) for k, a in acc.items()}


def bench_generate(seconds=3) -> float:
    """Problems per second on one core (CPU time), uniform op 2..20, all templates and modes,
    rejection included."""
    import data
    mix, i, t0 = data.MIXTURES['eval_all'], 0, time.process_time()
    while True:
        for _ in range(50):
            rng = data._rng_for('bench', i)
            op, template, mode = mix.sample(rng)
            data.generate(rng, op, template, mode)
            i += 1
        dt = time.process_time() - t0
        if dt >= seconds:
            return i / dt


def bench_verify(rows, seconds=3) -> float:
    """Verifications per second on one core (CPU time): each row's gold solution, written as a model
    would (solution + " </solution> <answer> N </answer>"), verified against its gold graph."""
    import verifier
    pairs = []
    for row in rows:
        gold = row.get('graph') or verifier.parse_solution(row['solution'], row.get('mode'))
        pred = row.get('prediction')
        if pred is None:
            sol = row['solution']
            k = sol.rfind('Answer:')
            pred = '%s </solution> <answer> %s </answer>' % ((sol[:k] if k >= 0 else sol).strip(), gold['answer'])
        pairs.append((pred, gold))
    if not pairs:
        raise ValueError('bench_verify: no rows')
    count, t0 = 0, time.process_time()
    while True:
        for pred, gold in pairs:
            verifier.verify(pred, gold)
        count += len(pairs)
        dt = time.process_time() - t0
        if dt >= seconds:
            return count / dt


@benchmark('data', '>= 1000 problems/s/core; >= 5000 verifications/s/core')
def bench_data(cfg):
    """The task world on one core (CPU time, so other load on the machine does not count):
    problem generation on a uniform op 2..20 mix, rejection included, and graph verification of
    gold solutions written as model output, on the same mix."""
    import data
    gen = bench_generate(seconds=3)
    rows = [p.to_row() for p in data.generate_problems(400, '2-20', seed=0)]
    ver = bench_verify(rows, seconds=3)
    return [('data/generate op 2..20', f'{gen:,.0f} problems/s', '>= 1000', gen >= 1000),
            ('data/verify op 2..20', f'{ver:,.0f} verif./s', '>= 5000', ver >= 5000)]


@benchmark('sizes', "the original's per-op sizes (STUDY.md §1)")
def bench_sizes(cfg, n=400):
    """Per-op mean sizes of n generated problems per op and mode, printed next to the original's
    table (data.REFERENCE_SIZES); one row per op: forward problem / solution characters and steps,
    reverse solution characters, ours / original."""
    import data
    ops = sorted(data.REFERENCE_SIZES)
    problems = []
    for mode in data.MODES:
        problems += data.generate_problems(n * len(ops), data.mixture(ops, modes=[mode]), seed=0)
    s = size_stats(problems)
    rows = []
    for op in ops:
        f, r, ref = s[data.FORWARD, op], s[data.REVERSE, op], data.REFERENCE_SIZES[op]
        rows.append((f'sizes/op {op}', f'fwd {f[0]:.0f}/{f[1]:.0f} ch, {f[3]:.1f} st; rev {r[1]:.0f} ch',
                     f'{ref[0]}/{ref[1]}, {ref[2]}; {ref[3]}', None))
    return rows


def main(argv):
    cfg = common.configure(config, argv)
    if cfg['device'] == 'auto':
        cfg['device'] = 'cuda' if torch.cuda.is_available() else 'cpu'
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    only = [s for s in cfg['only'].split(',') if s]
    names = [n for n, _, _ in BENCHMARKS]
    for s in only:
        if s not in names:
            raise common.UsageError(f"unknown benchmark {s!r}; available: {', '.join(names)}")
    print(f"torch {torch.__version__}, device {cfg['device']}, {torch.get_num_threads()} threads")
    rows = []
    for name, _, fn in BENCHMARKS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        rows += fn(cfg)
        print(f"  [{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
    w = max(len(r[0]) for r in rows)
    print(f"{'name'.ljust(w)}  {'measured':>18}  {'target':>10}  result")
    for r_name, measured, target, ok in rows:
        res = '' if ok is None else ('PASS' if ok else 'FAIL')
        print(f"{r_name.ljust(w)}  {measured:>18}  {target:>10}  {res}")
    return rows


if __name__ == '__main__':
    common.cli('bench.py', main)
