"""pretrain.py / midtrain.py: the model learns, resume is exact (even after a kill mid-checkpoint), two
processes equal one, mid-training starts from the base with a fresh optimizer and a FLOP budget, and
config mistakes are clear errors."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import checkpoint
import common
import data
import midtrain
import pretrain
import tokenizer
from conftest import ROOT, StubWandb, run_pretrain

# A micro model and run for the equivalence tests: seconds per run.
MICRO = ['tiny_pretrain', '--n_layer=2', '--hidden_size=32', '--n_head=2', '--n_kv_head=1', '--intermediate_size=64',
         '--seq_len=32', '--micro_batch=2', '--batch_tokens=128', '--max_steps=6', '--lr=3e-3', '--min_lr=3e-4',
         '--warmup_frac=0.2', '--whole_docs=False',
         '--eval_interval=3', '--eval_tokens=256', '--ckpt_interval=2', '--log_interval=1', '--progress=False']


def load_log(out):
    with open(os.path.join(out, 'log.json')) as f:
        return json.load(f)


def weights(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)['model']


def assert_same_weights(a, b, atol=0.0, loose=(), loose_atol=0.0):
    """Equal (atol 0) or within atol; names ending in one of `loose` within loose_atol instead."""
    assert a.keys() == b.keys()
    for k in a:
        tol = loose_atol if k.endswith(tuple(loose)) else atol
        if tol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------------
# it learns

def test_tiny_base_learns_and_writes_its_run_dir(tiny_base):
    out = tiny_base['out_dir']
    log = load_log(out)
    v0, v1 = log['val'][0]['loss'], log['val'][-1]['loss']
    # at init the model is close to uniform over ~2.8k tokens (ln 2771 = 7.93); 50 steps of 4k tokens
    # must take it far below (measured 2.43: it has the vocabulary and the format, and starts to copy)
    assert 7.5 < v0 < 8.2, v0
    assert v1 < 3.0, (v0, v1)
    assert log['train'][-1]['loss'] < log['train'][0]['loss'] - 3.0
    assert [r['step'] for r in log['train']] == list(range(1, 51))
    s = log['summary']
    assert s['tokens'] == 50 * 4096 and s['tok_s'] > 0 and s['params'] > 1e6
    assert s['train_flops_6n'] == 6 * s['params'] * s['tokens']
    # self-contained run dir: checkpoint with the data's tokenizer identity, a copy of the tokenizer, plot
    ck = checkpoint.load_checkpoint(tiny_base['ckpt'])
    tok = tokenizer.Tokenizer.load(os.path.join(out, 'tokenizer.json'))
    assert ck['tokenizer_identity'] == tok.identity == \
        tokenizer.Tokenizer.load(os.path.join(tiny_base['data_dir'], 'tokenizer.json')).identity
    assert ck['step'] == 50 and ck['config']['max_steps'] == 50 and ck['optimizer'] is not None
    assert {'loader', 'rng', 'log'} <= set(ck['extra'])
    assert os.path.getsize(os.path.join(out, 'loss.png')) > 5000
    # the checkpoint's weights give the logged val loss (nothing lost in the save/load round trip)
    # (the loss the run's config trains: its doc_mask and loss_on, read back from the checkpoint)
    x, y = next(iter(tokenizer.ShardLoader(tiny_base['data_dir'], 'val', 8, 512, seed=0)))
    cfg = ck['config']
    with torch.no_grad():
        _, loss = ck['model'](x, pretrain.targets(x, y, cfg, tok), doc_ids=pretrain.doc_ids(x, cfg, tok.eos_id))
    assert abs(loss.item() - v1) < 0.5


# ------------------------------------------------------------------------------------------------
# exact resume, including a kill between writing ckpt.pt.tmp and renaming it

KILL_AT_CKPT = r"""
import os, sys
sys.path.insert(0, os.getcwd())
real_replace, seen = os.replace, []
def replace(src, dst):
    if str(dst).endswith('ckpt.pt'):
        seen.append(dst)
        if len(seen) == int(os.environ['KILL_AT_CKPT']):
            os._exit(17)   # like a SIGKILL: no cleanup, no exception handlers
    return real_replace(src, dst)
os.replace = replace
import pretrain
pretrain.main(sys.argv[1:])
"""


def test_resume_after_kill_mid_checkpoint_is_exact(tiny_data, tmp_path, capsys):
    base = MICRO + [f'--data_dir={tiny_data}']
    pretrain.main(base + [f'--out_dir={tmp_path}/full'])  # in-process where we can: a fresh python costs ~10 s
    killer = tmp_path / 'kill.py'
    killer.write_text(KILL_AT_CKPT)
    out = f'{tmp_path}/resumed'
    p = run_pretrain(base + [f'--out_dir={out}'], script=str(killer), env={'KILL_AT_CKPT': '2'}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    # the kill left the step-2 checkpoint in place and a complete-but-unrenamed step-4 file beside it
    assert torch.load(f'{out}/ckpt.pt', weights_only=True)['step'] == 2
    assert os.path.exists(f'{out}/ckpt.pt.tmp')
    pretrain.main(base + [f'--out_dir={out}'])
    assert 'at step 2/6' in capsys.readouterr().out  # resumed from the step-2 checkpoint
    assert_same_weights(weights(f'{tmp_path}/full'), weights(out))
    full, resumed = load_log(f'{tmp_path}/full'), load_log(out)
    assert [r['loss'] for r in full['train']] == [r['loss'] for r in resumed['train']]
    assert [r['step'] for r in resumed['train']] == [1, 2, 3, 4, 5, 6]   # steps 3-4 of the killed run dropped
    assert full['val'] == resumed['val']
    # the optimizer state was resumed too (Adam moments, step count)
    a = torch.load(f'{tmp_path}/full/ckpt.pt', weights_only=True)['optimizer']['state']
    b = torch.load(f'{out}/ckpt.pt', weights_only=True)['optimizer']['state']
    assert all(torch.equal(a[k]['exp_avg_sq'], b[k]['exp_avg_sq']) for k in a)


def test_resume_with_another_config_is_an_error_naming_the_keys(tiny_data, tmp_path):
    out = f'{tmp_path}/run'
    args = MICRO + [f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_steps=2']
    pretrain.main(args)
    with pytest.raises(common.UsageError,  # one line naming the key
                       match=r"different config.*lr: checkpoint 0\.003 != now 0\.005.*resume_override"):
        pretrain.main(args + ['--lr=0.005'])
    # how often we log / evaluate is not part of the trajectory: no error
    pretrain.main(args + ['--log_interval=5', '--eval_interval=7'])
    # an explicit override continues the run with the new settings (here: two more steps)
    log = pretrain.main(args + ['--max_steps=4', '--resume_override=True'])
    assert [r['step'] for r in log['train']] == [1, 2, 3, 4]


def test_logger_tracker_gets_the_records_of_log_json(tiny_data, tmp_path, monkeypatch):
    """--logger=wandb (a stub module standing in for the package): every record of log.json, and only
    those, reaches the tracker at its step; log.json itself is what it is without a tracker."""
    wandb = StubWandb()
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    args = MICRO + [f'--data_dir={tiny_data}', '--max_steps=3']
    log = pretrain.main(args + [f'--out_dir={tmp_path}/w', '--logger=wandb'])
    assert wandb.inits[0]['name'] == 'w' and wandb.inits[0]['config']['logger'] == 'wandb' and wandb.finished == 1
    want = [({f'{kind}/{k}': v for k, v in r.items() if k != 'step' and v is not None}, r['step'])
            for kind, r in [('val', log['val'][0])] + [(k, r) for s in range(1, 4) for k in ('train', 'val')
                                                         for r in log[k] if r['step'] == s]]
    assert wandb.logged == want and load_log(f'{tmp_path}/w') == json.loads(json.dumps(log))
    plain = pretrain.main(args + [f'--out_dir={tmp_path}/p'])
    assert [r['loss'] for r in plain['train']] == [r['loss'] for r in log['train']]
    assert load_log(f'{tmp_path}/p').keys() == load_log(f'{tmp_path}/w').keys() == {'config', 'train', 'val', 'summary'}


# ------------------------------------------------------------------------------------------------
# two processes (DDP, gloo) == one process with the same global batch

def test_two_processes_match_one(tiny_data, tmp_path):
    base = MICRO + [f'--data_dir={tiny_data}', '--ckpt_interval=100']
    # one process: 2 micro-steps of 2 sequences; two processes: 2 micro-steps of 1 sequence each, so the
    # no_sync() path is exercised too; every step sees the same 4 windows in both runs. The preset's
    # loss_on='solution' gives each window its own number of targets: the loss must still be the
    # mean over the global batch's targets, not a mean of per-process means.
    pretrain.main(base + [f'--out_dir={tmp_path}/one'])
    run_pretrain(base + [f'--out_dir={tmp_path}/two', '--micro_batch=1'], nproc=2)
    one, two = load_log(f'{tmp_path}/one'), load_log(f'{tmp_path}/two')
    l1, l2 = [r['loss'] for r in one['train']], [r['loss'] for r in two['train']]
    assert len(l1) == len(l2) == 6
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    assert max(abs(a['loss'] - b['loss']) for a, b in zip(one['val'], two['val'])) < 1e-5
    assert l1[-1] < l1[0]  # and it is training, not a no-op
    # Key biases barely matter (a bias shared by all keys cancels in the softmax; only RoPE's rotation
    # leaves a trace), so their gradients are rounding-level noise that Adam normalises into steps of
    # up to ~lr: the two runs may move them apart (measured: 2.2e-5 after 6 steps at lr 3e-3, with the
    # tiny preset's init std 0.06). Everything else must agree to 1e-5.
    assert_same_weights(weights(f'{tmp_path}/one'), weights(f'{tmp_path}/two'), atol=1e-5,
                        loose=('k_proj.bias',), loose_atol=one['config']['lr'] / 10)


# ------------------------------------------------------------------------------------------------
# mid-training

def test_midtrain_starts_from_base_with_fresh_optimizer_and_flops_budget(tiny_base, tmp_path):
    base_log = load_log(tiny_base['out_dir'])
    n = checkpoint.load_checkpoint(tiny_base['ckpt'])['model'].num_params()
    out = f'{tmp_path}/mid'
    batch = 4096
    budget = 6 * n * batch * 3 + 1  # three steps' worth of 6N FLOPs
    log = midtrain.main([f'--init_from={tiny_base["out_dir"]}', f'--data_dir={tiny_base["data_dir"]}',
                         f'--out_dir={out}', f'--flops_budget={float(budget)}', '--seq_len=512',
                         f'--batch_tokens={batch}', '--micro_batch=8', '--eval_tokens=16384', '--eval_interval=100',
                         '--lr=1e-3', '--min_lr=1e-4', '--progress=False',
                         # the base's objective (attention mask, windows, which targets count), so losses compare
                         f"--doc_mask={base_log['config']['doc_mask']}", f"--loss_on={base_log['config']['loss_on']}",
                         f"--whole_docs={base_log['config']['whole_docs']}"])
    assert log['config']['max_tokens'] == budget // (6 * n)
    assert [r['step'] for r in log['train']] == [1, 2, 3]
    # step 0 is the base model itself (same held-out windows as the base run's last evaluation)
    assert log['val'][0]['loss'] == pytest.approx(base_log['val'][-1]['loss'], abs=1e-4)
    # fresh schedule: 15% warmup of 3 steps rounds to none, so step 1 is at the peak lr
    assert log['train'][0]['lr'] == pytest.approx(1e-3)
    ck = torch.load(f'{out}/ckpt.pt', weights_only=True)
    assert ck['step'] == 3 and ck['optimizer']['state'][0]['step'].item() == 3  # a fresh AdamW, not the base's
    assert os.path.exists(f'{out}/tokenizer.json')


def test_midtrain_refuses_data_from_another_tokenizer(tiny_base, tmp_path):
    other = tokenizer.train_tokenizer(['<question> a different corpus </question> entirely'] * 3)
    d = f'{tmp_path}/other'
    data.build_dataset(d, '2-3', 20_000, tokenizer=other, eval_ops=[2], eval_n=1, val_n=20)
    with pytest.raises(common.UsageError, match='tokenizer mismatch'):
        midtrain.main([f'--init_from={tiny_base["out_dir"]}', f'--data_dir={d}', f'--out_dir={tmp_path}/mid',
                       '--seq_len=32', '--micro_batch=2', '--batch_tokens=64', '--max_steps=1', '--progress=False'])


def test_midtrain_builds_its_data_with_the_base_tokenizer(tiny_base, tmp_path):
    d = f'{tmp_path}/mid_data'
    assert midtrain.main([f'--init_from={tiny_base["out_dir"]}', f'--data_dir={d}', f'--out_dir={tmp_path}/mid',
                          '--mixture=2-3:0.2,7-8:0.8', '--data_tokens=20000', '--prepare_only=True']) is None
    meta = tokenizer.load_shard_meta(d)
    assert meta['tokenizer_identity'] == checkpoint.load_checkpoint(tiny_base['ckpt'])['tokenizer_identity']
    assert 15_000 < meta['splits']['train']['tokens'] <= 20_000
    assert meta['meta']['mixture']['ops'] == [[0.2, [2, 3]], [0.8, [7, 8]]]
    assert not os.path.exists(f'{tmp_path}/mid')  # prepare_only trains nothing


def test_midtrain_needs_a_base(tmp_path):
    with pytest.raises(SystemExit, match='base checkpoint'):
        midtrain.main(['--init_from=scratch'])
    with pytest.raises(SystemExit, match='no base checkpoint'):
        midtrain.main([f'--init_from={tmp_path}/nothing'])


def test_load_run_checks_the_tokenizer(tiny_base, tmp_path):
    m, tok, ck = checkpoint.load_run(tiny_base['out_dir'])
    assert tok.identity == ck['tokenizer_identity'] and m.num_params() == ck['model'].num_params()
    other = tokenizer.train_tokenizer(['<question> a b </question>'], tokenizer.N_FIXED_TOKENS)
    with pytest.raises(common.UsageError, match='tokenizer mismatch'):
        checkpoint.load_run(tiny_base['ckpt'], tokenizer=other)
    with pytest.raises(common.UsageError, match='no checkpoint'):
        checkpoint.load_run(str(tmp_path / 'nothing'))


def test_tokens_for_flops():
    assert midtrain.tokens_for_flops(6e9, 1_000_000) == 1000
    assert midtrain.tokens_for_flops(6e9 - 1, 1_000_000) == 999


# ------------------------------------------------------------------------------------------------
# config errors and the schedule

def test_batch_not_divisible_names_the_fix(tiny_data, tmp_path):
    with pytest.raises(common.UsageError, match=r'batch_tokens=100 is not a multiple of .* = 64; set --batch_tokens'):
        pretrain.main(MICRO + [f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', '--batch_tokens=100'])
    assert pretrain.grad_accum_steps({'batch_tokens': 512, 'micro_batch': 2, 'seq_len': 32}, 2) == 4
    # from the command line: that one line and exit status 2, no traceback
    p = run_pretrain(MICRO + [f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', '--batch_tokens=100'], check=False)
    assert p.returncode == 2 and p.stderr.startswith('pretrain.py: batch_tokens=100 is not a multiple')
    assert p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr


def test_solution_loss_mask_matches_a_token_by_token_reference(tiny_data):
    """loss_on='solution': a target is dropped iff it is a token of a question (tags included), also in
    windows that start inside a question; checked against a walk over the whole token stream."""
    tok = tokenizer.Tokenizer.load(os.path.join(tiny_data, 'tokenizer.json'))
    qo, qc = tok.id_of('<question>'), tok.id_of('</question>')
    stream = tokenizer.ShardLoader(tiny_data, 'val', 1, 64, seed=0)._read(0, 8000).astype('int64')
    in_q, inside = [], False
    for t in stream.tolist():  # reference: a state machine over the stream from its true start
        inside = inside or t == qo
        in_q.append(inside)
        inside = inside and t != qc
    W = 256  # windows at many offsets: some begin mid-question, a few hold no tag at all
    starts = list(range(0, 8000 - W - 1, 37))
    s = torch.from_numpy(np.stack([stream[i:i + W + 1] for i in starts]))
    x, y = s[:, :-1], s[:, 1:]
    got = tokenizer.mask_question_targets(x, y, tok)
    want = torch.tensor([[-100 if in_q[i + 1 + t] else int(stream[i + 1 + t]) for t in range(W)] for i in starts])
    tagless = [k for k, i in enumerate(starts) if not ({qo, qc} & set(stream[i:i + W + 1].tolist()))]
    want[tagless] = -100  # no tag in view: the window is masked whole (it cannot tell question from solution)
    assert 0 < len(tagless) < len(starts) // 4
    assert torch.equal(got, want)
    assert 0.2 < (got == -100).float().mean() < 0.9  # both kinds of targets are present


def test_doc_mask_and_solution_loss_train(tiny_data, tmp_path):
    """The two tiny-preset switches run end to end, change the trajectory, and bad values are errors."""
    base = MICRO + [f'--data_dir={tiny_data}', '--max_steps=3', '--eval_interval=3']
    plain = pretrain.main(base + [f'--out_dir={tmp_path}/plain', '--doc_mask=False', '--loss_on=all'])
    both = pretrain.main(base + [f'--out_dir={tmp_path}/both', '--doc_mask=True', '--loss_on=solution'])
    assert plain['train'][0]['loss'] != both['train'][0]['loss']
    assert all(r['loss'] == r['loss'] for r in both['train'] + both['val'])  # finite, no NaN from empty masks
    with pytest.raises(common.UsageError, match="loss_on='answers'.*'solution'"):
        pretrain.main(base + [f'--out_dir={tmp_path}/bad', '--loss_on=answers'])


def test_unknown_and_mistyped_keys_are_errors():
    with pytest.raises(SystemExit, match="unknown config key 'batch_token'.*batch_tokens"):
        common.configure(pretrain.defaults, ['--batch_token=10'])
    with pytest.raises(SystemExit, match='lr expects float'):
        common.configure(pretrain.defaults, ['--lr=fast'])
    with pytest.raises(SystemExit, match="unknown config key 'n_layer'"):  # mid-training takes the base's architecture
        common.configure(midtrain.defaults, ['--n_layer=3'])


def test_presets_resolve():
    """Every pretrain / midtrain preset loads with only known keys; the paper one has STUDY.md §4's numbers."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py'))
    pre = [n for n in names if 'pretrain' in n]
    mid = [n for n in names if 'midtrain' in n]
    assert {'tiny_pretrain', 'paper_pretrain', 'paper_pretrain_headroom_50_30_20', 'paper_pretrain_ctx_school_1pct'} \
        <= set(pre) and {'tiny_midtrain', 'paper_midtrain'} <= set(mid)
    for n in pre:
        cfg = common.configure(pretrain.defaults, [n])
        data.parse_mixture(cfg['mixture'])  # the mixture exists
    for n in mid:
        cfg = common.configure(midtrain.defaults, [n])
        data.parse_mixture(cfg['mixture'])
    p = common.configure(pretrain.defaults, ['paper_pretrain'])
    assert (p['model'], p['seq_len'], p['batch_tokens'], p['max_tokens']) == ('paper', 2048, 524_288, 10_000_000_000)
    assert (p['lr'], p['min_lr'], p['warmup_frac'], p['weight_decay'], p['grad_clip']) == (1e-4, 3e-5, 0.05, 0.1, 1.0)
    assert p['max_tokens'] // p['batch_tokens'] == 19_073
    for world in (1, 8, 16):
        pretrain.grad_accum_steps(p, world)  # divisible on 1 GPU, 8 GPUs, two nodes
    h = common.configure(pretrain.defaults, ['paper_pretrain_headroom_50_30_20'])
    assert h['mixture'] == 'headroom_.5/.3/.2' and h['out_dir'] != p['out_dir'] and h['max_tokens'] == p['max_tokens']
    m = common.configure(midtrain.defaults, ['paper_midtrain'])
    assert m['mixture'] == 'mid_11_14' and m['warmup_frac'] == 0.15 and m['init_from'] == 'out/base'


def test_lr_schedule():
    cfg = {'lr': 1.0, 'min_lr': 0.1, 'warmup_frac': 0.1}
    lrs = [pretrain.lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)   # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                  # cosine decay, monotone
    assert lrs[55] == pytest.approx(0.55, abs=1e-9)                         # halfway down the cosine


# ------------------------------------------------------------------------------------------------
# GPU path (bf16 autocast, fused AdamW, torch.compile); skipped on CPU-only machines

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_gpu_bf16_compile_smoke(tiny_data, tmp_path):
    log = pretrain.main(MICRO + [f'--data_dir={tiny_data}', f'--out_dir={tmp_path}', '--compile=True'])
    assert log['train'][-1]['loss'] < log['train'][0]['loss'] and log['summary']['mfu'] > 0


# ------------------------------------------------------------------------------------------------
# the command in the README, end to end (builds its own data through data.build_dataset)

@pytest.mark.slow
def test_tiny_pretrain_command(tmp_path):
    out = f'{tmp_path}/out'
    run_pretrain(['tiny_pretrain', f'--data_dir={tmp_path}/data', f'--out_dir={out}', '--max_tokens=400_000',
                  '--data_tokens=500_000', '--progress=False'], timeout=3600)
    log = load_log(out)
    assert log['val'][-1]['loss'] < 0.4 * log['val'][0]['loss']
