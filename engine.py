"""
The generation engine: sampling from a Qwen2 (model.py) fast, with a KV cache.

    generate(model, prompts, max_new_tokens, ...)   num_samples=G continuations of each token-id
                     prompt -> Generation(tokens, logprobs, finished). Each prompt prefilled once and
                     its keys shared by its G samples, a queue of prompts refilling freed slots, slots
                     sized from a memory budget, stops found on the device, seeded draws that depend
                     only on (seed, prompt, sample, position), fused q/k/v and gate/up weights
                     (oneDNN-packed on CPU), CUDA graphs on CUDA. Pass every prompt of a step / shard
                     in one call.
    complete(model, tok, texts, ...)   the call every stage makes (rl.py's rollouts, evaluate.py's
                     samples, bench.py): encode prompt texts, generate until '</answer>' or EOS
                     (stop_ids), decode -> Completions(prompts, tokens, finished, texts).
    Engine, EngineCache, EngineWeights   one generate() call, its cache and its weights
    sample_token, inverse_cdf, cdf_block, counter_uniform   the draws

model.sample is the plain reference (one full forward pass per token); tests/test_engine.py ties the
two together, and checks seeded samples against slots, prompt order and CUDA graphs.

Rows are laid out as prompt-slots x G: a prompt is prefilled once and its keys/values stored once
per slot; each of its G samples has its own cache for the tokens it generates. Decode attention
scores the G * (n_head / n_kv_head) queries of a slot against the prompt keys in one batched
matmul -- the prompt cache is read once per step for the whole group, never copied, never expanded
to the query heads -- and each row against its own generated keys; one softmax over both score
blocks, then the two value products are summed. When every row of a slot has stopped, the slot
takes the next waiting prompt (several freed slots are prefilled in one batch). Stops are
detected on the device and collected every SYNC_EVERY steps: no host sync inside a step, so on
CUDA the step (static shapes) is captured once per (slots, length bucket) as a CUDA graph.

Why a slot is refilled whole, not row by row: a row belongs to its prompt's slot (its prompt keys
are the slot's), so a freed row could only take a sample of another prompt by giving up that
sharing. What it would win, measured on the bench's calls (tiny trained run, CPU): of the row-steps
decoded, rows that had stopped while a sibling still ran took 1.6% (rollout 32x6), 4.9% (eval
30x16) and 7.1% (128x6 through 32 slots, the queue refilling them); whole slots of stopped rows
waiting for the next collection or the tail repack (_compact) another 5-7%. Collecting every 2 or
4 steps on CPU, or repacking at a 5% gain, changed the rollout by +-1% (noise): not worth it.

Why a slot that runs far past the others is parked while prompts wait: every row attends over the
generated keys of the oldest occupied slot (Tb; masked beyond its own length), and a slot lives as
long as the longest of its G samples, so one long sample makes every row read keys it never uses
(evaluate.py tiny_eval's call, 210 problems x 16 through 12 slots: 4.7x the keys the rows hold).
A parked slot's caches and row state are set aside, its slot takes a waiting prompt, and it is
put back, exactly as it was, once the queue is empty: rows never interact, so its samples are
the same (that call: 1.35x faster at 1 thread, 1.26x at 2, all 3,360 samples identical).
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import UsageError, unwrap
from model import ModelConfig, Qwen2, apply_rope, sdpa

def generation_sdpa_backends(device):
    """On CUDA, keep SDPA off the cuDNN backend while decoding: cuDNN builds a new plan for every
    new key length, i.e. at every decode step (measured on an H100 / torch 2.11: 3.4 ms of CPU per
    attention call, 10x slower decoding). Flash / memory-efficient / math have no such cost."""
    if torch.device(device).type != 'cuda':
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])



@dataclass
class Generation:
    tokens: list[list[int]]      # generated tokens per row (stop token included, nothing after it)
    logprobs: list[list[float]]  # log_softmax(raw logits)[token] per generated token: temperature 1, no top-k/top-p
    finished: list[bool]         # hit a stop id (False = truncated at max_new_tokens)


@torch.inference_mode()  # (not no_grad: no autograd bookkeeping on any op; 1.08x on CPU decode)
def generate(model: Qwen2, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids=(),
             generator: torch.Generator | None = None, num_samples: int = 1, pad_id: int = 0,
             logprobs: bool = True, kv_bytes: int | None = None, max_rows: int | None = None,
             cuda_graphs: bool | None = None) -> Generation:
    """Sample num_samples=G continuations of each token-id prompt (any lengths, any number of
    prompts: pass them all, the engine schedules memory). Rows come back prompt-major:
    [p0 s0, p0 s1, ..., p1 s0, ...].

    temperature 0 = greedy. Otherwise logits / temperature, then top_k, then top_p (nucleus),
    then one draw. A sample's draws depend only on (a base seed taken from `generator`, its
    prompt's tokens, its sample index, its position) -- not on the other prompts, their order,
    the number of slots or the device's memory -- so a subset or a reshuffled call gives the
    same samples per prompt (up to float rounding of the logits across batch shapes). A row
    stops after emitting any token of stop_ids, or after max_new_tokens, or when it reaches
    max_seq_len. pad_id only fills the (masked) right padding of a prefill.

    logprobs=True returns log_softmax(raw logits)[sampled token] in fp32 -- the distribution at
    temperature 1 with no top-k/top-p -- which is what forward() gives for the same tokens (to
    bf16 precision under autocast); False skips that work and returns empty lists.
    Memory: kv_bytes bounds the KV cache (default DEFAULT_KV_BYTES of the device); max_rows
    optionally caps the rows decoded at once (evaluate.py's batch_size). cuda_graphs: capture the
    decode step as CUDA graphs (default CUDA_GRAPHS, on; ignored off CUDA).
    Call inside autocast_ctx(device) for bf16 on CUDA; the model's train/eval mode is kept."""
    model = unwrap(model)  # (the plain Qwen2 inside DDP / torch.compile wrappers)
    device = model.embed_tokens.weight.device
    if any(len(p) == 0 for p in prompts):
        raise UsageError("generate: every prompt needs at least one token")
    too_long = [len(p) for p in prompts if len(p) >= model.config.max_seq_len]
    if too_long:
        raise UsageError(f"generate: a prompt of {too_long[0]} tokens leaves no room in max_seq_len "
                         f"{model.config.max_seq_len}; shorten the prompt or use a longer model")
    if num_samples < 1:
        raise UsageError(f"generate: num_samples must be >= 1, got {num_samples}")
    if not prompts or max_new_tokens <= 0:
        n = len(prompts) * num_samples
        return Generation([[] for _ in range(n)], [[] for _ in range(n)], [False] * n)
    graphs = device.type == 'cuda' and (CUDA_GRAPHS if cuda_graphs is None else cuda_graphs)
    eng = Engine(model, prompts, num_samples, max_new_tokens, temperature, top_k, top_p, stop_ids,
                 generator, logprobs, kv_bytes, max_rows, pad_id, graphs)
    with generation_sdpa_backends(device):
        return eng.run()


def stop_ids(tok) -> tuple:
    """Where a response ends: '</answer>' closes it (the task's format), EOS ends a document."""
    return (tok.id_of('</answer>'), tok.eos_id)


@dataclass
class Completions:
    prompts: list[list[int]]  # the encoded prompt texts, one per text
    tokens: list[list[int]]   # generated tokens per sample, prompt-major (stop token kept)
    finished: list[bool]      # hit a stop (False = truncated at max_new_tokens)
    texts: list[str]          # what each sample wrote after '<solution>': '</answer>' kept, EOS dropped


def complete(model, tok, texts, max_new_tokens, *, num_samples=1, temperature=1.0, top_k=None, generator=None,
             max_rows=None) -> Completions:
    """num_samples completions of each prompt text (data.prompt_text), in one generate() call that
    stops at stop_ids(tok), without per-token log-probs (RL recomputes them with a forward pass).
    Samples are prompt-major: sample k answers text k // num_samples. `model` is a Qwen2 (wrappers
    unwrapped) or a stand-in with its own generate(prompts, max_new_tokens, **the same keywords)."""
    prompts = [tok.encode(t) for t in texts]
    m = unwrap(model)
    run = functools.partial(generate, m) if isinstance(m, Qwen2) else m.generate
    gen = run(prompts, max_new_tokens, temperature=temperature, top_k=top_k or None, stop_ids=stop_ids(tok),
              generator=generator, num_samples=num_samples, pad_id=tok.pad_id, logprobs=False, max_rows=max_rows)
    return Completions(prompts, gen.tokens, list(gen.finished),
                       [tok.decode(t[:-1] if t and t[-1] == tok.eos_id else t) for t in gen.tokens])


# -----------------------------------------------------------------------------
# The engine

DEFAULT_KV_BYTES = {'cuda': 8 << 30, 'cpu': 256 << 20}  # paper preset in bf16: 6 KiB a token -> 1.4M tokens
SYNC_EVERY = 8     # decode steps between collections of finished rows
CUDA_GRAPHS = True # generate's default on CUDA: replay the decode step as CUDA graphs (False: eager)
ROW_COST = 128     # a row's non-attention work in a decode step, in cached keys read (for _compact)
COMPACT_GAIN = {'cuda': 0.5}  # repack when it cuts a step's cost to this share (0.9 elsewhere); CUDA
                              # must capture new graphs after a repack, so it waits for a bigger gain
PREFILL_TOKENS = {'cuda': 1 << 16}  # padded tokens per prefill batch (1024 elsewhere: less padding, as fast)
BUCKET = 64        # CUDA: key lengths attended are rounded up to this (one graph per bucket)
PARK_AGE, PARK_FACTOR = 64, 2.0  # while prompts wait, park a slot older than both PARK_AGE steps
                                 # and PARK_FACTOR x the median occupied slot's age (Engine._park_old)
GROW = 8           # elsewhere: the generated-key cache grows by this many positions at a time
graph_fallbacks = 0  # generate() calls whose CUDA graph capture failed and that went on eagerly (logged by rl.py)
ONEDNN_LINEAR = True  # CPU fp32: the engine's matmuls through oneDNN's packed GEMM (EngineWeights)


class EngineCache:
    """Prompt keys/values [n_layer, slots, n_kv_head, P, head_dim], stored once per prompt-slot,
    and generated keys/values [n_layer, slots, G, n_kv_head, T, head_dim], one cache per row.
    `attend` is called by every layer (EngineWeights.hidden): in prefill mode it writes the prompt
    keys of the slots being filled and runs causal attention; in decode mode it writes each row's
    new key at its own position and attends over prompt + own generated keys (mask `bias`, built
    once per step)."""

    def __init__(self, cfg: ModelConfig, slots, G, P, T, device, dtype):
        L, H, D = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        # zeros, not empty: a masked key has weight 0, and 0 * NaN garbage would still be NaN
        self.pk = torch.zeros(L, slots, H, P, D, device=device, dtype=dtype)
        self.pv = torch.zeros_like(self.pk)
        self.gk = torch.zeros(L, slots, G, H, T, D, device=device, dtype=dtype)
        self.gv = torch.zeros_like(self.gk)
        self.rep, self.scale = cfg.n_head // cfg.n_kv_head, cfg.head_dim ** -0.5
        self.fill = None       # prefill: slot of each prompt in the batch ([B] long)
        self.wflat = None      # decode: where each row's new key goes, as a flat index of gk[layer]
        self.bias = None       # decode: [slots, G, 1, 1, P + Tb], 0 where visible, -inf where not
        self.Tb = T            # decode: generated keys attended (>= every row's wpos + 1)

    def attend(self, layer, q, k, v):
        """q [B, T, n_head, D], k/v [B, T, n_kv_head, D] -> [B, T, n_head * D]."""
        if self.fill is not None:  # prefill, right-padded: causal attention never sees the pads
            B, T = q.shape[:2]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            self.pk[layer, self.fill, :, :T] = k
            self.pv[layer, self.fill, :, :T] = v
            return sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        _, S, G, Hk, T, D = self.gk.shape
        P, Tb, r = self.pk.size(3), self.Tb, self.rep
        kg, vg, kp, vp = self.gk[layer], self.gv[layer], self.pk[layer], self.pv[layer]
        kg.view(-1, D).index_copy_(0, self.wflat, k.reshape(-1, D))
        vg.view(-1, D).index_copy_(0, self.wflat, v.reshape(-1, D))
        if Tb < T:  # (CUDA's length buckets; on CPU the cache is grown to Tb instead)
            kg, vg = kg[:, :, :, :Tb], vg[:, :, :, :Tb]
        q = q.reshape(S, G, Hk, r, D) * self.scale                     # query head h reads KV head h // r
        qp = q.permute(0, 2, 1, 3, 4).reshape(S * Hk, G * r, D)         # a slot's queries, grouped by KV head
        sp = scores(qp, kp.reshape(S * Hk, P, D)).view(S, Hk, G, r, P).permute(0, 2, 1, 3, 4)
        sg = scores(q.reshape(S * G * Hk, r, D), kg.reshape(S * G * Hk, Tb, D)).view(S, G, Hk, r, Tb)
        w = torch.softmax(torch.cat([sp, sg], -1) + self.bias, dim=-1).to(q.dtype)
        wp = w[..., :P].permute(0, 2, 1, 3, 4).reshape(S * Hk, G * r, P)
        yp = torch.bmm(wp, vp.view(S * Hk, P, D)).view(S, Hk, G, r, D).permute(0, 2, 1, 3, 4)
        yg = torch.bmm(w[..., P:].reshape(S * G * Hk, r, Tb), vg.reshape(S * G * Hk, Tb, D)).view(S, G, Hk, r, D)
        return (yp + yg).reshape(S * G, 1, Hk * r * D)  # (bmm, not @ on 5-d tensors: a third of the ops)

    def resize(self, T):
        """Room for exactly T generated positions per row: new positions zeroed, or the last ones
        dropped (CPU: Engine._set_lengths grows it, Engine._park_old shrinks it)."""
        extra = list(self.gk.shape)
        extra[4] = T - self.gk.size(4)
        if extra[4] > 0:
            self.gk, self.gv = (torch.cat([c, c.new_zeros(extra)], dim=4) for c in (self.gk, self.gv))
        else:
            self.gk, self.gv = (c[:, :, :, :, :T].contiguous() for c in (self.gk, self.gv))

    def select(self, slots, cols):
        """Keep prompt-slots slots [S', 1] and, of each, the rows cols [S', C'] (Engine._compact)."""
        self.pk, self.pv = self.pk[:, slots[:, 0]], self.pv[:, slots[:, 0]]
        self.gk, self.gv = self.gk[:, slots, cols], self.gv[:, slots, cols]


_BMM_OUT_DTYPE = [True]  # aten::bmm.dtype works here (cleared at the first failure)


def scores(q, k):
    """q [B, M, D] @ k [B, N, D]^T -> [B, M, N] in fp32. bf16 on CUDA: cuBLAS accumulates in fp32
    and bmm's out_dtype keeps that result instead of rounding the scores to bf16 (no fp32 copy of
    the cache either); where it is missing, bf16 scores as Hugging Face's eager attention has them."""
    if q.is_cuda and q.dtype != torch.float32 and _BMM_OUT_DTYPE[0]:
        try:
            return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _BMM_OUT_DTYPE[0] = False
    return torch.bmm(q, k.transpose(1, 2)).float()


def _job_seed(base: int, prompt_key: bytes, sample: int) -> int:
    """A signed int64 seed of one sample, from the call's base seed, its prompt and sample index."""
    h = hashlib.blake2b(prompt_key + f':{base}:{sample}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little', signed=True)


def _i64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def counter_uniform(seed, t):
    """SplitMix64's t-th output for each seed: int64 tensors [N] -> uniforms in [0, 1) [N] fp32.
    A pure function of (seed, t), computed on the device with integer ops (the multiplications wrap
    modulo 2^64; the masks turn torch's arithmetic right shifts into logical ones)."""
    z = seed + (t + 1) * _GOLDEN
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return ((z >> 40) & 0xFFFFFF).float() * 2.0 ** -24


def onednn_linear(x, w, b=None):
    """F.linear through oneDNN with a weight packed by torch.ops.mkldnn._reorder_linear_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')


class EngineWeights:
    """The engine's weights, built once per generate() call (the checkpoint keeps its own layout),
    and Qwen2's forward through the engine's cache (prefill and decode). q/k/v are stacked into one
    matrix and gate/up into another, so a layer runs 4 matmuls instead of 7, all cast to `dtype`
    (under autocast on CUDA a graph would otherwise replay a cast of every weight at every step;
    autocast's weight cache must be off while capturing). CPU fp32: the matrices are also packed for
    oneDNN (ONEDNN_LINEAR): on the AMD EPYC dev box torch's F.linear (MKL sgemm) runs at half the
    speed of oneDNN's packed GEMM, with the same results (maxdiff 0 at 7-192 rows; oneDNN's rows
    also do not depend on the batch size)."""

    def __init__(self, model, dtype, rows):
        dev = model.embed_tokens.weight.device
        self.linear, pack = F.linear, lambda w: w  # noqa: E731
        if ONEDNN_LINEAR and dev.type == 'cpu' and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:  # (an internal op: fall back to F.linear where this torch build lacks it)
                pk = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows)  # noqa: E731
                onednn_linear(torch.zeros(1, 4), pk(torch.zeros(2, 4)), torch.zeros(2))
                self.linear, pack = onednn_linear, pk
            except (AttributeError, RuntimeError, NotImplementedError):
                pass

        def cast(*ts, packed=True):  # (no copy of a lone weight already in dtype)
            w = (torch.cat(ts) if len(ts) > 1 else ts[0]).detach().to(dtype)
            return pack(w) if packed else w
        self.layers = []
        for b in model.layers:
            a, f = b.self_attn, b.mlp
            self.layers.append((b.input_layernorm, cast(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                                cast(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, packed=False), cast(a.o_proj.weight),
                                b.post_attention_layernorm, cast(f.gate_proj.weight, f.up_proj.weight),
                                cast(f.down_proj.weight)))
        self.embed, self.norm, self.lm_head = model.embed_tokens, model.norm, cast(model.lm_head.weight)
        self.H, self.Hk, self.D = model.config.n_head, model.config.n_kv_head, model.config.head_dim

    def hidden(self, idx, cos, sin, cache):
        """Tokens idx [B, T] at RoPE tables cos/sin [B or 1, T, 1, D] -> final-norm hidden states
        [B, T, C]: Qwen2's forward through the engine's cache (a prefill, or a decode step: T = 1)."""
        H, Hk, D, lin = self.H, self.Hk, self.D, self.linear
        B, T = idx.shape
        x = self.embed(idx)
        for i, (ln1, wqkv, bqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            qkv = lin(ln1(x), wqkv, bqkv).view(B, T, H + 2 * Hk, D)
            qk = apply_rope(qkv[:, :, :H + Hk], cos, sin)                # q and k rotated in one go
            x = x + lin(cache.attend(i, qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hk:]), wo)
            g, u = lin(ln2(x), wgu).chunk(2, dim=-1)
            x = x + lin(F.silu(g) * u, wd)
        return self.norm(x)

    def logits(self, h):
        """Hidden states [N, C] -> logits [N, V] in fp32."""
        return self.linear(h, self.lm_head).float()


class Engine:
    """One generate() call: a queue of prompts (G samples each), prompt-slots refilled as they free."""

    def __init__(self, model, prompts, G, max_new_tokens, temperature, top_k, top_p, stop_ids, generator,
                 logprobs, kv_bytes, max_rows, pad_id, graphs):
        cfg, dev = model.config, model.embed_tokens.weight.device
        graphs = graphs and dev.type == 'cuda'
        self.m, self.cfg, self.dev, self.G, self.prompts = model, cfg, dev, G, prompts
        self.temperature, self.top_k, self.top_p, self.want_lp, self.pad_id = \
            temperature, top_k, top_p, logprobs, pad_id
        self.dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) \
            else model.embed_tokens.weight.dtype
        self.caps = [min(max_new_tokens, cfg.max_seq_len - len(p)) for p in prompts]
        self.P, self.T = max(len(p) for p in prompts), max(self.caps)
        # slots from the memory budget: a slot holds P prompt tokens and G rows of T tokens
        per_token = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=self.dtype).element_size()
        budget = kv_bytes or DEFAULT_KV_BYTES.get(dev.type, DEFAULT_KV_BYTES['cpu'])
        slots = budget // (per_token * (self.P + G * self.T))
        self.per_token, self.budget = per_token, budget  # (parked slots may hold up to budget more)
        if max_rows:
            slots = min(slots, max_rows // G)
        self.S = max(1, min(len(prompts), slots))
        # seeds: one int from the generator; a sample's seed hashes it with its prompt and sample
        # index (the k-th copy of a repeated prompt continues its sample indices, so copies differ)
        base = 0
        if temperature > 0:
            gdev = generator.device if generator is not None else 'cpu'
            base = int(torch.randint(-2**63, 2**63 - 1, (1,), generator=generator, device=gdev))
        seen = {}
        self.seeds = []
        for p in prompts:
            key = np.asarray(p, dtype=np.int64).tobytes()
            k = seen[key] = seen.get(key, -1) + 1
            self.seeds.append([_job_seed(base, key, k * G + j) for j in range(G)])
        self.stop = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=dev)
        self.w = EngineWeights(model, self.dtype, self.S * G)
        self.graphs = {} if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        # one side stream per engine, on the engine's device, for every warm-up and capture: a stream
        # per captured shape would cost a cuBLAS workspace each (~33 MiB), and warm-up on one stream with
        # capture on another can allocate that workspace inside the graphs' pool (the next capture then
        # fails with `use_count > 0` on torch builds of before 2026)
        self.capture_stream = torch.cuda.Stream(dev) if graphs else None

    # -- state ---------------------------------------------------------------------------------

    def _alloc(self):
        S, C, dev, T = self.S, self.G, self.dev, self.T
        R = S * C
        self.C = C                    # rows per slot: G, fewer after a tail compaction
        self.cache = EngineCache(self.cfg, S, C, self.P, T if dev.type == 'cuda' else min(T, GROW), dev, self.dtype)
        z = lambda dt=torch.long: torch.zeros(R, dtype=dt, device=dev)  # noqa: E731
        # per row: last sampled token (fed next), tokens generated, cap, done, the uniform of each of
        # its draws (counter_uniform of its seed, drawn at prefill: one gather a step, not ~20 integer
        # ops); per slot: prompt length
        self.tok, self.n_gen, self.cap = z(), torch.ones(R, dtype=torch.long, device=dev), z()
        self.u = torch.zeros(R, T + 1, device=dev) if self.temperature > 0 else None
        self.done = torch.ones(R, dtype=torch.bool, device=dev)       # a free slot's rows are done
        self.plen = torch.ones(S, dtype=torch.long, device=dev)
        self.out_tok = torch.zeros(R, T + 1, dtype=torch.long, device=dev)  # +1: a done row writes past its end
        self.out_lp = torch.zeros(R, T + 1, device=dev) if self.want_lp else None
        self.slot_job = [-1] * S      # host: prompt index in each slot (-1: free)
        self.slot_age = [0] * S       # host: decode steps since the slot was filled
        self.row_j = [-1] * R         # host: sample index of each row (-1: free, collected or padding)

    def _compact(self):
        """The tail of a call (no prompt waiting): repack the rows still running into fewer slots of
        C' rows. A slot's running rows go to ceil(n / C') slots (a split slot gets a copy of its
        prompt's keys); a short slot repeats one of its rows (marked done). C' minimises the keys a
        step reads plus a per-row cost; the repack (one gather of the caches) happens when it
        saves enough. Finished rows then stop costing anything."""
        C, dev, P, Tb = self.C, self.dev, self.P, self.cache.Tb
        live = [(s, [c for c in range(C) if self.row_j[s * C + c] >= 0]) for s in range(self.S)]
        live = [(s, cs) for s, cs in live if cs]

        def cost(c2):  # key reads of a step + ROW_COST per row, in tokens
            n = sum(-(-len(cs) // c2) for _, cs in live)
            return n * P + n * c2 * (Tb + ROW_COST)
        c2 = min(range(1, C + 1), key=cost)
        if cost(c2) > COMPACT_GAIN.get(dev.type, 0.9) * self.S * (P + C * (Tb + ROW_COST)):
            return
        slots, cols, pad = [], [], []   # per new slot: its old slot, its old columns, which are repeats
        for s, cs in live:
            for i in range(0, len(cs), c2):
                chunk = cs[i:i + c2]
                slots.append(s)
                cols.append(chunk + chunk[:1] * (c2 - len(chunk)))
                pad.append([False] * len(chunk) + [True] * (c2 - len(chunk)))
        sl = torch.tensor(slots, device=dev)
        cl = torch.tensor(cols, device=dev)
        rows = (sl[:, None] * C + cl).reshape(-1)
        self.cache.select(sl[:, None], cl)
        self.tok, self.n_gen, self.cap = (t[rows] for t in (self.tok, self.n_gen, self.cap))
        self.u = self.u[rows] if self.u is not None else None
        self.done = self.done[rows] | torch.tensor(pad, device=dev).reshape(-1)
        self.out_tok = self.out_tok[rows]
        self.out_lp = self.out_lp[rows] if self.want_lp else None
        self.plen = self.plen[sl]
        self.row_j = [-1 if p else self.row_j[s * C + c] for s, cc, pp in zip(slots, cols, pad) for c, p in zip(cc, pp)]
        self.slot_job = [self.slot_job[s] for s in slots]
        self.slot_age = [self.slot_age[s] for s in slots]
        self.S, self.C = len(slots), c2
        if self.graphs is not None:  # new tensors, new shapes: new graphs, in a fresh pool
            self.graphs = {}
            self.pool = torch.cuda.graph_pool_handle()

    # -- sampling ------------------------------------------------------------------------------

    def _sample(self, logits, u):
        """logits [N, V] fp32 -> tokens [N] drawn with the uniforms u [N] (None: greedy); the
        log-probs [N] of the raw distribution when asked for, else None."""
        tok = sample_token(logits, self.temperature, self.top_k, self.top_p, u=u)
        lp = None
        if self.want_lp:
            lp = logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return tok, lp

    # -- prefill -------------------------------------------------------------------------------

    def _prefill(self, slots, jobs):
        """Prefill the prompts `jobs` into the free prompt-slots `slots` (one right-padded batch) and
        draw each of their G rows' first token."""
        G, dev, m = self.G, self.dev, self.m
        ps = [self.prompts[j] for j in jobs]
        B, Pb = len(ps), max(len(p) for p in ps)
        idx = torch.full((B, Pb), self.pad_id, dtype=torch.long)
        for i, p in enumerate(ps):
            idx[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        lens = torch.tensor([len(p) for p in ps], device=dev)
        s = torch.tensor(slots, device=dev)
        self.cache.fill = s
        h = self.w.hidden(idx.to(dev), m.rope_cos[:Pb][None, :, None], m.rope_sin[:Pb][None, :, None], self.cache)
        self.cache.fill = None
        logits = self.w.logits(h[torch.arange(B, device=dev), lens - 1]).repeat_interleave(G, dim=0)
        rows = (s[:, None] * G + torch.arange(G, device=dev)).reshape(-1)
        cap = torch.tensor([self.caps[j] for j in jobs], device=dev).repeat_interleave(G)
        u = None
        if self.u is not None:  # draw t of a row uses counter_uniform(its seed, t)
            seed = torch.tensor([x for j in jobs for x in self.seeds[j]], device=dev)
            u = self.u[rows] = counter_uniform(seed[:, None], torch.arange(self.T + 1, device=dev))
        tok, lp = self._sample(logits, None if u is None else u[:, 0])
        self.plen[s] = lens
        self.tok[rows], self.cap[rows] = tok, cap  # rows per slot C == G here
        self.n_gen[rows] = 1
        self.done[rows] = self._stops(tok) | (cap <= 1)
        self.out_tok[rows, 0] = tok
        if self.want_lp:
            self.out_lp[rows, 0] = lp
        for sl, j in zip(slots, jobs):
            self.slot_job[sl], self.slot_age[sl] = j, 0
            self.row_j[sl * G:(sl + 1) * G] = range(G)

    def _stops(self, tok):
        # a broadcast compare, not torch.isin: isin may sort/unique, i.e. sync, inside a CUDA graph
        return (tok[:, None] == self.stop).any(-1) if self.stop.numel() else torch.zeros_like(tok, dtype=torch.bool)

    # -- decode --------------------------------------------------------------------------------

    def _step(self):
        """One decode step for every row, all on the device, state updated in place (so that the
        same code runs eagerly or replayed as a CUDA graph). Done rows run too; nothing they do is kept."""
        m, c, S, G = self.m, self.cache, self.S, self.C
        P, Tb = self.P, c.Tb
        dev = self.dev
        live = ~self.done
        wpos = self.n_gen - 1                                          # the fed token's index among generated
        pos = self.plen[:, None].expand(S, G).reshape(-1) + wpos       # its RoPE position (no sync)
        wpos = wpos.clamp(max=c.gk.size(4) - 1)                       # (a done row may be past a grown cache)
        Hk, T = c.gk.size(3), c.gk.size(4)                             # gk[layer] is [S, G, Hk, T, D]
        c.wflat = (wpos[:, None] + torch.arange(S * G * Hk, device=dev).view(-1, Hk) * T).view(-1)
        key_p = torch.arange(P, device=dev) < self.plen[:, None]                           # [S, P]
        key_g = torch.arange(Tb, device=dev) <= wpos.view(S, G, 1)                        # [S, G, Tb]
        ok = torch.cat([key_p[:, None].expand(S, G, P), key_g], -1)
        c.bias = torch.zeros(ok.shape, device=dev).masked_fill_(~ok, float('-inf'))[:, :, None, None]
        cos, sin = (t.index_select(0, pos)[:, None, None] for t in (m.rope_cos, m.rope_sin))  # (faster than t[pos])
        h = self.w.hidden(self.tok[:, None], cos, sin, c)
        logits = self.w.logits(h[:, 0])
        u = self.u.gather(1, self.n_gen[:, None]).squeeze(1) if self.u is not None else None
        tok, lp = self._sample(logits, u)
        rows = torch.arange(S * G, device=dev)
        self.out_tok[rows, self.n_gen] = tok                           # a done row writes past its kept tokens
        if self.want_lp:
            self.out_lp[rows, self.n_gen] = lp
        self.tok.copy_(torch.where(live, tok, self.tok))
        self.n_gen.add_(live.long())
        self.done.logical_or_(live & (self._stops(tok) | (self.n_gen >= self.cap)))

    def _need(self):
        """Generated positions the oldest occupied slot's rows may attend to (n_gen <= age + 1)."""
        return max([self.slot_age[s] for s in range(self.S) if self.slot_job[s] >= 0] or [0]) + 1

    def _set_lengths(self):
        """The generated keys a step attends to: at least the oldest occupied slot's (a row's n_gen
        <= its slot's age + 1); beyond them every key is masked anyway. CUDA: a slice of the full
        cache, rounded up to BUCKET (one graph per bucket). CPU: the whole cache, grown GROW
        positions at a time (shrunk only when a slot is parked: shrinking whenever the oldest slot
        finishes made tiny_eval's call 0.76x, the cache regrown again and again) -- a batched matmul
        over a strided slice of a larger cache measured 3-4x slower than over a contiguous one."""
        need = self._need()
        c = self.cache
        if self.dev.type == 'cuda':
            c.Tb = min(self.T, -(-need // BUCKET) * BUCKET)
        else:
            if need > c.gk.size(4):
                c.resize(min(self.T, -(-need // GROW) * GROW))
            c.Tb = c.gk.size(4)

    def _run_step(self):
        if self.graphs is None:
            return self._step()
        key = (self.S, self.C, self.cache.Tb)
        g = self.graphs.get(key)
        if g is not None:
            return g.replay()
        # first time at this shape: one real step, eagerly, on the capture stream (the warm-up that
        # capture needs), then capture the step for the next ones. A failed capture is not fatal: the
        # warm-up already advanced the state, so decoding goes on eagerly (_graphs_failed)
        self._warm_up()
        try:
            self.graphs[key] = self._capture()
        except Exception as e:  # noqa: BLE001 (any capture error: cudaErrorStreamCaptureInvalidated, OOM, ...)
            self._graphs_failed(e)

    def _warm_up(self):
        s, cur = self.capture_stream, torch.cuda.current_stream(self.dev)
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            self._step()
        cur.wait_stream(s)

    def _capture(self):
        g = torch.cuda.CUDAGraph()
        ac = torch.is_autocast_enabled('cuda')
        # autocast's cache of cast weights must not live across captures; torch.cuda.device: the capture
        # belongs to the engine's device even when another one is current (--device=cuda:1)
        with torch.cuda.device(self.dev), \
                torch.autocast('cuda', dtype=self.dtype, enabled=ac, cache_enabled=False), \
                torch.cuda.graph(g, pool=self.pool, stream=self.capture_stream):
            self._step()
        return g

    def _graphs_failed(self, err):
        """Decode eagerly from now on in this call; warn once per process and count it (graph_fallbacks)."""
        global graph_fallbacks
        graph_fallbacks += 1
        self.graphs = None
        if graph_fallbacks == 1:
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {str(err)[:200]}); decoding eagerly "
                          f"instead (slower, same samples). engine.graph_fallbacks counts the calls it happened in",
                          RuntimeWarning, stacklevel=2)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> Generation:
        G, n = self.G, len(self.prompts)
        self._alloc()
        # longest prompts first (pop() takes from the end), so a prefill batch pads little. The
        # order changes no sample: a draw depends on its prompt, not on when or where it runs.
        queue = sorted(range(n), key=lambda i: len(self.prompts[i]))
        self.steps = 0
        res_tok, res_lp, res_fin = [None] * (n * G), [None] * (n * G), [False] * (n * G)
        stop = set(self.stop.tolist())
        self.parked = []  # slots set aside while prompts wait (_park_old), put back when none does
        while True:
            free = [s for s in range(self.S) if self.slot_job[s] < 0]
            if not queue and free and self.parked:
                for s in free[:len(self.parked)]:
                    self._unpark(s, self.parked.pop())
            if queue and free:
                jobs = [queue.pop() for _ in range(min(len(free), len(queue)))]  # longest first
                i = 0
                while i < len(jobs):  # batches of about PREFILL_TOKENS padded tokens
                    k = max(1, PREFILL_TOKENS.get(self.dev.type, 1024) // len(self.prompts[jobs[i]]))
                    self._prefill(free[i:i + k][:len(jobs) - i], jobs[i:i + k])
                    i += k
            for _ in range(SYNC_EVERY):
                self._set_lengths()
                self._run_step()
                self.slot_age = [a + 1 for a in self.slot_age]
            self.steps += SYNC_EVERY
            # collect the rows that have stopped (the one host sync of SYNC_EVERY steps)
            done = self.done.tolist()
            new = [r for r, d in enumerate(done) if d and self.row_j[r] >= 0]
            if new:
                ix = torch.tensor(new, device=self.dev)
                ng, toks = self.n_gen[ix].tolist(), self.out_tok[ix].tolist()
                lps = self.out_lp[ix].tolist() if self.want_lp else None
                for i, r in enumerate(new):
                    o = self.slot_job[r // self.C] * G + self.row_j[r]
                    res_tok[o] = toks[i][:ng[i]]
                    res_lp[o] = lps[i][:ng[i]] if self.want_lp else []
                    res_fin[o] = res_tok[o][-1] in stop
                    self.row_j[r] = -1
                for s in {r // self.C for r in new}:
                    if all(j < 0 for j in self.row_j[s * self.C:(s + 1) * self.C]):
                        self.slot_job[s], self.slot_age[s] = -1, 0
            if queue:
                self._park_old()
            elif not self.parked:  # (the repack assumes G rows a slot: only once every slot is back)
                if all(j < 0 for j in self.row_j):
                    return Generation(tokens=res_tok, logprobs=res_lp, finished=res_fin)
                self._compact()

    # -- parking (see "Why a slot that runs far past the others is parked" above) -----------------

    def _row_state(self):
        return [self.tok, self.n_gen, self.cap, self.done, self.out_tok, self.u, self.out_lp]

    def _park_old(self):
        """Park the occupied slots older than PARK_AGE and PARK_FACTOR x the median age, while the
        parked caches fit in another KV budget (they are held beside the engine's own); on CPU, shrink
        the generated-key cache to what the remaining slots need."""
        occ = [s for s in range(self.S) if self.slot_job[s] >= 0]
        if len(occ) < 2:
            return
        median = sorted(self.slot_age[s] for s in occ)[len(occ) // 2]
        for s in occ:
            size = self.per_token * (self.P + self.C * (self.slot_age[s] + 1))
            if self.slot_age[s] > max(PARK_AGE, PARK_FACTOR * median) and \
                    sum(p['bytes'] for p in self.parked) + size <= self.budget:
                self._park(s, size)
        need = self._need()
        c = self.cache
        if self.dev.type != 'cuda' and c.gk.size(4) >= 2 * need and c.gk.size(4) > GROW:
            c.resize(-(-need // GROW) * GROW)
            c.Tb = c.gk.size(4)

    def _park(self, s, size):
        """Set slot s aside (size: its caches' bytes): its prompt and generated keys/values, its rows'
        state; free the slot."""
        C, c = self.C, self.cache
        rows, a = slice(s * C, (s + 1) * C), min(self.slot_age[s] + 1, c.gk.size(4))  # positions written
        self.parked.append(dict(
            bytes=size, job=self.slot_job[s], age=self.slot_age[s], a=a, plen=self.plen[s].clone(), row_j=self.row_j[rows],
            rows=[None if t is None else t[rows].clone() for t in self._row_state()],
            kv=[t[:, s, ..., :a, :].clone() if t.dim() == 6 else t[:, s].clone() for t in (c.pk, c.pv, c.gk, c.gv)]))
        self.slot_job[s], self.slot_age[s] = -1, 0
        self.row_j[rows] = [-1] * C
        self.done[rows] = True

    def _unpark(self, s, p):
        """Put parked slot p back into the free slot s, exactly as it was."""
        C, c, a = self.C, self.cache, p['a']
        rows = slice(s * C, (s + 1) * C)
        self.slot_job[s], self.slot_age[s] = p['job'], p['age']
        self.row_j[rows] = p['row_j']
        self._set_lengths()  # (CPU: the cache may have shrunk meanwhile; room for this slot's keys)
        pk, pv, gk, gv = p['kv']
        c.pk[:, s], c.pv[:, s] = pk, pv
        c.gk[:, s, ..., :a, :], c.gv[:, s, ..., :a, :] = gk, gv
        for t, v in zip(self._row_state(), p['rows']):
            if t is not None:
                t[rows] = v
        self.plen[s] = p['plen']


def sample_token(logits, temperature, top_k=None, top_p=None, generator=None, u=None):
    """logits [N, V] fp32 -> token ids [N]. Greedy at temperature 0. Sampling draws by inverse CDF
    from the filtered distribution with one uniform per row: u [N] when given (the engine's
    counter-based uniforms), else torch.rand from `generator` (any device: a CPU generator works for
    a CUDA model). One uniform a row, not one per vocabulary entry, keeps the engine's seeded draws
    cheap to compute on the device."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p_sorted = torch.softmax(sorted_logits, dim=-1)
        drop = (p_sorted.cumsum(dim=-1) - p_sorted) >= top_p  # the tokens before already hold top_p
        sorted_logits = sorted_logits.masked_fill(drop, float('-inf'))
        logits = torch.full_like(logits, float('-inf')).scatter(1, order, sorted_logits)
    if u is None:
        gdev = generator.device if generator is not None else logits.device
        u = torch.rand(logits.size(0), generator=generator, device=gdev).to(logits.device)
    # (inverse_cdf scales u by the probabilities' total, so their rounding to a sum of 1 is harmless)
    return inverse_cdf(torch.softmax(logits, dim=-1), u)


@functools.lru_cache
def cdf_block(V: int) -> int:
    """inverse_cdf's block size for a vocabulary of V: a divisor of V near 64 where one lies in
    [32, 256] (the blocks are then a view of the probabilities, no padded copy), else 64."""
    return min((b for b in range(32, 257) if V % b == 0), key=lambda b: abs(math.log(b / 64)), default=64)


def inverse_cdf(probs, u, block=None):
    """The token whose cumulative-probability interval holds u * total: [N, V], [N] -> [N]. In two
    levels (the block of `block` tokens, then the token inside it), because a cumulative sum over the
    whole vocabulary is a slow sequential scan on CPU. A token of probability 0 is never returned,
    whatever the rounding."""
    N, V = probs.shape
    block = block or cdf_block(V)
    nb = -(-V // block)
    blocks = (probs if nb * block == V else F.pad(probs, (0, nb * block - V))).reshape(N, nb, block)
    bcdf = blocks.sum(-1).cumsum(-1)                                            # [N, nb]
    total = bcdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    bi = torch.searchsorted(bcdf, x, right=True).clamp(max=nb - 1)             # first block past x
    below = torch.where(bi > 0, bcdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(x))
    inner = blocks.gather(1, bi[:, :, None].expand(N, 1, block)).squeeze(1)     # [N, block]
    icdf = inner.cumsum(-1)
    ti = torch.searchsorted(icdf, (x - below).clamp(min=0), right=True)
    # rounding may put x - below at or past the block's own sum: take its last token with mass
    last = torch.where(inner > 0, torch.arange(block, device=probs.device), -1).amax(-1, keepdim=True)
    return (bi * block + torch.minimum(ti, last)).squeeze(1)

