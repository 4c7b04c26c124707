"""
Text to token ids, in one place (STUDY.md §3, §4). Three sections, in pipeline order:

1. Our tokenizer
     Tokenizer          a tiktoken.Encoding plus its identity (a sha1 over everything that defines it);
                        shards and checkpoints store the identity, and mixing two tokenizers is one
                        clear error (check_identity, the only place that says so)
     train_tokenizer, tokenizer_identity, check_identity, load_tokenizer (a Tokenizer, a
     tokenizer.json or a dataset directory), SPECIAL_TOKENS, PAT_STR, MAX_INT_TOKEN, N_FIXED_TOKENS,
     DEFAULT_VOCAB_SIZE
2. The original study's tokenizer (reference/paper_release/tokenizer.json), converted exactly
     load_original_tokenizer(path) -> OriginalTokenizer: the same ids as HF `tokenizers` on every text.
     Tokenizer.load reads both kinds (TOKENIZER_KINDS).
3. Token shards, the shard loader and the loss mask
     write_shards, load_shard_meta, count_tokens, SHARD_FORMAT, ShardLoader, mask_question_targets

The standard tokenizer (trained on the task world's problems) and dataset directories are data.py's;
this file knows text, not problems. It imports common.py only.
"""
import base64
import bisect
import collections
import hashlib
import json
import os
import re

import numpy as np
import tiktoken
import torch

from common import write_json


# -----------------------------------------------------------------------------
# 1. Our tokenizer (STUDY.md §3)
#
#   Tokenizer          a tiktoken.Encoding plus its identity (a sha1 over everything that defines
#                      the encoding); shards and checkpoints store the identity, and mixing two
#                      tokenizers is a clear error (check_identity).
#   train_tokenizer    byte-level BPE learned from training texts: ids 0..9 are SPECIAL_TOKENS, then
#                      the 256 bytes, then every integer 0..1000 as one token with and without a
#                      leading space ("(7)" and " 7"), then the learned merges.
# The original study's tokenizer, converted exactly, is section 2.

SPECIAL_TOKENS = ['[UNK]', '[PAD]', '[BOS]', '[EOS]', '<question>', '</question>', '<solution>', '</solution>',
                  '<answer>', '</answer>']

# Split regex (tiktoken / fancy-regex syntax): contractions, words with their leading space, numbers
# of up to 4 digits with their leading space, punctuation runs with their leading space, whitespace
# (a run before a word leaves its last space to the word). BPE merges never cross these pieces.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,4}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split with Python's `re` (no \p{..}), used only to count words when training; it agrees
# with PAT_STR on our texts (tested) and can differ on exotic characters, which only costs merges.
_TRAIN_SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,4}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
MAX_INT_TOKEN = 1000  # integers 0..MAX_INT_TOKEN are single tokens, bare and after a space
# specials + bytes + bare 10..1000 (0..9 are bytes) + " 0".." 1000": the vocabulary before any merge
N_FIXED_TOKENS = len(SPECIAL_TOKENS) + 256 + (MAX_INT_TOKEN + 1 - 10) + (MAX_INT_TOKEN + 1)
# 2258 fixed + up to 558 merges (a multiple of 64). The paper's 2200 cannot hold the 2002 integer
# tokens plus words; on the 114 reference problems training runs out of pairs seen twice at 512
# merges, by which point every word of the task is one token.
DEFAULT_VOCAB_SIZE = 2816


def tokenizer_identity(kind, pat_str, mergeable_ranks, special_tokens):
    """sha1 (hex) over everything that defines an encoding: kind, split regex, ranks, specials."""
    spec = {'kind': kind, 'pat_str': pat_str,
            'ranks': [[base64.b64encode(b).decode(), r]
                      for b, r in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])],
            'specials': sorted([s, i] for s, i in special_tokens.items())}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def check_identity(expected, got, what):
    """Raise ValueError unless the tokenizer identity `got` (read from `what`: shards, a checkpoint)
    equals `expected` (the tokenizer in use)."""
    if expected != got:
        raise ValueError(f"tokenizer mismatch: {what} was made with tokenizer {got}, but the tokenizer in use is "
                         f"{expected}. Token ids of different tokenizers mean different things: use the "
                         f"tokenizer.json that {what} was made with, or rebuild it with this tokenizer.")


class Tokenizer:
    """A tiktoken.Encoding with named special tokens and an identity. Special tokens written in the
    text ('<question>', '[EOS]', ...) are encoded as specials; decode(encode(t)) == t for every str."""
    kind = 'bpe'

    def __init__(self, mergeable_ranks: dict, special_tokens: dict, pat_str: str, name: str = 'gsm-bpe'):
        self.name, self.pat_str = name, pat_str
        self.mergeable_ranks, self.special_tokens = dict(mergeable_ranks), dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.identity = tokenizer_identity(self.kind, pat_str, self.mergeable_ranks, self.special_tokens)
        self.vocab_size = self.enc.max_token_value + 1  # ids are 0..vocab_size-1 (possibly with holes)
        self.unk_id, self.pad_id = self.id_of('[UNK]'), self.id_of('[PAD]')
        self.bos_id, self.eos_id = self.id_of('[BOS]'), self.id_of('[EOS]')

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, identity={self.identity[:12]})"

    def id_of(self, special: str) -> int:
        return self.special_tokens[special]

    def encode(self, text: str) -> list:
        return self.enc.encode(text, allowed_special='all')

    def encode_batch(self, texts, num_threads: int = 8) -> list:
        return self.enc.encode_batch(list(texts), num_threads=num_threads, allowed_special='all')

    def decode(self, ids) -> str:
        """Text of the ids (a list, array or tensor). An id outside the vocabulary (e.g. sampled from a
        model whose embedding is padded past vocab_size) decodes to U+FFFD instead of raising."""
        ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
        try:
            return self.enc.decode(ids)
        except KeyError:
            valid = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
            parts = [self.enc.decode_single_token_bytes(i) if i in valid else '\ufffd'.encode() for i in ids]
            return b''.join(parts).decode('utf-8', errors='replace')

    def to_dict(self) -> dict:
        return {'format': 'gsm-tokenizer-v1', 'kind': self.kind, 'name': self.name, 'identity': self.identity,
                'pat_str': self.pat_str, 'special_tokens': self.special_tokens,
                'ranks': [base64.b64encode(b).decode() for b, _ in sorted(self.mergeable_ranks.items(),
                                                                          key=lambda kv: kv[1])],
                'rank_ids': sorted(self.mergeable_ranks.values())}

    def save(self, path):
        """Atomic write of the JSON form."""
        write_json(self.to_dict(), path, indent=None)

    @classmethod
    def load(cls, path):
        """Load a tokenizer saved by save(); the stored identity is checked against the contents."""
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
        if d.get('format') != 'gsm-tokenizer-v1':
            raise ValueError(f"{path}: not a tokenizer saved by Tokenizer.save (format {d.get('format')!r})")
        ranks = {base64.b64decode(b): r for b, r in zip(d['ranks'], d['rank_ids'])}
        kind = TOKENIZER_KINDS.get(d['kind'])
        if kind is None:
            raise ValueError(f"{path}: unknown tokenizer kind {d['kind']!r}")
        tok = kind(ranks, d['special_tokens'], d['pat_str'], name=d['name'])
        if tok.identity != d['identity']:
            raise ValueError(f"{path}: stored identity {d['identity']} does not match its contents "
                             f"({tok.identity}); the file was edited or is corrupt")
        return tok


def _learn_merges(word_counts: dict, n_new: int, known: set, min_count: int = 2) -> list:
    """Byte-pair merges over a word-frequency table ({word bytes: count}), most frequent pair first
    (ties: smallest pair), until n_new new tokens exist or no pair occurs min_count times. Returns the
    new tokens (bytes) in merge order. Pair counts are updated only for the words a merge touches, so
    a corpus of a few hundred distinct words trains in well under a second."""
    words = [[bytes([b]) for b in w] for w in word_counts]
    freq = list(word_counts.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)

    def count(i, sign):
        w = words[i]
        for p in zip(w, w[1:]):
            pairs[p] += sign * freq[i]
            if sign > 0:
                where[p].add(i)
            elif pairs[p] == 0:
                del pairs[p]

    for i in range(len(words)):
        count(i, +1)
    new = []
    while len(new) < n_new and pairs:
        (a, b), c = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < min_count:
            break
        if a + b not in known:  # the same bytes can be reached by two different pairs
            new.append(a + b)
            known.add(a + b)
        for i in where.pop((a, b)):
            w = words[i]
            if len(w) < 2:
                continue
            count(i, -1)
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            count(i, +1)
    return new


def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE, name: str = 'gsm-bpe') -> Tokenizer:
    """Byte-level BPE on `texts` (training_text strings). Ids: SPECIAL_TOKENS 0..9, bytes 10..265, the
    integers (bare 10..1000, then " 0".." 1000"), then learned merges up to vocab_size entries (fewer
    if the corpus runs out of pairs seen twice). Digits are never merged with anything else, so every
    integer 0..1000 is one token whether or not a space precedes it."""
    if vocab_size < N_FIXED_TOKENS:
        raise ValueError(f"vocab_size={vocab_size} is too small: specials, bytes and the integers 0..{MAX_INT_TOKEN} "
                         f"(bare and after a space) alone take {N_FIXED_TOKENS} entries")
    specials = re.compile('|'.join(map(re.escape, SPECIAL_TOKENS)))
    counts = collections.Counter()
    for text in texts:
        for part in specials.split(text):
            counts.update(_TRAIN_SPLIT.findall(part))
    words = {w.encode(): c for w, c in counts.items() if not any(ch.isdigit() for ch in w)}
    ranks = {}
    for tok in ([bytes([b]) for b in range(256)] + [str(n).encode() for n in range(10, MAX_INT_TOKEN + 1)] +
                [b' ' + str(n).encode() for n in range(MAX_INT_TOKEN + 1)]):
        ranks[tok] = len(SPECIAL_TOKENS) + len(ranks)
    for tok in _learn_merges(words, vocab_size - N_FIXED_TOKENS, known=set(ranks)):
        ranks[tok] = len(SPECIAL_TOKENS) + len(ranks)
    return Tokenizer(ranks, {s: i for i, s in enumerate(SPECIAL_TOKENS)}, PAT_STR, name=name)


def load_tokenizer(tok) -> Tokenizer:
    """A Tokenizer as given, or the one a tokenizer.json path or a dataset directory holds (either
    kind: ours or the original study's)."""
    if isinstance(tok, Tokenizer):
        return tok
    path = os.path.join(tok, 'tokenizer.json') if os.path.isdir(tok) else tok
    if not os.path.exists(path):
        raise FileNotFoundError(f'tokenizer {tok!r} not found: give a tokenizer.json or a dataset directory')
    return Tokenizer.load(path)


# -----------------------------------------------------------------------------
# 2. The original study's tokenizer (reference/paper_release/tokenizer.json), as a tiktoken Encoding
#
# It is an HF byte-level BPE whose pre-tokenizer is Split(regex, "Isolated") followed by
# ByteLevel(use_regex=True), which re-splits every piece with the GPT-2 regex. The Split regex was
# double-escaped when written: '\\p{L}' is a backslash, 'p' and '{L}', '\\s' a backslash and 's'.
# Read the way Oniguruma reads it (alternatives tried in order at each position):
#   - '\\[A-Za-z]+' and '\\.' take a backslash and what follows; every other alternative that starts
#     with a backslash ('\\begin..', '\\to', '\\p{N}..', '\\s+') is shadowed by those two;
#   - '<=' '>=' '!=' ':=' '->' '=>' '::=' '==', the math symbols, '_' '^', '(' ')' '{' '}' '\' and
#     '-' are one piece each ('[{}()\\[\\]]' holds no brackets: Oniguruma reads '[\\]' as a nested
#     class; '->>' and '<=>' are shadowed by '->' and '<=');
#   - ' ?[^\\s\\p{L}\\p{N}]+' was meant as "punctuation"; as written it is "a run of anything but the
#     characters \ s p { L } N", so ordinary text is cut before every s, p, L, N, { and };
#   - nothing matches at s, p, L or N: a run of them is left over and becomes a piece of its own;
#   - ' ?\\p{L}+' matches a space, a backslash, 'p{L' and closing braces.
# So " equals 2." is split " equal" "s" " 2." and then GPT-2-split into " equal" "s" " 2" ".". (Its
# vocabulary also lacks " number" and " of", which it spells letter by letter: on the reference
# problems it needs 1.7x the tokens of our tokenizer.)
#
# ORIGINAL_PAT_STR below composes both splits into one regex, exact for every text without
# a backslash (all of ours). Backslash pieces depend on unbounded context (is this backslash itself
# escaped?), so text containing one is split in Python exactly as the original does (_ORIG_SPLIT),
# then GPT-2-split and BPE-merged by tiktoken. The HF BPE merges pairs in merge-list order; its
# vocab ids follow that order, so the ids serve as tiktoken ranks (checked on load).

ORIGINAL_TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference', 'paper_release',
                                       'tokenizer.json')
_ORIG_MATH = '±≈≅≃≡∼∝∞√∑∏∫∮∇∂∆∈∉⊂⊆⊄⊇⊃∩∪∧∨¬⇒⇔←→↦⟶⟨⟩⋯…'
# the Split regex exactly as the original's tokenizer.json holds it (after JSON unescaping)
_ORIG_HF_REGEX = '|'.join([
    r'\\[A-Za-z]+', r'\\.', r'\\begin\s*\{[A-Za-z*]+\}', r'\\end\s*\{[A-Za-z*]+\}', '<=', '>=', '!=', ':=', '->',
    '->>', '=>', '<=>', '::=', '==', r'\\to', r'\\mapsto', r'\\implies', r'\\iff', f'[{_ORIG_MATH}]', '[_^]',
    r'[{}()\\[\\]]', r'(?<![\\p{L}\\p{N}])\\p{N}{1,3}(?:[_,]\\p{N}{1,3})*(?:\\.\\p{N}+)?(?:[eE][+-]?\\p{N}+)?',
    '-', r' ?\\p{L}+', r' ?[^\\s\\p{L}\\p{N}]+', r'\\s+(?!\\S)', r'\\s+'])
# the same regex in Python `re` syntax, alternative for alternative, with Oniguruma's reading
_ORIG_SPLIT = re.compile('|'.join([
    r'\\[A-Za-z]+', r'\\.', r'\\begin\s*\{[A-Za-z*]+\}', r'\\end\s*\{[A-Za-z*]+\}', '<=', '>=', '!=', ':=', '->',
    '->>', '=>', '<=>', '::=', '==', r'\\to', r'\\mapsto', r'\\implies', r'\\iff', f'[{_ORIG_MATH}]', '[_^]',
    r'[{}()\\]', r'(?<![\\p{L}N])\\p\{N\}{1,3}(?:[_,]\\p\{N\}{1,3})*(?:\\.\\p\{N\}+)?(?:[eE][+-]?\\p\{N\}+)?',
    '-', r' ?\\p\{L\}+', r' ?[^\\spL{}N]+', r'\\s+(?!\\S)', r'\\s+']))
# HF ByteLevel's own regex (= GPT-2's), applied to every piece of the Split
_GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Both splits composed (tiktoken syntax). A position starts a Split piece at the start of the text,
# after s p L N { } \, or between two punctuation characters (inside a run the GPT-2 punctuation
# alternative is greedy, so a token can only end between two of them where a piece ended).
_ORIG_PIECE_START = r"(?:^|(?<=[spLN{}\\])|(?<=[^\s\p{L}\p{N}])(?=[^\s\p{L}\p{N}]))"
ORIGINAL_PAT_STR = '|'.join([
    r'[spLN]+',                                   # the letters the Split never matches
    r'[{}\\]',                                    # always a piece of their own
    _ORIG_PIECE_START + rf'(?:<=|>=|!=|:=|->|=>|::=|==|[{_ORIG_MATH}]|[_^()]|-)',  # one-piece operators
    r"'(?:t|re|ve|m|ll|d)",                       # GPT-2's contractions ('s cannot happen: s ends a run)
    r' ?[^\P{L}spLN]+',                           # GPT-2's alternatives, cut where a Split run ends
    r' ?\p{N}+',
    r' ?[^\s\p{L}\p{N}{}\\]+',
    r'\s+(?![^\s{}\\spLN])',
    r'\s+',
])


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map used by HF byte-level BPE vocabularies."""
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_isolated(regex, text):
    """HF Split(behavior='Isolated'): the matches and the text between them, in order."""
    pieces, pos = [], 0
    for m in regex.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        pieces.append(m.group())
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


class OriginalTokenizer(Tokenizer):
    """The original study's tokenizer (see load_original_tokenizer). Its vocab_size is 2201: the added
    token '<special_token_4>' has id 2200, one past the released model's 2200 embeddings."""
    kind = 'hf-original'

    def __init__(self, mergeable_ranks, special_tokens, pat_str=ORIGINAL_PAT_STR, name='paper-release'):
        super().__init__(mergeable_ranks, special_tokens, pat_str, name=name)
        self._gpt2 = tiktoken.Encoding(name + '-gpt2', pat_str=_GPT2_PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                       special_tokens={})
        self._specials = re.compile('|'.join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))))

    def encode(self, text: str) -> list:
        if '\\' not in text:
            return super().encode(text)
        ids, pos = [], 0
        for m in self._specials.finditer(text):  # added tokens are cut out first, as HF does
            ids += self._encode_exact(text[pos:m.start()]) + [self.special_tokens[m.group()]]
            pos = m.end()
        return ids + self._encode_exact(text[pos:])

    def _encode_exact(self, text):
        return [i for piece in _split_isolated(_ORIG_SPLIT, text) for i in self._gpt2.encode_ordinary(piece)]

    def encode_batch(self, texts, num_threads: int = 8) -> list:
        texts = list(texts)
        if any('\\' in t for t in texts):
            return [self.encode(t) for t in texts]
        return super().encode_batch(texts, num_threads)


def load_original_tokenizer(path: str = ORIGINAL_TOKENIZER_PATH) -> Tokenizer:
    """The original HF tokenizer.json as an OriginalTokenizer: same ids as `tokenizers` on every text
    (quirky split included), lossless decode. Refuses a file whose model or pre-tokenizer differ from
    what this conversion was written for."""
    with open(path, encoding='utf-8') as f:
        hf = json.load(f)
    bpe, pre = hf['model'], hf.get('pre_tokenizer') or {}
    steps = pre.get('pretokenizers', [])
    if (bpe.get('type') != 'BPE' or bpe.get('byte_fallback') or bpe.get('continuing_subword_prefix') or
            bpe.get('end_of_word_suffix') or hf.get('normalizer') is not None or len(steps) != 2 or
            steps[0].get('type') != 'Split' or steps[0]['pattern'].get('Regex') != _ORIG_HF_REGEX or
            steps[0].get('behavior') != 'Isolated' or steps[0].get('invert') or steps[1].get('type') != 'ByteLevel' or
            steps[1].get('add_prefix_space') or not steps[1].get('use_regex')):
        raise ValueError(f"{path}: not the original study's tokenizer (model / pre-tokenizer differ); "
                         f"this converter translates exactly that one")
    u2b = {u: b for b, u in _bytes_to_unicode().items()}
    specials = {t['content']: t['id'] for t in hf['added_tokens']}
    vocab = bpe['vocab']
    ranks = {bytes(u2b[ch] for ch in tok): i for tok, i in vocab.items() if tok not in specials}
    merges = [m.split(' ') if isinstance(m, str) else m for m in bpe['merges']]
    ids = [vocab[a + b] for a, b in merges]
    singles = [i for tok, i in ranks.items() if len(tok) == 1]
    if len(singles) != 256 or ids != sorted(ids) or len(ranks) != 256 + len(merges) or max(singles) > min(ids):
        raise ValueError(f"{path}: vocab ids do not follow the merge order, so they cannot serve as tiktoken ranks")
    return OriginalTokenizer(ranks, specials, ORIGINAL_PAT_STR)


TOKENIZER_KINDS = {Tokenizer.kind: Tokenizer, OriginalTokenizer.kind: OriginalTokenizer}  # for Tokenizer.load


# -----------------------------------------------------------------------------
# 3. Token shards, the shard loader and the loss mask (STUDY.md §4)
#
# Token shards: {dir}/train_000.bin ... (uint16, one flat stream of documents, each encode(text) +
# [EOS]), val.bin, tokenizer.json and meta.json. meta.json is written last and lists every file with
# its token count, so a directory without it (or with a file of another size) is incomplete.
# ShardLoader yields packed (x, y) windows in a deterministic order per seed and epoch, a disjoint
# share per DDP rank, with state_dict()/load_state_dict() for exact resume mid-epoch.

SHARD_FORMAT = 'gsm-shards-v1'


class _SplitWriter:
    """Appends uint16 tokens to {prefix}_000.bin, {prefix}_001.bin, ... (shard_tokens each), or to
    {prefix}.bin when shard_tokens is None; each file is written as .tmp and renamed when complete."""

    def __init__(self, out_dir, prefix, shard_tokens):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.files, self.f, self.n = [], None, 0  # files: [name, tokens] of the completed files

    def _name(self):
        return f"{self.prefix}.bin" if self.shard_tokens is None else f"{self.prefix}_{len(self.files):03d}.bin"

    def write(self, tokens):
        while len(tokens):
            if self.f is None:
                self.f, self.n = open(os.path.join(self.out_dir, self._name() + '.tmp'), 'wb'), 0
            room = len(tokens) if self.shard_tokens is None else self.shard_tokens - self.n
            self.f.write(tokens[:room].tobytes())
            self.n += min(room, len(tokens))
            tokens = tokens[room:]
            if self.shard_tokens is not None and self.n == self.shard_tokens:
                self._finish()

    def _finish(self):
        name = self._name()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(os.path.join(self.out_dir, name + '.tmp'), os.path.join(self.out_dir, name))
        self.files.append([name, self.n])
        self.f = None

    def abort(self):
        if self.f is not None:
            self.f.close()
            os.remove(os.path.join(self.out_dir, self._name() + '.tmp'))
            self.f = None

    def close(self):
        if self.f is not None or not self.files:  # an empty split still gets one (empty) file
            if self.f is None:
                self.f, self.n = open(os.path.join(self.out_dir, self._name() + '.tmp'), 'wb'), 0
            self._finish()
        return self.files


def _write_split(docs, tokenizer, out_dir, prefix, token_budget, shard_tokens, batch_docs):
    writer = _SplitWriter(out_dir, prefix, shard_tokens)
    n_tokens, n_docs, full = 0, 0, False
    docs = iter(docs)
    try:
        while not full:
            batch = [d for _, d in zip(range(batch_docs), docs)]
            if not batch:
                break
            out = []
            for ids in tokenizer.encode_batch(batch):
                if token_budget is not None and n_tokens + len(ids) + 1 > token_budget:
                    full = True  # whole documents only: the next one would pass the budget
                    break
                out += ids
                out.append(tokenizer.eos_id)
                n_tokens, n_docs = n_tokens + len(ids) + 1, n_docs + 1
            writer.write(np.array(out, dtype=np.uint16))
    except BaseException:
        writer.abort()
        raise
    return {'tokens': n_tokens, 'docs': n_docs, 'files': writer.close()}


def write_shards(docs, tokenizer, out_dir, token_budget=None, shard_tokens=100_000_000, val_docs=None, meta=None,
                 batch_docs=1024) -> dict:
    """Tokenize documents (texts) into out_dir: train shards of shard_tokens tokens, val.bin from
    val_docs, tokenizer.json and meta.json (written last). Stops taking documents when the next one
    would pass token_budget (so the train split holds at most token_budget tokens, whole documents);
    with no budget it consumes all of `docs`. `meta` (e.g. the mixture spec) is stored under
    meta.json's 'meta'. Returns the meta.json contents."""
    if tokenizer.vocab_size > 65536:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16 shards")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):  # from here on the directory is incomplete until the new meta.json lands
        os.remove(meta_path)
    splits = {'train': _write_split(docs, tokenizer, out_dir, 'train', token_budget, shard_tokens, batch_docs)}
    if val_docs is not None:
        splits['val'] = _write_split(val_docs, tokenizer, out_dir, 'val', None, None, batch_docs)
    tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
    keep = {name for s in splits.values() for name, _ in s['files']}
    for name in os.listdir(out_dir):  # shards of an earlier, larger write, and leftovers of a killed one
        if re.fullmatch(r'(train_\d+|val)\.bin(\.tmp)?', name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    info = {'format': SHARD_FORMAT, 'tokenizer_identity': tokenizer.identity, 'tokenizer_name': tokenizer.name,
            'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id, 'dtype': 'uint16',
            'token_budget': token_budget, 'shard_tokens': shard_tokens, 'splits': splits, 'meta': meta or {}}
    write_json(info, meta_path)
    return info


def load_shard_meta(dir) -> dict:
    """meta.json of a complete shard directory; raises if it is missing or a listed file has another size."""
    path = os.path.join(dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {dir} is not a complete token-shard directory "
                                f"(never built, or its writer was interrupted)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get('format') != SHARD_FORMAT:
        raise ValueError(f"{path}: unknown shard format {meta.get('format')!r}")
    for split in meta['splits'].values():
        for name, n in split['files']:
            fp = os.path.join(dir, name)
            if not os.path.exists(fp) or os.path.getsize(fp) != 2 * n:
                raise ValueError(f"{fp}: missing or not {n} tokens as meta.json says; rebuild {dir}")
    return meta


def count_tokens(dir, split='train') -> int:
    """Tokens in a split of a shard directory (documents and their EOS tokens)."""
    return load_shard_meta(dir)['splits'][split]['tokens']


class ShardLoader:
    """Packed next-token batches from a shard directory: x, y = int64 tensors [batch_size, seq_len],
    y[:, t] = x[:, t + 1] (windows of seq_len + 1 consecutive tokens of the split's stream; documents
    are packed and separated by EOS, and a window may span documents and shard files).

    An epoch cuts the stream into windows at offset + k * seq_len (offset random in [0, seq_len))
    and visits them in a random order; both come from (seed, epoch), so every epoch differs and every
    run with the same seed is identical. A global step takes the next batch_size * world_size windows
    of that order and rank r gets rows [r * batch_size, (r + 1) * batch_size): the union over ranks is
    exactly the batch one process with batch_size * world_size sees at the same step. The incomplete
    last global batch of an epoch is skipped. Iterating never ends (epochs roll over).

    state_dict() is the same on every rank (epoch and global position), so any rank's state resumes
    any rank, and also a run with another batch_size / world_size (at the same window position).

    whole_docs=True packs whole documents instead: each window holds consecutive documents of the
    stream that fit in seq_len + 1 tokens (a longer document is cut into pieces of its own), the rest
    of the row is PAD with target -100, and the windows are visited in a random order per epoch. No
    problem is cut from its question, so short windows (cheap attention) lose nothing but padding."""

    def __init__(self, dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, tokenizer_identity=None,
                 whole_docs=False):
        meta = load_shard_meta(dir)
        if tokenizer_identity is not None:
            check_identity(tokenizer_identity, meta['tokenizer_identity'], f"the token shards in {dir}")
        if split not in meta['splits']:
            raise ValueError(f"{dir} has no {split!r} split (has {sorted(meta['splits'])})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dir, self.split, self.seed = dir, split, seed
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.tokenizer_identity = meta['tokenizer_identity']
        self._shards = [np.memmap(os.path.join(dir, name), dtype=np.uint16, mode='r')
                        for name, n in meta['splits'][split]['files'] if n > 0]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.n_tokens = self._starts[-1]
        need = (batch_size * world_size + 1) * seq_len
        if self.n_tokens < need:
            raise ValueError(f"the {split} split of {dir} has {self.n_tokens:,} tokens, fewer than the {need:,} "
                             f"one global batch of {batch_size} x {world_size} windows of {seq_len} needs")
        self.epoch, self.pos = 0, 0  # pos: windows of this epoch's order already handed out (all ranks)
        self._plan_epoch = None
        self.whole_docs, self._eos = whole_docs, int(meta['eos_id'])
        self._windows = self._doc_windows() if whole_docs else None
        if whole_docs and len(self._windows) < batch_size * world_size:
            raise ValueError(f"the {split} split of {dir} has {len(self._windows):,} whole-document windows of "
                             f"{seq_len} tokens, fewer than one global batch of {batch_size} x {world_size}")

    def _doc_windows(self):
        """[n, 2] (start, length) of the whole-document windows, greedily in stream order: consecutive
        documents while they fit in seq_len + 1 tokens; a document longer than that in pieces."""
        cap = self.seq_len + 1
        ends = np.concatenate([np.flatnonzero(np.asarray(sh) == self._eos) + st + 1
                               for sh, st in zip(self._shards, self._starts)]).tolist()
        if not ends or ends[-1] < self.n_tokens:    # an unterminated tail is a document too
            ends.append(self.n_tokens)
        windows, start, w_start = [], 0, 0          # w_start: where the window being filled begins
        for end in ends:
            if end - w_start > cap:                 # this document does not fit: close the window
                if start > w_start:
                    windows.append((w_start, start - w_start))
                w_start = start
                while end - w_start > cap:          # a document longer than a window, in pieces that
                    windows.append((w_start, cap))  # overlap by one token, so every token is a target once
                    w_start += cap - 1
            start = end
        if start > w_start:
            windows.append((w_start, start - w_start))
        return np.array(windows, dtype=np.int64)

    def windows_per_epoch(self) -> int:
        """How many windows one epoch visits (at most; packed epochs start at a random offset)."""
        return len(self._windows) if self.whole_docs else (self.n_tokens - 1) // self.seq_len

    def _plan(self):
        """(offset, window order) of the current epoch, from (seed, epoch) only."""
        if self._plan_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.whole_docs:
                offset, n_windows = 0, len(self._windows)
            else:
                offset = int(rng.integers(self.seq_len))
                n_windows = (self.n_tokens - 1 - offset) // self.seq_len
            self._offset, self._order = offset, rng.permutation(n_windows)
            self._plan_epoch = self.epoch
        return self._offset, self._order

    def _read(self, start, n):
        k = bisect.bisect_right(self._starts, start) - 1
        lo = start - self._starts[k]
        out = self._shards[k][lo:lo + n]
        while len(out) < n:  # the window continues into the next file
            k += 1
            out = np.concatenate([out, self._shards[k][:n - len(out)]])
        return out

    def __iter__(self):
        return self

    def __next__(self):
        gb = self.batch_size * self.world_size
        offset, order = self._plan()
        if self.pos + gb > len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            offset, order = self._plan()
        rows = order[self.pos + self.rank * self.batch_size:self.pos + (self.rank + 1) * self.batch_size]
        self.pos += gb
        buf = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        if not self.whole_docs:
            for i, w in enumerate(rows):
                buf[i] = self._read(offset + int(w) * self.seq_len, self.seq_len + 1)
            buf = torch.from_numpy(buf)
            return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        buf.fill(self._eos)                          # padding: EOS inputs (never attended), no targets
        lens = np.empty(self.batch_size, dtype=np.int64)
        for i, w in enumerate(rows):
            start, n = (int(v) for v in self._windows[w])
            buf[i, :n], lens[i] = self._read(start, n), n
        buf = torch.from_numpy(buf)
        y = buf[:, 1:].clone()
        y[torch.arange(self.seq_len)[None, :] >= torch.from_numpy(lens)[:, None] - 1] = -100
        return buf[:, :-1].contiguous(), y

    def state_dict(self) -> dict:
        return {'split': self.split, 'seq_len': self.seq_len, 'seed': self.seed, 'n_tokens': self.n_tokens,
                'whole_docs': self.whole_docs,
                'tokenizer_identity': self.tokenizer_identity, 'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state: dict):
        """Continue where `state` left off. The data (tokens, tokenizer), split, seq_len and seed must be
        the ones the state was taken with; batch_size and world_size may differ."""
        check_identity(self.tokenizer_identity, state['tokenizer_identity'], 'the data-loader state')
        state = {'whole_docs': False, **state}       # states written before whole_docs existed
        for key in ('split', 'seq_len', 'seed', 'n_tokens', 'whole_docs'):
            if state[key] != getattr(self, key):
                raise ValueError(f"data-loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}; exact resume needs the same data and settings")
        self.epoch, self.pos = int(state['epoch']), int(state['pos'])


def mask_question_targets(x, y, tokenizer):
    """y with -100 wherever the target token is part of a question (<question> ... </question>, tags
    included), so the loss covers only solutions and answers. x, y: a ShardLoader batch (y = x shifted
    by one); a window that starts inside a question is recognised by its first tag being a close, and
    a window with no tag at all (shorter than one question or solution) is masked whole: what it
    holds cannot be told from the window alone."""
    s = torch.cat([x[:, :1], y], 1)  # the whole window: s[:, t + 1] = y[:, t]
    opens = (s == tokenizer.id_of('<question>')).long()
    closes = (s == tokenizer.id_of('</question>')).long()
    marks = opens - closes                               # +1 open tag, -1 close tag, 0 other
    first = marks.gather(1, (marks != 0).long().argmax(1, keepdim=True))  # first tag's sign (0: none)
    inside = opens.cumsum(1) - (closes.cumsum(1) - closes) + (first < 0).long() > 0
    inside |= (marks == 0).all(1, keepdim=True)
    return y.masked_fill(inside[:, 1:], -100)
