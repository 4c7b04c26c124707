"""Tests of engine.py's generation engine (generate -> Engine): greedy decoding equals the
uncached forward pass token for token (slots refilled mid-run included; model.sample, the reference
sampler, too), seeded samples do not depend on the number of slots, the order of the prompts or what
else is in the call, the draws follow the softmax, parked slots come back as they were, stops / caps
/ edge cases, log-probs, and CUDA-graph decoding == eager decoding (CUDA only).

Run: python -m pytest -q tests/test_engine.py   (CPU, ~10 s)
"""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import engine as E  # noqa: E402
import model as M  # noqa: E402
from test_model import make_model, naive_greedy  # noqa: E402

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures('one_thread')]



def varied_prompts(n, seed=0, lo=1, hi=14, vocab=97):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def per_prompt(gen, G):
    return [gen.tokens[i:i + G] for i in range(0, len(gen.tokens), G)]


def forward_logprobs(m, prompt, tokens):
    with torch.no_grad():
        logits, _ = m(torch.tensor([prompt + tokens]))
    ls = torch.log_softmax(logits[0], -1)
    return torch.stack([ls[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)])


@pytest.mark.parametrize('onednn', [True, False])
def test_greedy_equals_uncached_forward_with_refilled_slots(onednn, monkeypatch):
    """Few slots, many prompts of varied lengths and stops at different steps: slots are refilled
    mid-run (and dropped at the tail) and every row is still the naive decoder's output -- with the
    engine's matmuls through oneDNN (CPU default) or F.linear (elsewhere)."""
    monkeypatch.setattr(E, 'ONEDNN_LINEAR', onednn)
    m = make_model(peaky=True)
    if torch.backends.mkldnn.is_available():  # (the oneDNN path is really taken, not fallen back from)
        assert (E.EngineWeights(m, torch.float32, 8).linear is E.onednn_linear) == onednn
    prompts = varied_prompts(23)
    free = E.generate(m, prompts, 14, temperature=0)
    stop = list({t[i % 7] for i, t in enumerate(free.tokens)})[:5]
    for G, max_rows in ((1, 3), (2, 4), (3, 64)):
        g = E.generate(m, prompts, 14, temperature=0, stop_ids=stop, num_samples=G, max_rows=max_rows)
        assert 0 < sum(g.finished) < len(g.finished)
        for i, p in enumerate(prompts):
            ref = naive_greedy(m, p, 14, stop_ids=stop)
            assert g.tokens[G * i:G * i + G] == [ref] * G, (G, max_rows, i)
            assert g.finished[G * i] == (ref[-1] in stop)


def test_samples_do_not_depend_on_slots_order_or_subset():
    m = make_model(peaky=True)
    prompts = varied_prompts(20, seed=1)
    prompts[7] = list(prompts[3])  # a repeated prompt gets other samples than its first copy
    G = 3

    def run(ps, **kw):
        return E.generate(m, ps, 16, temperature=1.0, top_k=40, stop_ids=[5, 6], num_samples=G,
                          generator=torch.Generator().manual_seed(11), **kw)

    base = per_prompt(run(prompts, max_rows=4 * G), G)
    assert per_prompt(run(prompts, max_rows=64 * G), G) == base
    assert per_prompt(run(prompts, kv_bytes=1), G) == base           # one slot
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = per_prompt(run([prompts[i] for i in order], max_rows=5 * G), G)
    assert [shuffled[order.index(i)] for i in range(len(prompts))] == base
    sub = [2, 3, 11]                                                  # first copy of prompt 3 included
    assert per_prompt(run([prompts[i] for i in sub]), G) == [base[i] for i in sub]
    assert base[3] != base[7] and len({tuple(t) for t in base[0]}) > 1
    other = per_prompt(E.generate(m, prompts, 16, temperature=1.0, top_k=40, stop_ids=[5, 6], num_samples=G,
                                  generator=torch.Generator().manual_seed(12)), G)
    assert other != base


def test_tail_repacking_keeps_every_row(monkeypatch):
    """Sampled rows of a group stop at different steps, so the tail repacks them into fewer,
    narrower slots (a group split over slots, repeated rows as padding): the samples are those of a
    run that never repacks, and their log-probs those of the forward pass."""
    m = make_model(peaky=True)
    prompts = varied_prompts(6, seed=6)
    kw = dict(temperature=1.0, stop_ids=[3, 4, 5, 6, 7], num_samples=5, generator=None)
    shapes = []
    real = E.Engine._compact

    def spy(self):
        before = (self.S, self.C)
        real(self)
        if (self.S, self.C) != before:
            shapes.append((before, (self.S, self.C)))
    monkeypatch.setattr(E.Engine, '_compact', spy)
    a = E.generate(m, prompts, 40, **{**kw, 'generator': torch.Generator().manual_seed(3)})
    assert any(c2 < c for (_, c), (_, c2) in shapes), shapes        # narrower slots happened
    for i, (toks, lps) in enumerate(zip(a.tokens, a.logprobs)):
        torch.testing.assert_close(torch.tensor(lps), forward_logprobs(m, prompts[i // 5], toks), rtol=0, atol=2e-5)
    monkeypatch.setattr(E.Engine, '_compact', lambda self: None)
    b = E.generate(m, prompts, 40, **{**kw, 'generator': torch.Generator().manual_seed(3)})
    assert a.tokens == b.tokens and a.finished == b.finished


def test_parked_slots_come_back_as_they_were(monkeypatch):
    """Parking forced at every collection (any slot older than the median, from 2 steps on) while
    prompts wait: slots are set aside, refilled and put back, and every row is still the naive
    decoder's greedy output, and the seeded samples are those of a run that never parks (their
    log-probs to rounding: a shrunk cache sums its softmax over fewer masked keys)."""
    m = make_model(peaky=True)
    prompts = varied_prompts(19, seed=4)
    parked = []
    real = E.Engine._park

    def spy(self, s, size):
        parked.append(self.slot_age[s])
        real(self, s, size)
        assert sum(p['bytes'] for p in self.parked) <= self.budget  # parked caches stay in their budget
    monkeypatch.setattr(E.Engine, '_park', spy)
    monkeypatch.setattr(E, 'PARK_AGE', 2)
    monkeypatch.setattr(E, 'PARK_FACTOR', 0.5)
    monkeypatch.setattr(E, 'SYNC_EVERY', 3)
    g = E.generate(m, prompts, 30, temperature=0, num_samples=2, max_rows=6)
    assert len(parked) >= 3, parked
    for i, p in enumerate(prompts):
        assert g.tokens[2 * i:2 * i + 2] == [naive_greedy(m, p, 30)] * 2, i
    kw = dict(temperature=1.0, stop_ids=[3, 4, 5], num_samples=3, max_rows=9)
    n = len(parked)
    a = E.generate(m, prompts, 30, generator=torch.Generator().manual_seed(2), **kw)
    assert len(parked) > n
    monkeypatch.setattr(E, 'PARK_AGE', 10 ** 9)
    b = E.generate(m, prompts, 30, generator=torch.Generator().manual_seed(2), **kw)
    assert a.tokens == b.tokens and a.finished == b.finished
    torch.testing.assert_close(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])), rtol=0, atol=2e-5)


def test_greedy_equals_transformers_generate():
    """The engine's greedy rows (prompt-slots refilled, stops) are Hugging Face's generate's."""
    pytest.importorskip('transformers', reason='transformers not installed: no reference generate')
    import bench
    m = make_model(peaky=True)
    hf = bench.hf_twin(m).eval()   # our weights in transformers' Qwen2
    prompts, stop = varied_prompts(7, seed=8, lo=3), [3, 4, 5]
    g = E.generate(m, prompts, 16, temperature=0, stop_ids=stop, num_samples=2, max_rows=4)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=0)
        ref = out[0, len(p):].tolist()
        ref = ref[:next((j + 1 for j, t in enumerate(ref) if t in stop), len(ref))]
        assert g.tokens[2 * i] == g.tokens[2 * i + 1] == ref, i


def test_bench_patches_in_the_old_engine_and_restores_ours():
    """bench.generate_of (the `stages` benchmark's before/after switch): inside it engine.generate is
    the old engine of git commit 281bfb1 -- greedy rows equal the new engine's, with the caller's
    current weights -- and after it ours is back."""
    import subprocess
    import bench
    if subprocess.run(['git', 'cat-file', '-e', '281bfb1:model.py'], cwd=bench.ROOT, capture_output=True).returncode:
        pytest.skip('git history without commit 281bfb1 (a shallow clone): no old engine to compare with')
    m = make_model(peaky=True)
    prompts, stop = varied_prompts(5, seed=4, lo=3), [3, 4]
    new = E.generate(m, prompts, 12, temperature=0, stop_ids=stop, num_samples=2)
    ours = E.generate
    with bench.generate_of('281bfb1'):
        assert E.generate is not ours
        old = E.generate(m, prompts, 12, temperature=0, stop_ids=stop, num_samples=2)
        with torch.no_grad():
            m.lm_head.weight.mul_(-1)   # the twin follows the caller's weights
        flipped = E.generate(m, prompts, 12, temperature=0, stop_ids=stop, num_samples=2)
    assert E.generate is ours
    assert type(old).__module__ != E.__name__ and old.tokens == new.tokens and old.finished == new.finished
    assert flipped.tokens == E.generate(m, prompts, 12, temperature=0, stop_ids=stop, num_samples=2).tokens != new.tokens


def test_counter_uniform_is_splitmix64():
    """The device hash is SplitMix64 (reference: the 64-bit unsigned arithmetic written out)."""
    def splitmix(seed, t):
        mask = (1 << 64) - 1
        z = (seed + (t + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) >> 40
    seeds = [0, 1, -1, 2**62 + 12345, -(2**63), 987654321987654321]
    ts = [0, 1, 7, 1000]
    s = torch.tensor([a for a in seeds for _ in ts])
    t = torch.tensor([b for _ in seeds for b in ts])
    u = E.counter_uniform(s, t)
    ref = torch.tensor([splitmix(a % 2**64, b) / 2**24 for a in seeds for b in ts])
    assert torch.equal(u, ref.float())
    assert float(u.min()) >= 0 and float(u.max()) < 1


@pytest.mark.parametrize('block', [None, 64])
def test_inverse_cdf_is_exact_on_a_grid_and_skips_zero_mass(block):
    """u on a regular grid of n points picks each token n * p times (+-1), across block edges, with
    zero-probability tokens (never picked) and u as close to 1 as a float gets; with blocks that
    divide the vocabulary (cdf_block: 60 of 300, no padding) and with a padded last block (64)."""
    assert (E.cdf_block(300), E.cdf_block(2771), E.cdf_block(4099)) == (60, 163, 64)  # 4099 is prime
    g = torch.Generator().manual_seed(0)
    p = torch.rand(300, generator=g) ** 3
    p[[0, 59, 60, 63, 64, 65, 128, 180, 250, 299]] = 0  # zero mass at block edges (60 and 64) and at the end
    p[100:140] = 0                               # a whole empty block
    p /= p.sum()
    n = 20000
    u = (torch.arange(n) + 0.5) / n
    tok = E.inverse_cdf(p.expand(n, -1), u, block)
    counts = torch.bincount(tok, minlength=300).float()
    assert (counts - n * p).abs().max() <= 1.0 + 1e-3
    assert counts[p == 0].sum() == 0
    edge = torch.tensor([0.0, 1 - 2 ** -24, 0.99999994])
    assert all(p[t] > 0 for t in E.inverse_cdf(p.expand(3, -1), edge, block))


def test_draws_follow_the_softmax():
    """First and second tokens of 6000 samples of one prompt vs the model's distributions
    (temperature 0.8, and top-k): a chi-square statistic far below what a wrong sampler gives."""
    m = make_model(seed=3, vocab_size=6, max_seq_len=32)
    prompt = [1, 2, 3]
    n = 6000

    def chi2(counts, p):
        keep = p > 0
        exp = n * p[keep]
        return float(((counts[keep] - exp) ** 2 / exp).sum()), int(counts[~keep].sum())

    with torch.no_grad():
        logits = m(torch.tensor([prompt]))[0][0, -1]
    for T, k in ((0.8, None), (1.0, 3), (1.0, None)):
        g = E.generate(m, [prompt], 2, temperature=T, top_k=k, num_samples=n, generator=torch.Generator().manual_seed(0))
        first = torch.tensor([t[0] for t in g.tokens])
        lg = logits / T
        if k:
            lg = lg.masked_fill(lg < lg.topk(k).values[-1], float('-inf'))
        stat, outside = chi2(torch.bincount(first, minlength=6).float(), torch.softmax(lg, -1))
        assert outside == 0 and stat < 25, (T, k, stat)  # 5 d.o.f.: P(chi2 > 25) < 2e-4
        # the second token given the most common first one: draws at position 1 are fresh
        a = int(torch.bincount(first).argmax())
        second = torch.tensor([t[1] for t in g.tokens if t[0] == a])
        with torch.no_grad():
            lg2 = m(torch.tensor([prompt + [a]]))[0][0, -1] / T
        if k:
            lg2 = lg2.masked_fill(lg2 < lg2.topk(k).values[-1], float('-inf'))
        n2 = len(second)
        p2 = torch.softmax(lg2, -1)
        keep = p2 > 0
        c2 = torch.bincount(second, minlength=6).float()
        stat2 = float(((c2[keep] - n2 * p2[keep]) ** 2 / (n2 * p2[keep])).sum())
        assert int(c2[~keep].sum()) == 0 and stat2 < 25, (T, k, stat2)


def test_logprobs_match_forward_and_can_be_skipped():
    m = make_model(peaky=True)
    prompts = varied_prompts(9, seed=2)
    g = E.generate(m, prompts, 12, temperature=1.0, stop_ids=[3, 4], num_samples=2, max_rows=6,
                   generator=torch.Generator().manual_seed(0))
    for i, (toks, lps) in enumerate(zip(g.tokens, g.logprobs)):
        assert len(toks) == len(lps)
        torch.testing.assert_close(torch.tensor(lps), forward_logprobs(m, prompts[i // 2], toks), rtol=0, atol=2e-5)
    h = E.generate(m, prompts, 12, temperature=1.0, stop_ids=[3, 4], num_samples=2, logprobs=False,
                   generator=torch.Generator().manual_seed(0))
    assert h.tokens == g.tokens and h.finished == g.finished and h.logprobs == [[]] * len(h.tokens)


def test_stops_caps_and_context_limit():
    m = make_model(peaky=True, max_seq_len=24)
    prompts = [list(range(1, 22)), [5], list(range(10, 20)), list(range(2, 25))[:23]]  # 21, 1, 10, 23 tokens
    g = E.generate(m, prompts, 8, temperature=0)
    assert [len(t) for t in g.tokens] == [3, 8, 8, 1]             # capped by max_seq_len per prompt
    assert g.finished == [False] * 4
    for p, t in zip(prompts, g.tokens):
        assert t == naive_greedy(m, p, len(t))
    # a stop at exactly the last allowed step counts as finished; stop tokens end a row
    stop = [g.tokens[1][-1], g.tokens[2][2]]
    s = E.generate(m, prompts, 8, temperature=0, stop_ids=stop)
    for p, t, f in zip(prompts, s.tokens, s.finished):
        ref = naive_greedy(m, p, len(t) if not f else 8, stop_ids=stop)
        assert t == ref[:len(t)] and f == (t[-1] in stop)
        assert not set(t[:-1]) & set(stop)
    assert s.finished[1] and s.finished[2] and len(s.tokens[2]) <= 3


def test_edge_cases():
    m = make_model(peaky=True)
    assert E.generate(m, [], 5) == E.Generation([], [], [])
    z = E.generate(m, [[1, 2]], 0, num_samples=2)
    assert z.tokens == [[], []] and z.finished == [False, False]
    one = E.generate(m, [[1, 2, 3]], 1, temperature=0)
    assert one.tokens == [naive_greedy(m, [1, 2, 3], 1)]
    with pytest.raises(common.UsageError, match='at least one token'):
        E.generate(m, [[1], []], 4)
    with pytest.raises(common.UsageError, match='no room'):
        E.generate(m, [list(range(128))], 4)
    with pytest.raises(common.UsageError, match='num_samples'):
        E.generate(m, [[1]], 4, num_samples=0)
    # every row stops on its first token: one collection ends the call
    first = E.generate(m, [[1, 2], [3]], 1, temperature=0).tokens
    g = E.generate(m, [[1, 2], [3]], 50, temperature=0, stop_ids=[t[0] for t in first], num_samples=2)
    assert g.tokens == [first[0], first[0], first[1], first[1]] and all(g.finished)


def test_memory_budget_sets_the_slots():
    m = make_model(peaky=True)
    prompts = varied_prompts(10, seed=4)
    cfg = m.config
    per_token = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4
    P, T, G = max(map(len, prompts)), 20, 2
    eng = E.Engine(m, prompts, G, T, 1.0, None, None, (), None, False, 3 * per_token * (P + G * T), None, 0, False)
    assert eng.S == 3
    eng = E.Engine(m, prompts, G, T, 1.0, None, None, (), None, False, None, 7, 0, False)
    assert eng.S == 3                                                # max_rows 7 -> 3 slots of 2 rows
    eng = E.Engine(m, prompts, G, T, 1.0, None, None, (), None, False, 1, None, 0, False)
    assert eng.S == 1                                                # always at least one slot


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA device')
def test_cuda_graph_decoding_equals_eager():
    m = make_model(peaky=True).cuda()
    prompts = varied_prompts(17, seed=5)
    for T in (0.0, 1.0):
        kw = dict(temperature=T, stop_ids=[3, 4], num_samples=3, max_rows=12)
        a = E.generate(m, prompts, 40, generator=torch.Generator().manual_seed(0), cuda_graphs=True, **kw)
        b = E.generate(m, prompts, 40, generator=torch.Generator().manual_seed(0), cuda_graphs=False, **kw)
        assert a.tokens == b.tokens and a.finished == b.finished
        torch.testing.assert_close(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])),
                                   rtol=0, atol=1e-5)
    g = E.generate(m, prompts, 20, temperature=0, stop_ids=[3, 4], max_rows=5, cuda_graphs=True)
    cpu = m.cpu()
    assert g.tokens == [naive_greedy(cpu, p, 20, stop_ids=[3, 4]) for p in prompts]  # fp32 graphs vs forward
    m = cpu.cuda()
    with common.autocast_ctx('cuda'):  # bf16: graphs replay the same kernels as the eager step
        a = E.generate(m, prompts, 40, generator=torch.Generator().manual_seed(0), cuda_graphs=True, **kw)
        b = E.generate(m, prompts, 40, generator=torch.Generator().manual_seed(0), cuda_graphs=False, **kw)
    assert a.tokens == b.tokens


def test_reference_sampler_gives_the_engines_greedy_tokens():
    """model.sample, the few-line sampler model.py keeps for teaching (one full forward pass per token),
    and the engine agree token for token at temperature 0, stops included."""
    m = make_model(peaky=True)
    prompts, stop = varied_prompts(6, seed=5, lo=2), [3, 4]
    g = E.generate(m, prompts, 12, temperature=0, stop_ids=stop)
    for p, toks in zip(prompts, g.tokens):
        assert M.sample(m, p, 12, stop_ids=stop) == toks


def test_a_failed_graph_capture_falls_back_to_eager_decoding(monkeypatch):
    """The CUDA-graph control flow, driven on the CPU: the first step at each shape is a real warm-up
    step and then a capture. A capture that fails leaves the call decoding eagerly from the state the
    warm-up left -- no step lost or repeated, so the samples are those of a call without graphs --,
    warns once and is counted in engine.graph_fallbacks."""
    m = make_model(peaky=True)
    prompts = varied_prompts(9, seed=3)
    kw = dict(temperature=1.0, num_samples=3, max_rows=6, logprobs=False)
    want = E.generate(m, prompts, 12, generator=torch.Generator().manual_seed(4), **kw)
    calls = {'warm': 0, 'capture': 0}
    real_init = E.Engine.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.graphs = {}  # pretend graphs are on: _run_step takes the capture path at every new shape

    def warm_up(self):
        calls['warm'] += 1
        self._step()

    def capture(self):
        calls['capture'] += 1
        raise RuntimeError('operation not permitted when stream is capturing')
    monkeypatch.setattr(E.Engine, '__init__', init)
    monkeypatch.setattr(E.Engine, '_warm_up', warm_up)
    monkeypatch.setattr(E.Engine, '_capture', capture)
    monkeypatch.setattr(E, 'graph_fallbacks', 0)
    with pytest.warns(RuntimeWarning, match='decoding eagerly'):
        got = E.generate(m, prompts, 12, generator=torch.Generator().manual_seed(4), **kw)
    assert got.tokens == want.tokens and got.finished == want.finished
    assert calls == {'warm': 1, 'capture': 1} and E.graph_fallbacks == 1  # then eager to the end of the call
