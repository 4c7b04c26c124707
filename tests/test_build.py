"""Dataset directories: data.build_dataset (held-out set, standard tokenizer, shards)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import tokenizer  # noqa: E402


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ds'))
    info = data.build_dataset(out, '2-3', 60_000, seed=0, eval_ops=[2, 3], eval_n=8, val_n=64)
    return out, info


def test_build_writes_a_complete_directory(built):
    out, info = built
    assert sorted(os.listdir(out)) == ['eval.jsonl', 'meta.json', 'tokenizer.json', 'train_000.bin', 'val.bin']
    assert 55_000 < info['splits']['train']['tokens'] <= 60_000          # whole documents, never over budget
    assert tokenizer.count_tokens(out, 'train') == info['splits']['train']['tokens']
    eval_rows = data.load_eval_rows(data_dir=out)[0]
    assert len(eval_rows) == 2 * len(data.TEMPLATES) * 8 and {r['op'] for r in eval_rows} == {2, 3}
    assert info['tokenizer_identity'] == data.standard_tokenizer().identity


def test_training_stream_never_contains_a_held_out_problem(built):
    """Decode the train shard back into documents and compare their problems with eval.jsonl."""
    out, _ = built
    tok = tokenizer.Tokenizer.load(os.path.join(out, 'tokenizer.json'))
    ids = np.fromfile(os.path.join(out, 'train_000.bin'), dtype=np.uint16).tolist()
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    held_out = {data.prompt_text(r) for r in data.load_eval_rows(data_dir=out)[0]}
    prompts = {d[:d.index('<solution>') + len('<solution>')] for d in docs}
    assert len(docs) > 250 and not (prompts & held_out)


def test_excluded_ids_are_skipped_and_the_rest_of_the_stream_is_unchanged():
    from tqdm import tqdm
    first = [p.to_row() for p in data.generate_problems(20, '2-3', seed=0)]
    exclude = frozenset(r['id'] for r in first[:20:2])
    stream = data._text_stream(data.parse_mixture('2-3'), 0, 1, exclude, tqdm(disable=True), chunk=32)
    texts = [next(stream) for _ in range(20)]
    kept = [data.training_text(r) for r in first[1:20:2]]
    assert not {data.training_text(r) for r in first[:20:2]} & set(texts)
    assert [t for t in texts if t in kept] == kept       # the other problems keep their place in the stream


def test_standard_tokenizer_is_deterministic():
    """Same identity when trained again from scratch (so datasets built anywhere are compatible)."""
    code = "import data; print(data.standard_tokenizer().identity)"
    ident = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert ident.stdout.strip() == data.standard_tokenizer().identity


def test_build_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, 'data.py', 'build', f'--out={tmp_path}/x', '--mixture=2-99', '--tokens=1e4'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'is outside' in r.stderr
    r = subprocess.run([sys.executable, 'data.py', 'build', '--out=x'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'needs --out=DIR --mixture' in r.stderr


def test_resolve_tokenizer_accepts_dirs_and_files(built, tmp_path):
    out, _ = built
    assert data.resolve_tokenizer(out).identity == data.standard_tokenizer().identity
    assert data.resolve_tokenizer(os.path.join(out, 'tokenizer.json')).identity == data.standard_tokenizer().identity
    with pytest.raises(FileNotFoundError, match='not found'):
        data.resolve_tokenizer(str(tmp_path / 'nope.json'))
