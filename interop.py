"""
Interop with the original study and the Hugging Face ecosystem.

1. The original study's tokenizer (reference/paper_release/tokenizer.json), converted exactly into
   a tiktoken-backed data.Tokenizer: the same ids as HF `tokenizers` on every text.
       load_original_tokenizer(path)          -> OriginalTokenizer
2. Hugging Face Qwen2 checkpoints. Our parameter names are HF's minus the `model.` prefix, so
   import and export are a rename (optional dependency: safetensors; tests compare with transformers).
       hf_config_dict / config_from_hf        ModelConfig <-> config.json
       to_hf_state_dict / from_hf_state_dict  state dicts
       load_hf_qwen2(dir)                     an HF directory -> our Qwen2 (fp32)
       export_hf(model, dir)                  our model -> config.json + model.safetensors
       import_hf(hf_dir, out_dir)             an HF directory -> a run directory (ckpt.pt + tokenizer.json)
3. Commands:
    python interop.py import_hf --hf_dir=path/to/released_model --out=out/released [--tokenizer=tokenizer.json]
    python interop.py export_hf --ckpt=out/tiny_base --out=out/tiny_base_hf
"""
import json
import os
import re

import tiktoken
import torch
import torch.nn as nn

import data
import model as M

# -----------------------------------------------------------------------------
# 1. The original study's tokenizer (reference/paper_release/tokenizer.json), as a tiktoken Encoding
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

ORIGINAL_TOKENIZER_PATH = os.path.join(data.REFERENCE_DIR, 'paper_release', 'tokenizer.json')
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


class OriginalTokenizer(data.Tokenizer):
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


def load_original_tokenizer(path: str = ORIGINAL_TOKENIZER_PATH) -> data.Tokenizer:
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


# -----------------------------------------------------------------------------
# 2. Hugging Face Qwen2 checkpoints (optional dependency: safetensors)

def hf_config_dict(cfg: M.ModelConfig) -> dict:
    """A transformers Qwen2 config.json for this model (fields as in reference/paper_release)."""
    return {
        'architectures': ['Qwen2ForCausalLM'], 'model_type': 'qwen2', 'hidden_act': 'silu',
        'attention_dropout': 0.0, 'initializer_range': cfg.initializer_range,
        'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size, 'intermediate_size': cfg.intermediate_size,
        'num_hidden_layers': cfg.n_layer, 'num_attention_heads': cfg.n_head,
        'num_key_value_heads': cfg.n_kv_head, 'max_position_embeddings': cfg.max_seq_len,
        'rms_norm_eps': cfg.rms_eps, 'rope_theta': cfg.rope_theta, 'tie_word_embeddings': cfg.tie_embeddings,
        'use_sliding_window': False, 'sliding_window': None, 'max_window_layers': cfg.n_layer,
        'use_cache': True, 'torch_dtype': 'float32', 'bos_token_id': 2, 'eos_token_id': 3,
    }


def config_from_hf(hf: dict) -> M.ModelConfig:
    if hf.get('model_type', 'qwen2') != 'qwen2':
        raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
    if hf.get('use_sliding_window'):
        raise ValueError("sliding-window attention is not implemented (use_sliding_window=true)")
    rope_theta = hf.get('rope_theta') or (hf.get('rope_parameters') or {}).get('rope_theta', 1e6)
    return M.ModelConfig(vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], n_layer=hf['num_hidden_layers'],
                       n_head=hf['num_attention_heads'],
                       n_kv_head=hf.get('num_key_value_heads', hf['num_attention_heads']),
                       intermediate_size=hf['intermediate_size'], max_seq_len=hf['max_position_embeddings'],
                       rope_theta=float(rope_theta), rms_eps=float(hf['rms_norm_eps']),
                       tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
                       initializer_range=float(hf.get('initializer_range', 0.02)))


def to_hf_state_dict(model: nn.Module) -> dict:
    """Our names are HF's minus the `model.` prefix (lm_head stays at the top)."""
    sd = M.clean_state_dict(M.unwrap(model).state_dict())
    return {(k if k.startswith('lm_head.') else 'model.' + k): v for k, v in sd.items()}


def from_hf_state_dict(sd: dict, cfg: M.ModelConfig) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith('rotary_emb.inv_freq'):
            continue  # a buffer older transformers versions saved; we recompute it
        out[k[len('model.'):] if k.startswith('model.') else k] = v
    if cfg.tie_embeddings:
        out['lm_head.weight'] = out['embed_tokens.weight']
    return out


def load_hf_qwen2(path, device='cpu') -> M.Qwen2:
    """Load a Hugging Face Qwen2 directory (config.json + model.safetensors, sharded safetensors,
    or pytorch_model.bin) into our Qwen2, in fp32."""
    with open(os.path.join(path, 'config.json')) as f:
        cfg = config_from_hf(json.load(f))
    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith('.safetensors')]
    sd = {}
    if st:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("load_hf_qwen2 needs `safetensors` to read *.safetensors: pip install safetensors")
        for f in st:
            sd.update(load_file(os.path.join(path, f)))
    elif 'pytorch_model.bin' in files:
        sd = torch.load(os.path.join(path, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    model = M.Qwen2(cfg)
    model.load_state_dict({k: v.float() for k, v in from_hf_state_dict(sd, cfg).items()})
    return model.to(device)


def export_hf(model: nn.Module, path, dtype=torch.float32, tokenizer_files: dict | None = None):
    """Write config.json + model.safetensors that transformers.AutoModelForCausalLM (and vLLM) load.
    Tied lm_head is written once (as HF does). tokenizer_files: optional {name: text} to copy
    alongside (e.g. tokenizer.json)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("export_hf needs `safetensors`: pip install safetensors")
    m = M.unwrap(model)
    os.makedirs(path, exist_ok=True)
    sd = to_hf_state_dict(m)
    if m.config.tie_embeddings:
        sd.pop('lm_head.weight', None)
    sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in sd.items()}
    save_file(sd, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    hf = hf_config_dict(m.config)
    hf['torch_dtype'] = str(dtype).replace('torch.', '')
    M.write_json(hf, os.path.join(path, 'config.json'), indent=2)
    for name, text in (tokenizer_files or {}).items():
        with open(os.path.join(path, name), 'w') as f:
            f.write(text)


def import_hf(hf_dir, out_dir, tokenizer_json=None) -> str:
    """Turn a Hugging Face Qwen2 directory (a released checkpoint of the original study, or one made
    by export_hf) into a run directory every stage reads: out_dir/ckpt.pt + out_dir/tokenizer.json.
    The tokenizer is the directory's HF tokenizer.json (or `tokenizer_json`) converted exactly to
    tiktoken (load_original_tokenizer). Returns the checkpoint path."""
    tok_path = tokenizer_json or os.path.join(hf_dir, 'tokenizer.json')
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} not found: pass the HF tokenizer.json with --tokenizer= "
                                f"(the original study's is reference/paper_release/tokenizer.json)")
    tok = load_original_tokenizer(tok_path)
    m = load_hf_qwen2(hf_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, 'tokenizer.json'))
    path = os.path.join(out_dir, 'ckpt.pt')
    M.save_checkpoint(path, m, run_config={'source': os.path.abspath(hf_dir), 'data_dir': ''},
                    tokenizer_identity=tok.identity, step=0)
    return path


# -----------------------------------------------------------------------------
# 3. Command line

IMPORT_DEFAULTS = dict(
    hf_dir='',           # a Hugging Face Qwen2 directory: config.json, weights, tokenizer.json (required)
    out='',              # the run directory to write: ckpt.pt + tokenizer.json (required)
    tokenizer='',        # the HF tokenizer.json, if it is not in hf_dir
)
EXPORT_DEFAULTS = dict(
    ckpt='',             # a run directory or its ckpt.pt (required)
    out='',              # the Hugging Face directory to write (required)
)


def _import_main(argv):
    a = M.configure(IMPORT_DEFAULTS, argv, presets=False)
    if not (a.hf_dir and a.out):
        raise M.UsageError('import_hf needs --hf_dir=DIR --out=RUN_DIR [--tokenizer=tokenizer.json]')
    try:
        print('wrote', import_hf(a.hf_dir, a.out, a.tokenizer or None))
    except (FileNotFoundError, ValueError) as e:
        raise M.UsageError(str(e)) from None


def _export_main(argv):
    a = M.configure(EXPORT_DEFAULTS, argv, presets=False)
    if not (a.ckpt and a.out):
        raise M.UsageError('export_hf needs --ckpt=RUN_DIR_OR_CKPT --out=DIR')
    ck_path = M.resolve_ckpt(a.ckpt)
    ck = M.load_checkpoint(ck_path)
    tok_file = os.path.join(os.path.dirname(ck_path), 'tokenizer.json')
    export_hf(ck['model'], a.out)
    print(f"wrote {a.out}/config.json and model.safetensors"
          + (f" (our tokenizer stays in {tok_file}: it is a tiktoken BPE, not an HF tokenizer)"
             if os.path.exists(tok_file) else ''))


COMMANDS = {'import_hf': _import_main, 'export_hf': _export_main}



if __name__ == '__main__':
    M.cli('interop.py', COMMANDS)  # one usage line lists the commands
