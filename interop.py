"""
Interop with the Hugging Face ecosystem: Qwen2 checkpoints in and out. Our parameter names are HF's
minus the `model.` prefix, so import and export are a rename (optional dependency: safetensors; tests
compare with transformers). The original study's tokenizer, which import_hf converts, is tokenizer.py's
(load_original_tokenizer).

1. Hugging Face Qwen2 checkpoints
       hf_config_dict / config_from_hf        ModelConfig <-> config.json
       to_hf_state_dict / from_hf_state_dict  state dicts
       load_hf_qwen2(dir)                     an HF directory -> our Qwen2 (fp32)
       export_hf(model, dir)                  our model -> config.json + model.safetensors
       import_hf(hf_dir, out_dir)             an HF directory -> a run directory (ckpt.pt + tokenizer.json)
2. Commands:
    python interop.py import_hf --hf_dir=path/to/released_model --out=out/released [--tokenizer=tokenizer.json]
    python interop.py export_hf --ckpt=out/tiny_base --out=out/tiny_base_hf
"""
import json
import os

import torch
import torch.nn as nn

from checkpoint import clean_state_dict, load_checkpoint, resolve_ckpt, save_checkpoint
from common import UsageError, cli, configure, unwrap, write_json
from model import ModelConfig, Qwen2
from tokenizer import load_original_tokenizer

# -----------------------------------------------------------------------------
# 1. Hugging Face Qwen2 checkpoints (optional dependency: safetensors)

def hf_config_dict(cfg: ModelConfig) -> dict:
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


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get('model_type', 'qwen2') != 'qwen2':
        raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
    if hf.get('use_sliding_window'):
        raise ValueError("sliding-window attention is not implemented (use_sliding_window=true)")
    rope_theta = hf.get('rope_theta') or (hf.get('rope_parameters') or {}).get('rope_theta', 1e6)
    return ModelConfig(vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], n_layer=hf['num_hidden_layers'],
                       n_head=hf['num_attention_heads'],
                       n_kv_head=hf.get('num_key_value_heads', hf['num_attention_heads']),
                       intermediate_size=hf['intermediate_size'], max_seq_len=hf['max_position_embeddings'],
                       rope_theta=float(rope_theta), rms_eps=float(hf['rms_norm_eps']),
                       tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
                       initializer_range=float(hf.get('initializer_range', 0.02)))


def to_hf_state_dict(model: nn.Module) -> dict:
    """Our names are HF's minus the `model.` prefix (lm_head stays at the top)."""
    sd = clean_state_dict(unwrap(model).state_dict())
    return {(k if k.startswith('lm_head.') else 'model.' + k): v for k, v in sd.items()}


def from_hf_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith('rotary_emb.inv_freq'):
            continue  # a buffer older transformers versions saved; we recompute it
        out[k[len('model.'):] if k.startswith('model.') else k] = v
    if cfg.tie_embeddings:
        out['lm_head.weight'] = out['embed_tokens.weight']
    return out


def load_hf_qwen2(path, device='cpu') -> Qwen2:
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
    model = Qwen2(cfg)
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
    m = unwrap(model)
    os.makedirs(path, exist_ok=True)
    sd = to_hf_state_dict(m)
    if m.config.tie_embeddings:
        sd.pop('lm_head.weight', None)
    sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in sd.items()}
    save_file(sd, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    hf = hf_config_dict(m.config)
    hf['torch_dtype'] = str(dtype).replace('torch.', '')
    write_json(hf, os.path.join(path, 'config.json'), indent=2)
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
    save_checkpoint(path, m, run_config={'source': os.path.abspath(hf_dir), 'data_dir': ''},
                    tokenizer_identity=tok.identity, step=0)
    return path


# -----------------------------------------------------------------------------
# 2. Command line

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
    a = configure(IMPORT_DEFAULTS, argv, presets=False)
    if not (a.hf_dir and a.out):
        raise UsageError('import_hf needs --hf_dir=DIR --out=RUN_DIR [--tokenizer=tokenizer.json]')
    try:
        print('wrote', import_hf(a.hf_dir, a.out, a.tokenizer or None))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def _export_main(argv):
    a = configure(EXPORT_DEFAULTS, argv, presets=False)
    if not (a.ckpt and a.out):
        raise UsageError('export_hf needs --ckpt=RUN_DIR_OR_CKPT --out=DIR')
    ck_path = resolve_ckpt(a.ckpt)
    ck = load_checkpoint(ck_path)
    tok_file = os.path.join(os.path.dirname(ck_path), 'tokenizer.json')
    export_hf(ck['model'], a.out)
    print(f"wrote {a.out}/config.json and model.safetensors"
          + (f" (our tokenizer stays in {tok_file}: it is a tiktoken BPE, not an HF tokenizer)"
             if os.path.exists(tok_file) else ''))


COMMANDS = {'import_hf': _import_main, 'export_hf': _export_main}



if __name__ == '__main__':
    cli('interop.py', COMMANDS)  # one usage line lists the commands
