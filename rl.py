"""
RL post-training with GRPO (STUDY.md §4 "RL"), a handwritten loop in one file.

One step of `main`, each phase a function a fork can replace:
  take prompts     PromptStream.take(): generated on the fly (op range, template weights, reverse
                   share) or read from a JSONL (ours or the released format)
  rollout          rollout(): one engine.complete(all of this rank's prompts, num_samples=G) call
  rewards          compute_rewards(): verifier.verify(text, gold graph) -> verifier.reward(verdict, kind),
                   plus DAPO's soft overlong penalty if asked; with dynamic sampling, groups whose
                   rewards are all equal are dropped and more prompts drawn (collect_rollouts())
  advantages       compute_advantages(): (r - group mean) / group std (or none, or the batch std), or
                   passk_advantages() or wreinforce_advantages(); then downsample() keeps update_size
                   per group (PODS; 0 = all)
  old / reference  rollout_logprobs(): "old" log-probs of the current policy and the reference's
  update           update_policy(model, optimizer, batch, cfg): prompts_per_step / minibatch_prompts
                   optimizer steps of policy_loss() (PPO clip + dual clip, k3 KL, entropy bonus)
  metrics, log     step_metrics(), log_step(); held-out evaluation and checkpoints

Run:
  python rl.py tiny_rl                                  # CPU, minutes (from out/tiny_base)
  python rl.py paper_rl                                 # one GPU, from out/base, op 11-14
  python rl.py paper_rl_op7-10 --reward=strict --out_dir=out/rl_op7-10_strict
  torchrun --standalone --nproc_per_node=8 rl.py paper_rl
  torchrun --standalone --nproc_per_node=2 rl.py tiny_rl   # CPU, gloo
  python rl.py paper_rl --init_from=out/mid_80 --flops_budget=1.2e17 --max_steps=100000   # STUDY.md §5.3
  python rl.py tiny_rl --loss_type=dapo --dynamic_sampling=True --overlong_buffer=48       # a DAPO ablation
Re-running a command continues from out_dir/ckpt.pt (same prompts, RNG and optimizer: exact); a
finished run says so and exits. A changed config is an error (naming the keys) unless
--resume_override=True; max_steps, flops_budget and how often we log/evaluate/save may change.

The paper's recipe is the default: loss_type='paper' (verl's GRPO as the paper ran it: token-mean
loss, group-std advantages, symmetric clip 0.2, dual clip 3.0, k3 KL 0.001), no dynamic sampling,
no overlong shaping, token-level ratio. The variants people ablate, each a key (README has a table):
  loss_type          'paper' | 'grpo' (DeepSeekMath: seq-mean-token-mean) | 'dr_grpo' (constant
                     normaliser, no std) | 'dapo' (token-mean, clip-higher 0.2/0.28): sets loss_agg,
                     adv_norm, clip_eps_low/high unless those are given
  clip_eps_low/high  asymmetric ratio clip [1 - low, 1 + high] (DAPO clip-higher)
  adv_norm           group (GRPO) | none (Dr.GRPO) | batch (std over the step's rewards, as TRL)
  ratio_level        token (PPO) | sequence (GSPO: exp of the mean token log-ratio; use small clips)
  dynamic_sampling   DAPO: only groups with signal, up to max_rollouts rollouts per step
  mask_truncated     DAPO overlong filtering: truncated responses carry no loss
  overlong_buffer    DAPO soft overlong penalty, linear to -overlong_penalty over the last N tokens
  update_size        PODS (Xu et al. 2025): roll out group_size per prompt (e.g. 64), train on the
                     update_size of each group with the largest reward variance (as balanced a set of
                     successes and failures as the group allows), advantages from the whole group
  adv_estimator      'passk': pass@k training's analytic advantage (Chen et al. 2025; k = passk_k);
                     'wreinforce': +psr_weight for a success, -1 for a failure, no baseline (Zhu et al. 2025)

Choices, and where we differ from verl (the paper's code):
- Old log-probs are recomputed by a forward pass of the current policy before the updates (as verl
  does), not taken from the sampler: the sampler's log-probs come from the KV-cache path (bf16 on
  GPU, different kernels) and are at temperature 1, so using them would make the first ratio
  differ from 1 by numerical noise. With a single update per rollout (prompts_per_step ==
  minibatch_prompts, ppo_epochs 1) the pass is skipped: old = current, detached (ratio == 1).
- With --sampler=vllm (vllm_sampler.py) the rollouts are drawn by vLLM from a copy of the policy whose
  weights are replaced in place after every step (load_weights, as TRL's colocated mode), and the old
  log-probs still come from our model's forward pass as above (or old = current), never from vLLM's
  sampling log-probs. So the ratio stays exactly 1 before the first update, and what changes is only
  the behaviour policy: the samples come from vLLM's kernels, whose distribution differs from our
  forward's by numerical noise (fp32 CPU: ~1e-6 in a token's log-prob; bf16 GPU: larger), and that
  mismatch goes uncorrected (no truncated importance weight, as verl's default) -- as with our own
  engine, whose KV-cache path differs from the forward in the same way, only by other kernels.
- Log-probs (policy, old and reference) are taken from logits / temperature, as verl does, so the
  ratio is measured against the distribution that was actually sampled.
- Advantages use the unbiased group std (torch.std, as verl).
- Losses are normalised over the whole mini-batch across micro-batches and ranks (the token count
  is all-reduced), so the gradient does not depend on micro-batch size or world size.
- Weights stay fp32 with bf16 autocast on CUDA: at lr 1e-6 bf16 weights would drop most updates.
- The prompt stream is a pure function of (prompt_seed, index) and the sampler's noise of
  (seed, step, prompt, sample index) -- not of the rank or the world size; with the optimizer and
  per-rank RNG states this makes resume exact.
- Dynamic sampling works per rank: each rank keeps the first groups with signal of its own slices
  until it holds its share of prompts_per_step (ranks roll out in lockstep, so every rank draws the
  same number of rounds). If max_rollouts rounds do not yield enough, the step is topped up with
  no-signal groups (advantage 0: no policy gradient, only KL), so a step always has the same shape.
  Reward metrics are over every drawn sample (the policy's health, not the filtered batch's).
- FLOPs follow STUDY.md §4: 2N per token of every forward-only pass (rollout: each prompt once per
  group -- it is prefilled once -- plus every generated token, over all dynamic-sampling rounds;
  old and reference passes: prompt + response per sample) and 6N per trained token (prompt +
  response, per PPO epoch), N = num_params(). Held-out evaluation is not counted. The FLOP budget
  stops the run before a step would exceed it: the mean step so far, or before the first step a
  bound (every response at the budget).
"""

import copy
import dataclasses
import math
import os
import random
import time
import types
from contextlib import nullcontext

import torch

import common
import data
import engine
import evaluate
import verifier
import vllm_sampler
from checkpoint import load_run, resolve_ckpt, restore_training_state, resume_checkpoint, rng_state, save_checkpoint
from common import all_reduce, global_std

# -----------------------------------------------------------------------------
# Defaults (paper values, STUDY.md §4). Presets in config/*rl*.py override them, then --key=value.
defaults = dict(
    # I/O
    init_from='out/base',       # starting run dir or ckpt.pt (pre/mid-training); also the frozen KL reference
    tokenizer='',               # tokenizer.json; '' = the one in init_from's run dir (else its data_dir)
    out_dir='out/rl',           # ckpt.pt, log.jsonl, eval.jsonl, samples.jsonl (rank 0); re-running resumes
    resume_override=False,      # allow resuming out_dir/ckpt.pt with a changed config
    # RL prompts
    prompts='',                 # JSONL of problems (ours or the released format); '' = generate on the fly
    op_min=11,                  # prompts have op in [op_min, op_max] (generated uniformly, or a JSONL filtered)
    op_max=14,
    templates={'crazy_zootopia': 1.0, 'teachers_in_school': 1.0, 'movie_festival_awards': 1.0},  # weights (0 = never)
    reverse_frac=0.5,           # share of forwardreverse problems (generated prompts)
    mixture='',                 # a data.MIXTURES name or ops spec (e.g. 'rl_ctx_zoo0.9'); replaces the 4 keys
                                # above for generated prompts (a JSONL is then not filtered by op)
    world='',                   # data.WORLDS name or 'places,items,noise' for generated prompts and held-out
                                # problems ('' = the mixture's own world; the paper's for op_min..op_max)
    prompt_seed=7919,           # seeds the prompt stream (held-out ids are excluded whatever the seed)
    exclude='',                 # comma-separated JSONL files whose ids must never be RL prompts (besides held-out sets)
    # rollout and reward
    group_size=6,               # G samples per prompt
    update_size=0,              # PODS (Xu et al. 2025): train on this many of each group's G rollouts, those with
                                # the largest reward variance (advantages still from all G); 0 = all G
    adv_estimator='grpo',       # grpo: r - group mean (over adv_norm) | passk: pass@k training's analytic
                                # advantage (Chen et al. 2025) of binary success (reward >= 1), k = passk_k
                                # | wreinforce: W-REINFORCE (Zhu et al. 2025), +psr_weight / -1 for a success / failure
    passk_k=8,                  # k of adv_estimator='passk' (1 <= k <= group_size; k = 1 is plain GRPO)
    psr_weight=0.1,             # adv_estimator='wreinforce': the weight of a success (the paper's 0.1; 0 = NSR only)
    prompts_per_step=1024,      # prompts per step (groups trained on), over all ranks
    max_prompt_len=1024,        # longer prompts are skipped
    max_response_len=1024,      # generation budget; unfinished responses are "truncated"
    temperature=1.0,            # sampling temperature (also divides the logits of the loss, as verl)
    reward='outcome',           # outcome | blend_0.2_0.8 | blend_0.5_0.5 | strict (verifier.REWARDS)
    # GRPO loss: loss_type sets the three keys marked (L) unless they are given
    loss_type='paper',          # paper | grpo | dr_grpo | dapo (LOSS_TYPES; 'paper' = the study's recipe)
    loss_agg='',                # (L) token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
    adv_norm='',                # (L) group: / group std (GRPO) | none: r - mean (Dr.GRPO) | batch: / step std
    clip_eps_low=0.0,           # (L) ratio clipped to [1 - low, 1 + high] (DAPO clip-higher 0.2 / 0.28)
    clip_eps_high=0.0,          # (L)
    ratio_level='token',        # token (PPO/GRPO) | sequence (GSPO: exp(mean token log-ratio); clips ~3e-4/4e-4)
    dual_clip=3.0,              # dual clip for negative advantages (Ye et al. 2020); 0 = off
    kl_coef=0.001,              # k3 ("low_var_kl") KL loss to the reference model; 0 = no reference pass
    entropy_coef=0.0,           # entropy bonus
    skip_no_signal=False,       # no optimizer step on a mini-batch whose advantages are all 0 (its only gradient
                                # would be the KL term's noise, which Adam scales up to a full-size step)
    # DAPO's sampling and length shaping (all off in the paper's recipe)
    dynamic_sampling=False,     # drop groups whose rewards are all equal; draw more prompts to fill the step
    max_rollouts=3,             # dynamic sampling: at most this many rollouts (of prompts_per_step prompts) a step
    mask_truncated=False,       # truncated responses get no loss (their rewards still count in the group)
    overlong_buffer=0,          # soft overlong penalty over the last N tokens of the budget (0 = off)
    overlong_penalty=1.0,       # the penalty at the budget: linear from 0 at max_response_len - overlong_buffer
    # update
    minibatch_prompts=256,      # prompts per optimizer step (-> prompts_per_step / minibatch_prompts updates)
    ppo_epochs=1,               # passes over each rollout
    micro_batch_tokens=32768,   # padded tokens per forward/backward on one rank (memory knob only)
    # optimizer
    lr=1e-6,                    # AdamW, constant after warmup
    warmup_steps=0,
    weight_decay=0.01,
    beta1=0.9,
    beta2=0.999,
    grad_clip=1.0,              # global grad-norm clip (0 = off)
    # run length
    max_steps=200,              # rollout steps
    flops_budget=0.0,           # stop before the RL FLOPs would exceed this (0 = no budget); STUDY.md §5.3
    # logging, evaluation, checkpoints
    log_every=1,                # print one line every N steps (the JSONL log gets every step)
    sample_every=10,            # print / save a few sample texts every N steps (0 = never)
    n_samples_show=2,           # how many of them to print
    eval_every=50,              # held-out evaluation every N steps (0 = never); also before the first and after
                                # the last step
    eval_data='',               # held-out JSONL; '' = {init run's data_dir}/eval.jsonl if present, else generated
                                # (data.make_eval_set, as evaluate.py). Every id in it is excluded from the RL prompts.
    eval_op_min=0,              # evaluate op in [eval_op_min, eval_op_max]; 0 = op_min / op_max
    eval_op_max=0,
    eval_modes='',              # '' = both; 'normalforward' or 'forwardreverse' to evaluate one mode only
    eval_per_op_template=8,     # held-out problems per (op, template)
    eval_samples=4,             # samples per problem (pass@1 is their mean)
    eval_temperature=0.7,       # STUDY.md §4 evaluation temperature
    eval_seed=1234,             # seed of a generated held-out set (evaluate.py's default)
    ckpt_every=50,              # checkpoint every N steps (0 = only at the end)
    logger='',                  # also log to 'wandb' or 'tensorboard' (if installed); '' = the JSONL files only
    # system
    seed=1337,                  # sampler noise is seeded by (seed, step) and each prompt / sample index
    device='',                  # '' = cuda if available else cpu (torchrun: cuda:LOCAL_RANK)
    compile=False,              # torch.compile the training forward (dynamic shapes)
    sampler='engine',           # rollouts and held-out evaluation: 'engine' (ours) | 'vllm' (vllm_sampler.py,
                                # pip install -r requirements-vllm.txt; one process; weights pushed after each step)
)

# loss_type presets: (aggregation, advantage normalisation, clip low, clip high)
LOSS_TYPES = {
    'paper': dict(loss_agg='token-mean', adv_norm='group', clip_eps_low=0.2, clip_eps_high=0.2),    # verl GRPO
    'grpo': dict(loss_agg='seq-mean-token-mean', adv_norm='group', clip_eps_low=0.2, clip_eps_high=0.2),
    'dr_grpo': dict(loss_agg='seq-mean-token-sum-norm', adv_norm='none', clip_eps_low=0.2, clip_eps_high=0.2),
    'dapo': dict(loss_agg='token-mean', adv_norm='group', clip_eps_low=0.2, clip_eps_high=0.28),
}
LOSS_AGGS = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm')
# keys that may change on resume: they do not change the trajectory (the lr has no schedule to stretch)
RESUME_SAFE_KEYS = {'resume_override', 'max_steps', 'flops_budget', 'log_every', 'sample_every', 'n_samples_show',
                    'eval_every', 'ckpt_every', 'compile', 'logger',
                    'sampler'}  # (the sampler changes the draws and their kernels, not the recipe)


def resolve(cfg: dict) -> common.Config:
    """Fill the loss_type keys left unset, check the choices (common.UsageError: one line)."""
    cfg = common.Config(cfg)
    if cfg['loss_type'] not in LOSS_TYPES:
        raise common.UsageError(f"unknown --loss_type={cfg['loss_type']!r}; choose one of {', '.join(LOSS_TYPES)}")
    for k, v in LOSS_TYPES[cfg['loss_type']].items():
        if not cfg[k]:
            cfg[k] = v
    for key, allowed in (('reward', verifier.REWARDS), ('loss_agg', LOSS_AGGS), ('adv_norm', ('group', 'none', 'batch')),
                         ('ratio_level', ('token', 'sequence')), ('adv_estimator', ('grpo', 'passk', 'wreinforce'))):
        if cfg[key] not in allowed:
            raise common.UsageError(f"unknown --{key}={cfg[key]!r}; choose one of {', '.join(allowed)}")
    if cfg['prompts_per_step'] % cfg['minibatch_prompts']:
        raise common.UsageError(f"prompts_per_step={cfg['prompts_per_step']} is not a multiple of minibatch_prompts="
                                f"{cfg['minibatch_prompts']}")
    if not 0 <= cfg['overlong_buffer'] < cfg['max_response_len']:
        raise common.UsageError(f"overlong_buffer={cfg['overlong_buffer']} must be in "
                                f"[0, max_response_len={cfg['max_response_len']})")
    if cfg['max_rollouts'] < 1:
        raise common.UsageError(f"max_rollouts={cfg['max_rollouts']} must be >= 1")
    vllm_sampler.check_sampler(cfg['sampler'])   # (imports vllm only when it samples)
    if not 0 <= cfg['update_size'] <= cfg['group_size']:
        raise common.UsageError(f"update_size={cfg['update_size']} must be in [0, group_size={cfg['group_size']}] "
                           f"(0 = train on the whole group)")
    if cfg['adv_estimator'] == 'passk' and not 1 <= cfg['passk_k'] <= cfg['group_size']:
        raise common.UsageError(f"passk_k={cfg['passk_k']} must be in [1, group_size={cfg['group_size']}]")
    if cfg['psr_weight'] < 0:
        raise common.UsageError(f"psr_weight={cfg['psr_weight']} must be >= 0 (0 = penalise failures only)")
    if cfg['adv_estimator'] == 'passk' and cfg['adv_norm'] == 'batch':
        raise common.UsageError("adv_estimator=passk normalises by its own group std (adv_norm=group) or not at all "
                           "(adv_norm=none); adv_norm=batch is not supported")
    if cfg['world']:
        try:
            data.parse_world(cfg['world'])
        except ValueError as e:
            raise common.UsageError(str(e))
    if cfg['mixture']:
        try:
            data.parse_mixture(cfg['mixture'])
        except ValueError as e:
            raise common.UsageError(f"--mixture={cfg['mixture']}: {e}") from None
    return cfg


def config(**overrides) -> common.Config:
    """The defaults with overrides, resolved: what update_policy() and friends take (tests, notebooks)."""
    return resolve({**defaults, **overrides})


# -----------------------------------------------------------------------------
# Prompts


class PromptStream:
    """An endless, deterministic stream of RL problems. Row i depends only on (seed, i), so the
    stream's state is one integer (`next`, the first row of the next step), each rank reads its
    own slice of a step, and the stream is the same for any world size.

    Generated: row i draws (op, template, mode) from `mix` (a data.Mixture) and the problem from
    random.Random(f"rl:{seed}:{i}"), redrawing while the id is held out or `keep` rejects the row
    (e.g. a prompt too long). From a JSONL: rows filtered to `ops` / `templates` / exclusions,
    shuffled once per epoch with random.Random(f"rl:{seed}:epoch{e}"); row i is row i % n of
    epoch i // n."""

    def __init__(self, mix=None, rows=None, *, ops=None, templates=None, seed=0, exclude_ids=(), keep=None):
        self.mix, self.seed = mix, seed
        self.exclude = set(exclude_ids)
        self.keep = keep or (lambda row: True)
        self.next = 0
        self.rows = None
        if rows is not None:
            self.rows = [r for r in rows if (ops is None or r['op'] in ops) and (templates is None or r.get('template')
                         in templates) and r['id'] not in self.exclude and self.keep(r)]
            if not self.rows:
                raise common.UsageError(f"no prompt rows left after filtering to ops {ops}, templates {templates} and "
                                        f"exclusions; fix --prompts, --op_min/--op_max or --templates")
            self._perm_epoch, self._perm = -1, None
        else:
            assert mix is not None, "PromptStream needs a mixture or rows"

    @classmethod
    def from_config(cls, C, exclude_ids=(), keep=None):
        """The stream a config asks for: C.prompts (a JSONL) or on-the-fly generation from C.mixture, or
        from op_min..op_max x templates weights x reverse_frac."""
        templates = {t: w for t, w in C.templates.items() if w > 0}
        ops = list(range(C.op_min, C.op_max + 1))
        if C.prompts:
            return cls(rows=data.read_jsonl(C.prompts), ops=None if C.mixture else ops, templates=templates,
                       seed=C.prompt_seed, exclude_ids=exclude_ids, keep=keep)
        mix = data.parse_mixture(C.mixture) if C.mixture else data.mixture(
            ops, templates, {'normalforward': 1 - C.reverse_frac, 'forwardreverse': C.reverse_frac})
        if C.world:
            mix = dataclasses.replace(mix, world=data.parse_world(C.world))
        return cls(mix, seed=C.prompt_seed, exclude_ids=exclude_ids, keep=keep)

    def get(self, i: int) -> dict:
        if self.rows is not None:
            epoch, j = divmod(i, len(self.rows))
            if epoch != self._perm_epoch:
                self._perm = list(range(len(self.rows)))
                random.Random(f"rl:{self.seed}:epoch{epoch}").shuffle(self._perm)
                self._perm_epoch = epoch
            return self.rows[self._perm[j]]
        rng = random.Random(f"rl:{self.seed}:{i}")
        while True:
            op, template, mode = self.mix.sample(rng)
            row = data.generate(rng, op, template, mode, self.mix.world).to_row()
            if row['id'] not in self.exclude and self.keep(row):
                return row

    def take(self, start: int, n: int) -> list[dict]:
        return [self.get(start + k) for k in range(n)]

    def state_dict(self) -> dict:
        return {'next': self.next, 'seed': str(self.seed)}

    def load_state_dict(self, state: dict):
        assert state['seed'] == str(self.seed), f"prompt_seed changed on resume ({state['seed']} -> {self.seed})"
        self.next = state['next']



# -----------------------------------------------------------------------------
# Rollout, rewards, dynamic sampling, advantages


def rollout(model, tok, rows, cfg, generator=None, sampler=None):
    """G = cfg.group_size samples per row in one generate() call (the sampler schedules its own
    memory). Samples are prompt-major: sample k answers row k // G. Returns per-sample lists:
    'row' (the problem), 'prompt', 'response' (token lists, stop token kept), 'text' (the response
    decoded, EOS dropped), 'finished' (hit </answer> or EOS; False = truncated). sampler: an object
    with Qwen2.generate's call used instead of the model's engine (vllm_sampler.VLLMSampler)."""
    G = cfg.group_size
    out = engine.complete(sampler or model, tok, [data.prompt_text(r) for r in rows], cfg.max_response_len, num_samples=G,
                          temperature=cfg.temperature, generator=generator)  # (old log-probs: a forward pass)
    return {'row': [r for r in rows for _ in range(G)], 'prompt': [p for p in out.prompts for _ in range(G)],
            'response': out.tokens, 'finished': out.finished, 'text': out.texts}


def compute_rewards(texts, golds, kind):
    """Verify each response against its gold graph; -> (rewards [N] float tensor, verdicts)."""
    verdicts = [verifier.verify(t, g) for t, g in zip(texts, golds)]
    return torch.tensor([verifier.reward(v, kind) for v in verdicts], dtype=torch.float32), verdicts


def overlong_penalty(lengths, max_len, buffer, penalty=1.0):
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - buffer tokens, then
    linear down to -penalty at max_len (the budget). buffer 0 = off. -> [N] float tensor."""
    L = torch.tensor(lengths, dtype=torch.float32)
    if buffer <= 0:
        return torch.zeros_like(L)
    return -penalty * ((L - (max_len - buffer)) / buffer).clamp(0, 1)


def score(ro, cfg):
    """Add 'reward' [N], 'verdict' and 'train_mask' [N] bool (False: no loss, a masked truncated
    response) to a rollout."""
    ro['reward'], ro['verdict'] = compute_rewards(ro['text'], [r['graph'] for r in ro['row']], cfg.reward)
    ro['success'] = ro['reward'] >= 1  # the full reward (before shaping): what pass@k counts
    if cfg.overlong_buffer:
        ro['reward'] = ro['reward'] + overlong_penalty([len(r) for r in ro['response']], cfg.max_response_len,
                                                       cfg.overlong_buffer, cfg.overlong_penalty)
    ro['train_mask'] = torch.tensor([f or not cfg.mask_truncated for f in ro['finished']])
    return ro


def has_signal(rewards, group_size):
    """[groups] bool: the group's rewards are not all equal (else every advantage is 0)."""
    r = rewards.view(-1, group_size)
    return r.max(1).values != r.min(1).values


def select_groups(ro, groups, group_size):
    """The samples of these groups (indices into the rollout's prompts), in that order."""
    idx = [g * group_size + k for g in groups for k in range(group_size)]
    return {key: v[idx] if torch.is_tensor(v) else [v[i] for i in idx] for key, v in ro.items()}


def concat(ros):
    return {key: torch.cat([r[key] for r in ros]) if torch.is_tensor(ros[0][key]) else
            [x for r in ros for x in r[key]] for key in ros[0]}


def rollout_sums(ro, group_size):
    """What the metrics need from a scored rollout, as sums (all-reduced later)."""
    v = ro['verdict']
    ok = successes(ro).view(-1, group_size)
    return {'samples': len(v), 'groups': len(v) // group_size, 'reward': float(ro['reward'].sum()),
            'solved': int(ok.any(1).sum()), 'successes': int(ok.sum()),
            'outcome': sum(x.outcome for x in v), 'process_acc': sum(x.process_acc for x in v),
            'perfect': sum(x.perfect for x in v), 'hacked': sum(x.outcome and not x.perfect for x in v),
            'no_signal': int((~has_signal(ro['reward'], group_size)).sum()),
            'resp_tokens': sum(len(r) for r in ro['response']), 'truncated': sum(not f for f in ro['finished']),
            'prompt_once': sum(len(p) for p in ro['prompt'][::group_size])}  # prefilled once per group


def fill_step(draw, n_groups, group_size, dynamic=False, max_rounds=1, world_size=1, device='cpu'):
    """The rollouts of one step: n_groups groups (this rank's share). draw(r) rolls out and scores
    round r's prompts (n_groups of them). Without dynamic sampling that is one round. With it (DAPO),
    groups whose rewards are all equal are set aside and further rounds drawn until every rank holds
    n_groups groups with signal, or max_rounds rounds were drawn; a short step is then topped up
    with set-aside groups (advantage 0), so every step has the same shape. A rank already full draws
    nothing but keeps the lockstep. Returns (batch, rollout sums over every draw,
    {'rounds', 'topped_up'}); groups keep their draw order."""
    kept, spare, sums = [], [], {}
    n_kept = n_spare = rounds = 0
    while True:
        if n_kept < n_groups:
            ro = draw(rounds)
            for k, v in rollout_sums(ro, group_size).items():
                sums[k] = sums.get(k, 0) + v
            if not dynamic:
                kept, n_kept = [ro], n_groups
            else:
                sig = has_signal(ro['reward'], group_size).tolist()
                take = [g for g, s in enumerate(sig) if s][:n_groups - n_kept]
                rest = [g for g, s in enumerate(sig) if not s][:n_groups - n_spare]
                kept.append(select_groups(ro, take, group_size))
                spare.append(select_groups(ro, rest, group_size))
                n_kept, n_spare = n_kept + len(take), n_spare + len(rest)
        rounds += 1
        if rounds >= (max_rounds if dynamic else 1):
            break
        need = torch.tensor([float(n_groups - n_kept)], device=device)  # on the device: nccl needs CUDA tensors
        if all_reduce(need, world_size, op='max').item() == 0:
            break
    topped_up = n_groups - n_kept
    if topped_up:
        kept.append(select_groups(concat(spare), list(range(topped_up)), group_size))
    return concat(kept), sums, {'rounds': rounds, 'topped_up': topped_up}


def successes(ro):
    """[N] bool: the samples with the full reward (score() sets ro['success'] before any shaping)."""
    return ro['success'] if 'success' in ro else ro['reward'] >= 1


def max_variance_subset(rewards, m):
    """PODS max-variance down-sampling of one group (Xu et al. 2025): the m of its samples whose rewards
    have the largest (population) variance. That set is always the i highest and m - i lowest rewards
    for some i (their Lemma), so every i is tried; a tie in variance goes to the larger i (more high
    rewards), and among equal rewards the earlier samples are kept. For binary rewards with s
    successes and f failures this keeps clamp(ceil(m / 2), m - f, s) successes: as balanced as the group
    allows. rewards: a list (or 1-D tensor) of one group's rewards -> sorted indices (all of them if
    m >= len(rewards))."""
    r = [float(x) for x in rewards]
    n = len(r)
    if m >= n:
        return list(range(n))
    high = sorted(range(n), key=lambda j: (-r[j], j))   # highest first, earlier first among equals
    low = sorted(range(n), key=lambda j: (r[j], j))     # lowest first, earlier first among equals
    best, best_var = None, -1.0
    for i in range(m, -1, -1):
        hi = high[:i]
        taken = set(hi)
        lo = [j for j in low if j not in taken][:m - i]
        vals = [r[j] for j in hi + lo]
        mean = sum(vals) / m
        var = sum((x - mean) ** 2 for x in vals) / m
        if var > best_var + 1e-12:
            best, best_var = hi + lo, var
    return sorted(best)


def downsample(ro, group_size, update_size):
    """The update batch of a PODS step: update_size samples of every group (max_variance_subset of its
    rewards), in their drawn order; every per-sample entry (advantages included, computed before on
    the whole group) follows. update_size 0 or >= group_size: the rollout as it is."""
    if not update_size or update_size >= group_size:
        return ro
    r = ro['reward'].view(-1, group_size)
    idx = [g * group_size + j for g in range(r.size(0)) for j in max_variance_subset(r[g].tolist(), update_size)]
    return {key: v[idx] if torch.is_tensor(v) else [v[i] for i in idx] for key, v in ro.items()}


def passk_advantages(success, group_size, k, norm='group', eps=1e-6):
    """Pass@k training's analytic advantage (Chen et al. 2025, "Pass@k Training for Adaptively Balancing
    Exploration and Exploitation"): the group's reward is the pass@k of its n = group_size samples,
    R = 1 - C(n_neg, k) / C(n, k), with std sigma = sqrt(R (1 - R)); a success always sits in a
    k-subset that passes, a failure in one that passes with probability 1 - C(n_neg - 1, k - 1) /
    C(n - 1, k - 1), so
      A_pos = (1 - R) / sigma,   A_neg = (1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / sigma
    (norm 'none': without the / sigma). They sum to 0 over a group; k = 1 gives GRPO's advantage with
    the population std; all successes, no success, or fewer than k failures: 0 (no signal).
    success [N] bool, prompt-major -> [N] float."""
    s = success.view(-1, group_size).bool()
    n, out = group_size, torch.zeros(s.shape)
    for g in range(s.size(0)):
        n_neg = int((~s[g]).sum())
        R = 1 - math.comb(n_neg, k) / math.comb(n, k)
        a_pos = 1 - R
        a_neg = (1 - R - math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1)) if n_neg >= 1 else 0.0
        if norm == 'group':
            sigma = math.sqrt(max(R * (1 - R), 0.0))
            a_pos, a_neg = a_pos / (sigma + eps), a_neg / (sigma + eps)
        elif norm != 'none':
            raise ValueError(f"passk advantages take adv_norm 'group' or 'none', not {norm!r}")
        out[g] = torch.where(s[g], torch.tensor(a_pos), torch.tensor(a_neg))
    return out.reshape(-1)


def wreinforce_advantages(success, psr_weight=0.1):
    """Weighted REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
    Reasoning"): reward +1 / -1 for a success / failure, no baseline, the positive term down-weighted,
    so A = psr_weight for a success and -1 for a failure. Penalising failures moves probability to the
    other answers the model already considers (they report pass@k kept or raised at every k), while
    rewarding successes concentrates it (pass@1 up, large-k pass@k down). Unlike GRPO a group whose
    samples all fail still trains (it is pushed away from them). success [N] bool -> [N] float."""
    s = success.reshape(-1).bool()
    return torch.where(s, torch.tensor(float(psr_weight)), torch.tensor(-1.0))


def compute_advantages(rewards, group_size, norm='group', eps=1e-6, batch_std=None):
    """r - group mean, divided by: the group's std ('group', GRPO; unbiased as torch.std, verl), nothing
    ('none', Dr.GRPO), or the std of all the step's rewards ('batch', as TRL; batch_std: that std over
    every rank, default this batch's). A group whose rewards are all equal gets advantage 0 (no
    signal). rewards [N] prompt-major -> [N]."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if norm == 'group':
        a = a / (r.std(dim=1, keepdim=True) + eps)
    elif norm == 'batch':
        a = a / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif norm != 'none':
        raise ValueError(f"unknown adv_norm {norm!r}")
    return a.reshape(-1)


# -----------------------------------------------------------------------------
# Losses


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per token, verl's "low_var_kl": exp(d) - d - 1 with
    d = ref - logp clamped to [-20, 20], the result clamped to [-10, 10]."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def aggregate(mat, mask, mode, n_tokens=None, n_seqs=None, max_len=None):
    """This batch's share of a loss aggregated over a whole mini-batch (verl's agg_loss). The
    mini-batch totals (n_tokens, n_seqs) default to this batch's own, so one call on a whole batch
    gives the plain aggregate; micro-batches pass the mini-batch totals and their shares add up.
      token-mean               sum over all tokens / n_tokens
      seq-mean-token-mean      mean over sequences of each sequence's token mean
      seq-mean-token-sum-norm  sum over all tokens / (n_seqs * max_len), Dr.GRPO: a constant divisor
                               (max_len = the response budget; default this batch's width)"""
    mask = mask.to(mat.dtype)
    n_seqs = mask.size(0) if n_seqs is None else n_seqs
    if mode == 'token-mean':
        return (mat * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    if mode == 'seq-mean-token-mean':
        return ((mat * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == 'seq-mean-token-sum-norm':
        return (mat * mask).sum() / (n_seqs * (mask.size(1) if max_len is None else max_len))
    raise ValueError(f"unknown loss_agg {mode!r}")


def policy_loss(logp, old_logp, adv, mask, ref_logp=None, entropy=None, *, clip_eps_low=0.2, clip_eps_high=0.2,
                dual_clip=3.0, kl_coef=0.001, entropy_coef=0.0, agg='token-mean', ratio_level='token',
                n_tokens=None, n_seqs=None, max_len=None):
    """GRPO loss of one batch of responses, tensors [B, T] over response tokens (mask 1 = real).
    adv [B] (one advantage per sequence) or [B, T].
      ratio = exp(logp - old_logp)                                 (log-ratio clamped to +-20)
              ratio_level='sequence' (GSPO): exp(mean over the sequence's tokens of logp - old_logp),
              the same for every token of a sequence
      pg    = max(-A*ratio, -A*clip(ratio, 1-low, 1+high))         PPO clip (DAPO: high > low)
      pg    = min(pg, -A*dual_clip) where A < 0                    dual clip: bounds the loss when
                                                                   the ratio explodes on a bad sample
      loss  = agg(pg) + kl_coef * agg(k3(logp, ref)) - entropy_coef * agg(entropy)
    Returns (loss, stats): stats hold detached token sums ('clipped', 'dual_clipped', 'kl', 'entropy',
    'ratio', 'tokens') and the aggregated parts ('pg_loss', 'kl_loss', 'entropy_loss')."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if ratio_level == 'sequence':
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = log_ratio.clamp(-20, 20).exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1) & mask.bool()
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip > 0:
        pg3 = -adv * dual_clip
        dual_clipped = (adv < 0) & (pg > pg3) & mask.bool()
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    agg_kw = dict(n_tokens=n_tokens, n_seqs=n_seqs, max_len=max_len)
    pg_loss = aggregate(pg, mask, agg, **agg_kw)
    loss = pg_loss
    stats = {'pg_loss': pg_loss.detach(), 'tokens': m.sum().detach(), 'ratio': (ratio * m).sum().detach(),
             'clipped': clipped.sum().float(), 'dual_clipped': dual_clipped.sum().float()}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        kl_loss = aggregate(kl, mask, agg, **agg_kw)
        if kl_coef:
            loss = loss + kl_coef * kl_loss
        stats['kl_loss'], stats['kl'] = kl_loss.detach(), (kl * m).sum().detach()
    if entropy is not None:
        ent_loss = aggregate(entropy, mask, agg, **agg_kw)
        if entropy_coef:
            loss = loss - entropy_coef * ent_loss
        stats['entropy_loss'], stats['entropy'] = ent_loss.detach(), (entropy * m).sum().detach()
    return loss, stats


def loss_kwargs(cfg):
    """The policy_loss() keywords a config sets."""
    return dict(clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
                kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg, ratio_level=cfg.ratio_level)


# -----------------------------------------------------------------------------
# Forward passes and the update


def forward_logprobs(model, prompts, responses, temperature=1.0, device='cpu', entropy_grad=False, entropy=True):
    """Log-probs of each response token under `model` given its prompt, in one forward over the
    right-padded [prompt + response] rows (right padding is invisible to causal attention), with
    logits computed at the response positions only.
    -> (logp [B, R] fp32, entropy [B, R] (differentiable only if entropy_grad; None unless
    `entropy`), mask [B, R])."""
    B = len(prompts)
    R = max(len(r) for r in responses)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses)) - 1  # the last token predicts nothing
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, R, dtype=torch.long)      # logit position predicting each response token
    tgt = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = (p + r)[:T]
        ids[i, :len(seq)] = torch.tensor(seq)
        pos[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        tgt[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    ids, pos, tgt, mask = ids.to(device), pos.to(device), tgt.to(device), mask.to(device)
    with common.autocast_ctx(device):
        logits, _ = model(ids, positions=pos)                                  # [B, R, V] fp32
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tgt[:, :, None]).squeeze(-1)
    if not entropy:
        return logp * mask, None, mask
    lp = logp_all if entropy_grad else logp_all.detach()
    return logp * mask, -(lp.exp() * lp).sum(-1) * mask, mask


def micro_batches(indices, lengths, max_tokens):
    """Split `indices` into length-sorted chunks whose padded size (rows x longest row) stays within
    max_tokens (one row at least), so short responses travel many to a forward and long ones few."""
    out, cur = [], []
    for i in sorted(indices, key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


@torch.no_grad()
def batch_logprobs(model, prompts, responses, max_tokens, temperature, device):
    """Per-sample log-prob tensors [len(response)] (on device), in length-sorted micro-batches."""
    out = [None] * len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    for mb in micro_batches(range(len(prompts)), lengths, max_tokens):
        logp, _, _ = forward_logprobs(model, [prompts[i] for i in mb], [responses[i] for i in mb],
                                      temperature, device, entropy=False)
        for k, i in enumerate(mb):
            out[i] = logp[k, :len(responses[i])]
    return out


def pad_stack(seqs, width, device):
    out = torch.zeros(len(seqs), width, device=device)
    for k, s in enumerate(seqs):
        out[k, :len(s)] = s
    return out


STAT_KEYS = ('tokens', 'ratio', 'clipped', 'dual_clipped', 'kl', 'entropy', 'pg_loss')


def update_policy(model, optimizer, batch, cfg):
    """PPO-style updates on one rollout; every hyperparameter comes from cfg (see config()).
    batch: 'prompt', 'response' (token lists), 'adv' [N] tensor, 'old_logp' (list of per-sample
    tensors, or None: on-policy, old = current detached), 'ref_logp' (list or None), 'train_mask'
    ([N] bool, optional: False = no loss for that sample). Samples are prompt-major; there are
    prompts_per_step / minibatch_prompts mini-batches, mini-batch j the j-th contiguous slice (whole
    groups), each one optimizer step. Its micro-batches (micro_batch_tokens) are accumulated with DDP's
    gradient sync only on the last, and every micro-batch loss is normalised by mini-batch totals
    all-reduced over ranks (x world_size, since DDP averages gradients). Statistics stay on the
    device until one host sync at the end. Returns summed stats (for all-reducing) plus 'grad_norm'
    (mean over updates), 'pg_loss' (mean mini-batch loss, this rank's share) and 'updates'."""
    N = len(batch['prompt'])
    n_mb = cfg.prompts_per_step // cfg.minibatch_prompts
    assert N % n_mb == 0, f"{N} samples do not split into {n_mb} mini-batches"
    size = N // n_mb
    W = common.world_size()
    device = next(model.parameters()).device
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    lengths = [len(p) + len(r) for p, r in zip(batch['prompt'], batch['response'])]
    keep = batch.get('train_mask')
    keep = torch.ones(N, dtype=torch.bool) if keep is None else keep.bool().cpu()
    resp_len = [len(r) * bool(k) for r, k in zip(batch['response'], keep.tolist())]
    minibatches = [list(range(j * size, (j + 1) * size)) for j in range(n_mb)]
    # the totals each mini-batch's loss is normalised by (tokens, sequences trained on): one all-reduce
    # and the samples with a non-zero advantage (all ranks must agree to skip a mini-batch)
    signal = (batch['adv'].cpu() != 0) & keep
    totals = torch.tensor([[sum(resp_len[i] for i in idx), sum(resp_len[i] > 0 for i in idx),
                            int(signal[idx].sum())] for idx in minibatches], dtype=torch.float64, device=device)
    totals = (all_reduce(totals, W) / W).tolist()
    skip = [cfg.skip_no_signal and s == 0 for _, _, s in totals]
    totals = [(max(t, 1 / W), max(n, 1 / W)) for t, n, _ in totals]  # per-rank share: DDP averages
    keep = keep.to(device)
    acc = torch.zeros(len(STAT_KEYS), device=device)
    grad_norms = []
    model.train()
    for _ in range(cfg.ppo_epochs):
        for idx, (n_tokens, n_seqs), no_signal in zip(minibatches, totals, skip):
            if no_signal:
                # Adam divides by the running gradient scale, so a step on a mini-batch whose only
                # gradient is the KL term's sampling noise moves the weights as far as a real one
                continue
            mbs = micro_batches(idx, lengths, cfg.micro_batch_tokens)
            for k, mb in enumerate(mbs):
                with nullcontext() if (not ddp or k == len(mbs) - 1) else model.no_sync():
                    logp, ent, mask = forward_logprobs(model, [batch['prompt'][i] for i in mb],
                                                       [batch['response'][i] for i in mb], cfg.temperature, device,
                                                       entropy_grad=cfg.entropy_coef != 0)
                    mask = mask & keep[mb][:, None]
                    T = mask.size(1)
                    old = logp.detach() if batch['old_logp'] is None else \
                        pad_stack([batch['old_logp'][i] for i in mb], T, device)
                    ref = None if batch['ref_logp'] is None else \
                        pad_stack([batch['ref_logp'][i] for i in mb], T, device)
                    loss, st = policy_loss(logp, old, batch['adv'][mb].to(device), mask, ref, ent, **loss_kwargs(cfg),
                                           n_tokens=n_tokens, n_seqs=n_seqs, max_len=cfg.max_response_len)
                    loss.backward()
                acc += torch.stack([st[key].float() if key in st else torch.zeros((), device=device)
                                    for key in STAT_KEYS])
            grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float('inf')))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    gn = torch.stack(grad_norms).float().mean()[None].to(device) if grad_norms else torch.zeros(1, device=device)
    vals = torch.cat([acc, gn]).tolist()  # the host sync
    out = dict(zip(STAT_KEYS + ('grad_norm',), vals))
    out['updates'] = len(grad_norms)
    out['pg_loss'] /= max(1, len(grad_norms))
    return out


# -----------------------------------------------------------------------------
# Evaluation, checkpoints, logging helpers


def held_out_eval(model, tok, rows, n, temperature, max_new_tokens, dist, sampler=None):
    """pass@1 (process-verified and outcome) etc. on held-out rows: evaluate.quick_eval in one
    generate() call per rank (rows sharded across ranks; every rank gets the same numbers)."""
    res = evaluate.quick_eval(model, tok, rows, n, temperature, max_new_tokens=max_new_tokens,
                              batch_size=0, dist=dist, sampler=sampler)  # 0: generate's memory budget sets the rows
    return {f'eval/{k}': float(v) for k, v in res.items()}


def lr_at(step, base, warmup):
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


# -----------------------------------------------------------------------------
# The phases of a step (each a function a fork can replace) and the loop


def setup(C):
    """Models, optimizer, tokenizer, held-out rows, prompt stream; resume out_dir/ckpt.pt if it
    exists. -> S, the run's state (S.step, S.flops, ...)."""
    dist = common.setup_distributed()
    device = C.device or dist.device
    if C.minibatch_prompts % dist.world_size:
        raise common.UsageError(f"minibatch_prompts={C.minibatch_prompts} is not a multiple of the world size "
                                f"{dist.world_size}")
    torch.manual_seed(C.seed + dist.rank)

    # models: the policy (start or resume) and the frozen reference (always the start)
    init = resolve_ckpt(C.init_from, '--init_from checkpoint',
                        fix='point it at a pre/mid-training run dir (e.g. out/base) or its ckpt.pt')
    policy, tok, start = load_run(init, device, C.tokenizer or None,
                                  fix='pass --tokenizer=PATH, the tokenizer.json it was trained with')
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if C.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=C.lr, betas=(C.beta1, C.beta2), weight_decay=C.weight_decay,
                                  fused='cuda' in str(device))

    # held-out rows and the prompt stream (never a held-out id)
    eval_ops = list(range(C.eval_op_min or C.op_min, (C.eval_op_max or C.op_max) + 1))
    data_dir = start['config'].get('data_dir', '')
    eval_rows, eval_source = data.load_eval_rows(C.eval_data, data_dir, eval_ops, C.eval_per_op_template,
                                                 modes=[m for m in C.eval_modes.split(',') if m],
                                                 seed=C.eval_seed, world=C.world or 'paper')
    # never train on a held-out problem: the rows evaluated here, the whole file they come from, the
    # base run's held-out set (what evaluate.py uses by default) and any `exclude` files
    held_out = [eval_source, os.path.join(data_dir, 'eval.jsonl') if data_dir else ''] + C.exclude.split(',')
    excluded = {r['id'] for r in eval_rows}
    for path in {p.strip() for p in held_out if p.strip() and os.path.isfile(p.strip())}:
        excluded |= {r['id'] for r in data.read_jsonl(path)}
    keep = lambda row: len(tok.encode(data.prompt_text(row))) <= C.max_prompt_len
    S = types.SimpleNamespace(
        dist=dist, device=device, W=dist.world_size, rank=dist.rank, policy=policy, ref=ref, optimizer=optimizer,
        tok=tok, eval_rows=eval_rows, stream=PromptStream.from_config(C, excluded, keep), N=policy.num_params(),
        step=0, flops={'rollout': 0.0, 'ref': 0.0, 'old': 0.0, 'train': 0.0, 'total': 0.0}, history=[],
        last_eval=-1, resumed=False, ckpt_path=os.path.join(C.out_dir, 'ckpt.pt'),
        run_config=dict(C, data_dir=data_dir))  # data_dir: evaluate.py / a later stage find the base's eval set
    # rank 0 writes log.jsonl (every step), eval.jsonl, samples.jsonl, the console; W&B / TensorBoard if asked
    S.log = common.RunLog(C.out_dir, S.run_config, 'rl', C.logger, dist.is_master,
                     jsonl={'train': 'log.jsonl', 'eval': 'eval.jsonl', 'samples': 'samples.jsonl'})
    S.say = S.log.print
    if os.path.exists(S.ckpt_path):
        resume(S, C)

    # one module computes the old log-probs and the new ones (the compiled one with compile=True): a
    # compiled and an eager forward round differently, and the first ratio of a step must be exactly 1
    S.logprob_model = torch.compile(policy, dynamic=True) if C.compile else policy
    S.train_model = S.logprob_model
    if dist.ddp:
        S.train_model = torch.nn.parallel.DistributedDataParallel(
            S.train_model, device_ids=[dist.local_rank] if 'cuda' in str(device) else None)
    S.sampler = None
    if C.sampler == 'vllm':  # after resume: vLLM starts from the weights the run continues with
        S.sampler = vllm_sampler.VLLMSampler(policy)
    if not S.resumed:
        S.log.clear()  # logs of an earlier attempt that never reached a checkpoint
    if dist.is_master:
        os.makedirs(C.out_dir, exist_ok=True)
        tok.save(os.path.join(C.out_dir, 'tokenizer.json'))  # the run dir is self-contained for evaluate.py
        S.log.progress(C.max_steps, S.step)
        S.say(f"held-out: {len(eval_rows)} problems from {eval_source}; {len(excluded)} ids excluded from RL prompts")
        S.say(f"rl: {S.N / 1e6:.2f}M params | world {S.W} | {C.prompts_per_step} prompts x G={C.group_size} per step"
              + (f" (update on {C.update_size} per group, max variance)" if C.update_size else '')
              + (f" | pass@{C.passk_k} advantages" if C.adv_estimator == 'passk' else '')
              + (f" | W-REINFORCE (success {C.psr_weight:g}, failure -1)" if C.adv_estimator == 'wreinforce' else '')
              + ", "
              f"{C.prompts_per_step // C.minibatch_prompts} updates | reward {C.reward} | loss {C.loss_type} "
              f"({C.loss_agg}, adv {C.adv_norm}, clip {C.clip_eps_low}/{C.clip_eps_high}, ratio {C.ratio_level})"
              f"{' | dynamic sampling' if C.dynamic_sampling else ''} | prompts "
              f"{C.prompts or C.mixture or f'op {C.op_min}-{C.op_max}'} | out {C.out_dir}"
              + (f" | resumed at step {S.step}" if S.resumed else ''))
    return S


def resume(S, C):
    """Continue out_dir/ckpt.pt (checkpoint.resume_checkpoint: same tokenizer, same config but for
    RESUME_SAFE_KEYS, unless --resume_override=True): weights, optimizer, this rank's RNG state, step,
    FLOPs and prompt stream."""
    ck = resume_checkpoint(S.ckpt_path, S.run_config, RESUME_SAFE_KEYS, S.tok.identity, S.say, device=S.device,
                           defaults=defaults)
    S.policy.load_state_dict(ck['model'].state_dict())
    S.step = restore_training_state(ck, S.optimizer, S.rank, S.W, S.say)  # (another world size: not bitwise exact)
    S.flops, S.history = dict(ck['extra']['flops']), list(ck['extra'].get('step_flops', []))
    S.stream.load_state_dict(ck['extra']['stream'])
    S.last_eval, S.resumed = ck['extra'].get('last_eval', -1), True
    S.log.trim(S.step)  # drop log lines of steps after the checkpoint (a crash between log and save)


def save(S, C):
    """Checkpoint (rank 0 writes; every rank's RNG state rides along)."""
    rngs = common.all_gather(rng_state(), S.W)
    if S.dist.is_master:
        save_checkpoint(S.ckpt_path, S.policy, S.run_config, S.tok.identity, S.step, S.optimizer,
                        extra={'flops': S.flops, 'stream': S.stream.state_dict(), 'rng': rngs,
                               'step_flops': S.history, 'init_from': C.init_from, 'last_eval': S.last_eval})


def step_flops_bound(C, N, prompt_lens, has_ref):
    """A step's FLOPs if every response ran to the budget (and dynamic sampling drew all its rounds):
    the estimate before the first step. prompt_lens: the step's prompts (all ranks)."""
    G, R, n, P = C.group_size, C.max_response_len, len(prompt_lens), sum(prompt_lens)
    U = C.update_size or G  # trained (and old / reference passes) per group
    seq = U * P + n * U * R
    passes = has_ref + (not single_update(C))
    return 2 * N * (P + n * G * R) * (C.max_rollouts if C.dynamic_sampling else 1) + 2 * N * seq * passes + \
        6 * N * seq * C.ppo_epochs


def single_update(C):
    return C.prompts_per_step == C.minibatch_prompts and C.ppo_epochs == 1


def stop_reason(S, C):
    """Why the run stops before the next step ('' = it does not): max_steps, or a FLOP budget the
    next step would exceed (its cost: the mean step so far, or the bound before the first)."""
    if S.step >= C.max_steps:
        return f"max_steps={C.max_steps} reached"
    if C.flops_budget:
        if S.history:
            est = sum(S.history) / len(S.history)
        else:
            lens = [len(S.tok.encode(data.prompt_text(r))) for r in S.stream.take(S.stream.next, C.prompts_per_step)]
            est = step_flops_bound(C, S.N, lens, S.ref is not None)
        if S.flops['total'] + est > C.flops_budget:
            return f"FLOP budget {C.flops_budget:.3g} reached ({S.flops['total']:.3g} used, a step costs ~{est:.3g})"
    return ''


def collect_rollouts(S, C):
    """Take prompts -> rollout -> rewards, for one step (several rounds under dynamic sampling).
    This rank reads its slice of each round's prompts_per_step prompts of the stream."""
    P = C.prompts_per_step // S.W
    # not the rank: a sample's draws hash its prompt and index with this base seed (engine.generate), so a
    # problem gets the same samples whatever the number of processes
    gen = torch.Generator(device=S.device).manual_seed((C.seed * 1_000_003 + S.step * 1009) % 2**63)
    first = S.stream.next

    def draw(r):
        rows = S.stream.take(first + r * C.prompts_per_step + S.rank * P, P)
        S.policy.eval()
        with common.autocast_ctx(S.device):
            return score(rollout(S.policy, S.tok, rows, C, gen, S.sampler), C)

    ro, sums, info = fill_step(draw, P, C.group_size, C.dynamic_sampling, C.max_rollouts, S.W, S.device)
    S.stream.next += info['rounds'] * C.prompts_per_step
    return ro, sums, info


def advantages(S, C, ro):
    """Per-sample advantages over whole groups (group_size samples each, before any down-sampling)."""
    if C.adv_estimator == 'passk':
        return passk_advantages(successes(ro), C.group_size, C.passk_k, C.adv_norm)
    if C.adv_estimator == 'wreinforce':
        return wreinforce_advantages(successes(ro), C.psr_weight)
    std = global_std(ro['reward'], S.W, S.device) if C.adv_norm == 'batch' else None
    return compute_advantages(ro['reward'], C.group_size, C.adv_norm, batch_std=std)


def rollout_logprobs(S, C, ro):
    """'Old' log-probs of the current policy (None with a single update: old = current) and the
    reference model's (None without KL), no grad."""
    args = (ro['prompt'], ro['response'], C.micro_batch_tokens, C.temperature, S.device)
    old = None if single_update(C) else batch_logprobs(S.logprob_model, *args)
    ref = None if S.ref is None else batch_logprobs(S.ref, *args)
    return old, ref


def step_metrics(S, C, ro, sums, info, st, old_lp, t_gen, t_step):
    """Sums over this rank, all-reduced, then ratios; adds the step's FLOPs to S.flops."""
    N, seq = S.N, sum(len(p) + len(r) for p, r in zip(ro['prompt'], ro['response']))
    local = dict(sums, topped_up=info['topped_up'], seq_tokens=seq, t_gen=t_gen, t_step=t_step,
                 kept=len(ro['response']), kept_successes=int(successes(ro).sum()),
                 flops_rollout=2 * N * (sums['prompt_once'] + sums['resp_tokens']),
                 flops_ref=2 * N * seq * (S.ref is not None), flops_old=2 * N * seq * (old_lp is not None),
                 flops_train=6 * N * seq * C.ppo_epochs,
                 **{k: st.get(k, 0.0) for k in STAT_KEYS + ('grad_norm',)})
    keys = list(local)
    vec = all_reduce(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=S.device), S.W)
    tot = dict(zip(keys, vec.tolist()))
    step_flops = sum(tot['flops_' + k] for k in ('rollout', 'ref', 'old', 'train'))
    for k in ('rollout', 'ref', 'old', 'train'):
        S.flops[k] += tot['flops_' + k]
    S.flops['total'] += step_flops
    S.history.append(step_flops)
    D, T, W = tot['samples'], max(tot['tokens'], 1), S.W
    return {'step': S.step, 'lr': S.optimizer.param_groups[0]['lr'],
            # the rollouts (every sample drawn): is the policy improving, and how long does it write?
            'reward': tot['reward'] / D, 'outcome_acc': tot['outcome'] / D, 'process_acc': tot['process_acc'] / D,
            'perfect': tot['perfect'] / D, 'hack': tot['hacked'] / D, 'resp_len': tot['resp_tokens'] / D,
            'truncated': tot['truncated'] / D, 'no_signal': tot['no_signal'] / tot['groups'],
            'drawn': tot['groups'], 'dropped': tot['groups'] - C.prompts_per_step, 'topped_up': tot['topped_up'],
            # exploration: drawn groups with at least one full-reward sample, full-reward samples drawn, and
            # in the update batch (PODS keeps update_size per group)
            'solved_groups': tot['solved'], 'successes': tot['successes'], 'kept': tot['kept'],
            'kept_successes': tot['kept_successes'],
            # the update (trained tokens): how far the policy moves
            'kl': tot['kl'] / T, 'entropy': tot['entropy'] / T, 'clip_frac': tot['clipped'] / T,
            'dual_clip_frac': tot['dual_clipped'] / T, 'ratio': tot['ratio'] / T,
            'pg_loss': tot['pg_loss'] / W, 'grad_norm': tot['grad_norm'] / W,
            # cost
            'gen_tok_per_s': tot['resp_tokens'] / (tot['t_gen'] / W),  # generated tokens / rollout time
            'tok_per_s': tot['seq_tokens'] / (tot['t_step'] / W),       # prompt + response tokens / step time
            'step_s': tot['t_step'] / W, 'flops': S.flops['total'], 'step_flops': step_flops,
            # generate() calls so far whose CUDA graph capture failed and that decoded eagerly instead
            'graph_fallbacks': engine.graph_fallbacks}


def log_step(S, C, m, ro):
    """log.jsonl every step, a console line every log_every, a few samples every sample_every (rank 0)."""
    if not S.dist.is_master:
        return
    S.log.log('train', m)
    S.log.advance(reward=m['reward'], kl=m['kl'])
    if m['step'] % C.log_every == 0:
        S.say(f"step {m['step']} | reward {m['reward']:.3f} | acc {m['outcome_acc']:.3f} | proc {m['process_acc']:.3f} "
              f"| hack {m['hack']:.3f} | kl {m['kl']:.2e} | ent {m['entropy']:.3f} | clip {m['clip_frac']:.3f} "
              f"| no-signal {m['no_signal']:.2f}" + (f" (drew {m['drawn']:.0f})" if C.dynamic_sampling else '')
              + f" | solved {m['solved_groups']:.0f} groups, {m['kept_successes']:.0f}/{m['successes']:.0f} ok kept"
              + f" | len {m['resp_len']:.0f} | trunc {m['truncated']:.2f} | {m['gen_tok_per_s']:.0f} gen tok/s "
              f"| {m['step_s']:.1f}s | {m['flops']:.3g} FLOPs")
    if C.sample_every and m['step'] % C.sample_every == 0:
        G = C.update_size or C.group_size  # per group in the update batch
        for j, k in enumerate(range(0, len(ro['text']), G)[:max(C.n_samples_show, 4)]):  # 1 per prompt
            row = ro['row'][k]
            rec = {'step': m['step'], 'id': row['id'], 'op': row['op'], 'mode': row['mode'],
                   'reward': float(ro['reward'][k]), 'verdict': ro['verdict'][k].to_dict(), 'response': ro['text'][k],
                   'gold': row['solution']}
            S.log.log('samples', rec, track=False)
            if j < C.n_samples_show:
                S.say(f"  [op {row['op']} {row['mode']}] reward {rec['reward']:.2f}: {ro['text'][k][:300]!r}")


def evaluate_now(S, C):
    res = held_out_eval(S.policy, S.tok, S.eval_rows, C.eval_samples, C.eval_temperature, C.max_response_len, S.dist,
                        S.sampler)
    res['step'] = S.last_eval = S.step
    S.log.log('eval', res)
    S.say(f"eval step {S.step}: pass@1 {res['eval/all/pass@1']:.3f} (process-verified) | outcome pass@1 "
          f"{res['eval/all/outcome_pass@1']:.3f} | hack {res['eval/all/hack_rate']:.3f} | "
          f"{len(S.eval_rows)} problems x {C.eval_samples}")
    return res


def main(argv):
    C = resolve(common.configure(defaults, argv))
    S = setup(C)
    results = {'eval': [], 'out_dir': C.out_dir}
    reason = stop_reason(S, C)
    if reason and S.resumed:
        S.say(f"{C.out_dir} is finished at step {S.step}: {reason}; nothing to do")
        return finish(S, results)
    if C.eval_every and S.step == 0:
        results['eval'].append(evaluate_now(S, C))

    while not (reason := stop_reason(S, C)):
        t0 = time.time()
        for g in S.optimizer.param_groups:
            g['lr'] = lr_at(S.step, C.lr, C.warmup_steps)
        ro, sums, info = collect_rollouts(S, C)                 # take prompts -> rollout -> rewards
        t_gen = time.time() - t0
        ro['adv'] = advantages(S, C, ro)                        # on whole groups
        ro = downsample(ro, C.group_size, C.update_size)       # PODS: update_size per group (0: all)
        ro['old_logp'], ro['ref_logp'] = rollout_logprobs(S, C, ro)
        st = update_policy(S.train_model, S.optimizer, ro, C)
        if S.sampler is not None:
            S.sampler.load_weights(S.policy)                    # vLLM samples the next step with the new weights
        S.step += 1
        results['last'] = m = step_metrics(S, C, ro, sums, info, st, ro['old_logp'], t_gen, time.time() - t0)
        log_step(S, C, m, ro)
        if C.eval_every and (S.step % C.eval_every == 0 or S.step == C.max_steps):
            results['eval'].append(evaluate_now(S, C))
        if C.ckpt_every and S.step % C.ckpt_every == 0:
            save(S, C)

    S.say(f"stopping at step {S.step}: {reason}")
    if C.eval_every and S.last_eval != S.step:  # stopped between evaluations (FLOP budget)
        results['eval'].append(evaluate_now(S, C))
    save(S, C)
    return finish(S, results)


def finish(S, results):
    S.log.close()
    results.update(step=S.step, flops=S.flops)
    if S.dist.ddp:
        S.train_model = None  # (the DDP wrapper goes first: cleanup_distributed)
        common.cleanup_distributed()
    return results


if __name__ == '__main__':
    common.cli('rl.py', main)
