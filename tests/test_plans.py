"""runs/*.sh in plan mode (PLAN=1, runs/plan.py) on the CPU: every stage's config resolves, the data of
every training stage covers its budget without repeating, and the mid-training vs RL arms follow the
original's split (STUDY.md §6)."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'runs'))
import plan  # noqa: E402

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'runs', 'paper_*.sh'))) + ['small.sh']


def run_plan(script, **env):
    e = dict(os.environ, PLAN='1', OMP_NUM_THREADS='1', **env)
    e.pop('PLANNED', None)
    return subprocess.run(['bash', os.path.join('runs', script)], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)


def stage_rows(stdout):
    """(stage, out_dir, detail) of every row of the plan's table."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('stage '))
    rows = []
    for ln in lines[start + 1:]:
        if ln.startswith('total:'):
            break
        parts = ln.split()
        rows.append((parts[0], parts[1], ln))
    return rows


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_plans_on_cpu(script):
    p = run_plan(script, NGPU='8')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = stage_rows(p.stdout)
    assert rows and {s for s, _, _ in rows} <= {'pretrain', 'midtrain', 'rl', 'evaluate'}
    assert rows[-1][0] == 'evaluate'
    for stage, _, line in rows:
        if stage in ('pretrain', 'midtrain'):
            assert float(re.search(r'([0-9.]+) epoch', line).group(1)) <= 1.0, line
    assert 'GPU hours' in p.stdout and 'on 8 GPU(s)' in p.stdout and 'MFU' in p.stdout


def test_midtrain_vs_rl_arms_follow_the_original_split():
    p = run_plan('paper_midtrain_vs_rl.sh')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {out: line for _, out, line in stage_rows(p.stdout)}
    steps = {out: int(line.split(' steps x ')[0].split()[-1].replace(',', '')) for out, line in rows.items()
             if ' steps x ' in line}
    assert steps['out/rl_share0'] == 50 and steps['out/rl_share0.2'] == 40
    assert steps['out/rl_share0.5'] == 25 and steps['out/rl_share0.8'] == 10
    batch = 524_288
    for share in ('0.2', '0.5', '0.8'):   # mid-training tokens: share x 1B, all from one 0.8B dataset
        assert steps[f'out/mid_share{share}'] == int(float(share) * 1e9) // batch
        assert 'data 800,000,000 tok' in rows[f'out/mid_share{share}']
    assert 'out/mid_share0' not in rows


def test_repeating_data_is_an_error_unless_allowed(tmp_path, monkeypatch):
    lines = ['midtrain.py paper_midtrain --data_tokens=100000000 --max_tokens=300000000']
    with pytest.raises(plan.PlanError, match=r'repeat the data 3.00x.*ALLOW_EPOCHS=1'):
        plan.plan(lines)
    monkeypatch.setattr(plan, 'ALLOW_EPOCHS', True)
    (row,) = plan.plan(lines)
    assert '3.00 epoch' in row['detail']


def test_plan_resolves_configs_as_the_stages_do():
    rows = plan.plan(['pretrain.py paper_pretrain --max_tokens=1048576 --data_tokens=2000000',
                      'rl.py paper_rl_op17-20 --init_from=out/base --max_steps=3',
                      'evaluate.py paper_eval --ckpts=out/base --eval_ops=[2,3] --n_samples=4'])
    pre, rl, ev = rows
    assert pre['config']['model'] == 'paper' and pre['tokens'] == 1_048_576
    assert 100e6 < pre['params'] < 110e6                               # the paper's ~103M model
    assert pre['flops'] > 6 * pre['params'] * pre['tokens']            # 6N plus attention
    assert rl['config']['op_min'] == 17 and rl['config']['lr'] == 1e-6 and '3 steps x 1024 prompts x 6' in rl['detail']
    assert rl['params'] == pre['params']                               # init_from=out/base: the planned base
    assert '1 checkpoints x 402 problems x 4 samples' in ev['detail']  # 2 ops x 67 x 3 templates
    # more samples for one op (evaluate.py's n_samples_by_op): that op's tokens scale, the rest do not
    (ev2,) = plan.plan(['evaluate.py paper_eval --ckpts=out/base --eval_ops=[2,3] --n_samples=4 '
                        '"--n_samples_by_op={3: 16}"'])
    assert '4-16 samples' in ev2['detail']
    t2, t3 = (plan.plan([f'evaluate.py paper_eval --ckpts=out/base --eval_ops=[{o}] --n_samples=4'])[0]['tokens']
              for o in (2, 3))
    assert ev['tokens'] == pytest.approx(t2 + t3, abs=2) and ev2['tokens'] == pytest.approx(t2 + 4 * t3, abs=2)
    with pytest.raises(plan.PlanError, match='config error'):
        plan.plan(['pretrain.py paper_pretrain --no_such_key=1'])


@pytest.mark.parametrize('preset', ['tiny', 'small'])
def test_parameter_and_flop_count_match_the_model(preset):
    import dataclasses

    import model
    mc = dataclasses.replace(model.MODEL_PRESETS[preset], vocab_size=300)
    m = model.Qwen2(mc)
    n, flops_per_token = plan.params_of(mc)
    assert n == m.num_params()
    assert flops_per_token(512) == m.flops_per_token(512)


def test_rl_prompts_from_a_released_directory(tmp_path):
    """rl.py --prompts= takes a directory laid out as the released data; the plan counts its rows at the RL ops
    and refuses a run that would cycle through them."""
    import data
    d = tmp_path / 'composition' / 'heldout'
    d.mkdir(parents=True)
    for op in (11, 12):
        rows = [p.to_row() for p in data.generate_problems(5, [op], seed=op)]
        data.write_jsonl(str(d / f'op{op}-50k.jsonl'), [{k: r[k] for k in ('problem', 'question', 'solution')}
                                                         for r in rows])
    ok = f'rl.py paper_rl --prompts={tmp_path} --op_min=11 --op_max=14 --prompts_per_step=4 --minibatch_prompts=4'
    (row,) = plan.plan([ok + ' --max_steps=2'])
    assert '2 steps x 4 prompts x 6' in row['detail']
    with pytest.raises(plan.PlanError, match=r'rl -> .* needs 12 .* holds 10'):
        plan.plan([ok + ' --max_steps=3'])


def test_gpu_check_commands_resolve(tmp_path):
    """runs/gpu_check.py's stage commands use only keys the stages know (the check itself needs a GPU)."""
    import gpu_check
    lines = [' '.join(cmd) for cmd in gpu_check.pipeline_steps(str(tmp_path))]
    lines.append(' '.join(['rl.py', *gpu_check.rl_step_args(str(tmp_path / 'init'), str(tmp_path / 'rl'))]))
    for line in lines:
        script, *args = line.split()
        mod, cfg = plan.resolve(script, args)
        assert cfg['out_dir'].startswith(str(tmp_path))
    assert cfg['prompts_per_step'] == 1024 and cfg['group_size'] == 6 and cfg['max_response_len'] == 1024
