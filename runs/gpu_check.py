"""
One prepared check of the paper-scale paths on ONE GPU (~6-8 minutes when healthy): a pass/fail table for

  mfu        a bf16, torch.compile'd pre-training step of the paper preset (bench.py's mfu row; mark 40%:
             a healthy compiled bf16 run reached 43.5% on an H100)
  doc_mask   per-document attention (pretrain.py's doc_mask): a paper-preset training step with the dense
             block-diagonal mask vs plain causal attention (target: <= 1.25x), and, for the record, the
             attention alone with FlexAttention's block mask where this torch has it
  sample     the sampling engine at paper scale (bench.py's sample rows, --preset=paper)
  rl_step    one full-size paper GRPO step (1024 prompts x 6 samples, responses up to 1024 tokens) from a
             random paper-size model, which never stops early: the worst case for memory and time
  pipeline   a small end-to-end run on the GPU: tiny pre-training (300 steps), 3 RL steps, evaluation

    bash runs/gpu_check.sh                 # everything; writes out/gpu_check/ and prints the table
    bash runs/gpu_check.sh doc_mask mfu    # a subset
    python runs/gpu_check.py --smoke       # every check on the CPU at tiny shapes (~2 min; tests/test_gpu_check.py):
                                           # the code paths, not the marks (GPU_CHECK_SMOKE=1 does the same)
Each check runs in its own process (a crash or a hang cannot take the table down) under a time limit of
about twice what a healthy run needs (LIMITS: a cold compile, ~5k decode steps of the paper RL step), so
the whole script ends within ~15 minutes at worst. NOT YET RUN on a GPU: written, and run on the CPU in
smoke mode.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
OUT = os.environ.get('OUT_DIR', 'out/gpu_check')
CHECKS = ('mfu', 'doc_mask', 'sample', 'rl_step', 'pipeline')
# seconds per check, ~2x what a healthy H100 run needs (process start and imports included): mfu a cold
# compile of the paper preset (~1 min) + 13 steps; doc_mask 14 eager steps + a compiled FlexAttention;
# sample bench.py's paper rows (HF's generate ~1k tok/s); rl_step one paper GRPO step (6144 rows through
# the engine's 8 GiB KV budget: ~5 waves of 1024 decode steps, then old/ref passes and the update of ~8M
# tokens); pipeline three processes (tiny data + 300 steps, 3 RL steps, an evaluation). 15.5 min in all.
LIMITS = {'mfu': 150, 'doc_mask': 120, 'sample': 120, 'rl_step': 300, 'pipeline': 240}
SMOKE_LIMITS = {'mfu': 120, 'doc_mask': 90, 'sample': 90, 'rl_step': 150, 'pipeline': 240}  # 2 busy CPU cores
SMOKE = os.environ.get('GPU_CHECK_SMOKE', '') not in ('', '0')   # set by --smoke; children inherit it
DEVICE = 'cuda'                                                  # 'cpu' in smoke mode without CUDA


def sync():
    if DEVICE == 'cuda':
        import torch
        torch.cuda.synchronize()


def run(cmd, limit, log, group=False):
    """Run a command with a time limit; (ok, seconds, output). The output goes to OUT/log. group: in a
    process group of its own, killed whole when it runs over (the commands it starts inherit the group)."""
    import signal
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=group)
    try:
        out, _ = p.communicate(timeout=limit)
        ok = p.returncode == 0
    except subprocess.TimeoutExpired:
        (os.killpg(p.pid, signal.SIGKILL) if group else p.kill())
        out, _ = p.communicate()
        out, ok = f"{out or ''}\nTIMEOUT after {limit}s", False
    with open(os.path.join(OUT, log), 'w') as f:
        f.write(' '.join(cmd) + '\n' + out)
    return ok, time.time() - t, out


def bench_row(only, extra):
    ok, s, out = run([sys.executable, 'bench.py', f'--only={only}', *extra], 600, f'bench_{only}.log')
    lines = out.splitlines()
    head = next((i for i, ln in enumerate(lines) if ln.startswith('name ') and 'measured' in ln), len(lines))
    table = [' '.join(ln.split()) for ln in lines[head + 1:] if ln.strip()]  # bench.py's table, one row each
    # smoke: the code path only (tiny shapes on a CPU miss every mark)
    return ok and (SMOKE or 'FAIL' not in out.upper()), f"{s:.0f}s; " + ' // '.join(table[-4:])[:300]


def check_mfu():
    if SMOKE:
        return bench_row('mfu', [f'--device={DEVICE}', '--mfu_preset=tiny', '--mfu_batch_size=2',
                                 '--mfu_seq_len=128', '--mfu_iters=1', f'--compile={DEVICE == "cuda"}'])
    return bench_row('mfu', ['--compile=True', '--mfu_batch_size=16', '--mfu_seq_len=2048'])


def check_sample():
    if SMOKE:
        return bench_row('sample', [f'--device={DEVICE}', '--preset=tiny', '--gen_prompts=4', '--gen_new_tokens=8'])
    return bench_row('sample', ['--preset=paper'])


def step_time(m, x, doc, iters=5):
    from common import autocast_ctx
    for i in range(2 + iters):
        if i == 2:
            sync()
            t = time.time()
        with autocast_ctx(DEVICE):
            _, loss = m(x[:, :-1], x[:, 1:], doc_ids=None if doc is None else doc[:, :-1])
        loss.backward()
    sync()
    return (time.time() - t) / iters


def check_doc_mask():
    """Paper-preset training step, B8 x T2048 with ~300-token documents: dense doc mask vs causal
    (smoke: the tiny preset, B2 x T256, ~40-token documents, the ratio not judged)."""
    import dataclasses

    import torch

    import data
    import model
    B, T, L, iters = (2, 256, 40, 1) if SMOKE else (8, 2048, 300, 5)
    cfg = dataclasses.replace(model.MODEL_PRESETS['tiny' if SMOKE else 'paper'], vocab_size=data.DEFAULT_VOCAB_SIZE)
    m = model.Qwen2(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, cfg.vocab_size, (B, T + 1), generator=g)
    eos = 3
    x[:, L::L] = eos
    x = x.to(DEVICE)
    doc = model.document_ids(x, eos)
    plain, masked = step_time(m, x, None, iters), step_time(m, x, doc, iters)
    ratio = masked / plain
    note = f"causal {plain * 1e3:.0f} ms, doc mask {masked * 1e3:.0f} ms per step: {ratio:.2f}x (target <= 1.25x)"
    try:  # what a FlexAttention block mask would cost (attention alone, forward + backward)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        H, D = cfg.n_head, cfg.head_dim
        dt = torch.bfloat16 if DEVICE == 'cuda' else torch.float32
        grad = DEVICE == 'cuda'  # (FlexAttention has no backward on the CPU: the smoke times the forward)
        q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=dt, requires_grad=grad) for _ in range(3))
        d = doc[:, :T]

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (d[b, qi] == d[b, ki])
        bm = create_block_mask(mask_mod, B, None, T, T, device=DEVICE)
        flex = torch.compile(flex_attention) if DEVICE == 'cuda' else flex_attention
        dense = (d[:, :, None] == d[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        times = {}
        for name, fn in (('sdpa causal', lambda: sdpa(q, k, v, is_causal=True)),
                         ('sdpa dense mask', lambda: sdpa(q, k, v, attn_mask=dense[:, None])),
                         ('flex block mask', lambda: flex(q, k, v, block_mask=bm))):
            for i in range(3 + iters):
                if i == 3:
                    sync()
                    t = time.time()
                o = fn()
                if grad:
                    o.sum().backward()
            sync()
            times[name] = (time.time() - t) / iters * 1e3
        note += '; attention alone: ' + ', '.join(f"{k} {v:.1f} ms" for k, v in times.items())
    except Exception as e:  # noqa: BLE001 (a probe: report, do not fail the check)
        note += f"; FlexAttention probe failed: {type(e).__name__}: {str(e)[:80]}"
    return SMOKE or ratio <= 1.25, note


def paper_init(path):
    """A random paper-size run directory (ckpt.pt + the standard tokenizer) for the RL step (smoke: tiny)."""
    import dataclasses

    import checkpoint
    import data
    import model
    tok = data.standard_tokenizer()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, 'tokenizer.json'))
    cfg = dataclasses.replace(model.MODEL_PRESETS['tiny' if SMOKE else 'paper'], vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(os.path.join(path, 'ckpt.pt'), model.Qwen2(cfg), {'data_dir': ''}, tok.identity, step=0)


def check_rl_step():
    init, out = os.path.join(OUT, 'paper_init'), os.path.join(OUT, 'rl_step')
    paper_init(init)
    code = (f"import time, torch, rl; t = time.time(); "
            f"rl.main({rl_step_args(init, out, SMOKE)!r}); "
            f"peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0; "
            f"print(json.dumps({{'s': time.time() - t, 'peak_gib': peak}}))")
    ok, s, tail = run([sys.executable, '-c', 'import json; ' + code], 600, 'rl_step.log')
    res = next((json.loads(ln) for ln in reversed(tail.splitlines()) if ln.startswith('{"s"')), None)
    if not ok or res is None:
        return False, f"failed after {s:.0f}s: {tail.strip().splitlines()[-1][:200] if tail.strip() else ''}"
    what = 'tiny model, a few prompts' if SMOKE else '1024 prompts x 6 (random model: every response 1024 tokens)'
    return True, f"1 step of {what} in {res['s']:.0f}s, peak {res['peak_gib']:.1f} GiB"


def pipeline_steps(T, smoke=False):
    """The small end-to-end run's commands (tests/test_plans.py resolves their configs on the CPU);
    smoke: a few steps of each."""
    if smoke:
        return [
            ['pretrain.py', 'tiny_pretrain', f'--out_dir={T}/base', f'--data_dir={T}/data', '--max_tokens=8192',
             '--data_tokens=60000', '--data_workers=1', '--progress=False', '--eval_interval=1', '--eval_tokens=4096',
             '--ckpt_interval=1'],
            ['rl.py', 'tiny_rl', f'--init_from={T}/base', f'--out_dir={T}/rl', '--max_steps=1', '--eval_every=0',
             '--prompts_per_step=2', '--minibatch_prompts=2', '--group_size=2', '--max_response_len=16',
             '--sample_every=0'],
            ['evaluate.py', 'tiny_eval', f'--ckpts={T}/base,{T}/rl', '--labels=base,rl', f'--out_dir={T}/eval',
             f'--data_dir={T}/data', '--n_samples=2', '--eval_per_op_template=1', '--eval_ops=[2,3]',
             '--max_new_tokens=16', '--bootstrap=10', '--progress=False'],
        ]
    return [
        ['pretrain.py', 'tiny_pretrain', f'--out_dir={T}/base', f'--data_dir={T}/data', '--max_tokens=1228800',
         '--data_tokens=1400000', '--data_workers=8', '--progress=False', '--eval_interval=100'],
        ['rl.py', 'tiny_rl', f'--init_from={T}/base', f'--out_dir={T}/rl', '--max_steps=3', '--eval_every=0'],
        ['evaluate.py', 'tiny_eval', f'--ckpts={T}/base,{T}/rl', '--labels=base,rl', f'--out_dir={T}/eval',
         f'--data_dir={T}/data', '--n_samples=4', '--eval_per_op_template=2', '--progress=False'],
    ]


def rl_step_args(init, out, smoke=False):
    args = ['paper_rl', f'--init_from={init}', f'--out_dir={out}', '--max_steps=1', '--eval_every=0',
            '--sample_every=0', '--ckpt_every=0']
    if smoke:
        args += ['--prompts_per_step=2', '--minibatch_prompts=2', '--group_size=2', '--max_response_len=16',
                 '--max_prompt_len=2000']
    return args


def check_pipeline():
    T = os.path.join(OUT, 'pipeline')
    steps = pipeline_steps(T, SMOKE)
    t = time.time()
    for i, cmd in enumerate(steps):
        ok, s, tail = run([sys.executable, *cmd], 600, f'pipeline_{i}.log')
        if not ok:
            return False, f"{cmd[0]} failed after {s:.0f}s: {tail.strip().splitlines()[-1][:160]}"
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip().startswith('base:')), '')
    what = 'a few steps of each' if SMOKE else 'pretrain 300 steps + RL 3 steps + eval'
    return True, f"{what} in {time.time() - t:.0f}s; {line[:160]}"


def run_check(name, limit):
    """One check in a child process (this file with --child=NAME) under `limit` seconds: (ok, note).
    A crash, a hang or a check that prints no result is a FAIL with the reason; the child's output is
    in OUT/check_NAME.log."""
    ok, s, out = run([sys.executable, os.path.abspath(__file__), f'--child={name}'], limit, f'check_{name}.log',
                     group=True)
    res = next((json.loads(ln[len('RESULT '):]) for ln in reversed(out.splitlines()) if ln.startswith('RESULT ')),
               None)
    if res is not None and ok:
        return bool(res['ok']), res['note']
    if 'TIMEOUT after' in out[-200:]:
        return False, f"no result within its limit of {limit}s (killed)"
    last = [ln for ln in out.strip().splitlines() if ln.strip()]
    return False, f"exited without a result: {last[-1][:200] if last else '(no output)'}"


def child(name):
    """The child side of run_check: run check_NAME and print its result as one JSON line."""
    try:
        ok, note = globals()[f'check_{name}']()
    except Exception as e:  # noqa: BLE001 (reported as the check's FAIL, with the traceback in the log)
        import traceback
        traceback.print_exc()
        ok, note = False, f"{type(e).__name__}: {str(e)[:200]}"
    print('RESULT ' + json.dumps({'ok': bool(ok), 'note': note}), flush=True)
    return 0


def main(argv):
    global SMOKE, DEVICE, OUT
    import torch
    if '--smoke' in argv:
        os.environ['GPU_CHECK_SMOKE'] = '1'  # the children read it too
        argv = [a for a in argv if a != '--smoke']
    SMOKE = os.environ.get('GPU_CHECK_SMOKE', '') not in ('', '0')
    if SMOKE:
        DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
        OUT = os.environ.get('OUT_DIR', 'out/gpu_check_smoke')
    kids = [a[len('--child='):] for a in argv if a.startswith('--child=')]
    if kids:
        return child(kids[0])
    if not torch.cuda.is_available() and not SMOKE:
        raise SystemExit("gpu_check: no CUDA device; this check needs one GPU (see runs/plan.py for estimates; "
                         "--smoke runs every check on the CPU at tiny shapes)")
    todo = argv or list(CHECKS)
    bad = [c for c in todo if c not in CHECKS]
    if bad:
        raise SystemExit(f"gpu_check: unknown check(s) {bad}; choose from {', '.join(CHECKS)}")
    os.makedirs(OUT, exist_ok=True)
    where = torch.cuda.get_device_name() if DEVICE == 'cuda' else 'the CPU'
    print(f"gpu_check{' --smoke' if SMOKE else ''} on {where} (torch {torch.__version__}); logs in {OUT}/", flush=True)
    limits = SMOKE_LIMITS if SMOKE else LIMITS
    rows = []
    for name in todo:
        t = time.time()
        ok, note = run_check(name, limits[name])
        rows.append((name, 'PASS' if ok else 'FAIL', f"{time.time() - t:.0f}s", note))
        print(f"  {name}: {rows[-1][1]} ({rows[-1][2]}): {note[:160]}", flush=True)
    print('\n| check | result | time | measured |\n|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')
    with open(os.path.join(OUT, 'table.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    return 0 if all(r[1] == 'PASS' for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
