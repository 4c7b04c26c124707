"""
RL post-training with GRPO (SPEC §4 "RL"), a handwritten loop in one file.

One step, read top to bottom in `main`:
  PromptStream.take()   the prompts of this step: generated on the fly (op range, template weights,
                        reverse share) or read from a JSONL (ours or the released format)
  rollout()             G samples per prompt with the KV-cache sampler (Qwen2.generate, num_samples=G)
  compute_rewards()     data.verify(text, gold graph) -> data.reward(verdict, kind)
  compute_advantages()  (r - group mean) / (group std + 1e-6)
  forward_logprobs()    "old" log-probs of the current policy and the reference model's, no grad
  update_policy()       prompts_per_step / minibatch_prompts optimizer steps, each a sum over
                        length-sorted micro-batches of policy_loss():
                        PPO ratio clip + dual clip, k3 KL to the frozen start model, entropy bonus

Run:
  python rl.py tiny_rl                                  # CPU, minutes (from out/tiny_base)
  python rl.py paper_rl                                 # one GPU, from out/base, op 11-14
  python rl.py paper_rl_op7-10 --reward=strict --out_dir=out/rl_op7-10_strict
  torchrun --standalone --nproc_per_node=8 rl.py paper_rl
  torchrun --standalone --nproc_per_node=2 rl.py tiny_rl   # CPU, gloo
  python rl.py tiny_rl --resume=True                    # exact resume from out_dir/ckpt.pt
  python rl.py paper_rl --init_from=out/mid_80 --flops_budget=1.2e17 --max_steps=100000   # SPEC §5.3

Choices, and where we differ from verl (the paper's code):
- Old log-probs are recomputed by a forward pass of the current policy before the updates (as verl
  does), not taken from the sampler: the sampler's log-probs come from the KV-cache path (bf16 on
  GPU, different kernels) and are at temperature 1, so using them would make the first ratio
  differ from 1 by numerical noise. With a single update per rollout (prompts_per_step ==
  minibatch_prompts, ppo_epochs 1) the pass is skipped: old = current, detached (ratio == 1).
- Log-probs (policy, old and reference) are taken from logits / temperature, as verl does, so the
  ratio is measured against the distribution that was actually sampled.
- Advantages use the unbiased group std (torch.std, as verl); `adv_std_norm=False` gives
  Dr.GRPO's r - mean.
- Losses are normalised over the whole mini-batch across micro-batches and ranks (the token count
  is all-reduced), so the gradient does not depend on micro-batch size or world size.
- Weights stay fp32 with bf16 autocast on CUDA: at lr 1e-6 bf16 weights would drop most updates.
- The prompt stream is a pure function of (prompt_seed, index) and the sampler's noise of
  (seed, step, rank); together with the optimizer state this makes resume exact.
- FLOPs follow SPEC §4: 2N per token of every forward-only pass (rollout: each prompt once per
  group -- it is prefilled once -- plus every generated token; old and reference passes: prompt +
  response per sample) and 6N per trained token (prompt + response, per PPO epoch), N =
  num_params(). Held-out evaluation is not counted.
"""

import json
import os
import random
import sys
import time
from contextlib import nullcontext

# -----------------------------------------------------------------------------
# Defaults (paper values, SPEC §4). Presets in config/*rl*.py override them, then --key=value.

# I/O
init_from = 'out/base'      # starting run dir or ckpt.pt (pre/mid-training); also the frozen KL reference
tokenizer = ''              # tokenizer.json; '' = the one in init_from's run dir (else its data_dir)
out_dir = 'out/rl'          # ckpt.pt, log.jsonl, samples.jsonl go here (rank 0 only)
resume = False              # continue from out_dir/ckpt.pt: step, optimizer, RNG, prompt stream, FLOPs
# RL prompts
prompts = ''                # JSONL of problems (ours or the released format); '' = generate on the fly
op_min = 11                 # prompts have op in [op_min, op_max] (generated uniformly, or a JSONL filtered)
op_max = 14
templates = {'crazy_zootopia': 1.0, 'teachers_in_school': 1.0, 'movie_festival_awards': 1.0}  # weights (0 = never)
reverse_frac = 0.5          # share of forwardreverse problems (generated prompts)
mixture = ''                # a data.MIXTURES name or ops spec (e.g. 'rl_ctx_zoo0.9'); replaces the 4 keys above
                            # for generated prompts (a JSONL is then not filtered by op)
prompt_seed = 7919          # seeds the prompt stream (held-out ids are excluded whatever the seed)
exclude = ''                # comma-separated JSONL files whose ids must never be RL prompts (besides the held-out sets)
# GRPO
group_size = 6              # G samples per prompt
prompts_per_step = 1024     # prompts per rollout, over all ranks
minibatch_prompts = 256     # prompts per optimizer step (-> 4 updates per rollout)
ppo_epochs = 1              # passes over each rollout
micro_batch = 16            # sequences per forward/backward on one rank (memory knob only)
gen_batch = 0               # prompts per generate() call on one rank (0 = all at once; memory knob)
max_prompt_len = 1024       # longer prompts are skipped
max_response_len = 1024     # generation budget; unfinished responses are "truncated"
temperature = 1.0           # sampling temperature (also divides the logits of the loss, as verl)
reward = 'outcome'          # outcome | blend_0.2_0.8 | blend_0.5_0.5 | strict (data.REWARDS)
adv_std_norm = True         # divide by the group std (GRPO); False = Dr.GRPO's r - mean
clip_eps = 0.2              # PPO ratio clip
dual_clip = 3.0             # dual clip for negative advantages (Ye et al. 2020); 0 = off
kl_coef = 0.001             # k3 ("low_var_kl") KL loss to the reference model; 0 = no reference pass
entropy_coef = 0.0          # entropy bonus
loss_agg = 'token-mean'     # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
# optimizer
lr = 1e-6                   # AdamW, constant after warmup
warmup_steps = 0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0             # global grad-norm clip (0 = off)
# run length
max_steps = 200             # rollout steps
flops_budget = 0.0          # stop before the RL FLOPs would exceed this (0 = no budget); SPEC §5.3
# logging, evaluation, checkpoints
log_every = 1               # print one line every N steps (the JSONL log gets every step)
sample_every = 10           # print / save a few sample texts every N steps (0 = never)
n_samples_show = 2          # how many of them to print
eval_every = 50             # held-out evaluation every N steps (0 = never); also before the first and after the last step
eval_data = ''              # held-out JSONL; '' = {init run's data_dir}/eval.jsonl if present, else generated
                            # (data.make_eval_set, as evaluate.py). Every id in it is excluded from the RL prompts.
eval_op_min = 0             # evaluate op in [eval_op_min, eval_op_max]; 0 = op_min / op_max
eval_op_max = 0
eval_modes = ''              # '' = both; 'normalforward' or 'forwardreverse' to evaluate one mode only
eval_per_op_template = 8    # held-out problems per (op, template)
eval_samples = 4            # samples per problem (pass@1 is their mean)
eval_temperature = 0.7      # SPEC §4 evaluation temperature
eval_seed = 1234            # seed of a generated held-out set (evaluate.py's default)
eval_batch = 256            # sequences per generate() call in the evaluation
ckpt_every = 50             # checkpoint every N steps (0 = only at the end)
# system
seed = 1337                 # sampler noise is seeded by (seed, step, rank)
device = ''                 # '' = cuda if available else cpu (torchrun: cuda:LOCAL_RANK)
compile = False             # torch.compile the training forward

DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, dict, list, tuple))}

import torch
import torch.distributed as tdist

import data
import model as M

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
            assert self.rows, f"no prompt rows left after filtering to ops {ops}, templates {templates} and exclusions"
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
            row = data.generate(rng, op, template, mode).to_row()
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
# Rollout, rewards, advantages


def rollout(model, tok, rows, group_size, max_new_tokens, temperature=1.0, generator=None, gen_batch=0):
    """G samples per row with the KV-cache sampler. Samples are prompt-major: sample k answers
    rows[k // G]. Returns {'prompt', 'response' (token lists, stop token kept), 'text' (the
    response decoded, EOS dropped), 'finished' (hit </answer> or EOS), 'row' (index into rows)}."""
    raw = M.unwrap(model)
    prompts = [tok.encode(data.prompt_text(r)) for r in rows]
    stop = (tok.id_of('</answer>'), tok.eos_id)
    step = gen_batch or len(prompts)
    out = {'prompt': [], 'response': [], 'finished': []}
    for s in range(0, len(prompts), step):
        chunk = prompts[s:s + step]
        gen = raw.generate(chunk, max_new_tokens, temperature=temperature, stop_ids=stop, generator=generator,
                           num_samples=group_size, pad_id=tok.pad_id)
        out['prompt'] += [p for p in chunk for _ in range(group_size)]
        out['response'] += gen.tokens
        out['finished'] += gen.finished
    out['text'] = [tok.decode([t for t in r if t != tok.eos_id]) for r in out['response']]
    out['row'] = [k // group_size for k in range(len(out['response']))]
    return out


def compute_rewards(texts, golds, kind):
    """Verify each response against its gold graph; -> (rewards [N] float tensor, verdicts)."""
    verdicts = [data.verify(t, g) for t, g in zip(texts, golds)]
    return torch.tensor([data.reward(v, kind) for v in verdicts], dtype=torch.float32), verdicts


def compute_advantages(rewards, group_size, std_norm=True, eps=1e-6):
    """GRPO: (r - group mean) / (group std + eps), unbiased std as torch.std (verl). A group whose
    rewards are all equal gets advantage 0 (no signal). rewards [N] prompt-major -> [N]."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        a = a / (r.std(dim=1, keepdim=True) + eps)
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


def policy_loss(logp, old_logp, adv, mask, ref_logp=None, entropy=None, *, clip_eps=0.2, dual_clip=3.0,
                kl_coef=0.001, entropy_coef=0.0, agg='token-mean', n_tokens=None, n_seqs=None, max_len=None):
    """GRPO loss of one batch of responses, tensors [B, T] over response tokens (mask 1 = real).
    adv [B] (one advantage per sequence) or [B, T].
      ratio = exp(logp - old_logp)                                (log-ratio clamped to +-20)
      pg    = max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps))         PPO clip
      pg    = min(pg, -A*dual_clip) where A < 0                   dual clip: bounds the loss when
                                                                  the ratio explodes on a bad sample
      loss  = agg(pg) + kl_coef * agg(k3(logp, ref)) - entropy_coef * agg(entropy)
    Returns (loss, stats): stats hold detached token sums ('clipped', 'dual_clipped', 'kl', 'entropy',
    'ratio', 'tokens') and the aggregated parts ('pg_loss', 'kl_loss', 'entropy_loss')."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    m = mask.to(logp.dtype)
    ratio = (logp - old_logp).clamp(-20, 20).exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
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


# -----------------------------------------------------------------------------
# Forward passes and the update


def forward_logprobs(model, prompts, responses, temperature=1.0, device='cpu', entropy_grad=False):
    """Log-probs of each response token under `model` given its prompt, in one forward over the
    right-padded [prompt + response] rows (right padding is invisible to causal attention).
    -> (logp [B, R] fp32, entropy [B, R] (differentiable only if entropy_grad), mask [B, R])."""
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
    with M.autocast_ctx(device):
        logits, _ = model(ids)
    logits = logits.float().gather(1, pos[:, :, None].expand(-1, -1, logits.size(-1)))
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tgt[:, :, None]).squeeze(-1)
    lp = logp_all if entropy_grad else logp_all.detach()
    entropy = -(lp.exp() * lp).sum(-1)
    return logp * mask, entropy * mask, mask


def micro_batches(indices, lengths, size):
    """Split `indices` into chunks of <= size, sorted by length so each chunk pads little."""
    order = sorted(indices, key=lambda i: lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


@torch.no_grad()
def batch_logprobs(model, prompts, responses, micro_batch, temperature, device):
    """Per-sample log-prob tensors [len(response)] (on device), computed in length-sorted micro-batches."""
    out = [None] * len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    for mb in micro_batches(range(len(prompts)), lengths, micro_batch):
        logp, _, _ = forward_logprobs(model, [prompts[i] for i in mb], [responses[i] for i in mb],
                                      temperature, device)
        for k, i in enumerate(mb):
            out[i] = logp[k, :len(responses[i])]
    return out


def all_reduce_sum(t, world_size):
    if world_size > 1:
        tdist.all_reduce(t)
    return t


def pad_stack(seqs, width, device):
    out = torch.zeros(len(seqs), width, device=device)
    for k, s in enumerate(seqs):
        out[k, :len(s)] = s
    return out


def update_policy(model, optimizer, batch, *, n_minibatches, micro_batch, temperature=1.0, clip_eps=0.2,
                  dual_clip=3.0, kl_coef=0.001, entropy_coef=0.0, loss_agg='token-mean', max_len=1024,
                  grad_clip=1.0, ppo_epochs=1, world_size=1, device='cpu'):
    """PPO-style updates on one rollout. batch: 'prompt', 'response' (token lists), 'adv' [N]
    tensor, 'old_logp' (list of per-sample tensors, or None: on-policy, old = current detached),
    'ref_logp' (list or None). Samples are prompt-major; mini-batch j is the j-th contiguous slice
    (whole groups). Each mini-batch is one optimizer step: its micro-batches are accumulated with
    DDP's gradient sync only on the last, and every micro-batch loss is normalised by mini-batch
    totals all-reduced over ranks (x world_size, since DDP averages gradients).
    Returns summed stats (for all-reducing) plus 'grad_norm' (mean) and 'updates'."""
    N = len(batch['prompt'])
    assert N % n_minibatches == 0, f"{N} samples do not split into {n_minibatches} mini-batches"
    size = N // n_minibatches
    lengths = [len(p) + len(r) for p, r in zip(batch['prompt'], batch['response'])]
    resp_len = [len(r) for r in batch['response']]
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    sums, grad_norms = {}, []
    model.train()
    for _ in range(ppo_epochs):
        for j in range(n_minibatches):
            idx = list(range(j * size, (j + 1) * size))
            totals = torch.tensor([sum(resp_len[i] for i in idx), len(idx)], dtype=torch.float64, device=device)
            all_reduce_sum(totals, world_size)
            n_tokens, n_seqs = (totals / world_size).tolist()  # per-rank share: DDP averages over ranks
            mbs = micro_batches(idx, lengths, micro_batch)
            for k, mb in enumerate(mbs):
                sync = nullcontext() if (not ddp or k == len(mbs) - 1) else model.no_sync()
                with sync:
                    logp, ent, mask = forward_logprobs(model, [batch['prompt'][i] for i in mb],
                                                       [batch['response'][i] for i in mb], temperature, device,
                                                       entropy_grad=entropy_coef != 0)
                    W = mask.size(1)
                    old = logp.detach() if batch['old_logp'] is None else \
                        pad_stack([batch['old_logp'][i] for i in mb], W, device)
                    ref = None if batch['ref_logp'] is None else pad_stack([batch['ref_logp'][i] for i in mb], W, device)
                    adv = batch['adv'][mb].to(device)
                    loss, st = policy_loss(logp, old, adv, mask, ref, ent, clip_eps=clip_eps, dual_clip=dual_clip,
                                           kl_coef=kl_coef, entropy_coef=entropy_coef, agg=loss_agg,
                                           n_tokens=n_tokens, n_seqs=n_seqs, max_len=max_len)
                    loss.backward()
                for key in ('tokens', 'ratio', 'clipped', 'dual_clipped', 'kl', 'entropy'):
                    if key in st:
                        sums[key] = sums.get(key, 0.0) + float(st[key])
                sums['pg_loss'] = sums.get('pg_loss', 0.0) + float(st['pg_loss'])  # sums over micro-batches
            if grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            else:
                gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
            grad_norms.append(float(gn))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sums['grad_norm'] = sum(grad_norms) / len(grad_norms)
    sums['updates'] = len(grad_norms)
    sums['pg_loss'] /= len(grad_norms)  # mean mini-batch loss (per-rank share)
    return sums


# -----------------------------------------------------------------------------
# Evaluation, logging helpers


def held_out_eval(model, tok, rows, n, temperature, max_new_tokens, batch_size, dist):
    """pass@1 (process-verified and outcome) etc. on held-out rows: evaluate.quick_eval, rows
    sharded across ranks (every rank gets the same numbers). Keys 'eval/all/pass@1', ..."""
    import evaluate
    res = evaluate.quick_eval(model, tok, rows, n, temperature, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, dist=dist)
    return {f'eval/{k}': float(v) for k, v in res.items()}


def load_tokenizer(path, init_from, run_config):
    """The tokenizer the starting checkpoint was trained with: `path`, else a tokenizer file next
    to the checkpoint or in its run's data_dir."""
    cands = [path] if path else []
    for base in (os.path.dirname(os.path.abspath(init_from)), run_config.get('data_dir', '')):
        if base:
            cands.append(os.path.join(base, 'tokenizer.json'))
    for c in cands:
        if c and os.path.exists(c):
            return data.Tokenizer.load(c)
    raise FileNotFoundError(f"no tokenizer found (tried {cands}); pass --tokenizer=PATH")


def resolve_ckpt(path):
    """A checkpoint file, or a run directory holding ckpt.pt."""
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def lr_at(step, base, warmup):
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    cfg = M.configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    C = type('Config', (), cfg)  # attribute access: C.lr
    assert C.reward in data.REWARDS, f"reward must be one of {data.REWARDS}, got {C.reward!r}"
    assert C.loss_agg in ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'), C.loss_agg
    dist = M.setup_distributed()
    device = C.device or dist.device
    W, rank = dist.world_size, dist.rank
    assert C.prompts_per_step % C.minibatch_prompts == 0, "prompts_per_step must be a multiple of minibatch_prompts"
    assert C.minibatch_prompts % W == 0, "minibatch_prompts must be a multiple of the world size"
    P_local = C.prompts_per_step // W
    n_minibatches = C.prompts_per_step // C.minibatch_prompts
    torch.manual_seed(C.seed + rank)

    # models: the policy (start or resume) and the frozen reference (always the start)
    init_path = resolve_ckpt(C.init_from)
    start = M.load_checkpoint(init_path, device=device)
    tok = load_tokenizer(C.tokenizer, init_path, start['config'])
    assert tok.identity == start['tokenizer_identity'], "tokenizer does not match the starting checkpoint"
    policy = start['model']
    ref = None
    if C.kl_coef > 0:
        ref = M.load_checkpoint(init_path, device=device)['model'].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=C.lr, betas=(C.beta1, C.beta2), weight_decay=C.weight_decay,
                                  fused='cuda' in str(device))
    N_params = policy.num_params()

    # held-out rows and the prompt stream (never a held-out id)
    import evaluate
    eval_ops = list(range(C.eval_op_min or C.op_min, (C.eval_op_max or C.op_max) + 1))
    data_dir = start['config'].get('data_dir', '')
    eval_rows, eval_source = evaluate.load_eval_rows(C.eval_data, data_dir, eval_ops, C.eval_per_op_template,
                                                     modes=[m for m in C.eval_modes.split(',') if m],
                                                     seed=C.eval_seed)
    # never train on a held-out problem: the rows evaluated here, the whole file they come from, the
    # base run's held-out set (what evaluate.py uses by default) and any `exclude` files
    held_out = [eval_source, os.path.join(data_dir, 'eval.jsonl') if data_dir else ''] + C.exclude.split(',')
    excluded = {r['id'] for r in eval_rows}
    for path in {p.strip() for p in held_out if p.strip() and os.path.isfile(p.strip())}:
        excluded |= {r['id'] for r in data.read_jsonl(path)}
    keep = lambda row: len(tok.encode(data.prompt_text(row))) <= C.max_prompt_len
    stream = PromptStream.from_config(C, excluded, keep)

    step, flops, history = 0, {'rollout': 0.0, 'ref': 0.0, 'old': 0.0, 'train': 0.0, 'total': 0.0}, []
    ckpt_path = os.path.join(C.out_dir, 'ckpt.pt')
    if not C.resume and os.path.exists(ckpt_path):
        raise SystemExit(f"{ckpt_path} exists: pass --resume=True to continue that run, or pick another --out_dir")
    if C.resume:
        ck = M.load_checkpoint(ckpt_path, device=device, expect_tokenizer=tok.identity)
        policy.load_state_dict(ck['model'].state_dict())
        optimizer.load_state_dict(ck['optimizer'])
        step, flops = ck['step'], dict(ck['extra']['flops'])
        stream.load_state_dict(ck['extra']['stream'])
        M.set_rng_state(ck['extra']['rng'])
        history = list(ck['extra'].get('step_flops', []))
        if dist.is_master:  # drop log lines of steps after the checkpoint (a crash between log and save)
            for name in ('log.jsonl', 'eval.jsonl', 'samples.jsonl'):
                trim_jsonl(os.path.join(C.out_dir, name), step)
    train_model = torch.compile(policy) if C.compile else policy
    if dist.ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if 'cuda' in str(device) else None)

    def save(step):
        if not dist.is_master:
            return
        # data_dir rides along so evaluate.py / a later stage find the held-out set of the base run
        M.save_checkpoint(ckpt_path, policy, dict(cfg, data_dir=data_dir), tok.identity, step, optimizer,
                          extra={'flops': flops, 'stream': stream.state_dict(), 'rng': M.rng_state(),
                                 'step_flops': history, 'init_from': C.init_from})

    def evaluate_now(step):
        res = held_out_eval(policy, tok, eval_rows, C.eval_samples, C.eval_temperature, C.max_response_len,
                            C.eval_batch, dist)
        res['step'] = step
        if dist.is_master:
            log_jsonl(os.path.join(C.out_dir, 'eval.jsonl'), res)
            say(f"eval step {step}: pass@1 {res['eval/all/pass@1']:.3f} (process-verified) | "
                f"outcome pass@1 {res['eval/all/outcome_pass@1']:.3f} | hack {res['eval/all/hack_rate']:.3f} "
                f"| {len(eval_rows)} problems x {C.eval_samples}")
        return res

    pbar = None
    if dist.is_master:
        os.makedirs(C.out_dir, exist_ok=True)
        tok.save(os.path.join(C.out_dir, 'tokenizer.json'))  # the run dir is self-contained for evaluate.py
        if not C.resume:  # logs of an earlier attempt that never reached a checkpoint
            for name in ('log.jsonl', 'eval.jsonl', 'samples.jsonl'):
                if os.path.exists(os.path.join(C.out_dir, name)):
                    os.remove(os.path.join(C.out_dir, name))
        from tqdm import tqdm
        pbar = tqdm(total=C.max_steps, initial=step, desc='rl', dynamic_ncols=True, file=sys.stdout)
        say = pbar.write
        say(f"held-out: {len(eval_rows)} problems from {eval_source}; {len(excluded)} ids excluded from RL prompts")
        say(f"rl: {N_params / 1e6:.2f}M params | world {W} | {C.prompts_per_step} prompts x G={C.group_size} per step, "
            f"{n_minibatches} updates | reward {C.reward} | prompts {C.prompts or C.mixture or f'op {C.op_min}-{C.op_max}'} "
            f"| out {C.out_dir}")
    else:
        say = lambda s: None
    results = {'eval': []}
    if C.eval_every and not C.resume:
        results['eval'].append(evaluate_now(step))

    while step < C.max_steps:
        if C.flops_budget and history and flops['total'] + sum(history) / len(history) > C.flops_budget:
            say(f"FLOP budget {C.flops_budget:.3g} reached: {flops['total']:.3g} used, a step costs ~{sum(history) / len(history):.3g}")
            break
        t0 = time.time()
        for g in optimizer.param_groups:
            g['lr'] = lr_at(step, C.lr, C.warmup_steps)

        # 1. rollout: this rank's slice of the step's prompts, G samples each
        rows = stream.take(stream.next + rank * P_local, P_local)
        stream.next += C.prompts_per_step
        gen = torch.Generator(device=device).manual_seed((C.seed * 1_000_003 + step * 1009 + rank) % 2**63)
        policy.eval()
        with M.autocast_ctx(device):
            ro = rollout(policy, tok, rows, C.group_size, C.max_response_len, C.temperature, gen, C.gen_batch)
        t_gen = time.time() - t0

        # 2. rewards and advantages
        golds = [rows[k]['graph'] for k in ro['row']]
        rewards, verdicts = compute_rewards(ro['text'], golds, C.reward)
        adv = compute_advantages(rewards, C.group_size, C.adv_std_norm)

        # 3. old (current policy) and reference log-probs, no grad
        single_update = n_minibatches == 1 and C.ppo_epochs == 1
        old_lp = None if single_update else batch_logprobs(policy, ro['prompt'], ro['response'], C.micro_batch,
                                                           C.temperature, device)
        ref_lp = None if ref is None else batch_logprobs(ref, ro['prompt'], ro['response'], C.micro_batch,
                                                         C.temperature, device)
        # 4. policy updates
        st = update_policy(train_model, optimizer, {'prompt': ro['prompt'], 'response': ro['response'], 'adv': adv,
                                                     'old_logp': old_lp, 'ref_logp': ref_lp},
                           n_minibatches=n_minibatches, micro_batch=C.micro_batch, temperature=C.temperature,
                           clip_eps=C.clip_eps, dual_clip=C.dual_clip, kl_coef=C.kl_coef, entropy_coef=C.entropy_coef,
                           loss_agg=C.loss_agg, max_len=C.max_response_len, grad_clip=C.grad_clip,
                           ppo_epochs=C.ppo_epochs, world_size=W, device=device)
        step += 1
        dt = time.time() - t0

        # 5. metrics: sums over this rank, all-reduced, then ratios
        G = C.group_size
        n_resp = sum(len(r) for r in ro['response'])
        n_seq_tok = sum(len(p) + len(r) for p, r in zip(ro['prompt'], ro['response']))
        n_prompt_once = sum(len(ro['prompt'][k]) for k in range(0, len(ro['prompt']), G))
        r_view = rewards.view(-1, G)
        local = {
            'samples': len(verdicts), 'groups': r_view.size(0),
            'reward': float(rewards.sum()),
            'outcome': sum(v.outcome for v in verdicts),
            'process_acc': sum(v.process_acc for v in verdicts),
            'perfect': sum(v.perfect for v in verdicts),
            'hacked': sum(v.outcome and not v.perfect for v in verdicts),
            'zero_adv_groups': float((r_view.max(1).values == r_view.min(1).values).sum()),
            'resp_tokens': n_resp, 'seq_tokens': n_seq_tok, 'truncated': sum(not f for f in ro['finished']),
            'flops_rollout': 2 * N_params * (n_prompt_once + n_resp),
            'flops_ref': 2 * N_params * n_seq_tok if ref is not None else 0,
            'flops_old': 2 * N_params * n_seq_tok * (old_lp is not None),
            'flops_train': 6 * N_params * n_seq_tok * C.ppo_epochs,
            't_gen': t_gen, 't_step': dt,
            **{k: st.get(k, 0.0) for k in ('tokens', 'ratio', 'clipped', 'dual_clipped', 'kl', 'entropy', 'pg_loss',
                                             'grad_norm')},
        }
        keys = list(local)
        vec = all_reduce_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=device), W)
        tot = dict(zip(keys, vec.tolist()))
        step_flops = tot['flops_rollout'] + tot['flops_ref'] + tot['flops_old'] + tot['flops_train']
        for k in ('rollout', 'ref', 'old', 'train'):
            flops[k] += tot['flops_' + k]
        flops['total'] += step_flops
        history.append(step_flops)
        S, T = tot['samples'], max(tot['tokens'], 1)
        m = {'step': step, 'lr': optimizer.param_groups[0]['lr'],
             'reward': tot['reward'] / S, 'outcome_acc': tot['outcome'] / S, 'process_acc': tot['process_acc'] / S,
             'perfect': tot['perfect'] / S, 'hack': tot['hacked'] / S,
             'hack_of_correct': tot['hacked'] / max(tot['outcome'], 1),
             'kl': tot['kl'] / T, 'entropy': tot['entropy'] / T, 'clip_frac': tot['clipped'] / T,
             'dual_clip_frac': tot['dual_clipped'] / T, 'ratio': tot['ratio'] / T,
             'pg_loss': tot['pg_loss'] / W, 'grad_norm': tot['grad_norm'] / W,
             'zero_adv_groups': tot['zero_adv_groups'] / tot['groups'],
             'resp_len': tot['resp_tokens'] / S, 'truncated': tot['truncated'] / S,
             'gen_tok_per_s': tot['resp_tokens'] / (tot['t_gen'] / W),  # generated tokens / rollout time
             'tok_per_s': tot['seq_tokens'] / (tot['t_step'] / W),       # prompt+response tokens / step time
             'step_s': tot['t_step'] / W, 'flops': flops['total'], 'step_flops': step_flops}

        if dist.is_master:
            log_jsonl(os.path.join(C.out_dir, 'log.jsonl'), m)
            pbar.update(1)
            pbar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2g}")
            if step % C.log_every == 0:
                say(f"step {step} | reward {m['reward']:.3f} | acc {m['outcome_acc']:.3f} | proc {m['process_acc']:.3f} "
                    f"| perfect {m['perfect']:.3f} | hack {m['hack']:.3f} | kl {m['kl']:.2e} | ent {m['entropy']:.3f} "
                    f"| clip {m['clip_frac']:.3f} | zero-adv {m['zero_adv_groups']:.2f} | len {m['resp_len']:.0f} "
                    f"| trunc {m['truncated']:.2f} | {m['gen_tok_per_s']:.0f} gen tok/s | {m['step_s']:.1f}s "
                    f"| {flops['total']:.3g} FLOPs")
            if C.sample_every and step % C.sample_every == 0:
                for j, k in enumerate(range(0, len(ro['text']), G)[:max(C.n_samples_show, 4)]):  # 1 per prompt
                    row = rows[ro['row'][k]]
                    rec = {'step': step, 'id': row['id'], 'op': row['op'], 'mode': row['mode'],
                           'reward': float(rewards[k]), 'verdict': verdicts[k].to_dict(), 'response': ro['text'][k],
                           'gold': row['solution']}
                    log_jsonl(os.path.join(C.out_dir, 'samples.jsonl'), rec)
                    if j < C.n_samples_show:
                        say(f"  [op {row['op']} {row['mode']}] reward {rec['reward']:.2f}: {ro['text'][k][:300]!r}")
        results['last'] = m
        if C.eval_every and (step % C.eval_every == 0 or step == C.max_steps):
            results['eval'].append(evaluate_now(step))
        if C.ckpt_every and step % C.ckpt_every == 0:
            save(step)

    if C.eval_every and step % C.eval_every and step != C.max_steps:  # stopped early (FLOP budget)
        results['eval'].append(evaluate_now(step))
    save(step)
    if pbar is not None:
        pbar.close()
    results.update(step=step, flops=flops, out_dir=C.out_dir)
    if dist.ddp:
        M.cleanup_distributed()
    return results


def log_jsonl(path, rec):
    with open(path, 'a') as f:
        f.write(json.dumps(rec) + '\n')


def trim_jsonl(path, last_step):
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get('step', 0) <= last_step]
        with open(path, 'w') as f:
            f.writelines(keep)


if __name__ == '__main__':
    main()
