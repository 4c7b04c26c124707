"""Tests of rl.py: the GRPO math against hand-computed values, the plumbing (log-prob indexing,
micro-batch and world-size invariance of the update, exact resume), rewards, and a tiny run that
must learn."""
import copy
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import data
import model as M
import rl
from data import REWARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# advantages and losses, by hand


def test_advantages_hand_computed():
    r = torch.tensor([1., 0., 0., 1., 0., 0., 0., 0., 1., 1., 1., 0.])
    a = rl.compute_advantages(r, 4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[:4], torch.tensor([.5, -.5, -.5, .5]) / (s + 1e-6))
    assert torch.equal(a[4:8], torch.zeros(4))  # all-equal group: no signal
    s3 = math.sqrt(((.25 ** 2) * 3 + .75 ** 2) / 3)  # [1, 1, 1, 0]: mean .75
    torch.testing.assert_close(a[8:], torch.tensor([.25, .25, .25, -.75]) / (s3 + 1e-6))
    torch.testing.assert_close(rl.compute_advantages(r, 4, std_norm=False)[:4], torch.tensor([.5, -.5, -.5, .5]))


def _example():
    """Two responses; ratios exp(logp - old): seq 0 (A = +1) [1.0, 1.5, 0.5]; seq 1 (A = -1)
    [4.0, 0.5, 1.1] with the last token padding."""
    ratios = torch.tensor([[1.0, 1.5, 0.5], [4.0, 0.5, 1.1]])
    old = torch.log(torch.tensor([[.5, .2, .4], [.1, .6, .3]]))
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    return logp, old, adv, mask


def test_policy_loss_clip_and_dual_clip_hand_computed():
    logp, old, adv, mask = _example()
    # per-token PPO losses max(-A r, -A clip(r, .8, 1.2)):
    #   seq 0 (A=+1): r=1 -> -1; r=1.5 -> -1.2 (clipped); r=.5 -> -.5 (the unclipped term is larger)
    #   seq 1 (A=-1): r=4 -> 4, dual clip -> min(4, 3) = 3; r=.5 -> .8 (clipped); r=1.1 masked out
    loss, st = rl.policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0, kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 - 1.2 - .5 + 3 + .8) / 5)  # token-mean over 5 real tokens
    assert st['clipped'].item() == 2 and st['dual_clipped'].item() == 1 and st['tokens'].item() == 5
    loss.backward()
    # d/dlogp of -A*r is -A*r where unclipped, 0 where clipped or dual-clipped, 0 on padding
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0, -0.5], [0.0, 0.0, 0.0]]) / 5)
    # without the dual clip the exploding ratio of the bad sample counts in full
    logp, old, adv, mask = _example()
    loss, st = rl.policy_loss(logp, old, adv, mask, dual_clip=0.0, kl_coef=0.0)
    assert loss.item() == pytest.approx((-1 - 1.2 - .5 + 4 + .8) / 5)
    assert st['dual_clipped'].item() == 0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0, -0.5], [4.0, 0.0, 0.0]]) / 5)


def test_loss_aggregation_modes_hand_computed():
    logp, old, adv, mask = _example()
    kw = dict(clip_eps=0.2, dual_clip=3.0, kl_coef=0.0)
    # per-sequence sums: seq 0 -2.7 over 3 tokens, seq 1 3.8 over 2 tokens
    tm, _ = rl.policy_loss(logp, old, adv, mask, agg='token-mean', **kw)
    sm, _ = rl.policy_loss(logp, old, adv, mask, agg='seq-mean-token-mean', **kw)
    dr, _ = rl.policy_loss(logp, old, adv, mask, agg='seq-mean-token-sum-norm', max_len=4, **kw)
    assert tm.item() == pytest.approx(1.1 / 5)
    assert sm.item() == pytest.approx((-2.7 / 3 + 3.8 / 2) / 2)
    assert dr.item() == pytest.approx(1.1 / (2 * 4))
    # micro-batch shares with the mini-batch totals add up to the whole-batch value
    for agg, whole in (('token-mean', tm), ('seq-mean-token-mean', sm), ('seq-mean-token-sum-norm', dr)):
        parts = [rl.policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], agg=agg, n_tokens=5,
                                n_seqs=2, max_len=4, **kw)[0] for i in range(2)]
        assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())


def test_k3_kl_hand_computed_and_clamped():
    logp = torch.log(torch.tensor([.25, .5, .5, .3]))
    ref = torch.log(torch.tensor([.5, .25, .5, .3])) + torch.tensor([0., 0., 0., 25.])
    kl = rl.kl_k3(logp, ref)
    # d = ref - logp: log 2 -> 2 - log 2 - 1; -log 2 -> .5 + log 2 - 1; 0 -> 0; 25 -> clamp(20) then clamp(10)
    torch.testing.assert_close(kl, torch.tensor([1 - math.log(2), math.log(2) - .5, 0., 10.]))
    # in the loss: kl_coef * token-mean of k3 is added to the policy term
    lp, old, adv, mask = _example()
    ref_lp = lp.detach() + math.log(2)
    base, _ = rl.policy_loss(lp, old, adv, mask, kl_coef=0.0)
    with_kl, st = rl.policy_loss(lp, old, adv, mask, ref_lp, kl_coef=0.1)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * (1 - math.log(2)))
    assert st['kl'].item() == pytest.approx(5 * (1 - math.log(2)), rel=1e-5)


def test_entropy_bonus_sign():
    lp, old, adv, mask = _example()
    ent = torch.ones(2, 3)
    base, _ = rl.policy_loss(lp, old, adv, mask, None, ent, kl_coef=0.0, entropy_coef=0.0)
    bonus, st = rl.policy_loss(lp, old, adv, mask, None, ent, kl_coef=0.0, entropy_coef=0.01)
    assert bonus.item() == pytest.approx(base.item() - 0.01)  # higher entropy lowers the loss
    assert st['entropy'].item() == 5


# -----------------------------------------------------------------------------
# log-prob indexing and the update on a tiny random model


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return M.Qwen2(M.ModelConfig(vocab_size=40, hidden_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                 intermediate_size=64, max_seq_len=64))


def _toy_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 40, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    return prompts, responses


def test_forward_logprobs_matches_per_sequence_forward():
    m = _tiny_model()
    prompts, responses = _toy_batch()
    logp, ent, mask = rl.forward_logprobs(m, prompts, responses, temperature=0.7)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logits, _ = m(torch.tensor([p + r]))
        lp = (logits[0, len(p) - 1:-1] / 0.7).log_softmax(-1)
        want = lp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :len(r)], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, :len(r)], -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=1e-5)
        assert mask[i].sum() == len(r) and (logp[i, len(r):] == 0).all()


def _update(m, prompts, responses, adv, micro, agg, n_minibatches=1, kl=True):
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    ref = _tiny_model(seed=1)
    batch = {'prompt': prompts, 'response': responses, 'adv': adv,
             'old_logp': rl.batch_logprobs(m, prompts, responses, 2, 1.0, 'cpu') if n_minibatches > 1 else None,
             'ref_logp': rl.batch_logprobs(ref, prompts, responses, 3, 1.0, 'cpu') if kl else None}
    return rl.update_policy(m, opt, batch, n_minibatches=n_minibatches, micro_batch=micro, loss_agg=agg,
                            kl_coef=0.5 if kl else 0.0, entropy_coef=0.01, grad_clip=0.0, max_len=16)


@pytest.mark.parametrize('agg', ['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'])
def test_update_is_invariant_to_micro_batch_size(agg):
    prompts, responses = _toy_batch(8)
    adv = torch.tensor([1., -1., .5, -.5, 2., 0., -2., 1.])
    a, b = _tiny_model(), _tiny_model()
    sa = _update(a, prompts, responses, adv, micro=8, agg=agg)
    sb = _update(b, prompts, responses, adv, micro=3, agg=agg)
    assert sa['updates'] == 1 and sa['grad_norm'] > 0
    assert sa['pg_loss'] == pytest.approx(sb['pg_loss'], abs=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_update_moves_logprobs_with_the_advantage():
    m = _tiny_model()
    prompts, responses = _toy_batch(4)
    adv = torch.tensor([1., -1., 1., -1.])
    before = rl.batch_logprobs(m, prompts, responses, 4, 1.0, 'cpu')
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    batch = {'prompt': prompts, 'response': responses, 'adv': adv, 'old_logp': None, 'ref_logp': None}
    for _ in range(3):
        rl.update_policy(m, opt, batch, n_minibatches=1, micro_batch=2, kl_coef=0.0)
    after = rl.batch_logprobs(m, prompts, responses, 4, 1.0, 'cpu')
    delta = [float((a - b).sum()) for a, b in zip(after, before)]
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0


def test_several_minibatches_use_old_logprobs():
    """With 2 mini-batches the second update's ratio is against the rollout policy, not 1."""
    prompts, responses = _toy_batch(8)
    adv = torch.tensor([1., -1., .5, -.5, 2., 0., -2., 1.])
    st = _update(_tiny_model(), prompts, responses, adv, micro=4, agg='token-mean', n_minibatches=2, kl=False)
    assert st['updates'] == 2
    assert st['ratio'] / st['tokens'] != pytest.approx(1.0, abs=1e-7)  # the 2nd mini-batch moved


# -----------------------------------------------------------------------------
# rewards and prompts


def _completion(row):
    """What a model that writes the gold solution produces after '<solution>'."""
    return data.training_text(row)[len(data.prompt_text(row)):]


def test_strict_reward_zero_for_right_answer_with_a_wrong_step():
    row = data.generate(random.Random(3), 5, 'crazy_zootopia', 'normalforward').to_row()
    gold = _completion(row)
    # corrupt the value of the first step (a leaf, not the asked node); the answer is untouched
    m = re.search(r'so (\w) = (\d+)\. ', gold)
    assert m and not gold.startswith(f" Define {row['graph']['order'][-1]} ")
    wrong = gold[:m.start(2)] + str(int(m.group(2)) % 4 + 1) + gold[m.end(2):]
    rewards, (v_gold, v_wrong) = rl.compute_rewards([gold, wrong], [row['graph']] * 2, 'strict')
    assert v_gold.perfect and v_wrong.outcome and not v_wrong.perfect
    assert rewards.tolist() == [1.0, 0.0]
    assert rl.compute_rewards([wrong], [row['graph']], 'outcome')[0].item() == 1.0  # outcome is fooled
    blend = rl.compute_rewards([wrong], [row['graph']], 'blend_0.2_0.8')[0].item()
    assert 0.2 < blend < 1.0  # partial process credit
    bad_answer = gold.replace(f"<answer> {row['answer']} </answer>", f"<answer> {row['answer'] + 1} </answer>")
    for kind in REWARDS:
        assert rl.compute_rewards([bad_answer], [row['graph']], kind)[0].item() == 0.0


def _cfg(**kw):
    return type('C', (), {**rl.DEFAULTS, **kw})


def test_prompt_stream_deterministic_sliceable_and_filtered():
    C = _cfg(op_min=3, op_max=5, prompt_seed=11, reverse_frac=0.5,
             templates={'crazy_zootopia': 1.0, 'teachers_in_school': 0.0, 'movie_festival_awards': 2.0})
    s = rl.PromptStream.from_config(C)
    rows = s.take(0, 24)
    assert [r['id'] for r in rows] == [r['id'] for r in rl.PromptStream.from_config(C).take(0, 24)]
    # two ranks reading halves of a step see exactly the single-process rows
    assert [r['id'] for r in s.take(0, 12) + s.take(12, 12)] == [r['id'] for r in rows]
    assert {r['op'] for r in rows} <= {3, 4, 5} and len({r['op'] for r in rows}) > 1
    assert {r['template'] for r in rows} == {'crazy_zootopia', 'movie_festival_awards'}
    assert {r['mode'] for r in rows} == {'normalforward', 'forwardreverse'}
    assert all(r['graph']['answer'] == r['answer'] for r in rows)
    # held-out ids never come out, whatever the seed
    banned = {r['id'] for r in rows[:6]}
    assert not banned & {r['id'] for r in rl.PromptStream.from_config(C, exclude_ids=banned).take(0, 24)}
    # forward only; a named data mixture (zoo/school RL context mix)
    assert {r['mode'] for r in rl.PromptStream.from_config(_cfg(reverse_frac=0.0, op_min=2, op_max=3)).take(0, 12)} \
        == {'normalforward'}
    ctx = rl.PromptStream.from_config(_cfg(mixture='rl_ctx_zoo0.5')).take(0, 40)
    assert {r['template'] for r in ctx} == {'crazy_zootopia', 'teachers_in_school'}


def test_prompt_stream_from_released_jsonl_and_gold_gets_full_reward():
    path = data.FIXTURE_PATH  # the original generator's samples
    rows = data.read_jsonl(path)  # released format: no id, graph or answer fields
    s = rl.PromptStream.from_config(_cfg(prompts=path, op_min=7, op_max=10))
    assert len(s.rows) == 4 * 3 * 2
    got = s.take(0, 48)  # two epochs, each a permutation
    assert sorted(r['id'] for r in got[:24]) == sorted(r['id'] for r in s.rows)
    assert [r['id'] for r in got[:24]] != [r['id'] for r in got[24:]]
    rewards, verdicts = rl.compute_rewards([_completion(r) for r in got[:24]], [r['graph'] for r in got[:24]],
                                           'strict')
    assert rewards.tolist() == [1.0] * 24


# -----------------------------------------------------------------------------
# distributed: the update does not depend on the world size


def _half_update_worker(rank, world, init_file, out_file):
    import torch.distributed as tdist
    tdist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = _tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    prompts, responses = _toy_batch(8)
    adv = torch.tensor([1., -1., .5, -.5, 2., 0., -2., 1.])
    mine = slice(rank * 4, rank * 4 + 4)
    ref = _tiny_model(seed=1)
    batch = {'prompt': prompts[mine], 'response': responses[mine], 'adv': adv[mine],
             'old_logp': rl.batch_logprobs(m, prompts[mine], responses[mine], 2, 1.0, 'cpu'),
             'ref_logp': rl.batch_logprobs(ref, prompts[mine], responses[mine], 3, 1.0, 'cpu')}
    st = rl.update_policy(ddp, torch.optim.SGD(m.parameters(), lr=1.0), batch, n_minibatches=2, micro_batch=1,
                          kl_coef=0.5, entropy_coef=0.01, grad_clip=0.0, world_size=world)
    vec = torch.tensor([st['tokens'], st['clipped']])
    tdist.all_reduce(vec)
    if rank == 0:
        torch.save({'params': m.state_dict(), 'tokens': vec[0].item()}, out_file)
    tdist.destroy_process_group()


def test_update_matches_across_world_sizes(tmp_path):
    """2 gloo ranks with half the groups each == 1 process with all (2 mini-batches: each rank
    holds the same halves of each mini-batch the single process holds)."""
    import torch.multiprocessing as mp
    out = tmp_path / 'ddp.pt'
    mp.spawn(_half_update_worker, args=(2, str(tmp_path / 'init'), str(out)), nprocs=2)
    got = torch.load(out)
    # single process: mini-batch j = samples of both ranks' j-th halves, in the same order
    prompts, responses = _toy_batch(8)
    adv = torch.tensor([1., -1., .5, -.5, 2., 0., -2., 1.])
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    m = _tiny_model()
    p, r = [prompts[i] for i in order], [responses[i] for i in order]
    batch = {'prompt': p, 'response': r, 'adv': adv[order], 'old_logp': rl.batch_logprobs(m, p, r, 2, 1.0, 'cpu'),
             'ref_logp': rl.batch_logprobs(_tiny_model(seed=1), p, r, 3, 1.0, 'cpu')}
    st = rl.update_policy(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, n_minibatches=2, micro_batch=3,
                          kl_coef=0.5, entropy_coef=0.01, grad_clip=0.0)
    assert got['tokens'] == st['tokens']
    for k, v in m.state_dict().items():
        torch.testing.assert_close(got['params'][k], v, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# whole runs from the tiny pre-trained base


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def one_thread():
    """Tiny-model work runs faster on one thread, and much faster on a loaded machine (OpenMP
    threads spin-waiting for a busy core: 17x slower decoding measured on the shared dev box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def edge_base(tiny_base, tmp_path_factory):
    """tiny_base mid-trained for 60 steps on op 2 (midtrain.py, the pipeline's own stage), so that it
    writes well-formed solutions that end in an answer. tiny_base itself writes no answers (pass@1 0
    and 98% no answer at op 2-5, measured), which gives GRPO no reward to work with."""
    import midtrain
    d = tmp_path_factory.mktemp('edge')
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        midtrain.main([f"--init_from={tiny_base['out_dir']}", f'--out_dir={d}/run', f'--data_dir={d}/data',
                       '--mixture=2', '--data_tokens=250000', '--max_steps=60', '--seq_len=256', '--micro_batch=16',
                       '--batch_tokens=4096', '--lr=3e-3', '--min_lr=1e-3', '--warmup_frac=0.05',
                       '--eval_interval=1000', '--eval_tokens=4096', '--progress=False', '--log_interval=20'])
    finally:
        torch.set_num_threads(n)
    return str(d / 'run')


def test_tiny_run_learns(edge_base, tmp_path, one_thread):
    """GRPO with the outcome reward on reverse-mode op 2 problems under a 96-token budget (the gold
    solutions take ~135). The edge base writes the right format but mostly runs past the budget
    (~60% truncated; held-out outcome pass@1 ~2% at temperature 0.7). Within 12 steps GRPO must raise
    the mean reward and the held-out outcome pass@1 (problems never used as prompts): it learns what
    this reward pays for, finishing short solutions within the budget. The reasoning stays wrong
    (process-verified pass@1 ~0 before and after: at this size, outcome reward buys the reward hacking
    of SPEC §5.4), so the assertions are on outcome, and the log shows the hacking."""
    out = tmp_path / 'rl'
    res = rl.main(['tiny_rl', f'--init_from={edge_base}', f'--out_dir={out}', '--op_min=2', '--op_max=2',
                   '--reverse_frac=1.0', '--eval_modes=forwardreverse', '--prompts_per_step=16',
                   '--minibatch_prompts=8', '--max_response_len=96', '--max_prompt_len=192', '--lr=2e-4',
                   '--max_steps=12', '--eval_every=12', '--eval_per_op_template=16', '--sample_every=6'])
    log = _read_jsonl(out / 'log.jsonl')
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    before, after = res['eval'][0], res['eval'][-1]
    print(f"reward {mean(log[:3], 'reward'):.3f} -> {mean(log[-4:], 'reward'):.3f}; truncated "
          f"{mean(log[:3], 'truncated'):.2f} -> {mean(log[-4:], 'truncated'):.2f}; held-out outcome pass@1 "
          f"{before['eval/all/outcome_pass@1']:.3f} -> {after['eval/all/outcome_pass@1']:.3f} (process-verified "
          f"{before['eval/all/pass@1']:.3f} -> {after['eval/all/pass@1']:.3f}); "
          f"{mean(log, 'gen_tok_per_s'):.0f} generated tok/s, {mean(log, 'step_s'):.1f} s/step")
    # calibrated on 4 seeds: reward +0.06..+0.09, pass@1 +0.16..+0.29, truncation -0.3..-0.6
    assert mean(log[-4:], 'reward') > mean(log[:3], 'reward') + 0.04
    assert after['eval/all/outcome_pass@1'] > before['eval/all/outcome_pass@1'] + 0.1
    assert mean(log[-4:], 'truncated') < mean(log[:3], 'truncated') - 0.2
    assert 0 < log[-1]['kl'] < 1.0 and log[-1]['clip_frac'] >= 0 and log[-1]['flops'] > log[0]['flops'] > 0
    assert (out / 'ckpt.pt').exists() and (out / 'tokenizer.json').exists() and (out / 'samples.jsonl').exists()


SMALL = ['tiny_rl', '--prompts_per_step=4', '--minibatch_prompts=2', '--group_size=2', '--max_response_len=24',
         '--micro_batch=3', '--eval_every=0', '--sample_every=1', '--log_every=1']


def test_exact_resume_and_flop_budget(tiny_base, tmp_path, one_thread):
    """1 step + resume 1 step == 2 steps: weights, optimizer, prompts, FLOPs. A FLOP budget stops
    the run before the budget is exceeded."""
    base = SMALL + [f"--init_from={tiny_base['out_dir']}", '--ckpt_every=1']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ra = rl.main(base + ['--max_steps=2', f'--out_dir={a}'])
    rl.main(base + ['--max_steps=1', f'--out_dir={b}'])
    with pytest.raises(SystemExit):  # a second fresh start into a run dir is refused
        rl.main(base + ['--max_steps=1', f'--out_dir={b}'])
    rb = rl.main(base + ['--max_steps=2', f'--out_dir={b}', '--resume=True'])
    assert ra['step'] == rb['step'] == 2 and ra['flops'] == rb['flops']
    ca, cb = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (a, b))
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for sa, sb in zip(ca['optimizer']['state'].values(), cb['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ca['extra']['stream'] == cb['extra']['stream'] == {'next': 8, 'seed': '7919'}
    la, lb = _read_jsonl(a / 'log.jsonl'), _read_jsonl(b / 'log.jsonl')
    drop = ('gen_tok_per_s', 'tok_per_s', 'step_s')
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == \
           [{k: v for k, v in r.items() if k not in drop} for r in lb]
    sa, sb = _read_jsonl(a / 'samples.jsonl'), _read_jsonl(b / 'samples.jsonl')
    assert [s['response'] for s in sa] == [s['response'] for s in sb]
    # FLOPs: 2N per rollout token, 2N per old/ref token, 6N per trained token
    n = M.load_checkpoint(a / 'ckpt.pt')['model'].num_params()
    f = ra['flops']
    assert f['train'] == pytest.approx(3 * f['ref']) and f['old'] == pytest.approx(f['ref'])
    assert f['total'] == pytest.approx(f['rollout'] + f['ref'] + f['old'] + f['train'])
    assert f['rollout'] % (2 * n) == 0 and f['rollout'] < f['ref']  # prompts prefilled once per group
    # a budget of 2.5 first steps: the run stops as soon as one more step, at the mean cost so far,
    # would exceed it (SPEC §5.3 splits one budget between mid-training and RL)
    budget = 2.5 * la[0]['step_flops']
    rc = rl.main(base + ['--max_steps=10', f'--out_dir={tmp_path / "c"}', f'--flops_budget={budget}'])
    lc = _read_jsonl(tmp_path / 'c' / 'log.jsonl')
    assert 2 <= rc['step'] < 10 and rc['flops']['total'] == pytest.approx(lc[-1]['flops'])
    projected = [r['flops'] + r['flops'] / r['step'] for r in lc]  # used + the mean step
    assert all(p <= budget for p in projected[:-1]) and projected[-1] > budget


def test_two_process_run_gloo(tiny_base, tmp_path):
    """torchrun with 2 CPU processes: each rank rolls out its half of the prompts, rank 0 writes."""
    from conftest import run_pretrain
    out = tmp_path / 'ddp'
    run_pretrain(SMALL + [f"--init_from={tiny_base['out_dir']}", '--max_steps=2', f'--out_dir={out}'],
                 script='rl.py', nproc=2)
    log = _read_jsonl(out / 'log.jsonl')
    assert [r['step'] for r in log] == [1, 2]
    assert all(r['resp_len'] > 0 and 0 <= r['reward'] <= 1 for r in log)
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['step'] == 2 and ck['extra']['stream']['next'] == 8  # 4 prompts per step over 2 ranks
