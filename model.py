"""
The Qwen2 architecture of the paper (STUDY.md §3), and nothing else, written to be read top to bottom:

    ModelConfig, MODEL_PRESETS -> RMSNorm -> RoPE -> grouped-query attention -> SwiGLU MLP
    -> decoder block -> Qwen2 (forward, parameter count, FLOPs per token, MFU)

Module and parameter names are exactly those of `transformers.Qwen2ForCausalLM` (minus its `model.`
prefix), so importing / exporting Hugging Face checkpoints is a rename, not a remap (interop.py), and
tests/test_model.py checks that the logits match `transformers` to fp32 tolerance.

`sample` at the bottom is the plain reference sampler: one full forward pass per new token, a few
lines to read. The real one -- a KV cache shared by a prompt's samples, a queue of prompts, CUDA
graphs -- is engine.py's `generate(model, prompts, ...)`; tests/test_engine.py ties the two together.
Checkpoints are in checkpoint.py, the tokenizer in tokenizer.py. This file imports no other file of
the project.

Quick check:
  python -c "import model; m = model.Qwen2(model.MODEL_PRESETS['paper']); print(m.num_params())"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 2200
    hidden_size: int = 768
    n_layer: int = 12
    n_head: int = 12               # query heads
    n_kv_head: int = 2             # key/value heads (GQA: each serves n_head // n_kv_head queries)
    intermediate_size: int = 3072  # SwiGLU hidden width
    max_seq_len: int = 2048
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    initializer_range: float = 0.02  # std of the N(0, std) init of every matrix (HF's name and default)

    def __post_init__(self):
        assert self.hidden_size % self.n_head == 0, "hidden_size must be a multiple of n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert (self.hidden_size // self.n_head) % 2 == 0, "head dim must be even for RoPE"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# Parameter counts (tied embeddings counted once) are printed by `python bench.py --only=params`
# and asserted in tests/test_model.py.
MODEL_PRESETS: dict[str, ModelConfig] = {
    # 1.41M: the tiny CPU study (op 2..3, forward mode, minutes on 2 cores). max_seq_len is only a
    # bound (RoPE has no parameters; training picks its own block length): 2048 so that evaluating on
    # longer, out-of-distribution problems never runs out of room. Three departures from the paper's
    # shape, all for one skill this width otherwise learns late or never: copying the variable letter
    # it has just defined ("as E; so E"), an attention head that looks a few tokens back. With HF's
    # initializer_range 0.02 (tuned for width 768), rope_theta 1e6 and 2 KV heads the letter
    # probability sat at chance (1/52) for 2.5M tokens and process-verified accuracy at 0%; with
    # init 0.06 it appeared after 1.2-2.4M tokens; with init 0.06, rope_theta 1e4 (faster-turning
    # low RoPE frequencies: sharper relative positions) and one KV head per query head, after ~1.1M.
    'tiny': ModelConfig(hidden_size=128, n_layer=4, n_head=4, n_kv_head=4, intermediate_size=512,
                        max_seq_len=2048, rope_theta=1e4, initializer_range=0.06),
    # 6.47M: a step up for CPU experiments that need more capacity.
    'mini': ModelConfig(hidden_size=256, n_layer=6, n_head=4, n_kv_head=2, intermediate_size=1024,
                        max_seq_len=2048),
    # 18.2M: small-GPU experiments.
    'small': ModelConfig(hidden_size=384, n_layer=8, n_head=6, n_kv_head=2, intermediate_size=1536,
                         max_seq_len=2048),
    # 103.17M: the paper's model (STUDY.md §3, reference/paper_release/config.json).
    'paper': ModelConfig(hidden_size=768, n_layer=12, n_head=12, n_kv_head=2, intermediate_size=3072,
                         max_seq_len=2048),
}

# -----------------------------------------------------------------------------
# Building blocks


def document_ids(idx, eos_id):
    """[B, T] index of the document each token belongs to in a packed window: documents end with
    eos_id, and the EOS token belongs to the document it ends (it predicts the next one's start
    from its own document only)."""
    is_eos = (idx == eos_id).long()
    return is_eos.cumsum(1) - is_eos


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 (as Hugging Face does) and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # F.rms_norm is one fused kernel; same numbers as HF's pow/mean/rsqrt chain
        if x.dtype == self.weight.dtype == torch.float32:  # weight inside: one op fewer, bitwise the same
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None):
    """cos / signed sin [max_seq_len, head_dim] in fp32. Hugging Face's layout: the frequencies are
    repeated (cat(f, f)), i.e. dimension i rotates with i + d/2, and HF's rotate_half(x) * sin =
    cat(-x2, x1) * sin is computed as cat(x2, x1) * cat(-sin1, sin2): the sign lives in the table."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x, cos, sin):
    # x [B, H, T, D]; cos / signed sin [B or 1, 1, T, D] fp32 tables (rope_tables), cast so that
    # under bf16 autocast q/k stay bf16 (fp32 * bf16 would promote and push SDPA off its fast
    # kernels). roll swaps the halves in one op (chunk, neg and cat took three; bitwise the same)
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * sin.to(x.dtype)


def sdpa(q, k, v, mask=None, is_causal=False, repeat_kv=None):
    """Attention of q [B, H, T, D] over k, v [B, H_kv, T, D]. Grouped KV heads are read in place
    (enable_gqa, torch >= 2.5), except with a mask on CUDA (repeat_kv=None: auto), where SDPA's GQA path
    can fall to the math kernel (fp32 B x H x T^2 scores, 2-3x slower): there K/V are repeated to the
    query heads, which the memory-efficient kernel takes with a mask. Both give the same numbers."""
    gqa = k.size(1) != q.size(1)
    if repeat_kv is None:
        repeat_kv = gqa and mask is not None and q.is_cuda
    if gqa and repeat_kv:
        r = q.size(1) // k.size(1)   # query head h reads KV head h // r, as enable_gqa does
        k, v, gqa = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)



class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_head * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # causal, or causal within each document (mask); generation has its own path (engine.py)
        y = sdpa(q, k, v, mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))



# -----------------------------------------------------------------------------
# The model


class Qwen2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        # non-persistent: recomputed from the config, never stored in checkpoints
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # Hugging Face's Qwen2 init: N(0, initializer_range) for every matrix, zero biases, unit norms.
        # 0.02 is tuned for width 768; narrow models need a larger std (see MODEL_PRESETS['tiny']).
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        """All parameters, tied embeddings counted once (this is also the N of the 6N FLOP rule:
        the lookup is free but the tied output projection is a real matmul)."""
        return sum(p.numel() for p in self.parameters())

    # --- FLOP accounting ----------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 6N + 12*L*d*T for a training step (forward + backward), or
        2N + 4*L*d*T for a forward pass (PaLM appendix B). The attention term counts the full T x T
        score matrix (as nanoGPT/PaLM do), T = seq_len (default max_seq_len)."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        n = self.num_params()
        # per layer and token the forward does QK^T and AV: 2 matmuls x T x d multiply-adds = 4*d*T
        # FLOPs; the backward costs twice the forward.
        attn_fwd = 4 * cfg.n_layer * cfg.hidden_size * T
        return (6 * n + 3 * attn_fwd) if training else (2 * n + attn_fwd)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float | None, seq_len=None) -> float | None:
        """Model FLOPs utilisation of a training run processing tokens_per_s (all ranks of one
        device) on a device of peak_flops dense FLOP/s (None when unknown, e.g. on CPU: then None;
        common.peak_flops_per_s looks the peak up from the CUDA device's name)."""
        if not peak_flops:
            return None
        return self.flops_per_token(seq_len, training=True) * tokens_per_s / peak_flops

    # --- forward ------------------------------------------------------------------------

    def forward(self, idx, targets=None, loss_reduction: str = 'mean', doc_ids=None, positions=None):
        """idx [B, T] -> (logits [B, T, V] in fp32, loss). loss is the mean cross-entropy over
        targets != -100 (None when no targets). loss_reduction='none' returns the per-token loss
        [B, T] instead (0 where ignored), for RL losses built from the same forward pass.
        doc_ids [B, T] (optional, see document_ids): a token attends only to earlier tokens of its own
        document, so packed documents do not see each other (plain causal attention when None).
        positions [B, R] (optional): logits (and targets [B, R]) only at these positions of each row
        -- RL needs them at the response tokens only, and the output layer and its [B, T, V] logits
        are a large share of a small model's pass."""
        B, T = idx.shape
        assert T <= self.config.max_seq_len, f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
        mask = None
        if doc_ids is not None:  # [B, 1, T, T]: same document and not in the future
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal
        for block in self.layers:
            x = block(x, cos, sin, mask)
        x = self.norm(x)
        if positions is not None:
            x = x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1)))
            T = positions.size(1)
        logits = self.lm_head(x).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                   reduction=loss_reduction)
            if loss_reduction == 'none':
                loss = loss.view(B, T)
        return logits, loss


# -----------------------------------------------------------------------------
# The reference sampler


@torch.no_grad()
def sample(model: Qwen2, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, stop_ids=(),
           generator: torch.Generator | None = None) -> list[int]:
    """The new tokens after `prompt`, one full forward pass per token (no cache): greedy at
    temperature 0, else a draw from softmax(logits / temperature). The stop token is kept. Slow and
    obviously right; engine.generate gives the same greedy tokens (tests/test_engine.py)."""
    ids, out = list(prompt), []
    for _ in range(min(max_new_tokens, model.config.max_seq_len - len(prompt))):
        logits = model(torch.tensor([ids], device=model.embed_tokens.weight.device))[0][0, -1]
        if temperature == 0:
            t = int(logits.argmax())
        else:
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
        ids.append(t)
        out.append(t)
        if t in stop_ids:
            break
    return out
