"""
vLLM as a sampling backend (vllm_sampler.py). Run where vllm is installed (requirements-vllm.txt):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest -q tests/test_vllm.py
Elsewhere every test but the first is skipped with the reason. Each test starts its own engine and
closes it (vLLM keeps process-wide state: one engine at a time).
"""
import json
import math
import os

import pytest
import torch

import data
import checkpoint
import common
import engine
import vllm_sampler

needs_vllm = pytest.mark.skipif(not vllm_sampler.available(),
                                reason='vllm is not installed (pip install -r requirements-vllm.txt, README)')


def test_asking_for_vllm_without_it_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    """evaluate.py and rl.py with --sampler=vllm where the package is missing (simulated where it is
    installed): one line naming the install, nothing written; an unknown sampler likewise."""
    import evaluate
    import rl
    monkeypatch.setattr(vllm_sampler, 'available', lambda: False)
    out = tmp_path / 'out'
    for main in (evaluate.main, rl.main):
        for sampler, words in (('vllm', 'requirements-vllm.txt'), ('vlm', 'choose one of engine, vllm')):
            with pytest.raises(common.UsageError) as e:
                main([f'--sampler={sampler}', f'--out_dir={out}',
                      '--ckpts=/nonexistent' if main is evaluate.main else '--init_from=/nonexistent'])
            msg = str(e.value)
            assert words in msg and '\n' not in msg, msg
            assert not out.exists()


def _prompts(tok, n, seed=0, ops=range(2, 7)):
    mix = data.mixture(ops, modes=['normalforward'], world=data.WORLDS['paper'])
    return [tok.encode(data.prompt_text(p.to_row())) for p in data.generate_problems(n, mix, seed=seed)]


@pytest.fixture
def sampler_of():
    """sampler_of(model) -> a VLLMSampler, closed after the test."""
    made = []

    def make(model, **kw):
        made.append(vllm_sampler.VLLMSampler(model, **kw))
        return made[-1]
    yield make
    for s in made:
        s.close()


@needs_vllm
def test_greedy_equals_our_engine_token_for_token(tiny_base, sampler_of, one_thread):
    """Greedy: the same tokens, stops and finished flags as our engine, log-probs to fp32 rounding;
    the result format (prompt-major rows, G identical greedy copies) is ours; seeded T=1 calls repeat
    exactly and a prompt's samples do not depend on the other prompts or their order."""
    m, tok, _ = checkpoint.load_run(tiny_base['ckpt'])
    m.eval()
    stops = (tok.id_of('</answer>'), tok.eos_id)
    prompts = _prompts(tok, 8)
    s = sampler_of(m)
    ours = engine.generate(m, prompts, 96, temperature=0, stop_ids=stops, num_samples=2)
    theirs = s.generate(prompts, 96, temperature=0, stop_ids=stops, num_samples=2)
    assert theirs.tokens == ours.tokens and theirs.finished == ours.finished
    assert any(ours.finished) and not all(ours.finished)  # both kinds of row (96 tokens cut some)
    for a, b in zip(theirs.logprobs, ours.logprobs):
        assert len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b)), default=0) < 1e-4
    assert all(t[-1] in stops for t, f in zip(theirs.tokens, theirs.finished) if f)
    assert all(len(t) == 96 for t, f in zip(theirs.tokens, theirs.finished) if not f)
    # seeded sampling: the same call repeats; a prompt's samples are the same alone, in another order,
    # or in another batch; the generator is advanced as ours advances it
    kw = dict(temperature=1.0, stop_ids=stops, num_samples=3, logprobs=False)
    a = s.generate(prompts, 64, generator=torch.Generator().manual_seed(5), **kw)
    b = s.generate(prompts[::-1], 64, generator=torch.Generator().manual_seed(5), **kw)
    c = s.generate(prompts[2:3], 64, generator=torch.Generator().manual_seed(5), **kw)
    d = s.generate(prompts, 64, generator=torch.Generator().manual_seed(6), **kw)
    rows = lambda g, i: g.tokens[3 * i:3 * i + 3]  # noqa: E731
    assert rows(b, 7 - 2) == rows(a, 2) == rows(c, 0)
    assert d.tokens != a.tokens and len(set(map(tuple, rows(a, 0)))) > 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s.generate(prompts[:1], 4, generator=g1, **kw)
    engine.generate(m, prompts[:1], 4, generator=g2, **kw)
    assert torch.equal(g1.get_state(), g2.get_state())


def _eval(tiny_base, out, sampler, n):
    import evaluate
    cfg = common.configure(evaluate.defaults, ['tiny_eval', f"--ckpts={tiny_base['out_dir']}", f'--out_dir={out}',
                                          '--eval_file=generate', '--eval_ops=[2,3,4,5,6]', '--eval_per_op_template=2',
                                          f'--n_samples={n}',
                                          '--temperature=1.0', '--max_new_tokens=192', '--bootstrap=0',
                                          '--progress=False', f'--sampler={sampler}', '--seed=3'])
    runs = evaluate.evaluate(cfg)
    (run,) = runs.values()
    return run['records'], run['aggregate']


@needs_vllm
def test_seeded_evaluation_agrees_with_our_engine_within_sampling_noise(tiny_base, tmp_path, one_thread):
    """evaluate.py --sampler=vllm at T=1 on the tiny base: pass@k (outcome; process-verified where the
    base has any), ProcessAcc and the answer rate agree with our engine's within 4 standard errors of
    the per-problem paired difference; a second vLLM run with the same seed repeats the first."""
    n = 8
    rec_e, agg_e = _eval(tiny_base, tmp_path / 'engine', 'engine', n)
    rec_v, agg_v = _eval(tiny_base, tmp_path / 'vllm', 'vllm', n)
    assert [r['id'] for r in rec_e] == [r['id'] for r in rec_v] and len(rec_e) == 30
    assert all(r['n'] == n for r in rec_v)
    # per-problem statistics, paired over the same problems
    stats = {'outcome pass@1': lambda r: r['c_outcome'] / n, 'process pass@1': lambda r: r['c_process'] / n,
             f'outcome pass@{n}': lambda r: float(r['c_outcome'] > 0), 'process_acc': lambda r: r['process_acc'],
             'answered': lambda r: 1 - r['no_answer'] / n}
    for name, f in stats.items():
        d = [f(a) - f(b) for a, b in zip(rec_e, rec_v)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        assert abs(mean) <= 4 * se + 0.02, (name, mean, se)
    assert 0 < agg_e['all']['outcome']['pass@1'] < 1 and 0 < agg_v['all']['outcome']['pass@1'] < 1
    rec_w, _ = _eval(tiny_base, tmp_path / 'vllm2', 'vllm', n)
    assert rec_w == rec_v
    with open(tmp_path / 'vllm' / 'results.json') as f:
        assert json.load(f)['meta']['config']['sampler'] == 'vllm'


@needs_vllm
def test_rl_update_reaches_the_vllm_engine(tiny_base, tmp_path, monkeypatch, one_thread):
    """rl.py --sampler=vllm: rollouts from vLLM, and after the updates the engine holds the policy's new
    weights: its greedy tokens and log-probs are the trained policy's (read back from the checkpoint),
    not the initial model's."""
    import rl
    made = []
    init = vllm_sampler.VLLMSampler.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(vllm_sampler.VLLMSampler, '__init__', record)
    out = tmp_path / 'rl'
    try:
        res = rl.main(['tiny_rl', f"--init_from={tiny_base['out_dir']}", f'--out_dir={out}', '--sampler=vllm',
                       '--prompts_per_step=4', '--minibatch_prompts=2', '--group_size=4', '--max_response_len=48',
                       '--micro_batch_tokens=1000', '--eval_every=0', '--sample_every=0', '--max_steps=2',
                       '--lr=1e-3', '--reward=blend_0.5_0.5', '--skip_no_signal=False', '--temperature=1.0'])
        assert res['step'] == 2 and len(made) == 1
        s = made[0]
        policy, tok, _ = checkpoint.load_run(str(out))
        start, _, _ = checkpoint.load_run(tiny_base['ckpt'])
        stops = (tok.id_of('</answer>'), tok.eos_id)
        prompts = _prompts(tok, 6, seed=11)
        new = engine.generate(policy.eval(), prompts, 64, temperature=0, stop_ids=stops)
        old = engine.generate(start.eval(), prompts, 64, temperature=0, stop_ids=stops)
        got = s.generate(prompts, 64, temperature=0, stop_ids=stops)
        assert got.tokens == new.tokens
        lp = lambda g: [x for r in g.logprobs for x in r]  # noqa: E731
        assert max(abs(a - b) for a, b in zip(lp(got), lp(new))) < 1e-4
        # the update moved the model: other greedy tokens, or the same tokens at other log-probs
        assert old.tokens != new.tokens or max(abs(a - b) for a, b in zip(lp(old), lp(new))) > 1e-2
    finally:
        for s in made:
            s.close()
