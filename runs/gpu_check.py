"""
One prepared check of the paper-scale paths on ONE GPU (~6 minutes): a pass/fail table for

  mfu        a bf16, torch.compile'd pre-training step of the paper preset (bench.py's mfu row; target 45%
             on an H100/H200)
  doc_mask   per-document attention (pretrain.py's doc_mask): a paper-preset training step with the dense
             block-diagonal mask vs plain causal attention (target: <= 1.25x), and, for the record, the
             attention alone with FlexAttention's block mask where this torch has it
  sample     the sampling engine at paper scale (bench.py's sample rows, --preset=paper)
  rl_step    one full-size paper GRPO step (1024 prompts x 6 samples, responses up to 1024 tokens) from a
             random paper-size model, which never stops early: the worst case for memory and time
  pipeline   a small end-to-end run on the GPU: tiny pre-training (300 steps), 3 RL steps, evaluation

    bash runs/gpu_check.sh                 # everything; writes out/gpu_check/ and prints the table
    bash runs/gpu_check.sh doc_mask mfu    # a subset
Each check runs with its own time limit, so the whole script ends within ~6 minutes. NOT YET RUN on a
GPU: this file was written and its CPU parts tested without one.
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
LIMITS = {'mfu': 75, 'doc_mask': 45, 'sample': 45, 'rl_step': 120, 'pipeline': 75}   # seconds: 6 min at worst


def run(cmd, limit, log):
    """Run a command with a time limit; (ok, seconds, output tail). The output goes to OUT/log."""
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        out, ok = p.stdout + p.stderr, p.returncode == 0
    except subprocess.TimeoutExpired as e:
        out, ok = f"{(e.stdout or b'').decode(errors='replace')}\nTIMEOUT after {limit}s", False
    with open(os.path.join(OUT, log), 'w') as f:
        f.write(' '.join(cmd) + '\n' + out)
    return ok, time.time() - t, out


def bench_row(only, extra):
    ok, s, out = run([sys.executable, 'bench.py', f'--only={only}', *extra], LIMITS[only], f'bench_{only}.log')
    table = [ln for ln in out.splitlines() if ln.strip() and ('|' in ln or 'PASS' in ln.upper() or 'FAIL' in ln.upper())]
    return ok and 'FAIL' not in out.upper(), f"{s:.0f}s; " + ' // '.join(table[-4:])[:300]


def check_mfu():
    return bench_row('mfu', ['--compile=True', '--mfu_batch_size=16', '--mfu_seq_len=2048'])


def check_sample():
    return bench_row('sample', ['--preset=paper'])


def step_time(m, x, doc, iters=5):
    import torch
    from common import autocast_ctx
    for i in range(2 + iters):
        if i == 2:
            torch.cuda.synchronize()
            t = time.time()
        with autocast_ctx('cuda'):
            loss, _ = m(x[:, :-1], x[:, 1:], doc_ids=None if doc is None else doc[:, :-1])
        loss.backward()
    torch.cuda.synchronize()
    return (time.time() - t) / iters


def check_doc_mask():
    """Paper-preset training step, B8 x T2048 with ~300-token documents: dense doc mask vs causal."""
    import dataclasses

    import torch

    import data
    import model
    cfg = dataclasses.replace(model.MODEL_PRESETS['paper'], vocab_size=data.DEFAULT_VOCAB_SIZE)
    m = model.Qwen2(cfg).cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, cfg.vocab_size, (8, 2049), generator=g)
    eos = 3
    x[:, 300::300] = eos
    x = x.cuda()
    doc = model.document_ids(x, eos)
    plain, masked = step_time(m, x, None), step_time(m, x, doc)
    ratio = masked / plain
    note = f"causal {plain * 1e3:.0f} ms, doc mask {masked * 1e3:.0f} ms per step: {ratio:.2f}x (target <= 1.25x)"
    try:  # what a FlexAttention block mask would cost (attention alone, forward + backward)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        H, T, D = cfg.n_head, 2048, cfg.head_dim
        q, k, v = (torch.randn(8, H, T, D, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        d = doc[:, :T]

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (d[b, qi] == d[b, ki])
        bm = create_block_mask(mask_mod, 8, None, T, T, device='cuda')
        flex = torch.compile(flex_attention)
        dense = (d[:, :, None] == d[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device='cuda').tril()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        times = {}
        for name, fn in (('sdpa causal', lambda: sdpa(q, k, v, is_causal=True)),
                         ('sdpa dense mask', lambda: sdpa(q, k, v, attn_mask=dense[:, None])),
                         ('flex block mask', lambda: flex(q, k, v, block_mask=bm))):
            for i in range(8):
                if i == 3:
                    torch.cuda.synchronize()
                    t = time.time()
                fn().sum().backward()
            torch.cuda.synchronize()
            times[name] = (time.time() - t) / 5 * 1e3
        note += '; attention alone: ' + ', '.join(f"{k} {v:.1f} ms" for k, v in times.items())
    except Exception as e:  # noqa: BLE001 (a probe: report, do not fail the check)
        note += f"; FlexAttention probe failed: {type(e).__name__}: {str(e)[:80]}"
    return ratio <= 1.25, note


def paper_init(path):
    """A random paper-size run directory (ckpt.pt + the standard tokenizer) for the RL step."""
    import dataclasses

    import checkpoint
    import data
    import model
    tok = data.standard_tokenizer()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, 'tokenizer.json'))
    cfg = dataclasses.replace(model.MODEL_PRESETS['paper'], vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(os.path.join(path, 'ckpt.pt'), model.Qwen2(cfg), {'data_dir': ''}, tok.identity, step=0)


def check_rl_step():
    init, out = os.path.join(OUT, 'paper_init'), os.path.join(OUT, 'rl_step')
    paper_init(init)
    code = (f"import time, torch, rl; t = time.time(); "
            f"rl.main({rl_step_args(init, out)!r}); "
            f"print(json.dumps({{'s': time.time() - t, 'peak_gib': torch.cuda.max_memory_allocated() / 2**30}}))")
    ok, s, tail = run([sys.executable, '-c', 'import json; ' + code], LIMITS['rl_step'], 'rl_step.log')
    res = next((json.loads(ln) for ln in reversed(tail.splitlines()) if ln.startswith('{"s"')), None)
    if not ok or res is None:
        return False, f"failed after {s:.0f}s: {tail.strip().splitlines()[-1][:200] if tail.strip() else ''}"
    return True, f"1 step of 1024 prompts x 6 (random model: every response 1024 tokens) in {res['s']:.0f}s, " \
                 f"peak {res['peak_gib']:.1f} GiB"


def pipeline_steps(T):
    """The small end-to-end run's commands (tests/test_plans.py resolves their configs on the CPU)."""
    return [
        ['pretrain.py', 'tiny_pretrain', f'--out_dir={T}/base', f'--data_dir={T}/data', '--max_tokens=1228800',
         '--data_tokens=1400000', '--data_workers=8', '--progress=False', '--eval_interval=100'],
        ['rl.py', 'tiny_rl', f'--init_from={T}/base', f'--out_dir={T}/rl', '--max_steps=3', '--eval_every=0'],
        ['evaluate.py', 'tiny_eval', f'--ckpts={T}/base,{T}/rl', '--labels=base,rl', f'--out_dir={T}/eval',
         f'--data_dir={T}/data', '--n_samples=4', '--eval_per_op_template=2', '--progress=False'],
    ]


def rl_step_args(init, out):
    return ['paper_rl', f'--init_from={init}', f'--out_dir={out}', '--max_steps=1', '--eval_every=0',
            '--sample_every=0', '--ckpt_every=0']


def check_pipeline():
    T = os.path.join(OUT, 'pipeline')
    steps = pipeline_steps(T)
    t, left = time.time(), LIMITS['pipeline']
    for i, cmd in enumerate(steps):
        ok, s, tail = run([sys.executable, *cmd], max(1, left), f'pipeline_{i}.log')
        left -= s
        if not ok:
            return False, f"{cmd[0]} failed after {s:.0f}s: {tail.strip().splitlines()[-1][:160]}"
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip().startswith('base:')), '')
    return True, f"pretrain 300 steps + RL 3 steps + eval in {time.time() - t:.0f}s; {line[:160]}"


def main(argv):
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; this check needs one GPU (see runs/plan.py for estimates)")
    todo = argv or list(CHECKS)
    bad = [c for c in todo if c not in CHECKS]
    if bad:
        raise SystemExit(f"gpu_check: unknown check(s) {bad}; choose from {', '.join(CHECKS)}")
    os.makedirs(OUT, exist_ok=True)
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}); logs in {OUT}/", flush=True)
    rows = []
    for name in todo:
        t = time.time()
        try:
            ok, note = globals()[f'check_{name}']()
        except Exception as e:  # noqa: BLE001 (one failed check must not hide the others)
            ok, note = False, f"{type(e).__name__}: {str(e)[:200]}"
        rows.append((name, 'PASS' if ok else 'FAIL', f"{time.time() - t:.0f}s", note))
        print(f"  {name}: {rows[-1][1]} ({rows[-1][2]})", flush=True)
    print('\n| check | result | time | measured |\n|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')
    with open(os.path.join(OUT, 'table.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    return 0 if all(r[1] == 'PASS' for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
