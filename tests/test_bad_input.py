"""Bad files given to a command end in one line naming the file, what is wrong and the fix -- not a
traceback. Rows are read in one place (data.read_jsonl) and checkpoints in one place
(checkpoint.load_checkpoint), so each kind of bad file has one message whichever command reads it:
  rows without `solution`   rl.py --prompts=, evaluate.py --eval_file=
  a corrupt ckpt.pt         rl.py --init_from=, evaluate.py --ckpts=
  an unknown mixture        midtrain.py --mixture= (and rl.py --mixture=)

Run: python -m pytest -q tests/test_bad_input.py   (a few seconds: a 1-layer model, no training)
"""
import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
import midtrain  # noqa: E402
import model  # noqa: E402
import rl  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from common import UsageError  # noqa: E402
from tokenizer import N_FIXED_TOKENS, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.fast


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A run directory as the stages leave it: ckpt.pt (a random 1-layer model) + tokenizer.json."""
    d = tmp_path_factory.mktemp('run')
    rows = [p.to_row() for p in data.generate_problems(10, '2-3', seed=0)]
    tok = train_tokenizer([data.training_text(r) for r in rows], N_FIXED_TOKENS)
    tok.save(os.path.join(d, 'tokenizer.json'))
    cfg = dataclasses.replace(model.MODEL_PRESETS['tiny'], vocab_size=tok.vocab_size, n_layer=1, hidden_size=32,
                              n_head=2, n_kv_head=2, intermediate_size=64)
    torch.manual_seed(0)
    save_checkpoint(os.path.join(d, 'ckpt.pt'), model.Qwen2(cfg), {'data_dir': ''}, tok.identity, step=0)
    return str(d)


@pytest.fixture
def rows_without_solution(tmp_path):
    rows = [p.to_row() for p in data.generate_problems(3, '2-3', seed=1)]
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(json.dumps({k: v for k, v in r.items() if k != 'solution'}) + '\n' for r in rows))
    return str(path)


@pytest.fixture
def corrupt_ckpt(run_dir, tmp_path):
    good = open(os.path.join(run_dir, 'ckpt.pt'), 'rb').read()
    path = tmp_path / 'bad' / 'ckpt.pt'
    path.parent.mkdir()
    path.write_bytes(good[:len(good) // 2])   # a copy cut short (a full disk, a killed copy)
    (tmp_path / 'bad' / 'tokenizer.json').write_text(open(os.path.join(run_dir, 'tokenizer.json')).read())
    return str(path)


def one_line(e, *words):
    msg = str(e.value)
    assert '\n' not in msg and all(w in msg for w in words), msg
    return msg


RL_QUICK = ['tiny_rl', '--eval_op_min=2', '--eval_op_max=2', '--eval_per_op_template=1', '--max_steps=1']


def test_rows_without_solution(run_dir, rows_without_solution, tmp_path):
    with pytest.raises(UsageError) as e:
        rl.main(RL_QUICK + [f'--init_from={run_dir}', f'--prompts={rows_without_solution}',
                            f'--out_dir={tmp_path}/rl'])
    one_line(e, rows_without_solution, 'line 1', "'solution'", 'fix or remove')
    with pytest.raises(UsageError) as e:
        evaluate.main(['tiny_eval', f'--ckpts={run_dir}', f'--eval_file={rows_without_solution}',
                       f'--out_dir={tmp_path}/eval'])
    one_line(e, rows_without_solution, 'line 1', "'solution'", 'fix or remove')


def test_bad_json_and_a_solution_without_answer(tmp_path):
    path = tmp_path / 'rows.jsonl'
    row = data.generate_problems(1, '2-3', seed=2)[0].to_row()
    path.write_text(json.dumps(row) + '\n' + '{"problem": oops\n')
    with pytest.raises(UsageError) as e:
        data.read_jsonl(str(path))
    one_line(e, str(path), 'line 2', 'not valid JSON')
    path.write_text(json.dumps({k: v for k, v in row.items() if k not in ('answer', 'graph')}
                               | {'solution': 'no answer here'}) + '\n')
    with pytest.raises(UsageError) as e:
        data.read_jsonl(str(path))
    one_line(e, str(path), 'line 1', 'Answer: N')


def test_corrupt_checkpoint(corrupt_ckpt, tmp_path):
    with pytest.raises(UsageError) as e:
        rl.main(RL_QUICK + [f'--init_from={os.path.dirname(corrupt_ckpt)}', f'--out_dir={tmp_path}/rl'])
    one_line(e, corrupt_ckpt, 'not a readable checkpoint', 'train that run again')
    with pytest.raises(UsageError) as e:
        evaluate.main(['tiny_eval', f'--ckpts={corrupt_ckpt}', f'--out_dir={tmp_path}/eval'])
    one_line(e, corrupt_ckpt, 'not a readable checkpoint', 'train that run again')


def test_unknown_mixture(run_dir, tmp_path):
    with pytest.raises(UsageError) as e:
        midtrain.main(['tiny_midtrain', f'--init_from={run_dir}', '--mixture=no_such_mixture',
                       f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/mid'])
    one_line(e, 'no_such_mixture')
    with pytest.raises(UsageError) as e:
        rl.main(RL_QUICK + [f'--init_from={run_dir}', '--mixture=no_such_mixture', f'--out_dir={tmp_path}/rl'])
    one_line(e, 'no_such_mixture')
