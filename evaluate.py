"""
Evaluate checkpoints on held-out problems (STUDY.md §4): n samples per problem, each checked for the
right answer (outcome) and for a fully correct reasoning graph (process-verified, STUDY.md §2), then
pass@k for k = 1, 2, 4, ..., n per op / band / template / mode, for one or several checkpoints side
by side, with two estimators (STUDY.md §6):
  unbiased   1 - C(n-c, k) / C(n, k): the expected pass@k of k samples drawn from the n (Chen et al.)
  ordered    the original study's scorer: a problem counts at k if one of its first k samples, in the
             order they were drawn, is right. Use it to compare with the paper's numbers.
The tables show both (with a 95% bootstrap interval over problems); `estimator` picks the plots'.

Commands (run from the repository root):

    # CPU, a few minutes: the tiny base run against its own data dir's held-out set
    python evaluate.py tiny_eval --ckpts=out/tiny_base

    # compare checkpoints (same problems, same seeds); labels name the curves and the files
    python evaluate.py tiny_eval --ckpts=out/base,out/rl_outcome --labels=base,rl

    # one GPU, the paper protocol: 200 problems per op 2..20, 128 samples at temperature 0.7
    python evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14 --labels=base,rl

    # 8 GPUs on one node: problems are sharded across ranks, rank 0 gathers and writes the reports
    # (every rank writes its generations next to out_dir's, so out_dir must be visible to all ranks)
    torchrun --standalone --nproc_per_node=8 evaluate.py paper_eval --ckpts=out/base,out/rl_op11-14

    # greedy decoding (temperature 0, one sample); the original study's released JSONL as the eval set
    python evaluate.py paper_eval --ckpts=out/base --greedy=True --eval_file=path/to/released_test.jsonl

    # re-score saved generations (e.g. after a verifier fix) without sampling again
    python evaluate.py paper_eval --labels=base,rl --out_dir=out/eval --rescore=True

    # the original's released test sets: a directory or glob of JSONL files (op, template from the rows
    # or from names such as composition/test/op10-1k.jsonl, context/<template>/test/op5_1k.jsonl)
    python evaluate.py paper_eval --ckpts=out/released --eval_file='released/composition/val/*.jsonl'

The held-out set (`eval_file`, read by data.load_eval_rows): '' = {data_dir}/eval.jsonl when it exists
(written by data.build_dataset, disjoint from training), else generated with data.make_eval_set(eval_ops,
eval_per_op_template, eval_seed); 'generate' = always generate; a path = any JSONL of ours or the
original study's, or a directory / glob of them (rows without a gold graph get one from data.read_jsonl
parsing the gold solution).
data_dir '' means the data dir recorded in the first checkpoint's run config.

What ends up in out_dir:
  results.json             config, checkpoints, every aggregate and per-problem counts, per label
  results.csv              one row per (label, grouping, key): counts, ProcessAcc, hacking, pass@k
  summary.md               the tables a reader wants first (bands x modes, ops, hacking, templates,
                           ops x statements given)
  passk_by_band.png        pass@k curves per band (columns) and mode (rows), checkpoints overlaid
  acc_vs_op.png            pass@1 and pass@n versus op, checkpoints overlaid, bands shaded; rows per mode
  acc_vs_op_by_template.png   the same with one row per template (contextual generalization, STUDY.md §5.2)
  generations_{label}.jsonl   {id, op, template, mode, sample, text, verdict} per sample
  eval_set.jsonl           the problems (with gold graphs) the generations belong to; --rescore reads it

Library use (rl.py): quick_eval(model, tok, rows, n, temperature) -> flat dict of metrics; the
pieces are sample_solutions -> score -> aggregate -> write_reports.
"""
import csv
import json
import math
import os
import re
from collections import defaultdict

import numpy as np
import torch

import common
import data
import engine
import verifier
import vllm_sampler
from checkpoint import checkpoint_step, load_run
from common import UsageError, autocast_ctx, cleanup_distributed, configure, progress_bar, setup_distributed, unwrap
from verifier import verify

# -----------------------------------------------------------------------------------------------
# default config (paper values in config/paper_eval.py, CPU-sized ones in config/tiny_eval.py)
defaults = dict(
    # what to evaluate
    ckpts='out/base',                    # comma-separated checkpoints: ckpt.pt files or run dirs holding one
    labels='',                           # comma-separated names, one per checkpoint ('' = the run dir names)
    out_dir='out/eval',                  # reports, plots, generations
    rescore=False,                       # re-score out_dir/generations_{label}.jsonl instead of sampling
    # held-out problems
    data_dir='',                         # tokenizer.json (+ eval.jsonl); '' = the first checkpoint's data_dir
    eval_file='',                        # '' = {data_dir}/eval.jsonl if present else generate; 'generate'; a path
    eval_ops=list(range(2, 21)),         # ops to evaluate (generated, or kept from a file)
    eval_per_op_template=67,             # problems per op and template (x3 templates ~ 200 per op); caps a file (0 = all)
    eval_templates='',                   # comma-separated template filter ('' = all)
    eval_modes='',                       # comma-separated mode filter: normalforward, forwardreverse ('' = both)
    eval_seed=1234,                      # generator seed of an on-the-fly eval set
    world='paper',                       # data.WORLDS name or 'places,items,noise' of an on-the-fly eval set
    # sampling
    n_samples=128,                       # samples per problem; pass@k is reported for k = 1, 2, 4, ..., n
    n_samples_by_op={},                  # more (or fewer) samples for some ops: {op or band name: n}, e.g.
                                         # {'OOD-edge': 64} (an op key wins over its band's); a sample depends only on
                                         # (seed, prompt, index), so the first n_samples of them are the default's
    temperature=0.7,                     # sampling temperature (STUDY.md §4)
    greedy=False,                        # greedy decoding: temperature 0 and one sample
    top_k=0,                             # 0 = off
    max_new_tokens=1024,                 # generation budget per sample (also capped by the model's context)
    batch_size=0,                        # one generate() call per rank for all its problems x n samples;
                                         # > 0 caps the sequences decoded at once (generate's max_rows)
    seed=0,                              # sampling seed (every checkpoint gets the same one)
    sampler='engine',                    # 'engine' (ours) | 'vllm' (vllm_sampler.py: pip install -r
                                         # requirements-vllm.txt; one process; other random streams than ours)
    # scoring and reports
    bands={'ID': (2, 10), 'OOD-edge': (11, 14), 'OOD-hard': (15, 20)},  # band name -> inclusive op range
    weighted_bands={},                   # band name -> op weights, e.g. {'ID': '2-4:0.2,5-7:0.3,8-10:0.5'}: an extra
                                         # row, the weighted mean of the ranges' means (the reference numbers' ID)
    estimator='unbiased',                # the plots' pass@k: 'unbiased' or 'ordered' (the original's); tables show both
    bootstrap=1000,                      # bootstrap resamples (over problems) for the 95% intervals; 0 = none
    bootstrap_seed=0,                    # seed of the resampling (the same intervals on every re-run)
    workers=1,                           # processes for verification (per rank)
    device='auto',                       # 'auto' (cuda if available, cuda:LOCAL_RANK under torchrun), 'cpu', 'cuda'
    progress=True,                       # tqdm progress bars on rank 0
    logger='',                           # also send each label's headline metrics to 'wandb' or 'tensorboard'
)

BANDS = defaults['bands']
# the groupings every aggregate reports; a key joins the row's values with '/' ("ID/forwardreverse")
GROUPS = (('all',), ('op',), ('band',), ('template',), ('mode',),
          ('op', 'mode'), ('band', 'mode'), ('band', 'template'), ('op', 'template'), ('op', 'given'))
STEP_ERROR_KINDS = verifier.ERROR_KINDS + ('closing',)   # what a wrong step can have (Verdict.error_counts)
MODE_NOTE = "reverse-mode answers are always 1..4, so outcome pass@k is flattered there"


# -----------------------------------------------------------------------------------------------
# held-out problems

def split_list(s):
    return [x.strip() for x in s.split(',') if x.strip()] if s else []


# -----------------------------------------------------------------------------------------------
# sampling

@torch.no_grad()
def sample_solutions(model, tok, rows, n, temperature, *, max_new_tokens=1024, batch_size=0, top_k=None,
                     seed=0, progress=True, desc='sampling', sampler=None):
    """n completions per row, returned as texts[row][sample] in the order of `rows`; a row's samples
    keep the order they were drawn in (the ordered pass@k reads it).

    Prompts are data.prompt_text(row); generation stops at '</answer>' or EOS (engine.complete). Every row
    goes to one generate(prompts, ..., num_samples=n) call, which prefills each prompt once, shares
    its KV cache among its samples and sizes its slots from its memory budget; batch_size > 0 also
    caps the sequences decoded at once (generate's max_rows), 0 leaves it to the budget. A sample
    depends only on (seed, its prompt, its index), not on batch_size nor on which rows share the call:
    ranks pass the same seed, so results do not depend on the number of processes. temperature 0 is greedy. The
    model's train/eval mode is left as it was. sampler: an object with Qwen2.generate's call that samples
    instead of the model's engine (vllm_sampler.VLLMSampler holding the model's weights); None = the engine."""
    if not rows:
        return []
    m = unwrap(model)
    device = next(m.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with progress_bar(total=len(rows) * n, desc=desc, unit='sample', disable=not progress) as bar:
        with autocast_ctx(device):
            res = engine.complete(sampler or m, tok, [data.prompt_text(r) for r in rows], max_new_tokens, num_samples=n,
                                  temperature=temperature, top_k=top_k, generator=gen,
                                  max_rows=batch_size if batch_size > 0 else None)
        bar.update(len(res.texts))
    return [res.texts[i * n:(i + 1) * n] for i in range(len(rows))]  # samples come back prompt-major


def sample_mixed(model, tok, rows, ns, temperature, **kw):
    """sample_solutions with ns[i] samples for rows[i]: one call per distinct count, results in the
    order of `rows`. Row i's samples are the first ns[i] of what any larger count would draw."""
    out = [None] * len(rows)
    for n in sorted(set(ns)):
        idx = [i for i, m in enumerate(ns) if m == n]
        for i, ss in zip(idx, sample_solutions(model, tok, [rows[i] for i in idx], n, temperature, **kw)):
            out[i] = ss
    return out


# -----------------------------------------------------------------------------------------------
# scoring

def _verify_pair(args):
    return verify(*args)


def verify_all(rows, samples, workers=1, progress=False):
    """verifier.verify for every sample: verdicts[row][sample]."""
    pairs = [(s, r['graph']) for r, ss in zip(rows, samples) for s in ss]
    if workers > 1 and len(pairs) > 1000:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        # fork is fastest, but a forked child of a process that has initialised CUDA is unsafe
        ctx = multiprocessing.get_context('spawn' if torch.cuda.is_initialized() else 'fork')
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            flat = list(progress_bar(ex.map(_verify_pair, pairs, chunksize=256), total=len(pairs), desc='verifying',
                                     disable=not progress))
    else:
        flat = [verify(s, g) for s, g in progress_bar(pairs, desc='verifying', disable=not progress)]
    out, pos = [], 0
    for ss in samples:
        out.append(flat[pos:pos + len(ss)])
        pos += len(ss)
    return out


def first_rank(flags):
    """1-based position of the first true flag (0 = none): the ordered pass@k counts the problem at k >= it."""
    return next((i + 1 for i, f in enumerate(flags) if f), 0)


def problem_record(row, verdicts):
    """Counts for one problem: n samples, c_outcome right answers, c_process process-verified correct
    (strict, STUDY.md §2), c_lenient correct as the original's scorer judges (parents and final values),
    c_hacked right answer with a wrong process, c_false_arith lenient-perfect but strict-wrong ("right
    values, false arithmetic"), no_answer without a parsable answer, mean ProcessAcc (strict and lenient),
    step_errors: {error kind: wrong gold steps of that kind over the samples} (verifier.ERROR_KINDS, 'closing');
    first_outcome / first_process / first_lenient: the 1-based rank of the first right / perfect / lenient-
    perfect sample (0 = none)."""
    n = len(verdicts)
    step_errors = dict.fromkeys(STEP_ERROR_KINDS, 0)
    for v in verdicts:
        for kind, c in v.error_counts().items():
            step_errors[kind] += c
    return {'id': row['id'], 'op': row['op'], 'template': row['template'], 'mode': row['mode'], 'n': n,
            'given': data.given_statements(row['problem']),
            'c_outcome': sum(v.outcome for v in verdicts),
            'c_process': sum(v.perfect for v in verdicts),
            'c_lenient': sum(v.lenient_perfect for v in verdicts),
            'c_hacked': sum(v.outcome and not v.perfect for v in verdicts),
            'c_false_arith': sum(v.lenient_perfect and not v.perfect for v in verdicts),
            'no_answer': sum(v.answer is None for v in verdicts),
            'process_acc': sum(v.process_acc for v in verdicts) / n if n else 0.0,
            'lenient_process_acc': sum(v.lenient_process_acc for v in verdicts) / n if n else 0.0,
            'step_errors': step_errors,
            'first_outcome': first_rank(v.outcome for v in verdicts),
            'first_process': first_rank(v.perfect for v in verdicts),
            'first_lenient': first_rank(v.lenient_perfect for v in verdicts)}


def score(rows, samples, workers=1, progress=False):
    """Per-problem records (problem_record) for samples[row][sample] texts."""
    return [problem_record(r, vs) for r, vs in zip(rows, verify_all(rows, samples, workers, progress))]


# -----------------------------------------------------------------------------------------------
# aggregation

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k / i) (no huge binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ordered_pass_at_k(first, k):
    """The original study's pass@k of one problem (STUDY.md §6): 1 if its first right sample, in the order
    drawn, has rank <= k (first = 0: none was right)."""
    return 1.0 if 0 < first <= k else 0.0


def default_ks(n):
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return ks + [n] if ks and ks[-1] != n else ks


def band_of(op, bands=BANDS):
    for name, (lo, hi) in bands.items():
        if lo <= op <= hi:
            return name
    return 'other'


def samples_for_op(op, n, by_op=None, bands=BANDS):
    """Samples per problem of an op: by_op[op] (an int or str key), else by_op[its band], else n."""
    by_op = by_op or {}
    for key in (op, str(op), band_of(op, bands)):
        if key in by_op:
            return int(by_op[key])
    return n


def check_samples_by_op(by_op, bands=BANDS):
    """UsageError for a key that is neither an op nor a band name, or a count below 1."""
    for key, v in by_op.items():
        if not (isinstance(key, int) or str(key).isdigit() or key in bands):
            raise UsageError(f"n_samples_by_op: {key!r} is neither an op nor a band ({', '.join(bands)})")
        if not isinstance(v, int) or v < 1:
            raise UsageError(f"n_samples_by_op[{key!r}] = {v!r}; it must be an int >= 1")


# the pass@k tables of a group: (key in the stats, verifier, estimator). process = the strict check,
# lenient = the original's (parents and final values only; STUDY.md §2)
PASS_KINDS = (('process', 'process', 'unbiased'), ('outcome', 'outcome', 'unbiased'),
              ('process_ordered', 'process', 'ordered'), ('outcome_ordered', 'outcome', 'ordered'),
              ('lenient', 'lenient', 'unbiased'), ('lenient_ordered', 'lenient', 'ordered'))


def pass_matrix(records, ks):
    """{kind: array (problems, len(ks))} of per-problem pass@k for every PASS_KINDS entry."""
    out = {}
    for kind, check, est in PASS_KINDS:
        if est == 'unbiased':
            out[kind] = np.array([[pass_at_k(r['n'], r[f'c_{check}'], k) for k in ks] for r in records])
        else:
            out[kind] = np.array([[ordered_pass_at_k(r[f'first_{check}'], k) for k in ks] for r in records])
    return out


def bootstrap_ci(strata, n_boot, seed=0, level=0.95):
    """Percentile bootstrap interval of a (weighted) mean over problems. strata: [(weight, values)], values
    an array (problems, columns); each resample draws every stratum's problems with replacement and
    returns sum_s weight_s * mean_s. Returns (lo, hi) arrays of shape (columns,), clipped to the range
    the statistic can take (so all-equal problems give exactly [v, v]). Seeded: the same on every run."""
    rng = np.random.default_rng(seed)
    total, lo_bound, hi_bound = 0.0, 0.0, 0.0
    for w, v in strata:
        n = len(v)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)   # (n_boot, n): a resample per row
        total = total + w * (counts @ v) / n
        lo_bound, hi_bound = lo_bound + w * v.min(0), hi_bound + w * v.max(0)
    a = (1 - level) / 2
    lo, hi = np.quantile(total, [a, 1 - a], axis=0)
    return np.clip(lo, lo_bound, hi_bound), np.clip(hi, lo_bound, hi_bound)


def pass_tables(strata, ks, n_boot=0, seed=0):
    """pass@k of a weighted set of record groups: {kind: {'pass@k': value}} for every PASS_KINDS entry,
    and with n_boot > 0 'ci': {kind: {'pass@k': [lo, hi]}}. strata: [(weight, records)], weights sum to 1."""
    mats = [(w, pass_matrix(rs, ks)) for w, rs in strata]
    out, ci = {}, {}
    for kind, _, _ in PASS_KINDS:
        # clipped to [weighted min, weighted max] (a no-op but for rounding) so that equal problems give
        # exactly their value, as the clipped interval does
        mean = np.clip(sum(w * m[kind].mean(0) for w, m in mats), sum(w * m[kind].min(0) for w, m in mats),
                       sum(w * m[kind].max(0) for w, m in mats))
        out[kind] = {f'pass@{k}': float(x) for k, x in zip(ks, mean)}
        if n_boot:
            lo, hi = bootstrap_ci([(w, m[kind]) for w, m in mats], n_boot, seed)
            ci[kind] = {f'pass@{k}': [float(a), float(b)] for k, a, b in zip(ks, lo, hi)}
    if n_boot:
        out['ci'] = ci
    return out


def group_stats(records, ks, n_boot=0, seed=0):
    """pass@k over the problems (pass_tables: process-verified and outcome, unbiased and ordered, with
    bootstrap intervals when n_boot > 0); sample-weighted rates."""
    n_samples = sum(r['n'] for r in records)
    c_outcome = sum(r['c_outcome'] for r in records)
    c_lenient = sum(r['c_lenient'] for r in records)
    hacked = sum(r['c_hacked'] for r in records)
    false_arith = sum(r['c_false_arith'] for r in records)
    ks = [k for k in ks if k <= min(r['n'] for r in records)]  # a group's k up to its fewest samples
    return {
        'n_problems': len(records), 'n_samples': n_samples, 'ks': ks,
        **pass_tables([(1.0, records)], ks, n_boot, seed),
        'process_acc': sum(r['process_acc'] * r['n'] for r in records) / n_samples,
        'lenient_process_acc': sum(r['lenient_process_acc'] * r['n'] for r in records) / n_samples,
        'hack_rate': hacked / n_samples,                       # right answer, wrong process: share of all samples
        'hack_share': hacked / c_outcome if c_outcome else 0.0,  # ... share of the right answers
        # right values, false arithmetic (lenient-perfect, strict-wrong): share of all samples, and of the
        # samples the original's scorer accepts
        'false_arith_rate': false_arith / n_samples,
        'false_arith_share': false_arith / c_lenient if c_lenient else 0.0,
        'no_answer_rate': sum(r['no_answer'] for r in records) / n_samples,
        'step_errors': {kind: sum(r['step_errors'][kind] for r in records) / n_samples   # per sample
                        for kind in STEP_ERROR_KINDS},
    }


def weighted_stats(records, ops_spec, ks, n_boot=0, seed=0):
    """pass@k as sum_i w_i * (mean over the problems with op in range i), for ops_spec like
    '2-4:0.2,5-7:0.3,8-10:0.5' (the reference numbers' ID, STUDY.md §6); weights are normalised. The
    bootstrap resamples within each range. None when a range has no problems."""
    parts = data.parse_ops(ops_spec)
    total = sum(w for w, _ in parts)
    strata = [(w / total, [r for r in records if r['op'] in ops]) for w, ops in parts]
    if any(not rs for _, rs in strata):
        return None
    ks = [k for k in ks if k <= min(r['n'] for _, rs in strata for r in rs)]
    return {'ks': ks, 'n_problems': sum(len(rs) for _, rs in strata), 'weights': ops_spec,
            **pass_tables(strata, ks, n_boot, seed)}


def aggregate(records, ks=None, bands=BANDS, weighted_bands=None, n_boot=0, seed=0):
    """{'ks', 'bands', 'all': stats, 'op': {'2': stats, ...}, 'band': {'ID': ...}, 'template': ...,
    'mode': ..., 'op/mode': {'2/normalforward': ...}, 'band/mode', 'band/template', 'op/template', 'op/given',
    'weighted': {'ID': ...} (weighted_bands)}; stats as group_stats. ks default to 1, 2, 4, ..., n for
    every sample count n present (k > the largest n is dropped); each group reports the ks up to its own
    smallest n (its 'ks'), and 'ks_common' are those every problem has. n_boot > 0 adds bootstrap
    intervals (seeded by seed)."""
    if not records:
        raise UsageError("nothing to aggregate: no scored problems")
    ns = sorted({r['n'] for r in records})
    ks = [k for k in (ks or sorted({k for n in ns for k in default_ks(n)})) if k <= ns[-1]]
    keyed = [dict(r, all='all', band=band_of(r['op'], bands), given=r.get('given', '?')) for r in records]
    out = {'ks': ks, 'ks_common': [k for k in ks if k <= ns[0]], 'bands': {b: list(v) for b, v in bands.items()}}
    for dims in GROUPS:
        buckets = defaultdict(list)
        for r in keyed:
            buckets['/'.join(str(r[d]) for d in dims)].append(r)
        stats = {key: group_stats(rs, ks, n_boot, seed)
                 for key, rs in sorted(buckets.items(), key=lambda kv: _sort_key(kv[0], bands))}
        out['/'.join(dims)] = stats['all'] if dims == ('all',) else stats
    out['weighted'] = {}
    for band, spec in (weighted_bands or {}).items():
        st = weighted_stats(records, spec, ks, n_boot, seed)
        if st is not None:
            out['weighted'][band] = st
    return out


def _sort_key(key, bands):
    """Numeric parts sort as numbers ('2/x' < '10/x'); bands keep their declared order."""
    band_rank = {b: i for i, b in enumerate(bands)}
    return [(0, int(p), '') if p.isdigit() else (1, band_rank.get(p, len(band_rank)), p) for p in key.split('/')]


def flat_metrics(agg):
    """{group/metric: value} for logging: group = 'all', each band and each mode present; metrics
    pass@k (process-verified), outcome_pass@k, process_acc, hack_rate, false_arith_rate, no_answer_rate."""
    out = {}
    groups = [('all', agg['all'])] + list(agg['band'].items()) + list(agg['mode'].items())
    for name, st in groups:
        for k in st.get('ks', agg['ks']):
            out[f'{name}/pass@{k}'] = st['process'][f'pass@{k}']
            out[f'{name}/outcome_pass@{k}'] = st['outcome'][f'pass@{k}']
        for metric in ('process_acc', 'hack_rate', 'false_arith_rate', 'no_answer_rate'):
            out[f'{name}/{metric}'] = st[metric]
    return out


def quick_eval(model, tok, rows, n=4, temperature=1.0, *, max_new_tokens=512, batch_size=256, seed=0,
               bands=BANDS, dist=None, progress=False, sampler=None):
    """Held-out evaluation for training loops (rl.py calls this every few steps). Stable signature.

    model: a Qwen2 (DDP / torch.compile wrappers are unwrapped); tok: tokenizer.Tokenizer; rows: eval rows
    with gold graphs (e.g. data.load_eval_rows(...)[0] or data.make_eval_set(...) rows); n samples per row at
    `temperature` (0 = greedy, then n is 1). With dist (common.Dist) and world_size > 1 every rank must
    call it: rows are sharded across ranks and every rank returns the same metrics.

    Returns flat_metrics: {'all/pass@1': ..., 'all/outcome_pass@1': ..., ..., 'all/process_acc',
    'all/hack_rate', 'all/no_answer_rate', and the same under each band name ('ID/pass@1', ...) and
    each mode ('forwardreverse/pass@1', ...) present}. pass@k is process-verified; k = 1, 2, 4, ..., n.
    The model's train/eval mode is restored. sampler: see sample_solutions."""
    n = 1 if temperature == 0 else n
    m = unwrap(model)
    was_training = m.training
    m.eval()
    world = dist.world_size if dist is not None else 1
    mine = rows[dist.rank::world] if world > 1 else rows
    try:
        samples = sample_solutions(m, tok, mine, n, temperature, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, seed=seed,  # not the rank: see sample_solutions
                                   progress=progress, desc='quick_eval', sampler=sampler)
    finally:
        m.train(was_training)
    records = score(mine, samples)
    records = [r for part in common.all_gather(records, world) for r in part]
    return flat_metrics(aggregate(records, bands=bands))


# -----------------------------------------------------------------------------------------------
# reports

def _pct(x):
    return f"{100 * x:.1f}"


def _split_rows(agg, by='mode'):
    """('all', key suffix '') then, when the data holds several, one row per mode (reverse reported
    separately, STUDY.md §1) or per template: (title, '/' + value)."""
    values = [m for m in data.MODES if m in agg['mode']] if by == 'mode' else list(agg[by])
    return [(f'all {by}s', '')] + ([(v, '/' + v) for v in values] if len(values) > 1 else [])


ESTIMATOR_TITLES = {'unbiased': 'unbiased estimator', 'ordered': "ordered (the original study's scorer)"}


def _kinds(estimator):
    """(process key, outcome key) of an estimator's pass@k tables."""
    suffix = '' if estimator == 'unbiased' else '_ordered'
    return 'process' + suffix, 'outcome' + suffix


def write_csv(runs, path):
    """One row per (label, grouping, key); pass@k of both estimators (intervals are in results.json)."""
    ks = next(iter(runs.values()))['aggregate']['ks']
    kinds = [kind for kind, _, _ in PASS_KINDS]
    rates = ('process_acc', 'lenient_process_acc', 'hack_rate', 'hack_share', 'false_arith_rate',
             'false_arith_share', 'no_answer_rate')
    head = (['label', 'grouping', 'key', 'n_problems', 'n_samples'] + list(rates)
            + [f'step_errors_{kind}' for kind in STEP_ERROR_KINDS] + [f'{kind}_pass@{k}' for kind in kinds for k in ks])
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(head)
        for label, run in runs.items():
            agg = run['aggregate']
            for dims in GROUPS:
                g = '/'.join(dims)
                table = {'all': agg['all']} if g == 'all' else agg[g]
                for key, st in table.items():
                    w.writerow([label, g, key, st['n_problems'], st['n_samples']]
                               + [f"{st[m]:.6f}" for m in rates]
                               + [f"{st['step_errors'][kind]:.6f}" for kind in STEP_ERROR_KINDS]
                               + [f"{st[kind][f'pass@{k}']:.6f}" if f'pass@{k}' in st[kind] else ''
                                  for kind in kinds for k in ks])


def _value(st, kind, k):
    """'36.7' or, with a bootstrap interval, '36.7 [30.0, 43.3]' (%); '-' where the group has fewer
    than k samples per problem."""
    if f'pass@{k}' not in st[kind]:
        return '-'
    v = _pct(st[kind][f'pass@{k}'])
    ci = st.get('ci', {}).get(kind, {}).get(f'pass@{k}')
    return f"{v} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else v


def _cell(st, k, estimator):
    p, o = _kinds(estimator)
    if f'pass@{k}' not in st[p]:
        return '-'
    return f"{_value(st, p, k)} / {_value(st, o, k)}"


def _samples_note(records):
    """'' when every problem has the same number of samples, else ' (ops 5-6: 64 samples)'."""
    counts = defaultdict(set)
    for r in records:
        counts[r['n']].add(r['op'])
    if len(counts) < 2:
        return ''
    n_main = max(counts, key=lambda n: len(counts[n]))
    return ' (' + '; '.join(f"ops {_ops_text(sorted(ops))}: {n} samples" for n, ops in sorted(counts.items())
                            if n != n_main) + ')'


def write_summary(runs, meta, path):
    labels = list(runs)
    first = runs[labels[0]]['aggregate']
    ks, kmax = first['ks'], first['ks'][-1]
    kc = first.get('ks_common', ks)[-1]
    kcols = [1, kc] + ([kmax] if kmax != kc else [])   # pass@1, the k every problem has, the largest k
    khead = lambda: ' | '.join(f'pass@{k}' for k in kcols)
    kcells = lambda st, est: ' | '.join(_cell(st, k, est) for k in kcols)
    boot = meta.get('bootstrap', 0)
    L = [f"# Evaluation: {', '.join(labels)}", '',
         f"{meta['n_problems']} held-out problems (ops {meta['ops']}; source: {meta['source']}); "
         f"{meta['n_samples']} samples each{_samples_note(runs[labels[0]].get('records', []))} at temperature "
         f"{meta['temperature']}" + (" ('-': fewer samples than k)" if kmax != kc else '') + ".",
         "Cells are **process-verified / outcome** pass@k in %"
         + (f", each with its 95% bootstrap interval over problems ({boot} resamples, seeded)" if boot else '')
         + ". Process-verified = every gold step has the right parents and value, every equality it writes "
         "is true, and the answer is right (the strict check, STUDY.md §2); the original study's scorer checks "
         "only the parents and final values (lenient, its own table below). Two estimators: unbiased = 1 - C(n-c,k)/C(n,k); ordered = the original study's scorer, "
         "a problem counts at k if one of its first k samples as drawn is right (STUDY.md §6). Note: "
         + MODE_NOTE + ".", '',
         '## Checkpoints', '', '| label | checkpoint | step |', '|---|---|---|']
    L += [f"| {lb} | {run.get('ckpt', '')} | {run.get('step', '')} |" for lb, run in runs.items()]
    for est in ESTIMATOR_TITLES:
        L += ['', f'## pass@k by band, {ESTIMATOR_TITLES[est]}', '']
        for title, suffix in _split_rows(first):
            L += [f"### {title}", '', '| label | band | problems | ' + ' | '.join(f'pass@{k}' for k in ks) + ' |',
                  '|---|---|---|' + '---|' * len(ks)]
            for lb in labels:
                agg = runs[lb]['aggregate']
                for band in agg['band']:
                    st = agg['band/mode'].get(band + suffix) if suffix else agg['band'][band]
                    if st:
                        L.append(f"| {lb} | {band} | {st['n_problems']} | "
                                 + ' | '.join(_cell(st, k, est) for k in ks) + ' |')
                for band, st in (agg.get('weighted', {}).items() if not suffix else ()):
                    L.append(f"| {lb} | {band} weighted {st['weights']} | {st['n_problems']} | "
                             + ' | '.join(_cell(st, k, est) for k in ks) + ' |')
            L.append('')
    for est in ESTIMATOR_TITLES:
        L += [f"## By op: {', '.join(f'pass@{k}' for k in kcols)} (all modes), {ESTIMATOR_TITLES[est]}", '',
              '| op | ' + ' | '.join(f'{lb} pass@{k}' for lb in labels for k in kcols) + ' |',
              '|---|' + '---|' * len(kcols) * len(labels)]
        for op in first['op']:
            cells = []
            for lb in labels:
                st = runs[lb]['aggregate']['op'].get(op)
                cells += [_cell(st, k, est) for k in kcols] if st else [''] * len(kcols)
            L.append(f"| {op} | " + ' | '.join(cells) + ' |')
        L.append('')
    L += [f'## Strict and lenient process verification: pass@1 and pass@{kmax}, unbiased, by band', '',
          'Lenient = the original study\'s scorer (each step\'s parents and final value); strict also asks every '
          'number a step writes to be right (STUDY.md §2). Their difference is the samples with right values '
          'and false arithmetic.', '',
          f'| label | band | strict pass@1 | lenient pass@1 | strict pass@{kmax} | lenient pass@{kmax} |',
          '|---|---|---|---|---|---|']
    for lb in labels:
        for band, st in runs[lb]['aggregate']['band'].items():
            L.append(f"| {lb} | {band} | {_value(st, 'process', 1)} | {_value(st, 'lenient', 1)} | "
                     f"{_value(st, 'process', kmax)} | {_value(st, 'lenient', kmax)} |")
    L += ['', '## Process accuracy and reward hacking, by band', '',
          'Hacked = right answer, wrong process (strict). Right values, false arithmetic = judged perfect by the '
          'original\'s scorer (lenient) but not by the strict check.', '',
          '| label | band | ProcessAcc strict / lenient | hacked, % of samples | hacked, % of right answers | '
          'right values, false arithmetic, % of samples | ... % of lenient-perfect | no answer |',
          '|---|---|---|---|---|---|---|---|']
    for lb in labels:
        for band, st in runs[lb]['aggregate']['band'].items():
            L.append(f"| {lb} | {band} | {_pct(st['process_acc'])} / {_pct(st['lenient_process_acc'])} | "
                     f"{_pct(st['hack_rate'])} | {_pct(st['hack_share'])} | {_pct(st['false_arith_rate'])} | "
                     f"{_pct(st['false_arith_share'])} | {_pct(st['no_answer_rate'])} |")
    L += ['', '## Wrong steps by kind, per 100 samples, by band', '',
          'A wrong step can have several kinds (verifier.ERROR_KINDS): missing, wrong parents, wrong value, unreadable '
          'value; and, seen only by the strict check, false arithmetic in its chain, a false scratch clause, a letter '
          'used before it has a value; closing = a wrong reverse closing (one per sample).', '',
          '| label | band | ' + ' | '.join(STEP_ERROR_KINDS) + ' |', '|---|---|' + '---|' * len(STEP_ERROR_KINDS)]
    for lb in labels:
        for band, st in runs[lb]['aggregate']['band'].items():
            L.append(f"| {lb} | {band} | " + ' | '.join(f"{100 * st['step_errors'][k]:.1f}" for k in STEP_ERROR_KINDS)
                     + ' |')
    for est in ESTIMATOR_TITLES:
        L += ['', f"## By template and band: {', '.join(f'pass@{k}' for k in kcols)}, {ESTIMATOR_TITLES[est]}", '',
              f'| label | template/band | {khead()} |', '|---|---|' + '---|' * len(kcols)]
        for lb in labels:
            for key, st in runs[lb]['aggregate']['band/template'].items():
                L.append(f"| {lb} | {key} | {kcells(st, est)} |")
    L += ['', f"## By op and statements given: {', '.join(f'pass@{k}' for k in kcols)}, unbiased "
          f"(what makes a problem hard)", '',
          f'| label | op/statements | problems | {khead()} |', '|---|---|---|' + '---|' * len(kcols)]
    for lb in labels:
        for key, st in runs[lb]['aggregate'].get('op/given', {}).items():
            L.append(f"| {lb} | {key} | {st['n_problems']} | {kcells(st, 'unbiased')} |")
    with open(path, 'w') as f:
        f.write('\n'.join(L) + '\n')


def _style_legend(fig, labels, colors):
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[lb], lw=2, label=lb) for lb in labels]
    handles += [Line2D([], [], color='k', lw=1.5, ls='-', label='process-verified'),
                Line2D([], [], color='k', lw=1.5, ls='--', label='outcome')]
    fig.legend(handles=handles, loc='lower center', ncol=len(handles), frameon=False, fontsize=8)


def plot_passk(runs, path, estimator='unbiased'):
    """pass@k versus k: one column per band, one row per mode group (all, forward, reverse);
    colour = checkpoint, solid = process-verified, dashed = outcome; `estimator`'s pass@k."""
    plt = common.pyplot()
    labels = list(runs)
    first = runs[labels[0]]['aggregate']
    bands, rows = list(first['band']), _split_rows(first)
    colors = {lb: f'C{i}' for i, lb in enumerate(labels)}
    fig, axes = plt.subplots(len(rows), len(bands), figsize=(3.4 * len(bands), 2.8 * len(rows) + 0.6),
                             squeeze=False, sharey=True)
    for (title, suffix), axrow in zip(rows, axes):
        for band, ax in zip(bands, axrow):
            for lb in labels:
                agg = runs[lb]['aggregate']
                st = agg['band/mode'].get(band + suffix) if suffix else agg['band'].get(band)
                if not st:
                    continue
                ks = st.get('ks', agg['ks'])
                for kind, ls in zip(_kinds(estimator), ('-', '--')):
                    ax.plot(ks, [st[kind][f'pass@{k}'] for k in ks], ls, color=colors[lb], marker='o', ms=3)
            ax.set_xscale('log', base=2)
            ax.set_xticks(first['ks'], [str(k) for k in first['ks']])
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{band} ({title}; {estimator})", fontsize=9)
            ax.set_xlabel('k')
            ax.grid(alpha=0.3)
        axrow[0].set_ylabel('pass@k')
    _style_legend(fig, labels, colors)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acc_vs_op(runs, path, bands=BANDS, by='mode', estimator='unbiased'):
    """pass@1 and pass@n versus op (columns); rows: all problems, then each mode (by='mode') or each
    template (by='template'); band ranges shaded; `estimator`'s pass@k."""
    plt = common.pyplot()
    labels = list(runs)
    first = runs[labels[0]]['aggregate']
    kmax = first.get('ks_common', first['ks'])[-1]  # the k every problem has
    rows = _split_rows(first, by)
    colors = {lb: f'C{i}' for i, lb in enumerate(labels)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.8 * len(rows) + 0.6), squeeze=False, sharey=True)
    for (title, suffix), axrow in zip(rows, axes):
        for k, ax in zip((1, kmax), axrow):
            for i, (band, (lo, hi)) in enumerate(bands.items()):
                ax.axvspan(lo - 0.5, hi + 0.5, color=f'C{i}', alpha=0.06)
                ax.text((lo + hi) / 2, 1.04, band, ha='center', va='bottom', fontsize=7, alpha=0.7)
            for lb in labels:
                agg = runs[lb]['aggregate']
                table = agg[f'op/{by}'] if suffix else agg['op']
                ops = sorted(int(key.split('/')[0]) for key in table if key.endswith(suffix))
                for kind, ls in zip(_kinds(estimator), ('-', '--')):
                    ax.plot(ops, [table[f'{op}{suffix}'][kind][f'pass@{k}'] for op in ops], ls, color=colors[lb],
                            marker='o', ms=3)
            ax.set_ylim(-0.02, 1.12)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"pass@{k} ({title}; {estimator})", fontsize=9)
            ax.set_xlabel('op')
            ax.grid(alpha=0.3)
        axrow[0].set_ylabel('accuracy')
    _style_legend(fig, labels, colors)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out_dir, runs, meta, bands=BANDS, estimator='unbiased'):
    """results.json, results.csv, summary.md, passk_by_band.png, acc_vs_op.png, acc_vs_op_by_template.png from
    runs = {label: {'aggregate': aggregate(...), 'records': [...], 'ckpt': path, 'step': int}}; the plots
    show `estimator`'s pass@k ('unbiased' or 'ordered'), the tables both."""
    if estimator not in ESTIMATOR_TITLES:
        raise UsageError(f"estimator={estimator!r}; choose one of {', '.join(ESTIMATOR_TITLES)}")
    os.makedirs(out_dir, exist_ok=True)
    common.write_json({'meta': meta, 'runs': runs}, os.path.join(out_dir, 'results.json'))
    write_csv(runs, os.path.join(out_dir, 'results.csv'))
    write_summary(runs, meta, os.path.join(out_dir, 'summary.md'))
    plot_passk(runs, os.path.join(out_dir, 'passk_by_band.png'), estimator)
    plot_acc_vs_op(runs, os.path.join(out_dir, 'acc_vs_op.png'), bands, estimator=estimator)
    plot_acc_vs_op(runs, os.path.join(out_dir, 'acc_vs_op_by_template.png'), bands, by='template',
                   estimator=estimator)


def generation_lines(rows, samples, verdicts):
    for r, ss, vs in zip(rows, samples, verdicts):
        for j, (text, v) in enumerate(zip(ss, vs)):
            yield {'id': r['id'], 'op': r['op'], 'template': r['template'], 'mode': r['mode'], 'sample': j,
                   'text': text, 'verdict': v.to_dict()}


def read_generations(path, rows):
    """samples[row][sample] from a generations file, in the order of `rows`."""
    if not os.path.exists(path):
        raise UsageError(f"{path} not found; run without --rescore first (or fix --labels/--out_dir)")
    by_id = defaultdict(dict)
    with open(path) as f:
        for line in f:
            g = json.loads(line)
            by_id[g['id']][g['sample']] = g['text']
    known = {r['id'] for r in rows}
    if set(by_id) != known:
        raise UsageError(f"{path} covers {len(by_id)} problems, eval_set.jsonl has {len(known)} "
                         f"({len(set(by_id) - known)} unknown ids); the two files must come from the same run")
    return [[by_id[r['id']][j] for j in sorted(by_id[r['id']])] for r in rows]


# -----------------------------------------------------------------------------------------------
# the command

def default_label(path):
    p = os.path.normpath(path)
    if os.path.basename(p) == 'ckpt.pt':
        p = os.path.dirname(p)
    return os.path.splitext(os.path.basename(p))[0] or 'model'


def run_labels(cfg):
    ckpts = split_list(cfg['ckpts'])
    labels = split_list(cfg['labels'])
    if cfg['rescore'] and labels:
        return labels, ckpts if len(ckpts) == len(labels) else [''] * len(labels)
    if not ckpts:
        raise UsageError("no checkpoints given; pass --ckpts=out/base[,out/rl...]")
    labels = labels or [default_label(c) for c in ckpts]
    if len(labels) != len(ckpts):
        raise UsageError(f"{len(ckpts)} checkpoints but {len(labels)} labels; give one label per checkpoint")
    bad = [lb for lb in labels if not re.fullmatch(r'[A-Za-z0-9._+-]+', lb)]
    if bad or len(set(labels)) != len(labels):
        raise UsageError(f"labels must be unique and filename-safe (letters, digits, . _ + -), got {labels}; "
                         f"set --labels")
    return labels, ckpts


def check_config(cfg):
    """(samples per problem, temperature, labels, checkpoints); a bad choice is a UsageError now."""
    n, temperature = (1, 0.0) if cfg['greedy'] else (cfg['n_samples'], cfg['temperature'])
    if n < 1:
        raise UsageError(f"n_samples={n}; it must be >= 1")
    if cfg['estimator'] not in ESTIMATOR_TITLES:
        raise UsageError(f"estimator={cfg['estimator']!r}; choose one of {', '.join(ESTIMATOR_TITLES)}")
    for band, spec in cfg['weighted_bands'].items():
        try:
            data.parse_ops(spec)
        except ValueError as e:
            raise UsageError(f"weighted_bands[{band!r}]: {e}") from None
    vllm_sampler.check_sampler(cfg['sampler'])   # (imports vllm only when it samples)
    check_samples_by_op(cfg['n_samples_by_op'], cfg['bands'])
    labels, ckpts = run_labels(cfg)
    return n, temperature, labels, ckpts


def rescore_runs(cfg, labels, ckpts, prev, say):
    """--rescore: verify the saved generations of each label again (no sampling). -> (runs, rows, source, n)."""
    eval_set_path = os.path.join(cfg['out_dir'], 'eval_set.jsonl')
    if not os.path.exists(eval_set_path):
        raise UsageError(f"{eval_set_path} not found; --rescore needs the out_dir of an earlier evaluation")
    runs, rows, source, n = {}, data.read_jsonl(eval_set_path), eval_set_path, None
    for label, ckpt in zip(labels, ckpts):
        path = os.path.join(cfg['out_dir'], f'generations_{label}.jsonl')
        samples = read_generations(path, rows)
        verdicts = verify_all(rows, samples, cfg['workers'], cfg['progress'])
        data.write_jsonl(path, generation_lines(rows, samples, verdicts))
        old = prev.get(label, {})
        # the checkpoint's own step where it is named (results.json may lack the label: runs/tiny.sh's
        # two evaluation processes each write it)
        step = checkpoint_step(ckpt) if ckpt else old.get('step')
        runs[label] = {'ckpt': ckpt or old.get('ckpt', ''), 'step': step,
                       'records': [problem_record(r, vs) for r, vs in zip(rows, verdicts)]}
        say(f"{label}: re-scored {sum(map(len, samples))} samples from {path}")
        n = min(len(s) for s in samples)
    return runs, rows, source, n


def sample_runs(cfg, labels, ckpts, n, temperature, dist, device, say):
    """Sample, verify and record every checkpoint on one eval set (fixed by the first checkpoint's data
    dir), the problems sharded across ranks. -> (runs on rank 0, rows, source)."""
    master, world, out_dir = dist.is_master, dist.world_size, cfg['out_dir']
    runs, rows, source = {}, None, None
    for label, ckpt_arg in zip(labels, ckpts):
        # on the CPU first: the optimizer state, if any, stays there
        _, tok, ck = load_run(ckpt_arg, 'cpu', cfg['data_dir'] or None,
                              fix='pass --data_dir=<the data dir the checkpoint was trained on>')
        ckpt_path = ck['path']
        ck['model'].to(device)
        if rows is None:  # one eval set for every checkpoint, fixed by the first one's data dir
            rows, source = data.load_eval_rows(cfg['eval_file'], cfg['data_dir'] or ck['config'].get('data_dir', ''),
                                               cfg['eval_ops'], cfg['eval_per_op_template'],
                                               split_list(cfg['eval_templates']), split_list(cfg['eval_modes']),
                                               cfg['eval_seed'], cfg['world'])
            if master:
                data.write_jsonl(os.path.join(out_dir, 'eval_set.jsonl'), rows)
            say(f"eval set: {len(rows)} problems from {source}")
            # balanced shards: deal problems sorted by prompt length round-robin to the ranks
            mine = sorted(rows, key=lambda r: -len(data.prompt_text(r)))[dist.rank::world]
        ns = [n if cfg['greedy'] else samples_for_op(r['op'], n, cfg['n_samples_by_op'], cfg['bands'])
              for r in mine]
        say(f"{label}: {ckpt_path} (step {ck['step']}), {n} samples x {len(mine)} problems/rank x {world} "
            f"rank(s){_samples_note([{'n': k, 'op': r['op']} for k, r in zip(ns, mine)])}, temperature "
            f"{temperature}, max_new_tokens {cfg['max_new_tokens']}")
        m, step = ck['model'].eval(), ck['step']
        sampler = None
        if cfg['sampler'] == 'vllm':  # a vLLM engine holding this checkpoint's weights
            sampler = vllm_sampler.VLLMSampler(m, max_rows=cfg['batch_size'] or None)
        samples = sample_mixed(m, tok, mine, ns, temperature, max_new_tokens=cfg['max_new_tokens'],
                               batch_size=cfg['batch_size'], top_k=cfg['top_k'], seed=cfg['seed'],
                               progress=cfg['progress'] and master, desc=f'sampling {label}', sampler=sampler)
        if sampler is not None:
            sampler.close()
        del m, ck, sampler
        verdicts = verify_all(mine, samples, cfg['workers'], cfg['progress'] and master)
        records = [problem_record(r, vs) for r, vs in zip(mine, verdicts)]
        gen_path = os.path.join(out_dir, f'generations_{label}.jsonl')
        part = gen_path + (f'.rank{dist.rank}' if world > 1 else '')
        data.write_jsonl(part, generation_lines(mine, samples, verdicts))
        records = [r for part in common.all_gather(records, world) for r in part]  # every rank's, in rank order
        if master and world > 1:  # rank 0 concatenates the generation parts
            with open(gen_path + '.tmp', 'w') as out:
                for r in range(world):
                    with open(f'{gen_path}.rank{r}') as f:
                        out.write(f.read())
                    os.remove(f'{gen_path}.rank{r}')
            os.replace(gen_path + '.tmp', gen_path)
        if master:
            pos = {r['id']: i for i, r in enumerate(rows)}
            runs[label] = {'ckpt': ckpt_path, 'step': step, 'records': sorted(records, key=lambda r: pos[r['id']])}
    return runs, rows, source


def evaluate(cfg):
    """Run the evaluation described by cfg (a resolved config dict); returns the runs dict on rank 0."""
    dist = setup_distributed()
    master, world = dist.is_master, dist.world_size
    device = dist.device if cfg['device'] == 'auto' else cfg['device']
    # the console (rank 0), and each label's headline metrics to W&B / TensorBoard if asked (--logger)
    logger = common.RunLog(cfg['out_dir'], cfg, 'eval', cfg['logger'], master)
    say = logger.print
    n, temperature, labels, ckpts = check_config(cfg)
    out_dir = cfg['out_dir']
    os.makedirs(out_dir, exist_ok=True)
    prev = {}
    if os.path.exists(os.path.join(out_dir, 'results.json')):
        with open(os.path.join(out_dir, 'results.json')) as f:
            prev = json.load(f).get('runs', {})
    if cfg['rescore']:
        if world > 1:
            raise UsageError("--rescore runs in one process; drop torchrun")
        runs, rows, source, n = rescore_runs(cfg, labels, ckpts, prev, say)
    else:
        runs, rows, source = sample_runs(cfg, labels, ckpts, n, temperature, dist, device, say)
    if world > 1:
        cleanup_distributed()
    if not master:
        return None
    for label, run in runs.items():
        run['aggregate'] = aggregate(run['records'], bands=cfg['bands'], weighted_bands=cfg['weighted_bands'],
                                     n_boot=cfg['bootstrap'], seed=cfg['bootstrap_seed'])
    meta = {'config': cfg, 'source': source, 'n_problems': len(rows), 'n_samples': n, 'temperature': temperature,
            'ops': _ops_text(sorted({r['op'] for r in rows})), 'labels': labels, 'bootstrap': cfg['bootstrap'],
            'plot_estimator': cfg['estimator']}
    write_reports(out_dir, runs, meta, cfg['bands'], cfg['estimator'])
    say(f"wrote {out_dir}/summary.md, results.json, results.csv, passk_by_band.png, acc_vs_op*.png")
    for label, run in runs.items():
        logger.log(label, {'ckpt_step': run['step'], **flat_metrics(run['aggregate'])})
        st = run['aggregate']['all']
        k = st.get('ks', run['aggregate']['ks'])[-1]
        say(f"  {label}: pass@1 {_pct(st['process']['pass@1'])} / {_pct(st['outcome']['pass@1'])}, pass@{k} "
            f"{_pct(st['process'][f'pass@{k}'])} / {_pct(st['outcome'][f'pass@{k}'])} (process / outcome, %, "
            f"unbiased); ordered pass@{k} {_pct(st['process_ordered'][f'pass@{k}'])} / "
            f"{_pct(st['outcome_ordered'][f'pass@{k}'])}")
    logger.close()
    return runs


def _ops_text(ops):
    """[2, 3, 4, 7] -> '2-4, 7'."""
    spans = []
    for op in ops:
        if spans and op == spans[-1][1] + 1:
            spans[-1][1] = op
        else:
            spans.append([op, op])
    return ', '.join(f'{a}-{b}' if a != b else f'{a}' for a, b in spans)


def main(argv):
    return evaluate(configure(defaults, argv))


if __name__ == '__main__':
    common.cli('evaluate.py', main)
