"""evaluate.py: the pass@k estimator, scoring with oracle and corrupted samplers on real problems,
the sampling loop (order, batching), reports and plots, and the command end to end."""
import csv
import itertools
import json
import os
import re
from collections import defaultdict

import numpy as np
import pytest
import torch

import checkpoint
import data
import evaluate as ev
import tokenizer
from checkpoint import save_checkpoint
from engine import Generation
from model import ModelConfig, Qwen2


# -----------------------------------------------------------------------------------------------
# helpers

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

def gold_completion(row):
    """What a perfect model writes after '<solution>'."""
    full, prompt = data.training_text(row), data.prompt_text(row)
    assert full.startswith(prompt)
    return full[len(prompt):]


def wrong_step_value(row):
    """Gold completion with the first step's value off by one; later steps and the answer untouched."""
    text = gold_completion(row)
    end = text.index('. Define')  # end of the first step (forward rows have >= 2 steps)
    nums = list(re.finditer(r'\d+', text[:end]))
    last = nums[-1]
    return text[:last.start()] + str(int(last.group()) + 1) + text[last.end():]


def wrong_answer(row):
    text = gold_completion(row)
    return text.replace(f"<answer> {row['answer']} </answer>", f"<answer> {row['answer'] + 1} </answer>")


class CharTokenizer:
    """Stand-in for tokenizer.Tokenizer: one id per character, specials as single ids."""
    def __init__(self):
        self.specials = {s: i for i, s in enumerate(['[UNK]', '[PAD]', '[BOS]', '[EOS]', '<question>', '</question>',
                                                    '<solution>', '</solution>', '<answer>', '</answer>'])}
        self.inv = {i: s for s, i in self.specials.items()}
        self.eos_id, self.pad_id = self.specials['[EOS]'], self.specials['[PAD]']
        self._re = re.compile('(' + '|'.join(re.escape(s) for s in self.specials) + ')')

    def id_of(self, s):
        return self.specials[s]

    def encode(self, text):
        out = []
        for part in self._re.split(text):
            out += [self.specials[part]] if part in self.specials else [ord(c) + 16 for c in part]
        return out

    def decode(self, ids):
        return ''.join(self.inv[i] if i in self.inv else chr(i - 16) for i in ids)


class OracleModel(torch.nn.Module):
    """A 'model' whose generate() answers each prompt with sample_fn(row, j) for its j-th sample."""
    def __init__(self, tok, rows, sample_fn):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.sample_fn = tok, sample_fn
        self.by_prompt = {data.prompt_text(r): r for r in rows}
        self.count = defaultdict(int)
        self.calls = []  # (prompt lengths, num_samples) per call

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, num_samples=1, pad_id=0, logprobs=True, max_rows=None):
        self.calls.append(([len(p) for p in prompts], num_samples, max_rows))
        toks = []
        for p in prompts:
            row = self.by_prompt[self.tok.decode(p)]
            for _ in range(num_samples):
                j = self.count[row['id']]
                self.count[row['id']] += 1
                toks.append(self.tok.encode(self.sample_fn(row, j)) + [self.tok.eos_id])
        return Generation(toks, [[0.0] * len(t) for t in toks], [True] * len(toks))


# the tiny_eval preset keeps forward problems of op 2..8 only; these tests use every row of their eval set
ANY_EVAL = ['--eval_modes=', '--eval_per_op_template=0', f'--eval_ops={list(range(2, 21))}']



@pytest.fixture(scope='module')
def problems():
    """Real problems from data.py: every band, template and mode."""
    ops = [2, 3, 6, 9, 11, 13, 15, 18]
    return [p.to_row() for p in data.generate_problems(len(ops) * 6, ops, seed=7)]


@pytest.fixture(scope='module')
def forward_problems(problems):
    return [r for r in problems if r['mode'] == 'normalforward']


# -----------------------------------------------------------------------------------------------
# pass@k

def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_bad_input():
    assert ev.pass_at_k(128, 1, 1) == pytest.approx(1 / 128)
    assert ev.pass_at_k(128, 0, 128) == 0.0 and ev.pass_at_k(128, 1, 128) == 1.0
    # 1 - C(126, 64) / C(128, 64) = 1 - (64 * 63) / (128 * 127)
    assert ev.pass_at_k(128, 2, 64) == pytest.approx(1 - 64 * 63 / (128 * 127), rel=1e-12)
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            ev.pass_at_k(n, c, k)
    assert ev.default_ks(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert ev.default_ks(6) == [1, 2, 4, 6] and ev.default_ks(1) == [1]


# -----------------------------------------------------------------------------------------------
# scoring and aggregation

def test_oracle_sampler_scores_one_everywhere(problems):
    tok = CharTokenizer()
    oracle = OracleModel(tok, problems, lambda row, j: gold_completion(row))
    samples = ev.sample_solutions(oracle, tok, problems, 4, 0.7, batch_size=8, progress=False)
    agg = ev.aggregate(ev.score(problems, samples))
    assert agg['ks'] == [1, 2, 4]
    assert set(agg['band']) == {'ID', 'OOD-edge', 'OOD-hard'}
    assert set(agg['mode']) == set(data.MODES) and len(agg['template']) == 3
    groups = [agg['all']] + [st for g in ev.GROUPS[1:] for st in agg['/'.join(g)].values()]
    for st in groups:
        for kind in ('process', 'outcome'):
            assert all(v == 1.0 for v in st[kind].values()), st
        assert st['process_acc'] == 1.0 and st['hack_rate'] == 0.0 and st['no_answer_rate'] == 0.0


def test_corrupted_samples_score_exactly(forward_problems):
    """2 gold + 2 with one wrong step value (right answer) per problem; a second set with 1 gold +
    3 wrong answers. Every number follows from the counts."""
    rows = forward_problems
    assert len(rows) >= 8
    n_gold = {r['id']: len(r['graph']['order']) for r in rows}
    assert min(n_gold.values()) >= 2
    hacked = [[gold_completion(r)] * 2 + [wrong_step_value(r)] * 2 for r in rows]
    recs = ev.score(rows, hacked)
    agg = ev.aggregate(recs)
    st = agg['all']
    assert st['outcome'] == {'pass@1': 1.0, 'pass@2': 1.0, 'pass@4': 1.0}
    assert st['process']['pass@1'] == pytest.approx(0.5)
    assert st['process']['pass@2'] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert st['process']['pass@4'] == 1.0
    assert st['hack_rate'] == pytest.approx(0.5) and st['hack_share'] == pytest.approx(0.5)
    for r in recs:
        m = n_gold[r['id']]
        assert (r['n'], r['c_outcome'], r['c_process'], r['c_hacked']) == (4, 4, 2, 2)
        assert (r['c_lenient'], r['c_false_arith']) == (2, 0)       # a wrong value: both checks see it
        # lenient: one wrong step; strict: its children, which substitute the gold value, too
        assert r['lenient_process_acc'] == pytest.approx((1 + (m - 1) / m) / 2)
        assert r['process_acc'] <= r['lenient_process_acc']
        assert r['step_errors']['value'] == 2 and r['step_errors']['parents'] == 0
    assert st['process_acc'] == pytest.approx(sum(r['process_acc'] for r in recs) / len(recs))
    assert st['false_arith_rate'] == 0.0 and st['lenient']['pass@1'] == pytest.approx(0.5)

    wrong = [[gold_completion(r)] + [wrong_answer(r)] * 3 for r in rows]
    st = ev.aggregate(ev.score(rows, wrong))['all']
    for kind in ('process', 'outcome'):
        assert st[kind]['pass@1'] == pytest.approx(0.25)
        assert st[kind]['pass@2'] == pytest.approx(0.5)   # 1 - C(3,2)/C(4,2)
        assert st[kind]['pass@4'] == 1.0
    assert st['hack_rate'] == 0.0


def test_groups_split_problems_by_band_mode_and_op(problems):
    # one gold sample for forward problems, one wrong answer for reverse ones
    samples = [[gold_completion(r) if r['mode'] == 'normalforward' else wrong_answer(r)] for r in problems]
    agg = ev.aggregate(ev.score(problems, samples))
    assert agg['mode']['normalforward']['process']['pass@1'] == 1.0
    assert agg['mode']['forwardreverse']['outcome']['pass@1'] == 0.0
    n_fwd = sum(r['mode'] == 'normalforward' for r in problems)
    assert agg['all']['process']['pass@1'] == pytest.approx(n_fwd / len(problems))
    for key, st in agg['band/mode'].items():
        assert st['process']['pass@1'] == (1.0 if key.endswith('normalforward') else 0.0)
    assert list(agg['op']) == sorted(agg['op'], key=int)  # numeric order, 2 before 11
    assert list(agg['band']) == ['ID', 'OOD-edge', 'OOD-hard']
    assert sum(st['n_problems'] for st in agg['op'].values()) == len(problems)
    custom = ev.aggregate(ev.score(problems, samples), bands={'easy': (2, 6), 'hard': (7, 20)})
    assert list(custom['band']) == ['easy', 'hard']


# -----------------------------------------------------------------------------------------------
# sampling loop

@pytest.mark.parametrize('n,batch_size', [(3, 8), (5, 2), (4, 0)])
def test_sample_solutions_order_and_batches(forward_problems, n, batch_size):
    """Samples come back under the right problem and index; one generate() call for all rows, with
    batch_size as its cap on the rows decoded at once (0 = generate's memory budget)."""
    rows = forward_problems
    tok = CharTokenizer()
    oracle = OracleModel(tok, rows, lambda row, j: wrong_step_value(row) if j % 2 else gold_completion(row))
    samples = ev.sample_solutions(oracle, tok, rows, n, 0.7, batch_size=batch_size, progress=False)
    assert [len(s) for s in samples] == [n] * len(rows)
    for r, ss in zip(rows, samples):
        assert ss == [wrong_step_value(r) if j % 2 else gold_completion(r) for j in range(n)]
    assert [(len(ls), g, cap) for ls, g, cap in oracle.calls] == [(len(rows), n, batch_size or None)]


def test_quick_eval_metrics(problems):
    tok = CharTokenizer()
    oracle = OracleModel(tok, problems, lambda row, j: gold_completion(row) if j == 0 else wrong_answer(row))
    oracle.train()
    res = ev.quick_eval(oracle, tok, problems, 2, 1.0)
    assert oracle.training  # mode restored
    assert res['all/pass@1'] == pytest.approx(0.5) and res['all/outcome_pass@1'] == pytest.approx(0.5)
    assert res['all/pass@2'] == 1.0 and res['all/hack_rate'] == 0.0
    assert res['all/process_acc'] == 1.0  # a wrong final answer leaves every step right
    for group in ('ID', 'OOD-edge', 'OOD-hard', 'normalforward', 'forwardreverse'):
        assert res[f'{group}/pass@2'] == 1.0 and f'{group}/hack_rate' in res
    assert all(isinstance(v, float) for v in res.values())


# -----------------------------------------------------------------------------------------------
# reports

def _runs(rows):
    runs = {}
    for label, bad in (('base', 3), ('rl', 1)):
        samples = [[gold_completion(r)] * (4 - bad) + [wrong_answer(r)] * bad for r in rows]
        recs = ev.score(rows, samples)
        runs[label] = {'ckpt': f'out/{label}/ckpt.pt', 'step': 10, 'records': recs, 'aggregate': ev.aggregate(recs)}
    return runs


def test_reports_and_plots(tmp_path, problems):
    runs = _runs(problems)
    meta = {'n_problems': len(problems), 'n_samples': 4, 'temperature': 0.7, 'source': 'test', 'ops': '2-18'}
    ev.write_reports(str(tmp_path), runs, meta)
    for name in ('passk_by_band.png', 'acc_vs_op.png', 'acc_vs_op_by_template.png'):
        with open(tmp_path / name, 'rb') as f:
            blob = f.read()
        assert blob[:8] == b'\x89PNG\r\n\x1a\n' and len(blob) > 10_000
    res = json.loads((tmp_path / 'results.json').read_text())
    assert res['runs']['rl']['aggregate']['all']['outcome']['pass@1'] == pytest.approx(0.75)
    assert len(res['runs']['base']['records']) == len(problems)
    with open(tmp_path / 'results.csv') as f:
        table = list(csv.DictReader(f))
    row = next(t for t in table if t['label'] == 'base' and t['grouping'] == 'all')
    assert float(row['outcome_pass@1']) == pytest.approx(0.25) and float(row['process_pass@4']) == 1.0
    assert {t['key'] for t in table if t['grouping'] == 'band/mode'} >= {'ID/normalforward', 'OOD-hard/forwardreverse'}
    md = (tmp_path / 'summary.md').read_text()
    assert '| rl | OOD-edge |' in md and 'forwardreverse' in md and '75.0 / 75.0' in md


def false_arithmetic(row):
    """Gold completion whose last step writes a false intermediate expression ("= (v) + 1 = v"): right
    parents and values, so the original's (lenient) scorer accepts it; the strict check does not."""
    text = gold_completion(row)
    end = text.rindex('. ', 0, text.index('Answer:') if 'Answer:' in text else text.index('</solution>'))
    head, last = text[:end].rsplit(' = ', 1)
    return f'{head} = ({last}) + 1 = {last}{text[end:]}'


def test_false_arithmetic_is_reported(tmp_path, forward_problems):
    """Half the samples right, half with right values and false arithmetic: strict pass@1 0.5, lenient 1.0,
    'right values, false arithmetic' 50% of the samples, one false-arithmetic step per bad sample; in the
    CSV, the JSON and summary.md."""
    rows = forward_problems
    samples = [[gold_completion(r), false_arithmetic(r)] for r in rows]
    recs = ev.score(rows, samples)
    for r in recs:
        assert (r['c_outcome'], r['c_process'], r['c_lenient'], r['c_hacked'], r['c_false_arith']) == (2, 1, 2, 1, 1)
        assert r['lenient_process_acc'] == 1.0 and r['process_acc'] < 1.0 and r['first_lenient'] == 1
        assert r['step_errors']['arithmetic'] == 1 and sum(r['step_errors'].values()) == 1
    runs = {'rl': {'ckpt': 'out/rl/ckpt.pt', 'step': 1, 'records': recs, 'aggregate': ev.aggregate(recs)}}
    st = runs['rl']['aggregate']['all']
    assert st['process']['pass@1'] == pytest.approx(0.5) and st['lenient']['pass@1'] == 1.0
    assert st['lenient_ordered']['pass@1'] == 1.0 and st['process_ordered']['pass@1'] == 1.0   # gold drawn first
    assert st['false_arith_rate'] == pytest.approx(0.5) and st['false_arith_share'] == pytest.approx(0.5)
    assert st['step_errors']['arithmetic'] == pytest.approx(0.5) and st['step_errors']['value'] == 0.0
    meta = {'n_problems': len(rows), 'n_samples': 2, 'temperature': 0.7, 'source': 'test', 'ops': '2-18'}
    ev.write_reports(str(tmp_path), runs, meta)
    with open(tmp_path / 'results.csv') as f:
        row = next(t for t in csv.DictReader(f) if t['grouping'] == 'all')
    assert float(row['lenient_pass@1']) == 1.0 and float(row['false_arith_rate']) == pytest.approx(0.5)
    assert float(row['step_errors_arithmetic']) == pytest.approx(0.5)
    md = (tmp_path / 'summary.md').read_text()
    assert 'right values, false arithmetic' in md and '| strict pass@1 | lenient pass@1 |' in md
    assert '## Wrong steps by kind' in md
    res = json.loads((tmp_path / 'results.json').read_text())
    assert res['runs']['rl']['records'][0]['c_false_arith'] == 1


# -----------------------------------------------------------------------------------------------
# the command

def test_eval_set_loading_and_errors(tmp_path, problems):
    path = tmp_path / 'eval.jsonl'
    with open(path, 'w') as f:
        for r in problems + problems[:2]:  # a repeated problem
            f.write(json.dumps(r) + '\n')
    with pytest.raises(ev.UsageError, match='same problem twice'):
        data.load_eval_rows(str(path), ops=range(2, 21), per_op_template=0)
    with open(path, 'w') as f:
        for r in problems:
            f.write(json.dumps(dict(r, id=0)) + '\n')  # colliding ids, as in the original release
    rows, source = data.load_eval_rows(str(path), ops=[2, 3], per_op_template=1)
    assert source == str(path) and {r['op'] for r in rows} == {2, 3}
    assert len(rows) == len({(r['op'], r['template']) for r in rows}) and len({r['id'] for r in rows}) == len(rows)
    with pytest.raises(ev.UsageError, match='eval set is empty'):
        data.load_eval_rows(str(path), ops=[99])
    rows, source = data.load_eval_rows('generate', ops=[4, 5], per_op_template=2, modes=['forwardreverse'], seed=3)
    assert len(rows) == 12 and {r['mode'] for r in rows} == {'forwardreverse'} and source.startswith('generated')


def test_released_rows_are_evaluable():
    """The original study's rows (no graph, no answer, no id) load and their gold solutions verify."""
    ref = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'reference',
                       'official_generator_samples.jsonl')
    rows, _ = data.load_eval_rows(ref, ops=range(2, 21), per_op_template=0)
    assert len(rows) == 114 and len({r['id'] for r in rows}) == 114
    agg = ev.aggregate(ev.score(rows, [[gold_completion(r)] for r in rows]))
    assert agg['all']['process']['pass@1'] == 1.0 and agg['all']['outcome']['pass@1'] == 1.0


@pytest.fixture(scope='module')
def random_runs(tmp_path_factory):
    """Two untrained tiny Qwen2 runs sharing a data dir (tokenizer.json + eval.jsonl), as pretrain.py lays
    them out: {run}/ckpt.pt with the data dir in its run config, {run}/tokenizer.json."""
    root = tmp_path_factory.mktemp('eval_runs')
    data_dir = root / 'data'
    data_dir.mkdir()
    rows = [p.to_row() for p in data.generate_problems(100, list(range(2, 8)), seed=3)]
    tok = tokenizer.train_tokenizer([data.training_text(r) for r in rows])
    tok.save(str(data_dir / 'tokenizer.json'))
    data.write_jsonl(str(data_dir / 'eval.jsonl'), data.make_eval_set([2, 3, 12], 1, seed=5))
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = Qwen2(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layer=2, n_head=2, n_kv_head=1,
                                intermediate_size=64, max_seq_len=1024))
        run = root / f'run{seed}'
        run.mkdir()
        save_checkpoint(str(run / 'ckpt.pt'), net, {'data_dir': str(data_dir)}, tok.identity, step=7 + seed)
        tok.save(str(run / 'tokenizer.json'))
        runs.append(str(run))
    return {'runs': runs, 'data_dir': str(data_dir)}


def test_command_end_to_end_and_rescore(random_runs, tmp_path):
    out = tmp_path / 'eval'
    run0, run1 = random_runs['runs']
    args = ['tiny_eval', *ANY_EVAL, f'--ckpts={run0},{run1},{run0}/ckpt.pt', '--labels=a,b,a2',
            f'--out_dir={out}', '--n_samples=3', '--max_new_tokens=24', '--progress=False', '--batch_size=4']
    runs = ev.main(args)
    for name in ('results.json', 'results.csv', 'summary.md', 'passk_by_band.png', 'acc_vs_op.png',
                 'generations_a.jsonl', 'generations_b.jsonl', 'generations_a2.jsonl', 'eval_set.jsonl'):
        assert (out / name).stat().st_size > 0, name
    # the eval set is the data dir's eval.jsonl (found through the checkpoint's run config)
    rows = data.read_jsonl(str(out / 'eval_set.jsonl'))
    assert [r['id'] for r in rows] == [r['id'] for r in data.read_jsonl(random_runs['data_dir'] + '/eval.jsonl')]
    assert len(rows) == 9 and {r['op'] for r in rows} == {2, 3, 12}
    gens = [json.loads(line) for line in open(out / 'generations_a.jsonl')]
    assert len(gens) == 27 and {g['sample'] for g in gens} == {0, 1, 2} and {g['id'] for g in gens} == {r['id'] for r in rows}
    assert {'outcome', 'perfect', 'process_acc'} <= set(gens[0]['verdict'])
    # same checkpoint and seed: the same samples; another checkpoint: others
    again = [json.loads(line)['text'] for line in open(out / 'generations_a2.jsonl')]
    assert [g['text'] for g in gens] == again
    assert again != [json.loads(line)['text'] for line in open(out / 'generations_b.jsonl')]
    res = json.loads((out / 'results.json').read_text())
    assert res['runs']['b']['step'] == 8 and res['meta']['n_samples'] == 3
    assert res['runs']['a']['aggregate']['ks'] == [1, 2, 3]
    assert res['runs']['a']['aggregate'] == runs['a']['aggregate']
    # re-scoring the saved generations reproduces everything without a model
    (out / 'results.csv').unlink()
    ev.main(['tiny_eval', *ANY_EVAL, '--labels=a,b', f'--out_dir={out}', '--rescore=True', '--progress=False'])
    after = json.loads((out / 'results.json').read_text())['runs']
    assert after['a']['aggregate'] == res['runs']['a']['aggregate'] and after['a']['step'] == 7
    assert after['b']['records'] == res['runs']['b']['records']
    assert (out / 'results.csv').exists()
    # a label missing from results.json (two processes wrote it: runs/tiny.sh) gets its step from --ckpts
    res['runs'].pop('b')
    (out / 'results.json').write_text(json.dumps(res))
    ev.main(['tiny_eval', *ANY_EVAL, '--labels=a,b', f'--ckpts={run0},{run1}', f'--out_dir={out}', '--rescore=True',
             '--progress=False'])
    assert [r['step'] for r in json.loads((out / 'results.json').read_text())['runs'].values()] == [7, 8]
    assert checkpoint.checkpoint_step(run1) == 8 and checkpoint.checkpoint_step(str(tmp_path / 'none')) is None


def test_command_errors(random_runs, tmp_path):
    run0 = random_runs['runs'][0]
    common = [f'--out_dir={tmp_path}/o', '--n_samples=1', '--max_new_tokens=4', '--progress=False']
    ck = torch.load(run0 + '/ckpt.pt', map_location='cpu', weights_only=True)
    ck['tokenizer_identity'] = 'something-else'
    bad = tmp_path / 'bad' / 'ckpt.pt'
    bad.parent.mkdir()
    torch.save(ck, bad)
    with pytest.raises(SystemExit, match=r'tokenizer mismatch.*--data_dir='):
        ev.main([f'--ckpts={bad}', f"--data_dir={random_runs['data_dir']}"] + common)
    with pytest.raises(SystemExit, match=r'eval set is empty.*--eval_ops'):
        ev.main([f'--ckpts={run0}', '--eval_ops=[40]'] + common)
    with pytest.raises(SystemExit, match='no checkpoint at'):
        ev.main([f'--ckpts={tmp_path}/nope'] + common)
    with pytest.raises(SystemExit, match='labels'):
        ev.main([f'--ckpts={run0},{run0}', '--labels=x'] + common)
    with pytest.raises(SystemExit, match='--rescore needs the out_dir of an earlier evaluation'):
        ev.main(['--labels=zzz', f'--out_dir={tmp_path}/o', '--rescore=True'])


@pytest.mark.slow
def test_tiny_base_pipeline(tiny_base, tmp_path):
    """The real pipeline on the shared tiny base: tokenizer and eval.jsonl found through the checkpoint
    (its run dir and the data_dir in its run config), every output written. (At the fixture's 50 steps
    the model does not yet write parsable answers, so no accuracy is asserted here.)"""
    out = tmp_path / 'eval'
    runs = ev.main(['tiny_eval', *ANY_EVAL, f"--ckpts={tiny_base['ckpt']}", '--labels=base',
                    f'--out_dir={out}', '--eval_ops=[2,3,4,12]', '--n_samples=2', '--max_new_tokens=64', '--progress=False'])
    rows = data.read_jsonl(str(out / 'eval_set.jsonl'))
    in_data = [r for r in data.read_jsonl(os.path.join(tiny_base['data_dir'], 'eval.jsonl')) if r['op'] in (2, 3, 4, 12)]
    assert [r['id'] for r in rows] == [r['id'] for r in in_data]
    assert runs['base']['aggregate']['all']['n_samples'] == 2 * len(rows)
    for name in ('summary.md', 'results.csv', 'results.json', 'passk_by_band.png', 'acc_vs_op.png'):
        assert (out / name).stat().st_size > 0
    gens = [json.loads(line) for line in open(out / 'generations_base.jsonl')]
    assert len(gens) == 2 * len(rows) and all(g['text'] for g in gens)


def test_torchrun_two_ranks_match_one_process(random_runs, tmp_path):
    """Sampled at temperature 1: a problem's samples depend on (seed, its prompt, sample index), not on
    the rank that draws them, so 2 ranks (problems sharded, results gathered on rank 0) must give
    exactly the single-process results and generations."""
    import subprocess
    import sys
    run0 = random_runs['runs'][0]
    common = ['evaluate.py', 'tiny_eval', *ANY_EVAL, f'--ckpts={run0}', '--labels=g', '--n_samples=2', '--temperature=1.0',
              '--max_new_tokens=12', '--progress=False']
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f'n{nproc}'
        launcher = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                       if nproc > 1 else [])
        p = subprocess.run(launcher + common + [f'--out_dir={out}', '--bootstrap=0'], cwd=root, env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[nproc] = out
    one, two = (json.loads((outs[n] / 'results.json').read_text())['runs']['g'] for n in (1, 2))
    assert two['records'] == one['records'] and two['aggregate'] == one['aggregate']
    gen = {n: sorted((g['id'], g['sample'], g['text']) for g in map(json.loads, open(outs[n] / 'generations_g.jsonl')))
           for n in (1, 2)}
    assert gen[1] == gen[2] and len(gen[1]) == 18
    assert len({text for _, _, text in gen[1]}) > 9  # really sampled: the samples of a problem differ
    assert not list(outs[2].glob('*.rank*'))  # the per-rank parts were merged and removed


# -----------------------------------------------------------------------------------------------
# scorer parity (STUDY.md §6): the ordered pass@k, bootstrap intervals, weighted bands, released layout

def _rec(op, flags, **extra):
    """A problem record whose samples, in drawn order, are perfect where flags is 1 (outcome = perfect)."""
    n, c = len(flags), sum(flags)
    return {'id': f'{op}-{flags}-{extra}', 'op': op, 'template': 'crazy_zootopia', 'mode': 'normalforward',
            'n': n, 'c_outcome': c, 'c_process': c, 'c_lenient': c, 'c_hacked': 0, 'c_false_arith': 0, 'no_answer': 0,
            'process_acc': 1.0, 'lenient_process_acc': 1.0, 'step_errors': dict.fromkeys(ev.STEP_ERROR_KINDS, 0),
            'first_outcome': ev.first_rank(flags), 'first_process': ev.first_rank(flags),
            'first_lenient': ev.first_rank(flags)}


def test_ordered_pass_at_k_on_hand_made_orders():
    """The ordered estimator counts a problem at k iff one of its first k samples (as drawn) is right;
    the unbiased one only sees the count. Same counts, different orders: same unbiased, different ordered."""
    early, late, never = _rec(2, [1, 0, 0, 0]), _rec(2, [0, 0, 0, 1]), _rec(2, [0, 0, 0, 0])
    agg = ev.aggregate([early, late, never])
    ordered, unbiased = agg['all']['process_ordered'], agg['all']['process']
    assert [ordered[f'pass@{k}'] for k in (1, 2, 4)] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert [unbiased[f'pass@{k}'] for k in (1, 2, 4)] == pytest.approx([1 / 6, 1 / 3, 2 / 3])
    mid = ev.aggregate([_rec(3, [0, 1, 1, 0])])['all']
    assert [mid['process_ordered'][f'pass@{k}'] for k in (1, 2, 4)] == [0.0, 1.0, 1.0]
    assert mid['process']['pass@1'] == pytest.approx(0.5) and mid['process']['pass@2'] == pytest.approx(5 / 6)
    # pass@n agrees for both estimators: some sample right
    assert ordered['pass@4'] == unbiased['pass@4']


def test_ordered_pass_at_k_reads_the_drawn_order(forward_problems):
    """Through the real sampler and verifier: the first perfect sample's rank comes from the order generate drew."""
    rows = forward_problems[:4]
    tok = CharTokenizer()
    pattern = {0: 0, 1: 2, 2: 3}                      # row index -> rank-1 of its only perfect sample (row 3: none)
    index = {r['id']: i for i, r in enumerate(rows)}
    oracle = OracleModel(tok, rows, lambda row, j: gold_completion(row) if pattern.get(index[row['id']]) == j
                         else wrong_step_value(row))
    recs = ev.score(rows, ev.sample_solutions(oracle, tok, rows, 4, 0.7, progress=False))
    assert [r['first_process'] for r in recs] == [1, 3, 4, 0]
    assert [r['first_outcome'] for r in recs] == [1, 1, 1, 1]   # a wrong step keeps the right answer
    st = ev.aggregate(recs)['all']
    assert [st['process_ordered'][f'pass@{k}'] for k in (1, 2, 4)] == [0.25, 0.25, 0.75]
    assert oracle.calls and len(oracle.calls) == 1 and oracle.calls[0][1] == 4   # one generate call per shard


def test_bootstrap_interval_properties():
    rng = np.random.default_rng(1)

    def recs(n):
        return [_rec(2, list(rng.random(8) < 0.4)) for _ in range(n)]
    small, large = ev.aggregate(recs(40), n_boot=500, seed=3)['all'], ev.aggregate(recs(1000), n_boot=500, seed=3)['all']
    for st in (small, large):
        for kind, _, _ in ev.PASS_KINDS:
            for k in (1, 2, 4, 8):
                lo, hi = st['ci'][kind][f'pass@{k}']
                assert lo <= st[kind][f'pass@{k}'] <= hi
    width = {name: st['ci']['process']['pass@1'][1] - st['ci']['process']['pass@1'][0]
             for name, st in (('small', small), ('large', large))}
    assert width['large'] < width['small'] / 2         # ~ 1/sqrt(problems): 5x narrower for 25x problems
    # all problems equal: the interval is exactly the point
    same = ev.aggregate([_rec(2, [1, 0, 1, 0]) for _ in range(30)], n_boot=200)['all']
    for kind, _, _ in ev.PASS_KINDS:
        for k in (1, 2, 4):
            assert same['ci'][kind][f'pass@{k}'] == [same[kind][f'pass@{k}']] * 2
    # seeded: the same intervals again; another seed, others
    mixed = [_rec(2, [1, 0]), _rec(2, [0, 0]), _rec(2, [1, 1])] * 5
    again = ev.aggregate(mixed, n_boot=300, seed=9)
    assert again == ev.aggregate(mixed, n_boot=300, seed=9)
    assert again['all']['ci'] != ev.aggregate(mixed, n_boot=300, seed=10)['all']['ci']


def test_weighted_band_is_the_weighted_mean_of_its_ranges():
    """ID weighted 20/30/50 over easy (2-4) / medium (5-7) / hard (8-10), as the reference numbers (STUDY.md §6)."""
    easy = [_rec(2, [1, 1])] * 10                          # pass@1 1.0
    medium = [_rec(5, [1, 0])] * 3                         # 0.5 (unbiased)
    hard = [_rec(9, [0, 0])] * 7 + [_rec(10, [1, 1])]      # 1/8
    agg = ev.aggregate(easy + medium + hard, weighted_bands={'ID': '2-4:0.2,5-7:0.3,8-10:0.5'}, n_boot=200)
    w = agg['weighted']['ID']
    assert w['process']['pass@1'] == pytest.approx(0.2 * 1.0 + 0.3 * 0.5 + 0.5 / 8)
    assert agg['band']['ID']['process']['pass@1'] == pytest.approx((10 + 1.5 + 1) / 21)   # the plain mean differs
    lo, hi = w['ci']['process']['pass@1']
    assert lo <= w['process']['pass@1'] <= hi and hi - lo > 0
    assert lo >= 0.2 * 1.0 + 0.3 * 0.5 and hi <= 0.2 + 0.3 * 0.5 + 0.5 * 1.0   # easy and medium are constant
    assert ev.aggregate(easy, weighted_bands={'ID': '2-4:0.2,5-7:0.3'})['weighted'] == {}   # a range with no problems


def test_summary_shows_both_estimators_with_intervals(tmp_path, problems):
    runs = _runs(problems)
    for run in runs.values():
        run['aggregate'] = ev.aggregate(run['records'], weighted_bands={'ID': '2-4:0.2,5-7:0.3,8-10:0.5'}, n_boot=100)
    meta = {'n_problems': len(problems), 'n_samples': 4, 'temperature': 0.7, 'source': 'test', 'ops': '2-18',
            'bootstrap': 100}
    ev.write_reports(str(tmp_path), runs, meta, estimator='ordered')
    md = (tmp_path / 'summary.md').read_text()
    assert 'unbiased estimator' in md and "ordered (the original study's scorer)" in md
    assert 'ID weighted 2-4:0.2,5-7:0.3,8-10:0.5' in md
    st = runs['rl']['aggregate']['band']['ID']
    lo, hi = st['ci']['process_ordered']['pass@1']
    assert f"{100 * st['process_ordered']['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in md
    head = next(csv.reader(open(tmp_path / 'results.csv')))
    assert 'process_ordered_pass@4' in head and 'outcome_pass@1' in head
    with pytest.raises(ev.UsageError, match='estimator'):
        ev.write_reports(str(tmp_path), runs, meta, estimator='best')


def _released_layout(root, rows_by_op):
    """A directory laid out as the original's dataset repositories (STUDY.md §6), rows without op/template/mode/id."""
    def strip(r):
        return {k: r[k] for k in ('problem', 'question', 'solution')}
    for sub, name in (('val', 'op{}-200.jsonl'), ('heldout', 'op{}-50k.jsonl')):
        d = root / 'composition' / sub
        d.mkdir(parents=True, exist_ok=True)
        for op, rs in rows_by_op.items():
            data.write_jsonl(str(d / name.format(op)), [strip(r) for r in rs if r['template'] == 'crazy_zootopia'])
    (root / 'composition' / 'test').mkdir()
    data.write_jsonl(str(root / 'composition' / 'test' / 'op10-1k.jsonl'), [strip(r) for r in rows_by_op[10]])
    for tpl in data.TEMPLATES:
        d = root / 'context' / tpl / 'test'
        d.mkdir(parents=True)
        for op, rs in rows_by_op.items():
            data.write_jsonl(str(d / f'op{op}_1k.jsonl'), [strip(r) for r in rs if r['template'] == tpl])


def test_released_layout_directory_and_glob(tmp_path):
    rows_by_op = {op: [p.to_row() for p in data.generate_problems(6, [op], seed=op)] for op in (3, 10, 12)}
    _released_layout(tmp_path, rows_by_op)
    # a glob over one split: op from the file names, template from the place names, mode from the solution
    val = data.read_jsonl(str(tmp_path / 'composition' / 'val' / '*.jsonl'))
    assert sorted({r['op'] for r in val}) == [3, 10, 12]
    gold = {data.problem_id(r['problem'], r['question']): r for rs in rows_by_op.values() for r in rs}
    for r in val:
        g = gold[r['id']]
        assert (r['op'], r['template'], r['mode'], r['answer']) == (g['op'], g['template'], g['mode'], g['answer'])
    # a context directory: op and template from the path, modes inferred from the solutions
    ctx = data.read_jsonl(str(tmp_path / 'context'))
    assert len(ctx) == sum(len(rs) for rs in rows_by_op.values())
    for r in ctx:
        g = gold[r['id']]
        assert (r['op'], r['template'], r['mode']) == (g['op'], g['template'], g['mode'])
    # evaluate.py reads the directory; its gold solutions verify
    rows, source = data.load_eval_rows(str(tmp_path / 'context'), ops=[10, 12], per_op_template=0)
    assert {r['op'] for r in rows} == {10, 12} and '(9 files)' in source
    agg = ev.aggregate(ev.score(rows, [[gold_completion(r)] for r in rows]))
    assert agg['all']['process_ordered']['pass@1'] == 1.0
    test_rows, _ = data.load_eval_rows(str(tmp_path / 'composition' / 'test'), ops=range(2, 21), per_op_template=0)
    assert {r['op'] for r in test_rows} == {10}
    with pytest.raises(ev.UsageError, match='names no JSONL'):
        data.load_eval_rows(str(tmp_path / 'nothing_*.jsonl'))


def test_mixture_with_all_template_weights_zero_is_an_error():
    with pytest.raises(ValueError, match='every template weight is 0'):
        data.mixture('2-10', {'crazy_zootopia': 0, 'teachers_in_school': 0})
    assert dict(data.mixture('2-10', {'crazy_zootopia': 0, 'teachers_in_school': 1}).templates) == {'teachers_in_school': 1.0}


# -----------------------------------------------------------------------------------------------
# more samples for some ops (n_samples_by_op): the edge band at larger k

def test_samples_for_op_and_its_checks():
    by = {'OOD-edge': 64, 6: 32}
    assert [ev.samples_for_op(op, 16, by) for op in (2, 11, 14, 6, 15)] == [16, 64, 64, 32, 16]
    assert ev.samples_for_op(5, 16, {'5': 8}) == 8 and ev.samples_for_op(5, 16, {}) == 16
    ev.check_samples_by_op({'OOD-edge': 64, 5: 8, '6': 4})
    for bad in ({'edge': 64}, {5: 0}, {5: 2.5}):
        with pytest.raises(ev.UsageError, match='n_samples_by_op'):
            ev.check_samples_by_op(bad)


def test_mixed_sample_counts_hand_computed(tmp_path, forward_problems):
    """ID problems (op 2-10) with 4 samples, edge problems (op 11-14) with 8; each problem's first sample
    is right, the rest wrong (c = 1): ID pass@1 = 1/4, pass@4 = 1; edge pass@1 = 1/8, pass@4 =
    1 - C(7,4)/C(8,4) = 1/2, pass@8 = 1. The edge band reports k up to 8, the others up to 4."""
    rows, tok = forward_problems, CharTokenizer()
    oracle = OracleModel(tok, rows, lambda row, j: gold_completion(row) if j == 0 else wrong_step_value(row))
    ns = [ev.samples_for_op(r['op'], 4, {'OOD-edge': 8}) for r in rows]
    samples = ev.sample_mixed(oracle, tok, rows, ns, 0.7, progress=False)
    assert [len(s) for s in samples] == ns and sorted(g for _, g, _ in oracle.calls) == [4, 8]  # a call per count
    assert all(s[0] == gold_completion(r) for r, s in zip(rows, samples))
    agg = ev.aggregate(ev.score(rows, samples), n_boot=50)
    assert agg['ks'] == [1, 2, 4, 8] and agg['ks_common'] == [1, 2, 4]
    edge, idb = agg['band']['OOD-edge'], agg['band']['ID']
    assert edge['ks'] == [1, 2, 4, 8] and idb['ks'] == [1, 2, 4] and agg['all']['ks'] == [1, 2, 4]
    assert edge['process']['pass@1'] == pytest.approx(1 / 8) and edge['process']['pass@4'] == pytest.approx(0.5)
    assert edge['process']['pass@8'] == 1.0 and 'pass@8' in edge['ci']['process']
    assert idb['process']['pass@1'] == pytest.approx(0.25) and idb['process']['pass@4'] == 1.0
    assert 'pass@8' not in idb['process']
    flat = ev.flat_metrics(agg)
    assert flat['OOD-edge/pass@8'] == 1.0 and 'ID/pass@8' not in flat and 'all/pass@8' not in flat
    recs = ev.score(rows, samples)
    runs = {'m': {'ckpt': 'x', 'step': 1, 'records': recs, 'aggregate': agg}}
    ev.write_reports(str(tmp_path), runs, {'n_problems': len(rows), 'n_samples': 4, 'temperature': 0.7,
                                           'source': 'test', 'ops': '2-18', 'bootstrap': 50})
    md = (tmp_path / 'summary.md').read_text()
    assert '4 samples each (ops 11, 13: 8 samples)' in md
    edge_row = next(line for line in md.splitlines() if line.startswith('| m | OOD-edge |'))
    assert edge_row.count('[') == 4 * 2 and '100.0 [100.0, 100.0] / 100.0' in edge_row.split('|')[-2]
    id_row = next(line for line in md.splitlines() if line.startswith('| m | ID |'))
    assert id_row.rstrip(' |').endswith('-')            # no pass@8 for 4 samples
    assert '## By op: pass@1, pass@4, pass@8' in md
    with open(tmp_path / 'results.csv') as f:
        table = {(t['grouping'], t['key']): t for t in csv.DictReader(f)}
    assert table[('band', 'ID')]['process_pass@8'] == '' and float(table[('band', 'OOD-edge')]['process_pass@8']) == 1.0


def test_command_samples_some_ops_more_and_keeps_the_first_samples(random_runs, tmp_path):
    """--n_samples_by_op: op 12 gets 4 samples, the others 2; op 12's first 2 are the samples a plain
    n_samples=2 run draws (a sample depends on seed, prompt and index only)."""
    run0 = random_runs['runs'][0]
    common = ['tiny_eval', *ANY_EVAL, f'--ckpts={run0}', '--labels=g', '--n_samples=2', '--temperature=1.0',
              '--max_new_tokens=12', '--progress=False', '--bootstrap=20']
    ev.main(common + [f'--out_dir={tmp_path / "plain"}'])
    ev.main(common + [f'--out_dir={tmp_path / "more"}', "--n_samples_by_op={12: 4}"])
    read = lambda d: {(g['id'], g['sample']): (g['op'], g['text']) for g in map(json.loads, open(tmp_path / d / 'generations_g.jsonl'))}
    plain, more = read('plain'), read('more')
    assert len(plain) == 9 * 2 and len(more) == 6 * 2 + 3 * 4
    assert all(more[key] == v for key, v in plain.items())            # the first 2 samples are the same
    assert {op for (_, j), (op, _) in more.items() if j >= 2} == {12}
    res = json.loads((tmp_path / 'more' / 'results.json').read_text())['runs']['g']['aggregate']
    assert res['ks'] == [1, 2, 4] and res['op']['12']['ks'] == [1, 2, 4] and res['op']['2']['ks'] == [1, 2]
    # re-scoring reads the mixed counts back
    ev.main(['tiny_eval', *ANY_EVAL, '--labels=g', f'--out_dir={tmp_path / "more"}', '--rescore=True', '--progress=False',
             '--bootstrap=20'])
    again = json.loads((tmp_path / 'more' / 'results.json').read_text())['runs']['g']['aggregate']
    assert again == res
    with pytest.raises(SystemExit, match='n_samples_by_op'):
        ev.main(common + [f'--out_dir={tmp_path / "bad"}', "--n_samples_by_op={'edge': 4}"])
