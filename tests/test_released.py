"""The original study's artifacts: a Hugging Face Qwen2 directory with the released config and
tokenizer becomes a run directory that evaluate.py / rl.py read, with identical logits."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import interop  # noqa: E402
import checkpoint  # noqa: E402
import model as M  # noqa: E402
import tokenizer  # noqa: E402

RELEASE = os.path.join(ROOT, 'reference', 'paper_release')


def test_import_released_layout_gives_a_run_dir_with_the_same_logits(tmp_path):
    pytest.importorskip('safetensors', reason='HF checkpoint I/O needs safetensors (pip install safetensors)')
    # a small model with the released config's conventions (vocab 2200, tied, GQA), saved the HF way
    with open(os.path.join(RELEASE, 'config.json')) as f:
        hf_cfg = json.load(f)
    hf_cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    cfg = interop.config_from_hf(hf_cfg)
    torch.manual_seed(0)
    ours = M.Qwen2(cfg).eval()
    hf_dir = tmp_path / 'released'
    interop.export_hf(ours, str(hf_dir))
    with open(os.path.join(RELEASE, 'tokenizer.json')) as f:
        (hf_dir / 'tokenizer.json').write_text(f.read())
    r = subprocess.run([sys.executable, 'interop.py', 'import_hf', f'--hf_dir={hf_dir}', f'--out={tmp_path}/run'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ck = checkpoint.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))
    tok = tokenizer.Tokenizer.load(str(tmp_path / 'run' / 'tokenizer.json'))
    assert ck['tokenizer_identity'] == tok.identity == tokenizer.load_original_tokenizer().identity
    row = data.read_jsonl(data.FIXTURE_PATH)[0]
    ids = torch.tensor([tok.encode(data.prompt_text(row))])
    assert ids.max() < cfg.vocab_size
    with torch.no_grad():
        assert torch.allclose(ck['model'].eval()(ids)[0], ours(ids)[0], atol=1e-5)


def test_import_without_a_tokenizer_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, 'interop.py', 'import_hf', f'--hf_dir={tmp_path}', f'--out={tmp_path}/run'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'tokenizer.json not found' in r.stderr and 'reference/paper_release' in r.stderr


def test_export_hf_of_a_missing_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, 'interop.py', 'export_hf', f'--ckpt={tmp_path}/none', f'--out={tmp_path}/hf'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith('interop.py: no checkpoint at')
