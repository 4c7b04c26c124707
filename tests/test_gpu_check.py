"""runs/gpu_check.py without a GPU: each check's own code at tiny shapes on the CPU (smoke mode), the
time limit that kills a hung check with everything it started, and (slow) the whole smoke table."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'runs'))
import gpu_check  # noqa: E402


def alive(pid, wait=5.0):
    """Whether pid is still running after up to `wait` seconds (a zombie awaiting its reaper is dead)."""
    t = time.time()
    while True:
        try:
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ('Z', 'X'):
            return False
        if time.time() - t > wait:
            return True
        time.sleep(0.1)


@pytest.fixture
def smoke(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, 'SMOKE', True)
    monkeypatch.setattr(gpu_check, 'DEVICE', 'cpu')
    monkeypatch.setattr(gpu_check, 'OUT', str(tmp_path))


@pytest.mark.fast
def test_doc_mask_check_runs_on_the_cpu(smoke, one_thread):
    """The check's training steps (it once unpacked (logits, loss) the wrong way round and called
    backward on the logits) and its FlexAttention probe, at tiny shapes."""
    ok, note = gpu_check.check_doc_mask()
    assert ok and 'doc mask' in note and 'probe failed' not in note, note


@pytest.mark.fast
def test_a_check_over_its_limit_is_killed_with_what_it_started(smoke, tmp_path):
    """run(group=True) kills the command's whole process group at the limit (a check's own commands
    included) and reports the timeout; a crash is a failure with its output kept."""
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(p.pid, flush=True); time.sleep(60)")
    t = time.time()
    ok, s, out = gpu_check.run([sys.executable, '-c', code], 3, 'hang.log', group=True)
    assert not ok and 'TIMEOUT after 3s' in out and time.time() - t < 30
    grandchild = int(out.split()[0])
    assert not alive(grandchild)  # killed with its parent
    ok, _, out = gpu_check.run([sys.executable, '-c', 'raise SystemExit("boom")'], 30, 'crash.log')
    assert not ok and 'boom' in out and (tmp_path / 'crash.log').exists()


def test_smoke_commands_resolve(tmp_path):
    """The smoke pipeline's and RL step's commands use only keys the stages know."""
    import plan
    lines = [' '.join(cmd) for cmd in gpu_check.pipeline_steps(str(tmp_path), smoke=True)]
    lines.append(' '.join(['rl.py', *gpu_check.rl_step_args(str(tmp_path / 'init'), str(tmp_path / 'rl'), True)]))
    for line in lines:
        script, *args = line.split()
        _, cfg = plan.resolve(script, args)
        assert cfg['out_dir'].startswith(str(tmp_path))


@pytest.mark.slow
def test_every_check_passes_in_smoke_mode(tmp_path):
    """`python runs/gpu_check.py --smoke`: every check, each in its own process under its limit, PASS
    on the CPU (~2 min idle, ~5 min on a busy 2-core box)."""
    env = dict(os.environ, OUT_DIR=str(tmp_path), OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'runs/gpu_check.py', '--smoke'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    for name in gpu_check.CHECKS:
        assert f'| {name} | PASS |' in p.stdout, p.stdout[-3000:]
