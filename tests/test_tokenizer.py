"""Tests of the tokenizer, the original-tokenizer conversion, the token shards and the shard loader
(STUDY.md §3, §4)."""
import collections
import itertools
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import tokenizer  # noqa: E402
from tokenizer import (_TRAIN_SPLIT, N_FIXED_TOKENS, SPECIAL_TOKENS, ShardLoader, Tokenizer,  # noqa: E402
                  check_identity, count_tokens, load_shard_meta, train_tokenizer,
                  write_shards)

REF = os.path.join(ROOT, 'reference')
with open(os.path.join(REF, 'official_generator_samples.jsonl'), encoding='utf-8') as f:
    ROWS = [json.loads(line) for line in f]
ORIGINAL = os.path.join(REF, 'paper_release', 'tokenizer.json')


TEXTS = [data.training_text(r) for r in ROWS]
UNICODE = ['Festival Lumière de Valmont', 'Rêves de Belleville', 'Cinéma de Montreval', 'Festival de Saint-Rivage',
           'naïve café 東京 🙂 \u00a0\u3000 tab\there\r\nend', "it's we'll they're", '  double  spaces  ',
           '\n\n', '',
           'x' * 3000, '123456789 12345 0001 -7 3.14 ² ½']


@pytest.fixture(scope='module')
def tok():
    return train_tokenizer(TEXTS)


def random_text(rng, alphabet, n=30):
    return ''.join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


# --- our tokenizer -----------------------------------------------------------------------------

def test_training_is_fast_and_deterministic(tok):
    corpus = TEXTS * 30  # ~5 MB of text
    t0 = time.time()
    again = train_tokenizer(corpus)
    assert time.time() - t0 < 15
    assert again.identity == tok.identity  # same word frequencies up to a factor -> same merges
    assert train_tokenizer(TEXTS[:40]).identity != tok.identity
    assert N_FIXED_TOKENS < tok.vocab_size <= 2816


@pytest.mark.fast
def test_vocab_size_below_the_fixed_tokens_is_an_error():
    with pytest.raises(ValueError, match='too small'):
        train_tokenizer(TEXTS, vocab_size=2200)


@pytest.mark.fast
def test_special_tokens_have_their_ids(tok):
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s) == [i] and tok.id_of(s) == i
    assert (tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    ids = tok.encode('<question> a </question><solution>b</solution> <answer> 4 </answer>[EOS]')
    assert [i for i in ids if i < 10] == [4, 5, 6, 7, 8, 9, 3]


@pytest.mark.fast
def test_every_integer_is_one_token_as_it_appears_in_text(tok):
    for n in range(1001):
        bare, spaced = tok.encode(str(n)), tok.encode(f' {n}')
        assert len(bare) == 1 and len(spaced) == 1, n
        assert tok.encode(f'so x = {n}.')[-2:] == spaced + tok.encode('.')       # " n" after a space
        assert tok.encode(f'({n}) * ({n}*x)') == (tok.encode('(') + bare + tok.encode(') * (') + bare +
                                                  tok.encode('*x)'))              # bare after ( and before *
    assert len(tok.encode(' 1234')) == 2 and len(tok.encode(' 12345')) == 3       # pieces of at most 4 digits


@pytest.mark.fast
def test_round_trip_is_exact(tok):
    rng = random.Random(0)
    randoms = [''.join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000),
                                       rng.randrange(0x1F300, 0x1F600)])) for _ in range(rng.randint(0, 40)))
               for _ in range(300)]
    for text in TEXTS + [r['problem'] for r in ROWS] + [r['solution'] for r in ROWS] + UNICODE + randoms:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode('Rêves'))) == 'Rêves'
    assert tok.decode(tok.encode('ab') + [tok.vocab_size + 5]) == 'ab\ufffd'  # padded-vocab ids do not crash


@pytest.mark.fast
def test_training_split_agrees_with_the_encoding_split(tok):
    """Merges are learned on a Python re-split of the text; it must cut our texts where tiktoken does."""
    for text in TEXTS + UNICODE[:5]:
        segments = text.replace('<', '\0<').replace('>', '>\0').split('\0')
        pieces = [p for seg in segments if seg not in SPECIAL_TOKENS for p in _TRAIN_SPLIT.findall(seg)]
        assert ''.join(pieces) == ''.join(s for s in segments if s not in SPECIAL_TOKENS)
        assert [i for p in pieces for i in tok.enc.encode_ordinary(p)] == \
            [i for i in tok.encode(text) if i >= len(SPECIAL_TOKENS)]


@pytest.mark.fast
def test_tokens_per_text_by_op(tok):
    """Learned merges make every word of the task one token: a typical op-10 text is ~300 tokens
    (forward ~245, reverse ~380), about 4 characters per token, fewer tokens than the original's."""
    by_op = collections.defaultdict(list)
    for row, text in zip(ROWS, TEXTS):
        by_op[row['op']].append(len(tok.encode(text)))
    means = {op: statistics.mean(v) for op, v in sorted(by_op.items())}
    print('\nmean tokens per training text by op:', {op: round(m) for op, m in means.items()})
    assert 200 < means[10] < 400
    assert means[2] < means[10] < means[20]
    n_chars, n_tokens = sum(map(len, TEXTS)), sum(len(tok.encode(t)) for t in TEXTS)
    assert n_chars / n_tokens > 3.8
    for word in (' adult', ' Define', ' equals', ' number', ' total', ' Valley', ' Rêves', ' school', ' movie'):
        assert len(tok.encode(word)) == 1, word
    if os.path.exists(ORIGINAL):
        original = tokenizer.load_original_tokenizer(ORIGINAL)
        assert n_tokens < 0.8 * sum(len(original.encode(t)) for t in TEXTS)


@pytest.mark.fast
def test_save_load_and_identity(tok, tmp_path):
    path = tmp_path / 'tokenizer.json'
    tok.save(path)
    assert os.path.getsize(path) < 100_000
    back = Tokenizer.load(path)
    assert back.identity == tok.identity and back.vocab_size == tok.vocab_size
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS[:20] + UNICODE)
    d = json.loads(path.read_text())
    d['ranks'][300], d['ranks'][301] = d['ranks'][301], d['ranks'][300]  # a hand edit
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match='does not match its contents'):
        Tokenizer.load(path)
    other = train_tokenizer(TEXTS[:40])
    with pytest.raises(ValueError) as e:
        check_identity(tok.identity, other.identity, 'checkpoint out/base/ckpt.pt')
    assert tok.identity in str(e.value) and other.identity in str(e.value) and 'out/base/ckpt.pt' in str(e.value)
    check_identity(tok.identity, back.identity, 'the same tokenizer')
    # the identity covers the split regex and the specials, not only the ranks
    assert Tokenizer(tok.mergeable_ranks, tok.special_tokens, tok.pat_str + r'|\n').identity != tok.identity
    swapped = dict(tok.special_tokens, **{'[PAD]': 2, '[BOS]': 1})
    assert Tokenizer(tok.mergeable_ranks, swapped, tok.pat_str).identity != tok.identity


# --- the original tokenizer --------------------------------------------------------------------

ADVERSARIAL = (list("spLNabcxyzSPln{}()[]<>=!:-_^.,;'\"*+/\\ \t\n\r\u00a0\u3000éÿ²½0123456789±∑…→🙂") +
               ['<question>', '[EOS]', '<special_token_4>', "'re", "'s", "'t", '->', '::=', '<=>', '\\begin{x}',
                '\\p{L}', ' \\p{N}', '\\\\', ' The', ' number', ' equals', ' 123', '2*x'])


@pytest.fixture(scope='module')
def original():
    if not os.path.exists(ORIGINAL):
        pytest.skip(f'{ORIGINAL} not found')
    return tokenizer.load_original_tokenizer(ORIGINAL)


def test_original_tokenizer_encodes_exactly_like_hf(original):
    tokenizers = pytest.importorskip('tokenizers', reason='the `tokenizers` library is the reference')
    hf = tokenizers.Tokenizer.from_file(ORIGINAL)
    rng = random.Random(1)
    texts = (TEXTS + [r['problem'] for r in ROWS] + [r['solution'] for r in ROWS] + UNICODE +
             [random_text(rng, ADVERSARIAL) for _ in range(3000)] +
             [''.join(chr(rng.randrange(1, 0x2FFF)) for _ in range(20)) for _ in range(300)])
    for text in texts:
        ids = hf.encode(text).ids
        assert original.encode(text) == ids, text
        if '\\' not in text:  # the single tiktoken regex alone is exact without backslashes
            assert original.enc.encode(text, allowed_special='all') == ids, text
        assert original.decode(ids) == text
    assert original.encode_batch(texts[:50]) == [hf.encode(t).ids for t in texts[:50]]
    assert (original.vocab_size, original.eos_id, original.id_of('</answer>')) == (2201, 3, 9)
    # the quirk itself: text is cut before s, p, L, N (and a space never joins them)
    pieces = [original.decode([i]) for i in original.encode('equals Lumps')]
    assert pieces == ['equa', 'l', 's', ' ', 'L', 'u', 'm', 'ps']


@pytest.mark.fast
def test_original_tokenizer_save_load(original, tmp_path):
    original.save(tmp_path / 'orig.json')
    back = Tokenizer.load(tmp_path / 'orig.json')
    assert type(back) is type(original) and back.identity == original.identity
    for text in (TEXTS[0], 'a \\p{L}} s((x', '\\alpha((x'):
        assert back.encode(text) == original.encode(text)


# --- shards and the loader ---------------------------------------------------------------------

def docs_forever(counter):
    for text in itertools.cycle(TEXTS):
        counter[0] += 1
        yield text


def stream_of(tok, texts):
    return [i for t in texts for i in tok.encode(t) + [tok.eos_id]]


@pytest.fixture(scope='module')
def shards(tok, tmp_path_factory):
    d = str(tmp_path_factory.mktemp('shards'))
    taken = [0]
    meta = write_shards(docs_forever(taken), tok, d, token_budget=60_000, shard_tokens=7_000,
                        val_docs=TEXTS[:10], meta={'mixture': 'op2-10'}, batch_docs=16)
    return d, meta, taken[0]


@pytest.mark.fast
def test_shards_respect_the_budget_and_hold_the_documents(tok, shards):
    d, meta, taken = shards
    n = count_tokens(d, 'train')
    docs = list(itertools.islice(itertools.cycle(TEXTS), meta['splits']['train']['docs'] + 1))
    stream = stream_of(tok, docs[:-1])
    assert n == len(stream) <= 60_000 < n + len(tok.encode(docs[-1])) + 1  # whole documents up to the budget
    assert taken < meta['splits']['train']['docs'] + 2 * 16             # stopped consuming the infinite iterable
    files = meta['splits']['train']['files']
    assert [name for name, _ in files] == [f'train_{k:03d}.bin' for k in range(len(files))]
    assert all(k == 7_000 for _, k in files[:-1])
    on_disk = np.concatenate([np.fromfile(os.path.join(d, name), dtype=np.uint16) for name, _ in files])
    assert on_disk.tolist() == stream
    assert np.fromfile(os.path.join(d, 'val.bin'), dtype=np.uint16).tolist() == stream_of(tok, TEXTS[:10])
    assert count_tokens(d, 'val') == len(stream_of(tok, TEXTS[:10]))
    assert meta['tokenizer_identity'] == tok.identity and meta['meta'] == {'mixture': 'op2-10'}
    assert Tokenizer.load(os.path.join(d, 'tokenizer.json')).identity == tok.identity
    assert load_shard_meta(d) == json.loads(json.dumps(meta))
    assert not [f for f in os.listdir(d) if 'tmp' in f]


@pytest.mark.fast
def test_an_interrupted_write_never_looks_complete(tok, tmp_path):
    def dying_docs():
        yield from TEXTS[:30]
        raise KeyboardInterrupt

    d = str(tmp_path / 'data')
    write_shards(TEXTS[:20], tok, d, shard_tokens=1_000)
    with pytest.raises(KeyboardInterrupt):  # rewriting the same directory, killed half-way
        write_shards(dying_docs(), tok, d, shard_tokens=1_000, batch_docs=8)
    with pytest.raises(FileNotFoundError, match='interrupted'):
        ShardLoader(d, 'train', 2, 16)
    write_shards(TEXTS[:20], tok, d, shard_tokens=1_000)
    assert not [f for f in os.listdir(d) if 'tmp' in f]
    with open(os.path.join(d, 'train_001.bin'), 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match='train_001.bin'):
        count_tokens(d, 'train')


@pytest.mark.fast
def test_loader_yields_packed_next_token_windows(tok, shards):
    d, meta, _ = shards
    stream = np.concatenate([np.fromfile(os.path.join(d, name), dtype=np.uint16)
                             for name, _ in meta['splits']['train']['files']]).astype(np.int64)
    T = 64
    loader = ShardLoader(d, 'train', 4, T, seed=3)
    offset = loader._plan()[0]
    windows = {stream[s:s + T + 1].tobytes(): s for s in range(offset, len(stream) - T, T)}
    starts = set()
    for _ in range(40):
        x, y = next(loader)
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).numpy():  # a contiguous window at offset + k*T
            starts.add(windows[row.tobytes()])
    assert len(starts) == 160  # no window twice within an epoch
    assert any(s // 7_000 != (s + T) // 7_000 for s in starts)  # some windows span two shard files


@pytest.mark.fast
def test_loader_is_deterministic_and_reshuffles_each_epoch(shards):
    d = shards[0]
    a, b, c = (ShardLoader(d, 'train', 8, 256, seed=s) for s in (0, 0, 1))
    steps = len(a._plan()[1]) // 8  # global batches in epoch 0
    first = [next(a)[0] for _ in range(steps + 3)]
    assert all(torch.equal(x, next(b)[0]) for x in first)
    assert not torch.equal(first[0], next(c)[0])
    assert a.epoch == 1 and not torch.equal(first[0], first[steps])
    offsets = set()
    for epoch in range(5):  # each epoch also cuts the stream at other points
        a.epoch = epoch
        offsets.add(a._plan()[0])
    assert len(offsets) > 1


@pytest.mark.fast
def test_resume_mid_epoch_and_across_epochs_is_exact(shards):
    d = shards[0]
    for k in (3, 26, 33):  # 29 steps per epoch: mid-epoch, continuing across the boundary, in epoch 1
        a = ShardLoader(d, 'train', 8, 256, seed=5)
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint carries
        b = ShardLoader(d, 'train', 8, 256, seed=5)
        b.load_state_dict(state)
        for _ in range(6):
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.fast
def test_ranks_split_the_single_process_batch(shards):
    d = shards[0]
    for world in (2, 3):
        single = ShardLoader(d, 'train', 4 * world, 128, seed=7)
        ranks = [ShardLoader(d, 'train', 4, 128, rank=r, world_size=world, seed=7) for r in range(world)]
        for _ in range(40):  # more than an epoch
            x, y = next(single)
            parts = [next(r) for r in ranks]
            assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert len({r.state_dict()['pos'] for r in ranks} | {single.state_dict()['pos']}) == 1


@pytest.mark.fast
def test_loader_refuses_other_tokenizers_and_settings(tok, shards):
    d = shards[0]
    other = train_tokenizer(TEXTS[:40])
    with pytest.raises(ValueError) as e:
        ShardLoader(d, 'train', 2, 32, tokenizer_identity=other.identity)
    assert other.identity in str(e.value) and tok.identity in str(e.value)
    ShardLoader(d, 'train', 2, 32, tokenizer_identity=tok.identity)
    state = ShardLoader(d, 'train', 2, 32).state_dict()
    with pytest.raises(ValueError, match='seq_len'):
        ShardLoader(d, 'train', 2, 64).load_state_dict(state)
    with pytest.raises(ValueError, match='fewer than'):
        ShardLoader(d, 'val', 64, 256)
    with pytest.raises(ValueError, match='no .test. split'):
        ShardLoader(d, 'test', 2, 32)


def test_whole_document_windows_hold_whole_documents(tok, shards):
    """whole_docs: every window is whole consecutive documents (a window starts after an EOS, or is a
    piece of a document longer than a window), the windows tile the stream exactly once per epoch,
    padding has no targets, and resume is exact."""
    d, meta, _ = shards
    stream = np.concatenate([np.fromfile(os.path.join(d, name), dtype=np.uint16)
                             for name, _ in meta['splits']['train']['files']]).astype(np.int64)
    T, eos = 256, tok.eos_id
    loader = ShardLoader(d, 'train', 4, T, seed=3, whole_docs=True)
    w = loader._windows
    assert w[0, 0] == 0 and w[-1].sum() == len(stream) and (w[:, 1] >= 2).all() and (w[:, 1] <= T + 1).all()
    pieces = 0
    for (s0, n0), (s1, n1) in zip(w[:-1], w[1:]):
        if stream[s1 - 1] == eos:  # a window of whole documents starts where the previous one ended
            assert s1 == s0 + n0
        else:                      # a piece of a long document: after a full piece, overlapping by one
            assert n0 == T + 1 and s1 == s0 + T
            pieces += 1
    assert 0 < pieces < len(w)  # the fixture has documents longer than a window, and shorter ones
    assert any((stream[s:s + n - 1] == eos).any() for s, n in w)  # some windows hold several documents
    for _ in range(len(w) // 4):
        x, y = next(loader)
        for xi, yi in zip(x, y):
            k = int((yi != -100).sum())  # targets: the window's tokens 1..k; padding after them
            assert (yi[k:] == -100).all() and torch.equal(yi[:k - 1], xi[1:k])
    state = json.loads(json.dumps(loader.state_dict()))
    again = ShardLoader(d, 'train', 4, T, seed=3, whole_docs=True)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(loader), next(again)))
    with pytest.raises(ValueError, match='whole_docs'):
        ShardLoader(d, 'train', 4, T, seed=3).load_state_dict(state)
