"""
The plan of an experiment script (runs/*.sh with PLAN=1): every stage's config resolved exactly as the
stage would resolve it, without training, and per stage the tokens it processes, its FLOPs and its
estimated wall time on NGPU GPUs. It also checks that each training stage's data covers its token
budget without repeating: a stage that would see its data more than once is an error unless
ALLOW_EPOCHS=1 (repeated problems confound every comparison of the study).

    PLAN=1 bash runs/paper_extrapolation.sh          # the scripts collect their stages, then call this
    python runs/plan.py STAGES_FILE                  # one stage per line: "pretrain.py preset --key=value ..."

Estimates (all assumptions are printed, and each is an environment variable):
  training   FLOPs = model.flops_per_token(seq_len) (6N + attention) x tokens, at MFU_TRAIN (0.40) of
             PEAK_TFLOPS (989: H100/H200 dense bf16) per GPU
  RL         per step, rl.py's own accounting: rollout 2N x (prompt + response) tokens, the reference and
             old-policy passes 2N, the update 6N per sequence token; the rollout runs at MFU_SAMPLE (0.05:
             decoding is memory-bound), the passes and the update at MFU_TRAIN
  evaluation problems x samples x (prompt + response) tokens at 2N, at MFU_SAMPLE
  sampling   never faster than DECODE_MS (20) per decode step x the steps of a generate() call, taken as
             min(max response length, 3 x the mean gold response): the longest sample sets the pace
Prompt and response lengths are the mean gold lengths of 64 generated problems of the stage's ops
(data.standard_tokenizer; a trained model writes about the gold length). runs/gpu_check.sh measures
the real MFU and sampling throughput on a GPU: put them in MFU_TRAIN / MFU_SAMPLE.
"""
import json
import os
import shlex
import sys
from contextlib import redirect_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import common  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import tokenizer  # noqa: E402

NGPU = int(os.environ.get('NGPU') or 1)
PEAK = float(os.environ.get('PEAK_TFLOPS', 989)) * 1e12
MFU_TRAIN = float(os.environ.get('MFU_TRAIN', 0.40))
MFU_SAMPLE = float(os.environ.get('MFU_SAMPLE', 0.05))
DECODE_MS = float(os.environ.get('DECODE_MS', 20))   # one decode step of a generate() call (latency floor)
ALLOW_EPOCHS = os.environ.get('ALLOW_EPOCHS', '0') == '1'
PLAN_MODEL = os.environ.get('PLAN_MODEL', 'paper')   # the architecture of a checkpoint no stage here makes


class PlanError(Exception):
    """A stage that must not run as configured (one line, naming the fix)."""


def resolve(script, args):
    """The stage's resolved config, exactly as the stage's own main() would build it."""
    name = os.path.basename(script)
    mod = {'pretrain.py': 'pretrain', 'midtrain.py': 'midtrain', 'rl.py': 'rl', 'evaluate.py': 'evaluate'}.get(name)
    if mod is None:
        raise PlanError(f"{script}: not a stage (pretrain.py, midtrain.py, rl.py, evaluate.py)")
    m = __import__(mod)
    defaults = m.defaults
    try:
        with redirect_stdout(sys.stderr):
            return mod, common.configure(defaults, list(args))
    except SystemExit as e:
        raise PlanError(f"{name} {' '.join(args)}: config error: {e}") from None


def default_model():
    """The architecture of a checkpoint no stage of the plan makes: PLAN_MODEL, with the standard vocabulary."""
    import dataclasses
    return dataclasses.replace(model.MODEL_PRESETS[PLAN_MODEL], vocab_size=tokenizer.DEFAULT_VOCAB_SIZE)


def params_of(mc):
    """(N, training FLOPs per token at seq_len T) of a ModelConfig, counted as model.Qwen2 counts them
    (num_params, flops_per_token: 6N + 12 L d T), without building the model. tests/test_plans.py checks
    both against a real Qwen2."""
    d, q, kv = mc.hidden_size, mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim
    per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * mc.intermediate_size + 2 * d
    n = mc.vocab_size * d * (1 if mc.tie_embeddings else 2) + mc.n_layer * per_layer + d
    return n, (lambda T: 6 * n + 12 * mc.n_layer * d * T)


_LENGTHS = {}


def mean_lengths(ops):
    """(prompt tokens, gold response tokens) averaged over 64 generated problems of `ops`."""
    key = tuple(ops)
    if key not in _LENGTHS:
        tok = data.standard_tokenizer()
        rows = [p.to_row() for p in data.generate_problems(64, list(ops), seed=0)]
        prompt = [len(tok.encode(data.prompt_text(r))) for r in rows]
        full = [len(tok.encode(data.training_text(r))) for r in rows]
        _LENGTHS[key] = (sum(prompt) / len(rows), sum(f - p for f, p in zip(full, prompt)) / len(rows))
    return _LENGTHS[key]


def hours(flops, mfu):
    return flops / (NGPU * PEAK * mfu) / 3600


def decode_hours(calls, resp, max_len):
    """The latency floor of `calls` generate() calls (one after another on each GPU)."""
    return calls * min(max_len, 3 * resp) * DECODE_MS / 1000 / 3600


def data_tokens_available(cfg):
    """Training tokens in data_dir: counted if built, else what building it will write."""
    if os.path.exists(os.path.join(cfg['data_dir'], 'meta.json')):
        return tokenizer.count_tokens(cfg['data_dir'], 'train'), 'built'
    return cfg['data_tokens'] or cfg['max_tokens'], 'to build'


def check_epochs(what, needed, available, fix, unit='tokens'):
    epochs = needed / max(available, 1)
    if epochs > 1 and not ALLOW_EPOCHS:
        raise PlanError(f"{what} needs {needed:,} {unit} but its data holds {available:,}: it would repeat the data "
                        f"{epochs:.2f}x; {fix} (or set ALLOW_EPOCHS=1 to allow repeats)")
    return epochs


def plan_train(mod, cfg, models):
    """pretrain / midtrain: tokens, FLOPs, time, data coverage."""
    if mod == 'pretrain':
        mc = __import__('pretrain').model_config_for(cfg, tokenizer.DEFAULT_VOCAB_SIZE)
    else:
        mc = models.get(os.path.normpath(cfg['init_from'])) or default_model()
    n, flops_per_token = params_of(mc)
    if mod == 'midtrain' and cfg['flops_budget'] > 0:
        cfg['max_tokens'] = int(cfg['flops_budget'] // (6 * n))
    steps = cfg['max_steps'] or cfg['max_tokens'] // cfg['batch_tokens']
    if steps < 1:
        raise PlanError(f"{mod}: max_tokens={cfg['max_tokens']:,} is less than one batch of {cfg['batch_tokens']:,}")
    tokens = steps * cfg['batch_tokens']
    available, state = data_tokens_available(cfg)
    epochs = check_epochs(f"{mod} -> {cfg['out_dir']}", tokens, available,
                          f"build {cfg['data_dir']} with --data_tokens >= {tokens:,} or lower --max_tokens")
    flops = flops_per_token(cfg['seq_len']) * tokens
    models[os.path.normpath(cfg['out_dir'])] = mc
    return {'params': n, 'tokens': tokens, 'flops': flops, 'hours': hours(flops, MFU_TRAIN),
            'detail': f"{steps:,} steps x {cfg['batch_tokens']:,} tok; data {available:,} tok ({state}), "
                      f"{epochs:.2f} epoch"}


def rl_ops(cfg):
    if cfg['mixture']:
        mix = data.parse_mixture(cfg['mixture'])
        return sorted({op for _, ops in mix.ops for op in ops})
    return list(range(cfg['op_min'], cfg['op_max'] + 1))


def plan_rl(cfg, models):
    mc = models.get(os.path.normpath(cfg['init_from'])) or default_model()
    n, _ = params_of(mc)
    prompt, resp = mean_lengths(rl_ops(cfg))
    resp = min(resp, cfg['max_response_len'])
    P, G = cfg['prompts_per_step'], cfg['group_size']
    seq_tok = P * G * (prompt + resp)
    passes = (cfg['kl_coef'] > 0) + (P != cfg['minibatch_prompts'] or cfg['ppo_epochs'] > 1)
    rollout = 2 * n * (P * prompt + P * G * resp)
    rest = 2 * n * seq_tok * passes + 6 * n * seq_tok * cfg['ppo_epochs']
    steps = cfg['max_steps']
    if cfg['flops_budget']:
        steps = min(steps, int(cfg['flops_budget'] // (rollout + rest)))
    if cfg['prompts']:
        rows = [r for r in data.read_jsonl(cfg['prompts']) if cfg['mixture'] or cfg['op_min'] <= r['op'] <= cfg['op_max']]
        check_epochs(f"rl -> {cfg['out_dir']} (prompts)", steps * P, len(rows),
                     "give --prompts more rows or lower --max_steps", unit='prompts')
    models[os.path.normpath(cfg['out_dir'])] = mc
    calls = 1   # rl.py makes one generate() call per rank and step
    sample_h = max(hours(rollout, MFU_SAMPLE), decode_hours(calls, resp, cfg['max_response_len']))
    return {'params': n, 'tokens': int(steps * seq_tok), 'flops': steps * (rollout + rest),
            'hours': steps * (sample_h + hours(rest, MFU_TRAIN)),
            'detail': f"{steps} steps x {P} prompts x {G}; ~{prompt:.0f} + {resp:.0f} tok per sample (ops "
                      f"{rl_ops(cfg)[0]}-{rl_ops(cfg)[-1]})"}


def plan_eval(cfg, models):
    import evaluate
    ckpts = evaluate.split_list(cfg['ckpts'])
    # samples per problem of each op: n_samples, or more for the ops n_samples_by_op names (the edge band)
    n_samples = {op: 1 if cfg['greedy'] else evaluate.samples_for_op(op, cfg['n_samples'], cfg['n_samples_by_op'],
                                                                       cfg['bands']) for op in cfg['eval_ops']}
    per_op = cfg['eval_per_op_template'] * len(evaluate.split_list(cfg['eval_templates']) or data.TEMPLATES)
    problems = len(cfg['eval_ops']) * per_op
    flops, tokens, longest, seqs = 0.0, 0, 0.0, 0
    for op in cfg['eval_ops']:
        prompt, resp = mean_lengths([op])
        tokens += per_op * n_samples[op] * (prompt + min(resp, cfg['max_new_tokens']))
        longest = max(longest, resp)
        seqs += per_op * n_samples[op] / NGPU     # per rank; batch_size > 0 splits them into calls
    for c in ckpts:
        n, _ = params_of(models.get(os.path.normpath(c)) or default_model())
        flops += 2 * n * tokens
    calls = -(-seqs // cfg['batch_size']) if cfg['batch_size'] else 1
    h = max(hours(flops, MFU_SAMPLE), len(ckpts) * decode_hours(calls, longest, cfg['max_new_tokens']))
    return {'params': None, 'tokens': int(tokens * len(ckpts)), 'flops': flops, 'hours': h,
            'detail': f"{len(ckpts)} checkpoints x {problems} problems x " + '-'.join(
                str(k) for k in sorted(set(n_samples.values()))) + " samples"}


def plan(lines):
    """One row per stage line; raises PlanError on the first stage that must not run."""
    models, rows = {}, []
    for line in lines:
        script, *args = shlex.split(line)
        mod, cfg = resolve(script, args)
        row = (plan_train(mod, cfg, models) if mod in ('pretrain', 'midtrain') else
               plan_rl(cfg, models) if mod == 'rl' else plan_eval(cfg, models))
        rows.append(dict(row, stage=mod, out=cfg['out_dir'], config=cfg))
    return rows


def _fmt(x):
    return f"{x:.3g}"


def print_plan(rows, out=sys.stdout):
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{'stage':<9} {'out_dir':<28} {'params':>7} {'tokens':>9} {'FLOPs':>9} {'GPU h':>7} {'wall h':>7}  detail")
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r['params'] else ''
        p(f"{r['stage']:<9} {r['out']:<28} {params:>7} {_fmt(r['tokens']):>9} {_fmt(r['flops']):>9} "
          f"{r['hours'] * NGPU:>7.2f} {r['hours']:>7.2f}  {r['detail']}")
    tot = sum(r['hours'] for r in rows)
    p(f"total: {_fmt(sum(r['flops'] for r in rows))} FLOPs, {tot * NGPU:.1f} GPU hours = {tot:.2f} h wall on {NGPU} "
      f"GPU(s) (assumed: peak {PEAK / 1e12:.0f} TFLOP/s bf16 per GPU, MFU {MFU_TRAIN:.0%} training, "
      f"{MFU_SAMPLE:.0%} sampling and >= {DECODE_MS:g} ms per decode step; set PEAK_TFLOPS / MFU_TRAIN / "
      f"MFU_SAMPLE / DECODE_MS)")


def main(argv):
    if len(argv) != 1:
        raise common.UsageError("usage: python runs/plan.py STAGES_FILE   (one 'script preset --key=value ...' "
                                "per line)")
    with open(argv[0]) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    try:
        rows = plan(lines)
    except PlanError as e:
        raise common.UsageError(str(e)) from None
    print_plan(rows)
    return rows


if __name__ == '__main__':
    common.cli('plan.py', main)
