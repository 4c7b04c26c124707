"""Tests of rl.py: the GRPO math and each variant against hand-computed values, the defaults against
numbers pinned from the code before the variants (commit 2cfd73f), the plumbing (log-prob indexing,
micro-batch, world-size and torch.compile invariance of the update, dynamic sampling, resume), rewards,
and a tiny run that must learn."""
import json
import math
import os
import random
import re
import sys
import types

import pytest
import torch

import checkpoint
import common
import data
import model as M
import rl
from verifier import REWARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# config: the loss_type presets and one-line errors


def test_loss_type_presets_and_overrides():
    c = rl.config()  # the paper's recipe (verl's GRPO as the study ran it)
    assert (c.loss_type, c.loss_agg, c.adv_norm, c.clip_eps_low, c.clip_eps_high) == \
        ('paper', 'token-mean', 'group', 0.2, 0.2)
    assert (c.ratio_level, c.dynamic_sampling, c.mask_truncated, c.overlong_buffer) == ('token', False, False, 0)
    d = rl.config(loss_type='dapo')
    assert (d.loss_agg, d.adv_norm, d.clip_eps_low, d.clip_eps_high) == ('token-mean', 'group', 0.2, 0.28)
    g = rl.config(loss_type='grpo')
    assert (g.loss_agg, g.adv_norm) == ('seq-mean-token-mean', 'group')
    dr = rl.config(loss_type='dr_grpo', clip_eps_high=0.3)  # a key given explicitly wins over the preset
    assert (dr.loss_agg, dr.adv_norm, dr.clip_eps_low, dr.clip_eps_high) == \
        ('seq-mean-token-sum-norm', 'none', 0.2, 0.3)


@pytest.mark.parametrize('kw, words', [({'loss_type': 'ppo'}, 'loss_type'), ({'reward': 'nope'}, 'reward'),
                                       ({'adv_norm': 'std'}, 'adv_norm'), ({'ratio_level': 'seq'}, 'ratio_level')])
def test_bad_choice_is_a_one_line_error(kw, words):
    with pytest.raises(SystemExit) as e:
        rl.config(**kw)
    assert words in str(e.value) and '\n' not in str(e.value)


def test_missing_or_empty_init_from_is_a_one_line_error(tmp_path):
    for path, words in ((tmp_path / 'nope', 'does not exist'), (tmp_path, 'has no ckpt.pt')):
        with pytest.raises(SystemExit) as e:
            rl.main(['tiny_rl', f'--init_from={path}', f'--out_dir={tmp_path / "out"}'])
        assert words in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(SystemExit) as e:  # an unknown reward fails before anything is loaded
        rl.main(['tiny_rl', '--reward=outcome_strict', f'--out_dir={tmp_path / "out"}'])
    assert 'reward' in str(e.value) and 'strict' in str(e.value)


# -----------------------------------------------------------------------------
# advantages, rewards and losses, by hand


def test_advantages_hand_computed():
    r = torch.tensor([1., 0., 0., 1., 0., 0., 0., 0., 1., 1., 1., 0.])
    a = rl.compute_advantages(r, 4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[:4], torch.tensor([.5, -.5, -.5, .5]) / (s + 1e-6))
    assert torch.equal(a[4:8], torch.zeros(4))  # all-equal group: no signal
    s3 = math.sqrt(((.25 ** 2) * 3 + .75 ** 2) / 3)  # [1, 1, 1, 0]: mean .75
    torch.testing.assert_close(a[8:], torch.tensor([.25, .25, .25, -.75]) / (s3 + 1e-6))
    # Dr.GRPO: r - mean; batch: r - group mean over the std of all 12 rewards (5 ones: sqrt(5 * 7 / 12 / 11))
    none = rl.compute_advantages(r, 4, norm='none')
    torch.testing.assert_close(none, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0, .25, .25, .25, -.75]))
    sb = math.sqrt(5 * 7 / 12 / 11)
    torch.testing.assert_close(rl.compute_advantages(r, 4, norm='batch'), none / (sb + 1e-6))
    assert common.global_std(r, 1) == pytest.approx(sb)
    torch.testing.assert_close(rl.compute_advantages(r, 4, norm='batch', batch_std=2.0), none / (2 + 1e-6))


def test_pods_max_variance_subset_hand_computed():
    f = rl.max_variance_subset
    # binary rewards: as balanced as the group allows (ceil(m/2) successes on a tie), earlier samples first
    assert f([1, 0, 0, 0, 1, 0, 0, 0], 4) == [0, 1, 2, 4]   # 2 successes + the first 2 failures
    assert f([0, 0, 0, 1], 3) == [0, 1, 3]                   # the only success + 2 failures
    assert f([1, 1, 1, 0, 1], 3) == [0, 1, 3]                # the only failure + 2 successes
    assert f([0, 1, 0, 1], 3) == [0, 1, 3]                   # m odd: ceil(3/2) = 2 successes, 1 failure
    assert f([0, 0, 0, 0], 2) == [0, 1] and f([1, 1, 1], 2) == [0, 1]   # no signal: the first m
    assert f([0, 1, 0], 3) == [0, 1, 2] and f([0, 1], 5) == [0, 1]      # m >= n: all of them
    # real rewards: the i highest and m - i lowest for the best i. m 2: {0.9, 0.1}; m 3: {0.9, 0.1, 0.2}
    # (variance .1267) beats {0.9, 0.7, 0.1} (.1156), {0.9, 0.7, 0.5} and {0.1, 0.2, 0.5}
    r = [0.2, 0.9, 0.5, 0.1, 0.7]
    assert f(r, 2) == [1, 3] and f(r, 3) == [0, 1, 3]
    assert f(torch.tensor(r), 3) == [0, 1, 3]


def test_pods_keeps_whole_group_advantages():
    """Advantages come from all group_size rewards (PODS); the update batch keeps update_size per group."""
    rew = torch.tensor([1., 0., 0., 0., 0., 1., 1., 0.])
    ro = {'reward': rew, 'row': [f'g{i // 4}s{i % 4}' for i in range(8)], 'train_mask': torch.ones(8, dtype=torch.bool)}
    ro['adv'] = rl.compute_advantages(rew, 4)
    kept = rl.downsample(ro, 4, 2)
    assert kept['row'] == ['g0s0', 'g0s1', 'g1s0', 'g1s1']       # one success and one failure per group
    # group 0 [1,0,0,0]: mean .25, unbiased std .5 -> +1.5 / -0.5; group 1 [0,1,1,0]: mean .5, std sqrt(1/3)
    s1 = math.sqrt(1 / 3) + 1e-6
    torch.testing.assert_close(kept['adv'], torch.tensor([.75 / (.5 + 1e-6), -.25 / (.5 + 1e-6), -.5 / s1, .5 / s1]))
    assert torch.equal(kept['reward'], torch.tensor([1., 0., 0., 1.])) and len(kept['train_mask']) == 4
    assert rl.downsample(ro, 4, 0) is ro and rl.downsample(ro, 4, 4) is ro   # the default: the whole group
    # the step's metrics count the solved groups and the successes drawn / kept
    ro['success'] = rew >= 1
    sums = rl.rollout_sums(dict(ro, verdict=[types.SimpleNamespace(outcome=1, process_acc=1, perfect=1)] * 8,
                                response=[[1]] * 8, finished=[True] * 8, prompt=[[1]] * 8), 4)
    assert (sums['solved'], sums['successes']) == (2, 3)
    assert int(rl.successes(rl.downsample(ro, 4, 2)).sum()) == 2


def test_passk_advantages_hand_computed():
    s = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    a = rl.passk_advantages(s, 4, 2)
    # [1,0,0,0], k 2: R = 1 - C(3,2)/C(4,2) = 1/2, sigma 1/2; A+ = (1/2)/(1/2) = 1,
    # A- = (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3
    torch.testing.assert_close(a[:4], torch.tensor([1., -1 / 3, -1 / 3, -1 / 3]), atol=1e-5, rtol=1e-5)
    # [1,1,0,0]: R = 1 - 1/6 = 5/6, sigma = sqrt(5)/6; A+ = (1/6)/sigma = 1/sqrt(5), A- = (1/6 - 1/3)/sigma
    v = 1 / math.sqrt(5)
    torch.testing.assert_close(a[4:8], torch.tensor([v, v, -v, -v]), atol=1e-5, rtol=1e-5)
    # [1,1,1,0]: fewer failures than k: every 2-subset passes (R = 1), no signal; [0,0,0,0], [1,1,1,1]: none
    assert torch.equal(a[8:], torch.zeros(12))
    # without the / sigma: [1,0,0,0] -> 1/2 and 1/2 - 2/3; sums to 0 over each group
    torch.testing.assert_close(rl.passk_advantages(s, 4, 2, 'none')[:4], torch.tensor([.5, -1 / 6, -1 / 6, -1 / 6]))
    big = rl.passk_advantages(torch.tensor([1] + [0] * 7, dtype=torch.bool), 8, 4)
    # 1 success in 8, k 4: R = 1 - C(7,4)/C(8,4) = 1/2; A+ = 1, A- = (1/2 - C(6,3)/C(7,3)) / (1/2) = -1/7
    torch.testing.assert_close(big, torch.tensor([1.] + [-1 / 7] * 7), atol=1e-5, rtol=1e-5)
    assert abs(float(big.sum())) < 1e-5
    # k = 1 is GRPO's r - mean (with the population std under 'group')
    r = s.float()
    torch.testing.assert_close(rl.passk_advantages(s, 4, 1, 'none'), rl.compute_advantages(r, 4, norm='none'))
    # PODS on top: the success and the first failure carry the whole group's pass@4 advantages
    ro = {'reward': torch.tensor([0.] * 5 + [1.] + [0.] * 2)}
    ro['adv'] = rl.passk_advantages(ro['reward'] >= 1, 8, 4)
    kept = rl.downsample(ro, 8, 2)
    torch.testing.assert_close(kept['adv'], torch.tensor([-1 / 7, 1.]), atol=1e-5, rtol=1e-5)


def test_pods_and_passk_keys_default_off_and_checked():
    c = rl.config()
    assert (c.update_size, c.adv_estimator) == (0, 'grpo')   # today's recipe: train on every sample, GRPO
    for kw, words in (({'update_size': 7}, 'update_size'), ({'adv_estimator': 'passk', 'passk_k': 9}, 'passk_k'),
                      ({'adv_estimator': 'passk', 'passk_k': 4, 'adv_norm': 'batch'}, 'adv_norm'),
                      ({'adv_estimator': 'pass'}, 'adv_estimator')):
        with pytest.raises(SystemExit) as e:
            rl.config(**kw)
        assert words in str(e.value)
    assert rl.config(group_size=64, update_size=8, adv_estimator='passk', passk_k=8).update_size == 8


def test_wreinforce_advantages_and_an_all_failure_group_trains():
    """W-REINFORCE: +psr_weight per success, -1 per failure, no baseline. A group of failures only has no
    GRPO signal (skipped), but W-REINFORCE trains on it and lowers those failures' log-probs."""
    s = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    torch.testing.assert_close(rl.wreinforce_advantages(s, 0.1), torch.tensor([.1, -1, -1, .1, -1, -1, -1, -1]))
    assert torch.equal(rl.wreinforce_advantages(s, 0.0), -(~s).float())       # NSR only
    with pytest.raises(SystemExit, match='psr_weight'):
        rl.config(adv_estimator='wreinforce', psr_weight=-1)
    prompts, responses = _toy_batch(4)
    fail = torch.zeros(4, dtype=torch.bool)                                   # one group of 4, all wrong
    before = rl.batch_logprobs(_tiny_model(), prompts, responses, 1000, 1.0, 'cpu')
    for adv, moves in ((rl.compute_advantages(fail.float(), 4), False), (rl.wreinforce_advantages(fail), True)):
        m = _tiny_model()
        cfg = rl.config(prompts_per_step=1, minibatch_prompts=1, kl_coef=0.0, micro_batch_tokens=1000,
                        skip_no_signal=True)
        batch = {'prompt': prompts, 'response': responses, 'adv': adv, 'old_logp': None, 'ref_logp': None}
        st = rl.update_policy(m, torch.optim.SGD(m.parameters(), lr=0.1), batch, cfg)
        after = rl.batch_logprobs(m, prompts, responses, 1000, 1.0, 'cpu')
        assert st['updates'] == int(moves)
        drop = [float(b.sum() - a.sum()) for a, b in zip(after, before)]
        assert all(d > 0 for d in drop) if moves else all(d == 0 for d in drop)


def test_overlong_penalty_hand_computed():
    # budget 10, buffer 4: no penalty up to 6 tokens, then linear to -penalty at 10
    p = rl.overlong_penalty([3, 6, 7, 8, 10], max_len=10, buffer=4, penalty=0.5)
    torch.testing.assert_close(p, torch.tensor([0., 0., -.125, -.25, -.5]))
    assert torch.equal(rl.overlong_penalty([3, 10], 10, 0), torch.zeros(2))  # buffer 0: off


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
    loss, st = rl.policy_loss(logp, old, adv, mask, dual_clip=3.0, kl_coef=0.0)
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


def test_clip_higher_hand_computed():
    """DAPO's clip-higher: [1 - .2, 1 + .28]. A = +1, ratio 1.25: clipped at 1.2 symmetrically (no
    gradient), inside 1.28 asymmetrically (gradient -1.25); ratio .7 (A = +1) and .75 (A = -1) are
    treated alike by both (the low side is unchanged)."""
    ratios = torch.tensor([[1.25, 0.7], [0.75, 1.0]])
    old = torch.full((2, 2), math.log(.3))
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    grads = {}
    for high in (0.2, 0.28):
        logp = (old + ratios.log()).requires_grad_(True)
        loss, st = rl.policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=high, kl_coef=0.0)
        # tokens: -A r or -A clip(r): [-1.2 | -1.25, -0.7], [0.8 (clipped from .75), 1.0]
        first = -1.2 if high == 0.2 else -1.25
        assert loss.item() == pytest.approx((first - 0.7 + 0.8 + 1.0) / 4, abs=1e-6)
        assert st['clipped'].item() == (2 if high == 0.2 else 1)
        loss.backward()
        grads[high] = logp.grad
    torch.testing.assert_close(grads[0.2], torch.tensor([[0.0, -0.7], [0.0, 1.0]]) / 4)
    torch.testing.assert_close(grads[0.28], torch.tensor([[-1.25, -0.7], [0.0, 1.0]]) / 4)


def test_gspo_sequence_ratio_hand_computed():
    """GSPO: one ratio per sequence, exp(mean token log-ratio), with seq-mean-token-mean:
    loss = mean_i max(-A_i s_i, -A_i clip(s_i)); d loss / d logp_t = -A_i s_i / (n_seqs |y_i|) unclipped."""
    old = torch.log(torch.tensor([[.5, .2, .4], [.1, .6, .3]]))
    lr_ = torch.tensor([[0.1, 0.3, -0.1], [0.5, 0.1, 7.0]])  # the 7.0 is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    s0, s1 = math.exp(0.1), math.exp(0.3)
    logp = (old + lr_).requires_grad_(True)
    loss, st = rl.policy_loss(logp, old, adv, mask, kl_coef=0.0, agg='seq-mean-token-mean', ratio_level='sequence')
    assert loss.item() == pytest.approx((-s0 + s1) / 2)  # both inside [.8, 1.2]... s1 = 1.35 > 1.2 but A < 0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 6] * 3, [s1 / 4, s1 / 4, 0.0]]))
    assert st['ratio'].item() == pytest.approx(3 * s0 + 2 * s1, rel=1e-5)
    # a tight clip (GSPO uses ~3e-4 / 4e-4): s0 = 1.105 > 1.05 with A > 0 -> clipped, no gradient
    logp = (old + lr_).requires_grad_(True)
    loss, st = rl.policy_loss(logp, old, adv, mask, kl_coef=0.0, agg='seq-mean-token-mean', ratio_level='sequence',
                              clip_eps_low=0.05, clip_eps_high=0.05)
    assert loss.item() == pytest.approx((-1.05 + s1) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0] * 3, [s1 / 4, s1 / 4, 0.0]]))


def test_loss_aggregation_modes_hand_computed():
    logp, old, adv, mask = _example()
    kw = dict(dual_clip=3.0, kl_coef=0.0)
    # per-sequence sums: seq 0 -2.7 over 3 tokens, seq 1 3.8 over 2 tokens
    tm, _ = rl.policy_loss(logp, old, adv, mask, agg='token-mean', **kw)
    sm, _ = rl.policy_loss(logp, old, adv, mask, agg='seq-mean-token-mean', **kw)
    dr, _ = rl.policy_loss(logp, old, adv, mask, agg='seq-mean-token-sum-norm', max_len=4, **kw)
    assert tm.item() == pytest.approx(1.1 / 5)
    assert sm.item() == pytest.approx((-2.7 / 3 + 3.8 / 2) / 2)
    assert dr.item() == pytest.approx(1.1 / (2 * 4))
    # gradients: token-mean 1/5 per token, seq-mean 1/(2 |y_i|), Dr.GRPO 1/(2 * 4)
    for agg, scale in (('token-mean', [[1 / 5] * 3, [1 / 5] * 3]), ('seq-mean-token-mean', [[1 / 6] * 3, [1 / 4] * 3]),
                       ('seq-mean-token-sum-norm', [[1 / 8] * 3, [1 / 8] * 3])):
        lp = logp.detach().clone().requires_grad_(True)
        rl.policy_loss(lp, old, adv, mask, agg=agg, max_len=4, **kw)[0].backward()
        torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, 0.0, -0.5], [0.0, 0.0, 0.0]]) * torch.tensor(scale))
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
# dynamic sampling (DAPO), on scripted rewards


def _fake_draw(rounds_rewards, G):
    """draw(r) -> a scored rollout whose group rewards are rounds_rewards[r] (one list per group)."""
    calls = []

    def draw(r):
        calls.append(r)
        rew = [x for g in rounds_rewards[r] for x in g]
        n = len(rew)
        v = types.SimpleNamespace(outcome=False, process_acc=0.0, perfect=False)
        return {'row': [f'r{r}g{k // G}' for k in range(n)], 'prompt': [[1, 2]] * n, 'response': [[3]] * n,
                'finished': [True] * n, 'text': [''] * n, 'verdict': [v] * n,
                'reward': torch.tensor(rew, dtype=torch.float32),
                'train_mask': torch.ones(n, dtype=torch.bool)}
    return draw, calls


def test_dynamic_sampling_keeps_exactly_the_groups_with_signal():
    G = 2
    rounds = [[[1, 1], [0, 1], [0, 0]],   # 1 group with signal
              [[1, 0], [1, 1], [1, 0]],   # 2 more: 3 = enough, stop
              [[0, 1], [0, 1], [0, 1]]]   # never drawn
    draw, calls = _fake_draw(rounds, G)
    ro, sums, info = rl.fill_step(draw, 3, G, dynamic=True, max_rounds=3)
    assert calls == [0, 1] and info == {'rounds': 2, 'topped_up': 0}
    assert ro['row'][::G] == ['r0g1', 'r1g0', 'r1g2'] and len(ro['reward']) == 3 * G
    assert rl.has_signal(ro['reward'], G).all()
    assert sums['groups'] == 6 and sums['no_signal'] == 3  # metrics see every drawn group
    # without dynamic sampling: the first round as it is
    draw, calls = _fake_draw(rounds, G)
    ro, sums, info = rl.fill_step(draw, 3, G)
    assert calls == [0] and ro['row'][::G] == ['r0g0', 'r0g1', 'r0g2'] and info['rounds'] == 1


def test_dynamic_sampling_stops_at_its_bound():
    G = 2
    rounds = [[[1, 1], [0, 1], [0, 0]], [[1, 1], [0, 0], [1, 1]], [[1, 0], [1, 0], [1, 0]]]
    draw, calls = _fake_draw(rounds, G)
    ro, sums, info = rl.fill_step(draw, 3, G, dynamic=True, max_rounds=2)
    # 2 rounds drawn, 1 group with signal: topped up with the first 2 no-signal groups (advantage 0)
    assert calls == [0, 1] and info == {'rounds': 2, 'topped_up': 2}
    assert ro['row'][::G] == ['r0g1', 'r0g0', 'r0g2']
    assert rl.compute_advantages(ro['reward'], G)[G:].abs().sum() == 0


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


ADV8 = torch.tensor([1., -1., .5, -.5, 2., 0., -2., 1.])


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


def test_micro_batches_respect_the_token_budget():
    lengths = [5, 17, 3, 9, 9, 30, 2, 11]
    mbs = rl.micro_batches(range(8), lengths, 20)
    assert sorted(i for mb in mbs for i in mb) == list(range(8))
    assert all(len(mb) * max(lengths[i] for i in mb) <= 20 or len(mb) == 1 for mb in mbs)
    assert [lengths[i] for mb in mbs for i in mb] == sorted(lengths)  # length-sorted: little padding
    assert rl.micro_batches(range(3), [50, 60, 70], 10) == [[0], [1], [2]]  # one row at least


def _perturbed_old(m, prompts, responses):
    """Old log-probs away from the current policy, so the clips and the dual clip engage."""
    lps = rl.batch_logprobs(m, prompts, responses, 40, 1.0, 'cpu')
    return [lp - 1.2 * torch.sin(torch.arange(len(lp), dtype=torch.float32) + i) for i, lp in enumerate(lps)]


# update_policy at commit 2cfd73f (before the variants), on this batch with SGD lr 1, 2 mini-batches, KL 0.5,
# entropy 0.01: stats and two checksums of the weight change (sum |dw| and sum dw * sin(1..n))
PINNED_2CFD73F = {
    'token-mean': ({'tokens': 50.0, 'ratio': 70.4965391159, 'clipped': 19.0, 'dual_clipped': 4.0,
                    'kl': 1.7085249424, 'entropy': 180.6233062744, 'pg_loss': 0.63480822, 'grad_norm': 2.6332550049},
                   180.96760577260056, 4.141865664464462),
    'seq-mean-token-mean': ({'tokens': 50.0, 'ratio': 70.4124412537, 'clipped': 21.0, 'dual_clipped': 4.0,
                             'kl': 0.6221328974, 'entropy': 182.3971366882, 'pg_loss': 0.2278873622,
                             'grad_norm': 1.6595808268}, 107.19686665189329, 2.00765313621844),
    'seq-mean-token-sum-norm': ({'tokens': 50.0, 'ratio': 72.2861719131, 'clipped': 21.0, 'dual_clipped': 4.0,
                                 'kl': 0.4728351831, 'entropy': 183.5248756409, 'pg_loss': 0.2459466364,
                                 'grad_norm': 0.8108963966}, 46.49436008009144, 0.9944311724129588),
}


@pytest.mark.parametrize('agg', list(PINNED_2CFD73F))
def test_defaults_reproduce_the_update_before_the_variants(agg):
    """Regression: the default config (loss_type 'paper', token ratio, no masking) gives the loss,
    statistics and gradients of the code before the variants (commit 2cfd73f, pinned above)."""
    prompts, responses = _toy_batch(8)
    m = _tiny_model()
    before = [p.detach().clone() for p in m.parameters()]
    batch = {'prompt': prompts, 'response': responses, 'adv': ADV8, 'old_logp': _perturbed_old(m, prompts, responses),
             'ref_logp': rl.batch_logprobs(_tiny_model(seed=1), prompts, responses, 60, 1.0, 'cpu')}
    cfg = rl.config(prompts_per_step=2, minibatch_prompts=1, loss_agg=agg, kl_coef=0.5, entropy_coef=0.01,
                    grad_clip=0.0, max_response_len=16, micro_batch_tokens=50)
    st = rl.update_policy(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, cfg)
    stats, abs_sum, weighted = PINNED_2CFD73F[agg]
    for k, v in stats.items():
        assert st[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    d = [(a - b).detach().double() for a, b in zip(m.parameters(), before)]
    assert float(sum(x.abs().sum() for x in d)) == pytest.approx(abs_sum, rel=1e-5)
    w = lambda t: (t.flatten() * torch.arange(1, t.numel() + 1, dtype=torch.float64).sin()).sum()
    assert float(sum(w(x) for x in d)) == pytest.approx(weighted, rel=1e-5)


def _update(m, prompts, responses, adv, agg='token-mean', budget=1000, n_minibatches=1, kl=True, **kw):
    ref = _tiny_model(seed=1)
    batch = {'prompt': prompts, 'response': responses, 'adv': adv,
             'old_logp': rl.batch_logprobs(m, prompts, responses, 30, 1.0, 'cpu') if n_minibatches > 1 else None,
             'ref_logp': rl.batch_logprobs(ref, prompts, responses, 45, 1.0, 'cpu') if kl else None, **kw}
    cfg = rl.config(prompts_per_step=n_minibatches, minibatch_prompts=1, loss_agg=agg, micro_batch_tokens=budget,
                    kl_coef=0.5 if kl else 0.0, entropy_coef=0.01, grad_clip=0.0, max_response_len=16)
    return rl.update_policy(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, cfg)


@pytest.mark.parametrize('agg', ['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'])
def test_update_is_invariant_to_micro_batch_size(agg):
    prompts, responses = _toy_batch(8)
    a, b = _tiny_model(), _tiny_model()
    sa = _update(a, prompts, responses, ADV8, agg, budget=1000)  # one micro-batch
    sb = _update(b, prompts, responses, ADV8, agg, budget=25)    # many
    assert sa['updates'] == 1 and sa['grad_norm'] > 0
    assert sa['pg_loss'] == pytest.approx(sb['pg_loss'], abs=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_masked_truncated_responses_contribute_no_gradient():
    """mask_truncated: a masked sample changes nothing, whatever its advantage: the update equals
    the one on the batch without it (the normalisers count only the trained tokens)."""
    prompts, responses = _toy_batch(8)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    a, b, c = _tiny_model(), _tiny_model(), _tiny_model()
    adv2 = ADV8.clone()
    adv2[~keep] = 5.0
    sa = _update(a, prompts, responses, ADV8, train_mask=keep)
    _update(b, prompts, responses, adv2, train_mask=keep, budget=25)
    idx = keep.nonzero().squeeze(1).tolist()
    sc = _update(c, [prompts[i] for i in idx], [responses[i] for i in idx], ADV8[idx])
    assert sa['tokens'] == sc['tokens'] == sum(len(responses[i]) for i in idx)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pc, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pb, pc, atol=1e-6, rtol=1e-5)
    # score() masks exactly the truncated responses when asked
    row = data.generate(random.Random(0), 3, 'crazy_zootopia', 'normalforward').to_row()
    ro = {'row': [row] * 2, 'text': ['', ''], 'response': [[1], [1, 2]], 'finished': [True, False]}
    assert rl.score(dict(ro), rl.config(mask_truncated=True))['train_mask'].tolist() == [True, False]
    assert rl.score(dict(ro), rl.config())['train_mask'].tolist() == [True, True]


def test_update_moves_logprobs_with_the_advantage():
    m = _tiny_model()
    prompts, responses = _toy_batch(4)
    adv = torch.tensor([1., -1., 1., -1.])
    before = rl.batch_logprobs(m, prompts, responses, 100, 1.0, 'cpu')
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    batch = {'prompt': prompts, 'response': responses, 'adv': adv, 'old_logp': None, 'ref_logp': None}
    cfg = rl.config(prompts_per_step=1, minibatch_prompts=1, kl_coef=0.0, micro_batch_tokens=30)
    for _ in range(3):
        rl.update_policy(m, opt, batch, cfg)
    after = rl.batch_logprobs(m, prompts, responses, 100, 1.0, 'cpu')
    delta = [float((a - b).sum()) for a, b in zip(after, before)]
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0


def test_skip_no_signal_leaves_weights_of_no_signal_minibatches_alone():
    """A mini-batch whose advantages are all 0 has only the KL term's gradient; AdamW normalises it to
    a full-size step (every weight moves by ~lr). skip_no_signal skips exactly those mini-batches."""
    prompts, responses = _toy_batch(8)
    ref = rl.batch_logprobs(_tiny_model(seed=1), prompts, responses, 45, 1.0, 'cpu')

    def run(adv, skip):
        m = _tiny_model()
        before = [p.detach().clone() for p in m.parameters()]
        batch = {'prompt': prompts, 'response': responses, 'adv': adv, 'old_logp': None, 'ref_logp': ref}
        cfg = rl.config(prompts_per_step=2, minibatch_prompts=1, kl_coef=0.001, micro_batch_tokens=1000,
                        skip_no_signal=skip)
        st = rl.update_policy(m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0), batch, cfg)
        return st, max(float((p.detach() - b).abs().max()) for p, b in zip(m.parameters(), before))

    zero = torch.zeros(8)
    st, moved = run(zero, skip=False)
    assert st['updates'] == 2 and moved > 5e-4        # ~lr: Adam scales the KL noise up to a full step
    st, moved = run(zero, skip=True)
    assert st['updates'] == 0 and moved == 0.0
    half = torch.cat([ADV8[:4], torch.zeros(4)])        # signal in the first mini-batch only
    st, _ = run(half, skip=True)
    assert st['updates'] == 1


def test_several_minibatches_use_old_logprobs():
    """With 2 mini-batches the second update's ratio is against the rollout policy, not 1."""
    prompts, responses = _toy_batch(8)
    st = _update(_tiny_model(), prompts, responses, ADV8, budget=40, n_minibatches=2, kl=False)
    assert st['updates'] == 2
    assert st['ratio'] / st['tokens'] != pytest.approx(1.0, abs=1e-7)  # the 2nd mini-batch moved


def test_update_under_torch_compile_matches_eager():
    """compile=True wraps the training forward in torch.compile(dynamic=True): the update goes through
    dynamo and autograd tracing on CPU (aot_eager here: inductor's C++ build of even this model took
    minutes on the shared 2-core machine) and must give the eager weights."""
    prompts, responses = _toy_batch(6)
    a, b = _tiny_model(), _tiny_model()
    cfg = rl.config(prompts_per_step=1, minibatch_prompts=1, kl_coef=0.0, grad_clip=1.0, micro_batch_tokens=40)
    for m, wrap in ((a, lambda m: m), (b, lambda m: torch.compile(m, dynamic=True, backend='aot_eager'))):
        batch = {'prompt': prompts, 'response': responses, 'adv': ADV8[:6], 'old_logp': None, 'ref_logp': None}
        rl.update_policy(wrap(m), torch.optim.AdamW(m.parameters(), lr=1e-2), batch, cfg)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


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
    return rl.config(**kw)


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
    mine = slice(rank * 4, rank * 4 + 4)
    ref = _tiny_model(seed=1)
    batch = {'prompt': prompts[mine], 'response': responses[mine], 'adv': ADV8[mine],
             'old_logp': rl.batch_logprobs(m, prompts[mine], responses[mine], 20, 1.0, 'cpu'),
             'ref_logp': rl.batch_logprobs(ref, prompts[mine], responses[mine], 30, 1.0, 'cpu')}
    cfg = rl.config(prompts_per_step=4, minibatch_prompts=2, micro_batch_tokens=1, kl_coef=0.5, entropy_coef=0.01,
                    grad_clip=0.0)
    st = rl.update_policy(ddp, torch.optim.SGD(m.parameters(), lr=1.0), batch, cfg)
    vec = torch.tensor([st['tokens'], st['clipped']])
    tdist.all_reduce(vec)
    if rank == 0:
        torch.save({'params': m.state_dict(), 'tokens': vec[0].item()}, out_file)
    del ddp  # (the DDP wrapper goes first: common.cleanup_distributed)
    common.cleanup_distributed()


def test_update_matches_across_world_sizes(tmp_path):
    """2 gloo ranks with half the groups each == 1 process with all (2 mini-batches: each rank
    holds the same halves of each mini-batch the single process holds)."""
    import torch.multiprocessing as mp
    out = tmp_path / 'ddp.pt'
    mp.spawn(_half_update_worker, args=(2, str(tmp_path / 'init'), str(out)), nprocs=2)
    got = torch.load(out)
    # single process: mini-batch j = samples of both ranks' j-th halves, in the same order
    prompts, responses = _toy_batch(8)
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    m = _tiny_model()
    p, r = [prompts[i] for i in order], [responses[i] for i in order]
    batch = {'prompt': p, 'response': r, 'adv': ADV8[order], 'old_logp': rl.batch_logprobs(m, p, r, 20, 1.0, 'cpu'),
             'ref_logp': rl.batch_logprobs(_tiny_model(seed=1), p, r, 30, 1.0, 'cpu')}
    cfg = rl.config(prompts_per_step=4, minibatch_prompts=2, micro_batch_tokens=40, kl_coef=0.5, entropy_coef=0.01,
                    grad_clip=0.0)
    st = rl.update_policy(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, cfg)
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
    of STUDY.md §5.4), so the assertions are on outcome, and the log shows the hacking."""
    out = tmp_path / 'rl'
    res = rl.main(['tiny_rl', f'--init_from={edge_base}', f'--out_dir={out}', '--op_min=2', '--op_max=2',
                   '--world=paper', '--reward=outcome', '--reverse_frac=1.0', '--eval_modes=forwardreverse', '--prompts_per_step=16',
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
         '--micro_batch_tokens=400', '--eval_every=0', '--sample_every=1', '--log_every=1']


class _Crash(Exception):
    pass


def test_rerun_resumes_a_half_finished_run_and_exits_on_a_finished_one(tiny_base, tmp_path, one_thread, monkeypatch,
                                                                         capsys):
    """The same command twice: a run that crashed after step 2 (checkpoint at 1) resumes and ends
    exactly as an uninterrupted one (weights, optimizer, prompts, logs, FLOPs); a finished run says so
    and changes nothing; a changed config is refused, naming the key."""
    cmd = SMALL + [f"--init_from={tiny_base['out_dir']}", '--ckpt_every=1', '--max_steps=3']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ra = rl.main(cmd + [f'--out_dir={a}'])
    log_step = rl.log_step

    def crash_after_logging_step_2(S, C, m, ro):
        log_step(S, C, m, ro)
        if m['step'] == 2:
            raise _Crash  # after its log lines, before its checkpoint

    monkeypatch.setattr(rl, 'log_step', crash_after_logging_step_2)
    monkeypatch.setattr(rl, 'save', lambda S, C, save=rl.save: save(S, C) if S.step < 2 else None)
    with pytest.raises(_Crash):
        rl.main(cmd + [f'--out_dir={b}'])
    monkeypatch.undo()
    assert torch.load(b / 'ckpt.pt', weights_only=True)['step'] == 1 and len(_read_jsonl(b / 'log.jsonl')) == 2
    rb = rl.main(cmd + [f'--out_dir={b}'])
    assert ra['step'] == rb['step'] == 3 and ra['flops'] == rb['flops']
    ca, cb = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (a, b))
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for sa, sb in zip(ca['optimizer']['state'].values(), cb['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ca['extra']['stream'] == cb['extra']['stream'] == {'next': 12, 'seed': '7919'}
    la, lb = _read_jsonl(a / 'log.jsonl'), _read_jsonl(b / 'log.jsonl')
    drop = ('gen_tok_per_s', 'tok_per_s', 'step_s')
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == \
           [{k: v for k, v in r.items() if k not in drop} for r in lb]
    sa, sb = _read_jsonl(a / 'samples.jsonl'), _read_jsonl(b / 'samples.jsonl')
    assert [s['response'] for s in sa] == [s['response'] for s in sb]
    # finished: the same command again does nothing and says so
    capsys.readouterr()
    mtime = os.path.getmtime(b / 'ckpt.pt')
    rc = rl.main(cmd + [f'--out_dir={b}'])
    assert rc['step'] == 3 and 'finished' in capsys.readouterr().out
    assert os.path.getmtime(b / 'ckpt.pt') == mtime and len(_read_jsonl(b / 'log.jsonl')) == 3
    # a longer run continues it (max_steps may change); another learning rate may not
    with pytest.raises(SystemExit) as e:
        rl.main(cmd + [f'--out_dir={b}', '--lr=1e-3'])
    assert 'lr' in str(e.value) and 'resume_override' in str(e.value)
    # FLOPs: 2N per rollout token, 2N per old/ref token, 6N per trained token
    n = checkpoint.load_checkpoint(a / 'ckpt.pt')['model'].num_params()
    f = ra['flops']
    assert f['train'] == pytest.approx(3 * f['ref']) and f['old'] == pytest.approx(f['ref'])
    assert f['total'] == pytest.approx(f['rollout'] + f['ref'] + f['old'] + f['train'])
    assert f['rollout'] % (2 * n) == 0 and f['rollout'] < f['ref']  # prompts prefilled once per group


def test_flop_budget_is_respected_from_the_first_step(tiny_base, tmp_path, one_thread):
    base = SMALL + [f"--init_from={tiny_base['out_dir']}"]
    ra = rl.main(base + ['--max_steps=2', f'--out_dir={tmp_path / "a"}'])
    first = _read_jsonl(tmp_path / 'a' / 'log.jsonl')[0]['step_flops']
    # below one step: not even the first is taken (its cost is bounded before it runs)
    r0 = rl.main(base + ['--max_steps=10', f'--out_dir={tmp_path / "z"}', f'--flops_budget={0.9 * first}'])
    assert r0['step'] == 0 and r0['flops']['total'] == 0
    # a budget of 2.5 first steps: the run stops as soon as one more step, at the mean cost so far,
    # would exceed it (STUDY.md §5.3 splits one budget between mid-training and RL)
    budget = 2.5 * first
    rc = rl.main(base + ['--max_steps=10', f'--out_dir={tmp_path / "c"}', f'--flops_budget={budget}'])
    lc = _read_jsonl(tmp_path / 'c' / 'log.jsonl')
    assert 2 <= rc['step'] < 10 and rc['flops']['total'] == pytest.approx(lc[-1]['flops'])
    assert rc['flops']['total'] <= budget
    projected = [r['flops'] + r['flops'] / r['step'] for r in lc]  # used + the mean step
    assert all(p <= budget for p in projected[:-1]) and projected[-1] > budget
    assert ra['flops']['total'] > 0


def test_variants_run_end_to_end(tiny_base, tmp_path, one_thread, monkeypatch):
    """DAPO (clip-higher, dynamic sampling, overlong penalty and masking) and GSPO run through the
    loop and log what they did (to log.jsonl and, with --logger=wandb, a stand-in for the package)."""
    from conftest import StubWandb
    wandb = StubWandb()
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    out = tmp_path / 'dapo'
    rl.main(SMALL + [f"--init_from={tiny_base['out_dir']}", '--max_steps=2', f'--out_dir={out}', '--loss_type=dapo',
                     '--dynamic_sampling=True', '--max_rollouts=2', '--overlong_buffer=8', '--mask_truncated=True',
                     '--ratio_level=sequence', '--adv_norm=batch', '--logger=wandb'])
    log = _read_jsonl(out / 'log.jsonl')
    assert wandb.logged == [({f'train/{k}': v for k, v in r.items() if k != 'step'}, r['step']) for r in log]
    assert wandb.inits[0]['job_type'] == 'rl' and wandb.finished == 1
    assert [r['step'] for r in log] == [1, 2]
    for r in log:
        assert r['drawn'] in (4, 8) and r['dropped'] == r['drawn'] - 4 and 0 <= r['no_signal'] <= 1
        assert r['topped_up'] <= 4 and r['reward'] <= 1
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['config']['clip_eps_high'] == 0.28 and ck['extra']['stream']['next'] == 4 * sum(
        r['drawn'] // 4 for r in log)


def test_pods_and_passk_run_end_to_end(tiny_base, tmp_path, one_thread):
    """G 6 rollouts per prompt, an update on 2 of each (PODS) with pass@2 advantages: the step trains on
    4 x 2 samples and logs what it kept."""
    out = tmp_path / 'pods'
    rl.main(SMALL + [f"--init_from={tiny_base['out_dir']}", '--max_steps=2', f'--out_dir={out}', '--group_size=6',
                     '--update_size=2', '--adv_estimator=passk', '--passk_k=2', '--reward=outcome'])
    log = _read_jsonl(out / 'log.jsonl')
    assert [r['step'] for r in log] == [1, 2]
    for r in log:
        assert r['kept'] == 4 * 2 and r['drawn'] == 4
        assert 0 <= r['solved_groups'] <= 4 and r['kept_successes'] <= min(r['successes'], 4)
        assert r['solved_groups'] <= r['successes'] <= 24


def test_two_process_run_gloo(tiny_base, tmp_path):
    """torchrun with 2 CPU processes: each rank rolls out its half of the prompts, rank 0 writes;
    dynamic sampling keeps the ranks in lockstep; re-running the finished command is a no-op."""
    from conftest import run_pretrain
    out = tmp_path / 'ddp'
    cmd = SMALL + [f"--init_from={tiny_base['out_dir']}", '--max_steps=2', f'--out_dir={out}',
                   '--dynamic_sampling=True', '--max_rollouts=2']
    run_pretrain(cmd, script='rl.py', nproc=2)
    log = _read_jsonl(out / 'log.jsonl')
    assert [r['step'] for r in log] == [1, 2]
    assert all(r['resp_len'] > 0 and 0 <= r['reward'] <= 1 for r in log)
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ck['step'] == 2 and len(ck['extra']['rng']) == 2  # every rank's RNG state
    assert ck['extra']['stream']['next'] == sum(r['drawn'] for r in log)  # 4 prompts per round over 2 ranks
    p = run_pretrain(cmd, script='rl.py', nproc=2)
    assert 'finished' in p.stdout and len(_read_jsonl(out / 'log.jsonl')) == 2


def test_old_logprobs_come_from_the_module_that_trains(monkeypatch):
    """With compile=True the update runs the compiled policy; the old log-probs must come from that
    same module (a compiled and an eager forward round differently, so the first ratio would not be 1)."""
    seen = []
    S = types.SimpleNamespace(logprob_model='compiled policy', policy='eager policy', ref=None, device='cpu')
    C = rl.config(prompts_per_step=4, minibatch_prompts=2)  # two updates a step: old log-probs are needed
    monkeypatch.setattr(rl, 'batch_logprobs', lambda model, *a: seen.append(model) or 'lp')
    old, ref = rl.rollout_logprobs(S, C, {'prompt': [[1]], 'response': [[2]]})
    assert (old, ref) == ('lp', None) and seen == ['compiled policy']
