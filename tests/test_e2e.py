"""The tiny study end to end (runs/tiny.sh with SMOKE=1): data -> pretrain -> midtrain -> RL (edge with a
process-aware and an outcome reward, ID, too hard, after mid-training) -> evaluate, a few steps each, and
the report it must leave behind; then the same command again, which finds every stage finished; then
runs/tiny_long.sh's smoke on the same base (the long RL arm and its report)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a few minutes on 2 idle cores; part of CI's default run (the issue asks CI to run the whole study's smoke)
def test_tiny_study_smoke_runs_every_stage(tmp_path):
    env = dict(os.environ, SMOKE='1', OUT=str(tmp_path / 'tiny'), PATH=os.path.dirname(sys.executable) + ':' +
               os.environ.get('PATH', ''))
    p = subprocess.run(['bash', 'runs/tiny.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / 'tiny'
    for run in ('base', 'mid', 'rl_edge_strict', 'rl_edge_outcome', 'rl_id', 'rl_hard', 'mid_rl_edge'):
        assert (out / run / 'ckpt.pt').exists(), run
    report = out / 'report'
    with open(report / 'results.json') as f:
        res = json.load(f)
    labels = ['base', 'mid', 'rl_edge_strict', 'rl_edge_outcome', 'rl_id', 'rl_hard', 'mid+rl_edge']
    assert all(label in json.dumps(res) for label in labels)
    for png in ('passk_by_band.png', 'acc_vs_op.png'):
        assert (report / png).stat().st_size > 10_000
    summary = (report / 'summary.md').read_text()
    assert 'pass@k by band' in summary and '[' in summary  # intervals in the tables
    # the same command again: every training stage is finished, nothing is retrained
    before = {run: (out / run / 'ckpt.pt').stat().st_mtime for run in ('base', 'mid', 'rl_edge_strict', 'mid_rl_edge')}
    p = subprocess.run(['bash', 'runs/tiny.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert all((out / run / 'ckpt.pt').stat().st_mtime == t for run, t in before.items())
    # runs/tiny_long.sh on the same outputs: the base is finished (not retrained), the long arm runs
    p = subprocess.run(['bash', 'runs/tiny_long.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / 'base' / 'ckpt.pt').stat().st_mtime == before['base']
    log = [json.loads(line) for line in open(out / 'rl_edge_long' / 'log.jsonl')]
    assert [r['step'] for r in log] == [1, 2] and all(r['kept'] == 4 * 8 for r in log)  # 4 prompts x G 8, all kept
    with open(out / 'report_long' / 'results.json') as f:
        assert set(json.load(f)['runs']) == {'base', 'rl_edge_long'}
