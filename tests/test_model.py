"""Tests for model.py: equivalence with transformers' Qwen2, generation (cache, padding, groups,
seeds, stops, logprobs), checkpoints, the configurator and Hugging Face import/export.

Run: python -m pytest -q tests/test_model.py   (CPU, ~10-20 s)
"""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import interop  # noqa: E402
import checkpoint  # noqa: E402
import common  # noqa: E402
import engine as E  # noqa: E402
import model as M  # noqa: E402
from conftest import StubWandb  # noqa: E402



SMALL = dict(vocab_size=97, hidden_size=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128,
             max_seq_len=128)


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

def make_model(seed=0, tie=True, peaky=False, **kw):
    """A small random model. peaky=True scales the weights up so the next-token distributions are
    far from uniform: greedy decoding then has no near-ties, so token-for-token comparisons test
    the code, not float rounding."""
    torch.manual_seed(seed)
    m = M.Qwen2(M.ModelConfig(**{**SMALL, 'tie_embeddings': tie, **kw})).eval()
    if peaky:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.15)
                elif p.dim() == 1 and not torch.all(p == 1):
                    p.normal_(0, 0.1)  # biases too, so the q/k/v bias paths are exercised
    return m


def naive_greedy(m, prompt, n, stop_ids=()):
    """The obviously-correct decoder: a full forward pass over the whole sequence per token."""
    x, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits, _ = m(x)
        t = int(logits[0, -1].argmax())
        out.append(t)
        if t in stop_ids:
            break
        x = torch.cat([x, torch.tensor([[t]])], dim=1)
    return out


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20]]

# -----------------------------------------------------------------------------
# presets


def test_presets_and_param_counts():
    with torch.device('meta'):  # shapes only: no 100M-parameter init
        counts = {name: M.Qwen2(cfg).num_params() for name, cfg in M.MODEL_PRESETS.items()}
    assert counts['paper'] == 103_170_816  # STUDY.md §3 "~100M": 12 x 8.46M blocks + 1.69M tied embedding
    assert 1e6 <= counts['tiny'] <= 3e6
    assert 10e6 <= counts['small'] <= 20e6
    assert counts['tiny'] < counts['mini'] < counts['small'] < counts['paper']
    p = M.MODEL_PRESETS['paper']
    assert (p.hidden_size, p.n_layer, p.n_head, p.n_kv_head, p.intermediate_size, p.vocab_size, p.max_seq_len,
            p.rope_theta, p.rms_eps, p.tie_embeddings) == (768, 12, 12, 2, 3072, 2200, 2048, 1e6, 1e-6, True)
    # the released config describes exactly the paper preset
    ref = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'reference', 'paper_release',
                       'config.json')
    with open(ref) as f:
        assert interop.config_from_hf(json.load(f)) == p


def test_initializer_range_sets_the_init_and_survives_hf_round_trip():
    """The init std follows ModelConfig.initializer_range (the tiny preset uses 0.06: at 0.02 a model
    that narrow sat on a copy-task plateau), and the value travels through the HF config."""
    torch.manual_seed(0)
    for std in (0.02, 0.06):
        cfg = M.ModelConfig(vocab_size=500, hidden_size=64, n_layer=2, n_head=4, n_kv_head=2,
                            intermediate_size=128, max_seq_len=64, initializer_range=std)
        m = M.Qwen2(cfg)
        for name, w in (('embed', m.embed_tokens.weight), ('q', m.layers[0].self_attn.q_proj.weight),
                        ('down', m.layers[1].mlp.down_proj.weight)):
            assert abs(w.std().item() - std) < 0.1 * std, (name, std, w.std().item())
        assert m.layers[0].self_attn.q_proj.bias.abs().max() == 0
        assert interop.config_from_hf(interop.hf_config_dict(cfg)) == cfg
    assert M.MODEL_PRESETS['tiny'].initializer_range == 0.06 and M.MODEL_PRESETS['paper'].initializer_range == 0.02


@pytest.mark.fast
def test_flops_and_mfu():
    m = make_model()
    n, c = m.num_params(), m.config
    assert m.flops_per_token(seq_len=100) == 6 * n + 12 * c.n_layer * c.hidden_size * 100
    assert m.flops_per_token(seq_len=100, training=False) == 2 * n + 4 * c.n_layer * c.hidden_size * 100
    assert m.estimate_mfu(1000.0, peak_flops=m.flops_per_token() * 2000.0) == pytest.approx(0.5)

# -----------------------------------------------------------------------------
# (1) equivalence with transformers


def hf_model(cfg):
    transformers = pytest.importorskip('transformers', reason='transformers not installed: cannot compare '
                                                              'against the reference Qwen2')
    hcfg = {k: v for k, v in interop.hf_config_dict(cfg).items() if k != 'architectures'}
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hcfg)).eval()


@pytest.mark.parametrize('tie', [True, False])
def test_matches_transformers_both_directions(tie):
    ours = make_model(tie=tie, peaky=True)
    hf = hf_model(ours.config)
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params()
    x = torch.randint(0, SMALL['vocab_size'], (3, 40), generator=torch.Generator().manual_seed(0))
    # ours -> HF
    hf.load_state_dict(interop.to_hf_state_dict(ours), strict=True)
    with torch.no_grad():
        a, _ = ours(x)
        b = hf(x).logits.float()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # HF (fresh random init) -> ours
    torch.manual_seed(123)
    hf2 = hf_model(ours.config)
    ours2 = M.Qwen2(ours.config).eval()
    ours2.load_state_dict(interop.from_hf_state_dict(hf2.state_dict(), ours.config), strict=True)
    with torch.no_grad():
        a, loss = ours2(x[:, :-1], targets=x[:, 1:])
        out = hf2(x, labels=x)  # HF shifts labels internally
    torch.testing.assert_close(a, out.logits[:, :-1].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_rms_norm_paths_agree():
    """RMSNorm in fp32 runs as one op with the weight inside: bitwise the weight times the
    normalised input (the path bf16 takes), and Hugging Face's pow/mean/rsqrt chain up to rounding."""
    g = torch.Generator().manual_seed(0)
    norm = M.RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
        x = torch.randn(5, 7, 48, generator=g) * 3
        y = norm(x)
        assert torch.equal(y, norm.weight * torch.nn.functional.rms_norm(x, (48,), eps=1e-6))
        hf = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(y, hf, rtol=1e-6, atol=1e-6)
        xb = x.bfloat16()  # the cast path: fp32 inside, cast back, weight in bf16
        yb = norm.bfloat16()(xb)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), hf, rtol=2e-2, atol=2e-2)


@pytest.mark.fast
def test_logits_at_positions_equal_the_full_logits_there():
    """forward(positions=...) (RL's response tokens only) gives the full pass's logits at those
    positions, and its per-token loss against targets of the same shape."""
    m = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SMALL['vocab_size'], (3, 20), generator=g)
    pos = torch.tensor([[2, 5, 19], [0, 0, 7], [18, 3, 3]])
    tgt = torch.randint(0, SMALL['vocab_size'], (3, 3), generator=g)
    with torch.no_grad():
        full, _ = m(x)
        part, loss = m(x, targets=tgt, loss_reduction='none', positions=pos)
    want = full.gather(1, pos[:, :, None].expand(-1, -1, full.size(-1)))
    torch.testing.assert_close(part, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want.transpose(1, 2), tgt, reduction='none'),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.fast
def test_loss_ignore_index_and_reduction_none():
    m = make_model(peaky=True)
    x = torch.randint(0, 97, (2, 12))
    y = torch.randint(0, 97, (2, 12))
    y[0, :5] = -100
    logits, loss = m(x, y)
    _, per_tok = m(x, y, loss_reduction='none')
    assert per_tok.shape == (2, 12) and torch.all(per_tok[0, :5] == 0)
    torch.testing.assert_close(loss, per_tok.sum() / (y != -100).sum())
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, 97)


@pytest.mark.fast
def test_document_mask_makes_packed_documents_independent():
    """With doc_ids, each packed document gets exactly the logits it gets alone (RoPE is relative,
    so its offset in the window does not matter); without them the second one sees the first."""
    m = make_model(peaky=True)
    eos = 3
    a, b, c = torch.randint(4, 97, (1, 6)), torch.randint(4, 97, (1, 9)), torch.randint(4, 97, (1, 4))
    a[0, -1] = b[0, -1] = eos
    x = torch.cat([a, b, c], 1)
    ids = M.document_ids(x, eos)
    assert ids.tolist() == [[0] * 6 + [1] * 9 + [2] * 4]  # each EOS belongs to the document it ends
    packed, _ = m(x, doc_ids=ids)
    for lo, part in ((0, a), (6, b), (15, c)):
        alone, _ = m(part)
        torch.testing.assert_close(packed[:, lo:lo + part.size(1)], alone, atol=1e-5, rtol=1e-5)
    plain, _ = m(x)
    assert (plain[:, 6:15] - packed[:, 6:15]).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# (2) cached vs uncached greedy decoding, padding, groups


@pytest.mark.fast
def test_greedy_cached_matches_uncached_and_padding_is_invisible():
    m = make_model(peaky=True)
    batch = E.generate(m, PROMPTS, 24, temperature=0)
    for i, p in enumerate(PROMPTS):
        ref = naive_greedy(m, p, 24)
        assert batch.tokens[i] == ref, f"row {i}: batched cached decoding differs from full forward passes"
        alone = E.generate(m, [p], 24, temperature=0)
        assert alone.tokens[0] == ref, f"row {i}: single-prompt cached decoding differs"
        torch.testing.assert_close(torch.tensor(alone.logprobs[0]), torch.tensor(batch.logprobs[i]),
                                   rtol=0, atol=1e-4)
    assert batch.finished == [False] * len(PROMPTS)
    assert all(len(t) == 24 for t in batch.tokens)


@pytest.mark.fast
def test_num_samples_copies_the_prompt_cache():
    m = make_model(peaky=True)
    g = E.generate(m, PROMPTS, 10, temperature=0, num_samples=3)
    assert len(g.tokens) == 3 * len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        ref = naive_greedy(m, p, 10)
        assert g.tokens[3 * i:3 * i + 3] == [ref] * 3  # rows are [p0 s0, p0 s1, p0 s2, p1 s0, ...]
    # sampled groups: rows of a group differ, and each row is a valid sample of its prompt
    s = E.generate(m, PROMPTS, 10, temperature=1.0, num_samples=6, generator=torch.Generator().manual_seed(0))
    assert len({tuple(t) for t in s.tokens[:6]}) > 1
    for i, p in enumerate(PROMPTS):
        row = 6 * i + 2
        check_logprobs(m, p, s.tokens[row], s.logprobs[row])


@pytest.mark.fast
def test_max_seq_len_caps_generation():
    m = make_model(peaky=True, max_seq_len=16)
    g = E.generate(m, [[1, 2, 3, 4, 5, 6]], 100, temperature=0)
    assert len(g.tokens[0]) == 10 and g.finished == [False]

# -----------------------------------------------------------------------------
# (3) seeds


@pytest.mark.fast
def test_same_seed_same_samples_different_seed_different():
    m = make_model(peaky=True)

    def run(seed, **kw):
        return E.generate(m, PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(3, top_k=5, top_p=0.9) == run(3, top_k=5, top_p=0.9)
    assert run(3, num_samples=2) == run(3, num_samples=2)


@pytest.mark.fast
def test_sampler_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(logits[0] / 0.7, -1)
    counts = torch.bincount(E.sample_token(logits, 0.7, generator=g), minlength=5).float() / 40000
    torch.testing.assert_close(counts, p, rtol=0, atol=0.01)
    # top_k=2: only the two best, renormalised
    counts = torch.bincount(E.sample_token(logits, 1.0, top_k=2, generator=g), minlength=5).float() / 40000
    p2 = torch.softmax(logits[0, :2], -1)
    torch.testing.assert_close(counts, torch.cat([p2, torch.zeros(3)]), rtol=0, atol=0.01)
    # top_p: smallest prefix whose mass reaches top_p (0.6 -> probs .48 + .18 -> two tokens)
    counts = torch.bincount(E.sample_token(logits, 1.0, top_p=0.6, generator=g), minlength=5)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    assert torch.all(E.sample_token(logits[:5], 0.0) == 0)

# -----------------------------------------------------------------------------
# (4) stops and logprobs


def check_logprobs(m, prompt, tokens, logprobs):
    """Generated logprobs == log_softmax of a full forward pass at temperature 1."""
    with torch.no_grad():
        logits, _ = m(torch.tensor([prompt + tokens]))
    ls = torch.log_softmax(logits[0], -1)
    ref = torch.stack([ls[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)])
    torch.testing.assert_close(torch.tensor(logprobs), ref, rtol=0, atol=1e-4)


@pytest.mark.fast
def test_stop_ids_and_logprobs():
    m = make_model(peaky=True)
    free = E.generate(m, PROMPTS, 30, temperature=1.0, generator=torch.Generator().manual_seed(5))
    # stop on the most frequent tokens of the unconstrained run so that some rows do stop
    counts = torch.bincount(torch.tensor(sum(free.tokens, [])), minlength=97)
    stop = counts.topk(3).indices.tolist()
    g = E.generate(m, PROMPTS, 30, temperature=1.0, top_k=20, stop_ids=stop,
                   generator=torch.Generator().manual_seed(5))
    assert any(g.finished)
    for p, toks, lps, fin in zip(PROMPTS, g.tokens, g.logprobs, g.finished):
        assert len(toks) == len(lps)
        if fin:
            assert toks[-1] in stop and not set(toks[:-1]) & set(stop)
        else:
            assert len(toks) == 30 and not set(toks) & set(stop)
        check_logprobs(m, p, toks, lps)
    # greedy with a stop id reproduces the naive decoder cut at the stop
    greedy = E.generate(m, PROMPTS, 30, temperature=0, stop_ids=stop)
    for p, toks in zip(PROMPTS, greedy.tokens):
        assert toks == naive_greedy(m, p, 30, stop_ids=stop)


@pytest.mark.fast
def test_finished_rows_leave_the_batch():
    """Many rows with stops: rows are dropped from the batch as they finish (compaction); every
    row must still be exactly what it would be alone (greedy) and carry correct logprobs."""
    m = make_model(peaky=True)
    prompts = [[i, i + 1, i + 2][: 1 + i % 3] for i in range(1, 40, 3)]
    free = E.generate(m, prompts, 12, temperature=0)
    stop = list({t[i % 5] for i, t in enumerate(free.tokens)})[:6]  # rows stop at different steps
    g = E.generate(m, prompts, 12, temperature=0, stop_ids=stop)
    assert 0 < sum(g.finished) < len(prompts)
    for p, toks, lps in zip(prompts, g.tokens, g.logprobs):
        assert toks == naive_greedy(m, p, 12, stop_ids=stop)
        check_logprobs(m, p, toks, lps)
    s1 = E.generate(m, prompts, 12, temperature=1.0, stop_ids=stop, num_samples=3,
                    generator=torch.Generator().manual_seed(0))
    s2 = E.generate(m, prompts, 12, temperature=1.0, stop_ids=stop, num_samples=3,
                    generator=torch.Generator().manual_seed(0))
    assert s1 == s2
    for i in range(0, len(s1.tokens), 5):
        check_logprobs(m, prompts[i // 3], s1.tokens[i], s1.logprobs[i])


@pytest.mark.fast
def test_early_exit_when_all_rows_stop():
    m = make_model(peaky=True)
    first = E.generate(m, PROMPTS, 1, temperature=0).tokens
    g = E.generate(m, PROMPTS, 50, temperature=0, stop_ids=[t[0] for t in first])
    assert g.tokens == first and g.finished == [True] * len(PROMPTS)
    # a stop token at exactly the last allowed step still counts as finished
    five = E.generate(m, PROMPTS[:1], 5, temperature=0).tokens[0]
    last = E.generate(m, PROMPTS[:1], 5, temperature=0, stop_ids=[five[-1]])
    assert last.finished == [True] and last.tokens[0][-1] == five[-1]

# -----------------------------------------------------------------------------
# (5) checkpoints


@pytest.mark.fast
def test_checkpoint_round_trip_and_resume_state(tmp_path):
    m = make_model(peaky=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 97, (2, 16))
    m(x, x)[1].backward()
    opt.step()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    extra = {'loader': {'pos': 123, 'order': torch.arange(5)}, 'rng': checkpoint.rng_state()}
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    path = tmp_path / 'ckpt.pt'
    checkpoint.save_checkpoint(path, m, {'lr': 1e-3, 'preset': 'tiny', 'ops': (2, 3)}, 'tok-abc', 42, opt, extra)
    torch.load(path, weights_only=True)  # only safe types inside
    ck = checkpoint.load_checkpoint(path, expect_tokenizer='tok-abc', expect_model_config=m.config)
    assert ck['step'] == 42 and ck['config']['preset'] == 'tiny' and ck['tokenizer_identity'] == 'tok-abc'
    assert ck['model_config'] == m.config and ck['extra']['loader']['pos'] == 123
    with torch.no_grad():
        torch.testing.assert_close(ck['model'](x)[0], m(x)[0], rtol=0, atol=0)
    opt2 = torch.optim.AdamW(ck['model'].parameters(), lr=1e-3)
    opt2.load_state_dict(ck['optimizer'])
    torch.testing.assert_close(opt2.state_dict()['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])
    checkpoint.set_rng_state(ck['extra']['rng'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


@pytest.mark.fast
def test_checkpoint_atomic_and_stale_tmp(tmp_path, monkeypatch):
    m = make_model()
    path = str(tmp_path / 'ckpt.pt')
    with open(path + '.tmp', 'wb') as f:  # a stale tmp from an earlier crash must not matter
        f.write(b'garbage')
    checkpoint.save_checkpoint(path, m, {}, 'tok', 1)
    assert not os.path.exists(path + '.tmp')
    with open(path + '.tmp', 'wb') as f:
        f.write(b'garbage')
    assert checkpoint.load_checkpoint(path)['step'] == 1
    # a crash in the middle of writing step 2 leaves step 1 intact
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, m, {}, 'tok', 2)
    monkeypatch.setattr(torch, 'save', real_save)
    assert checkpoint.load_checkpoint(path)['step'] == 1


@pytest.mark.fast
def test_checkpoint_errors_and_wrappers(tmp_path):
    m = make_model()
    path = tmp_path / 'c.pt'
    with pytest.raises(TypeError, match='weights_only'):
        checkpoint.save_checkpoint(path, m, {}, 'tok', 0, extra={'state': np.zeros(3)})
    checkpoint.save_checkpoint(path, m, {}, 'tok-A', 0)
    with pytest.raises(ValueError, match="tok-A.*tok-B"):
        checkpoint.load_checkpoint(path, expect_tokenizer='tok-B')
    other = M.ModelConfig(**{**SMALL, 'n_layer': 3})
    with pytest.raises(ValueError, match='n_layer: checkpoint=2 vs expected=3'):
        checkpoint.load_checkpoint(path, expect_model_config=other)
    # state dicts from torch.compile / DDP wrappers load cleanly
    ck = torch.load(path, weights_only=True)
    ck['model'] = {'module._orig_mod.' + k: v for k, v in ck['model'].items()}
    torch.save(ck, path)
    loaded = checkpoint.load_checkpoint(path)['model']
    x = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(x)[0], m(x)[0])

    class Wrapper(torch.nn.Module):  # DDP-like: the model lives at .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    checkpoint.save_checkpoint(path, Wrapper(m), {}, 'tok', 0)
    assert all(not k.startswith('module.') for k in torch.load(path, weights_only=True)['model'])

# -----------------------------------------------------------------------------
# (6) configure


DEFAULTS = {'lr': 1e-4, 'batch_size': 8, 'compile': False, 'out_dir': 'out', 'ops': [2, 3], 'init_from': None}


@pytest.mark.fast
def test_configure_presets_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs('config')
    with open('config/fast.py', 'w') as f:
        f.write("import math\nbatch_size = 4 * 8\nlr = 3e-4\n_private = 1\n")
    cfg = common.configure(DEFAULTS, ['fast', '--lr=1', '--compile=True', '--out_dir=runs/x', '--ops=[5, 6]',
                                 '--init_from=ckpt.pt'])
    assert cfg == {'lr': 1.0, 'batch_size': 32, 'compile': True, 'out_dir': 'runs/x', 'ops': [5, 6],
                   'init_from': 'ckpt.pt'}
    assert isinstance(cfg['lr'], float)
    assert common.configure(DEFAULTS, []) == DEFAULTS and DEFAULTS['lr'] == 1e-4  # defaults untouched
    assert common.configure(DEFAULTS, ['--compile'])['compile'] is True
    assert common.configure(DEFAULTS, ['--out_dir=123'])['out_dir'] == '123'  # str default keeps the text
    with open('alt.py', 'w') as f:
        f.write("batch_size = 2\n")
    assert common.configure(DEFAULTS, ['alt.py'])['batch_size'] == 2  # a path works too


@pytest.mark.parametrize('argv, message', [
    (['--lr=abc'], 'lr expects float'),
    (['--batch_size=1.5'], 'batch_size expects int'),
    (['--compile=1'], 'compile must be True or False'),
    (['--learning_rate=1'], "unknown config key 'learning_rate'"),
    (['--batch_sze=4'], 'did you mean batch_size'),
    (['--batch_size'], 'needs a value'),
    (['nope'], "no preset 'nope'"),
    (['bad'], "unknown config key 'batchsize'"),
])
@pytest.mark.fast
def test_configure_errors_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    os.makedirs('config')
    with open('config/bad.py', 'w') as f:
        f.write("batchsize = 4\n")
    with pytest.raises(SystemExit) as e:
        common.configure(DEFAULTS, argv)
    assert message in str(e.value.code) and '\n' not in str(e.value.code)


@pytest.mark.fast
def test_configure_returns_a_dict_with_attribute_access(tmp_path):
    cfg = common.configure(DEFAULTS, ['--lr=0.5'])
    assert isinstance(cfg, dict) and cfg.lr == cfg['lr'] == 0.5
    cfg.batch_size = 3
    assert cfg['batch_size'] == 3
    with pytest.raises(AttributeError, match='no config key'):
        cfg.nope
    # a Config inside a checkpoint is saved as a plain dict (weights_only=True loads it)
    m = M.Qwen2(M.ModelConfig(**SMALL))
    checkpoint.save_checkpoint(tmp_path / 'c.pt', m, cfg, 'tok', 0, extra={'log': {'config': cfg}})
    ck = checkpoint.load_checkpoint(tmp_path / 'c.pt')
    assert type(ck['config']) is dict and ck['config'] == cfg and ck['extra']['log']['config'] == cfg


@pytest.mark.fast
def test_commands_without_presets_reject_bare_arguments():
    with pytest.raises(common.UsageError, match="'stray' is not --key=value"):
        common.configure(DEFAULTS, ['stray'], presets=False)


@pytest.mark.fast
def test_configure_help(capsys):
    with pytest.raises(SystemExit) as e:
        common.configure(DEFAULTS, ['--help'])
    assert e.value.code == 0 and '--batch_size' in capsys.readouterr().out


@pytest.mark.fast
def test_cli_dispatches_a_command_table(capsys):
    """One usage line listing the commands; a UsageError from a command is one line and exit 2."""
    calls = []

    def build(argv):
        calls.append(argv)
        if argv == ['--bad']:
            raise common.UsageError('build needs --out=DIR')
        return 'built'

    table = {'build': build, 'sample': lambda argv: None}
    assert common.cli('x.py', table, ['build', '--out=d']) == 'built' and calls == [['--out=d']]
    for argv, words in (([], 'usage: python x.py {build|sample}'), (['nope'], "unknown command 'nope'"),
                        (['build', '--bad'], 'build needs --out=DIR')):
        with pytest.raises(SystemExit) as e:
            common.cli('x.py', table, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('x.py: ') and words in err and err.count('\n') == 1


# -----------------------------------------------------------------------------
# the logger (RunLog) and its optional trackers


@pytest.mark.fast
def test_runlog_files_history_and_tracker_get_the_same_records(tmp_path, monkeypatch, capsys):
    wandb = StubWandb()
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    cfg = common.Config(lr=0.1, out_dir=str(tmp_path / 'run'))
    log = common.RunLog(cfg.out_dir, cfg, 'rl', 'wandb', jsonl={'train': 'log.jsonl', 'samples': 'samples.jsonl'})
    assert wandb.inits == [dict(project='reasoning-study', name='run', config={'lr': 0.1, 'out_dir': cfg.out_dir},
                                dir=cfg.out_dir, job_type='rl')]
    recs = [{'step': s, 'reward': 0.5 * s, 'kl': 1e-3, 'mfu': None} for s in (1, 2, 3)]
    for r in recs:
        log.log('train', r)
        log.log('val', {'step': r['step'], 'loss': 2.0 / r['step'], 'eval/all/pass@1': 0.25})
    log.log('samples', {'step': 3, 'response': 'text', 'reward': 1.0}, track=False)
    log.print('a console line')
    # JSONL streams: one line per record, as given; the others kept in memory (the stage saves them)
    with open(tmp_path / 'run' / 'log.jsonl') as f:
        assert [json.loads(line) for line in f] == recs
    assert [r['loss'] for r in log.history['val']] == [2.0, 1.0, 2 / 3] and 'train' not in log.history
    # the tracker: every record's numbers as stream/key at its step (a key already under the stream's name
    # keeps it), None and texts left out, nothing from track=False
    assert wandb.logged[:2] == [({'train/reward': 0.5, 'train/kl': 1e-3}, 1),
                                ({'val/loss': 2.0, 'val/eval/all/pass@1': 0.25}, 1)]
    assert len(wandb.logged) == 6 and capsys.readouterr().out == 'a console line\n'
    # a resumed run drops the lines after its checkpoint; a new one starts its files afresh
    log.trim(2)
    assert [json.loads(line)['step'] for line in open(tmp_path / 'run' / 'log.jsonl')] == [1, 2]
    log.clear()
    assert not os.path.exists(tmp_path / 'run' / 'log.jsonl') and not os.path.exists(tmp_path / 'run' / 'samples.jsonl')
    log.close()
    assert wandb.finished == 1


@pytest.mark.fast
def test_runlog_other_ranks_write_nothing_and_an_object_is_a_tracker(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # not even imported on rank 1
    log = common.RunLog(str(tmp_path / 'r1'), {}, 'pretrain', 'wandb', master=False, jsonl={'train': 'log.jsonl'},
                   history={'val': []})
    log.log('train', {'step': 1, 'loss': 1.0})
    log.log('val', {'step': 1, 'loss': 2.0})
    log.print('quiet')
    log.write_json('log.json', {})
    assert not os.path.exists(tmp_path / 'r1') and log.history == {'val': [{'step': 1, 'loss': 2.0}]}
    stub = StubWandb()
    common.RunLog(str(tmp_path / 'r0'), {}, 'eval', stub).log('base', {'ckpt_step': 7, 'all/pass@1': 0.5})
    assert stub.logged == [({'base/ckpt_step': 7, 'base/all/pass@1': 0.5}, None)]


@pytest.mark.fast
def test_runlog_plot_writes_a_png(tmp_path):
    log = common.RunLog(str(tmp_path), {}, 'pretrain', history={'train': [], 'val': []})
    for s in range(1, 20):
        log.log('train', {'step': s, 'loss': 5.0 / s})
    log.log('val', {'step': 19, 'loss': 0.4})
    log.plot('loss.png', 'loss', {'train': 'train', 'val': 'held-out val'}, logy=True)
    with open(tmp_path / 'loss.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.fast
@pytest.mark.parametrize('kind, package', [('wandb', 'wandb'), ('tensorboard', 'torch.utils.tensorboard')])
def test_asking_for_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch, kind, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    with pytest.raises(common.UsageError) as e:
        common.RunLog(str(tmp_path), {}, 'pretrain', kind)
    msg = str(e.value)
    assert f"logger='{kind}' needs the" in msg and 'pip install' in msg and "--logger=''" in msg and '\n' not in msg
    with pytest.raises(common.UsageError, match="logger='mlflow'; choose one of"):
        common.RunLog(str(tmp_path), {}, 'pretrain', 'mlflow')

# -----------------------------------------------------------------------------
# (7) Hugging Face export / import


def test_hf_export_import_round_trip(tmp_path):
    transformers = pytest.importorskip('transformers', reason='transformers not installed')
    pytest.importorskip('safetensors', reason='safetensors not installed')
    m = make_model(peaky=True)
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref = m(x)[0]
    interop.export_hf(m, tmp_path / 'hf')
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), ref, rtol=1e-5, atol=1e-5)
    back = interop.load_hf_qwen2(tmp_path / 'hf')
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ref, rtol=0, atol=0)
    # a directory written by transformers itself (untied, to cover a separate lm_head)
    hf2 = hf_model(M.ModelConfig(**{**SMALL, 'tie_embeddings': False}))
    hf2.save_pretrained(tmp_path / 'hf2')
    ours = interop.load_hf_qwen2(tmp_path / 'hf2')
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf2(x).logits.float(), rtol=1e-5, atol=1e-5)

# -----------------------------------------------------------------------------
# plumbing


@pytest.mark.fast
def test_single_process_dist_and_autocast(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)
    d = common.setup_distributed()
    assert (d.rank, d.world_size, d.is_master, d.ddp) == (0, 1, True, False)
    with common.autocast_ctx('cpu'):
        assert not torch.is_autocast_enabled('cpu')
    common.seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    common.seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_tiny_model_learns_a_pattern():
    """A few hundred AdamW steps fit a deterministic sequence task (copy with offset)."""
    torch.manual_seed(0)
    m = M.Qwen2(M.ModelConfig(**SMALL)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(80):
        a = torch.randint(10, 40, (16, 8))
        x = torch.cat([a, a + 40], 1)  # second half = first half + 40: learnable only by attention
        y = x[:, 1:].clone()
        y[:, :7] = -100  # only score the predictable half
        _, loss = m(x[:, :-1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.5, loss.item()  # chance level is ln(30) = 3.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_bf16_generation_matches_forward():
    m = make_model(peaky=True).cuda()
    with common.autocast_ctx('cuda'):
        a = E.generate(m, PROMPTS, 20, num_samples=3, stop_ids=[3, 4], generator=torch.Generator().manual_seed(0))
        b = E.generate(m, PROMPTS, 20, num_samples=3, stop_ids=[3, 4], generator=torch.Generator().manual_seed(0))
        assert a == b
        for i in range(0, len(a.tokens), 4):
            p, t = PROMPTS[i // 3], a.tokens[i]
            logits, _ = m(torch.tensor([p + t], device='cuda'))
            ls = torch.log_softmax(logits[0], -1)
            ref = torch.stack([ls[len(p) - 1 + j, x] for j, x in enumerate(t)]).cpu()
            torch.testing.assert_close(torch.tensor(a.logprobs[i]), ref, rtol=0, atol=2e-2)  # bf16


@pytest.mark.fast
def test_sdpa_repeated_kv_equals_grouped_kv_with_a_document_mask():
    """model.sdpa's CUDA path for a mask with grouped KV heads (K/V repeated to the query heads) gives
    what the grouped path gives (forced here on the CPU), for causal document masks as pre-training builds."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, 24, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 11 + [2] * 10])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    grouped = M.sdpa(q, k, v, mask=mask, repeat_kv=False)
    repeated = M.sdpa(q, k, v, mask=mask, repeat_kv=True)
    torch.testing.assert_close(repeated, grouped, rtol=1e-5, atol=1e-6)
    # and both are attention per document: the first document's rows ignore the rest
    alone = M.sdpa(q[:1, :, :10], k[:1, :, :10], v[:1, :, :10], is_causal=True)
    torch.testing.assert_close(grouped[:1, :, :10], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_rng_state_restores_from_a_checkpoint_loaded_for_another_device(tmp_path):
    """rl.py and pretrain.py load a run's checkpoint for the run's device (cuda on a GPU); the RNG
    states inside must still come back as CPU bytes, or set_rng_state fails on .numpy() and every
    resume on a GPU crashes. Loaded for the meta device here (no data at all): the model goes there,
    the RNG states stay on the CPU and restore exactly."""
    m = M.Qwen2(M.ModelConfig(**SMALL))
    torch.manual_seed(11)
    np.random.seed(12)
    state = checkpoint.rng_state()
    want = (torch.rand(3), np.random.rand(2), random.random())
    path = tmp_path / 'ckpt.pt'
    checkpoint.save_checkpoint(path, m, {'x': 1}, 'tok-id', step=5, extra={'rng': [state]})
    ck = checkpoint.load_checkpoint(path, device='meta')
    assert next(ck['model'].parameters()).device.type == 'meta'
    torch.manual_seed(0)
    checkpoint.set_rng_state(ck['extra']['rng'][0])
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
