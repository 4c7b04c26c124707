"""
vLLM as an optional sampling backend (issue #27): `evaluate.py --sampler=vllm`, `rl.py --sampler=vllm`,
and a row of bench.py. Our engine (Qwen2.generate) stays the default; this file is imported only
where vllm is asked for.

Install (a separate virtual environment; README "vLLM"): pip install -r requirements-vllm.txt

    s = VLLMSampler(model)            # exports the model (interop.export_hf) and starts vLLM in-process
    gen = s.generate(prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     stop_ids=(...), generator=g, num_samples=G, logprobs=False)
    gen.tokens / gen.logprobs / gen.finished    # the same Generation as Qwen2.generate, prompt-major
    s.load_weights(model)             # RL: push the policy's current weights into the live engine
                                      # (in-process, then vLLM's prefix cache is reset)
    s.close()

What is the same as our engine: token ids in and out (our tokenizer throughout; vLLM never sees a
tokenizer), rows prompt-major [p0 s0, p0 s1, ..., p1 s0, ...], a row stops after emitting any
token of stop_ids (kept in the row), after max_new_tokens, or at the model's max_seq_len (vLLM's own
EOS rule is off: ignore_eos, the stop ids are ours); finished = hit a stop id; temperature 0 is
greedy, otherwise logits / temperature, then top_k, then top_p, then one draw; logprobs are
log_softmax(raw logits)[token] (vLLM's 'raw_logprobs' mode: temperature 1, no top-k/top-p).

What differs:
- Seeds. Ours draws a sample's noise from (a base seed taken from `generator`, its prompt's tokens,
  its sample index, its position), one uniform per token (inverse CDF). Here the same base seed is
  drawn from `generator` and hashed with the prompt's tokens (and which copy of a repeated prompt
  it is) into a per-request vLLM seed; vLLM gives sample j of the request seed + j and draws each
  token from that request's own torch.Generator (exponential race over the vocabulary). So a
  sample still depends only on (seed, prompt, sample index, position), not on the other prompts,
  their order or the batch -- the same call twice gives the same samples, a subset or a reshuffle
  gives the same samples per prompt (up to float rounding of the logits across batch shapes) -- but
  the random streams are not ours: at T > 0 the samples differ token for token from our engine's,
  they agree in distribution (tests/test_vllm.py). Greedy outputs agree token for token.
- max_rows and kv_bytes are engine arguments in vLLM, fixed when the sampler is built (VLLMSampler's
  max_rows / kv_bytes); generate() ignores them per call. cuda_graphs likewise (enforce_eager).
- One process only (no torchrun): vLLM starts its own single-rank process group in-process.
- vLLM uses the platform's device (cuda:0 when CUDA is available, else the CPU), whatever the
  model's; bf16 on CUDA (as our engine under autocast), fp32 on the CPU.

Environment set here unless already set: VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine runs in this
process: its weights can be replaced in place, no second process to start), VLLM_LOGGING_LEVEL=ERROR.
vLLM's CPU worker lowers torch's thread count to 1 and disables torch.set_num_threads on start; the
sampler puts both back, so the caller's thread settings hold for our code and for vLLM's forward.
"""
import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile

import numpy as np
import torch

import common
import engine
import interop

SAMPLERS = ('engine', 'vllm')
INSTALL_HINT = 'pip install -r requirements-vllm.txt (README, "vLLM")'


def available() -> bool:
    return importlib.util.find_spec('vllm') is not None


def check_sampler(sampler: str, flag: str = '--sampler=vllm'):
    """The config check every command runs before any work: a one-line UsageError for an unknown
    sampler, or for 'vllm' where the package is not installed or under torchrun (flag: how the command asked
    for it)."""
    if sampler not in SAMPLERS:
        raise common.UsageError(f"unknown --sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == 'vllm' and not available():
        raise common.UsageError(f"{flag} needs the vllm package, which is not installed: {INSTALL_HINT}")
    if sampler == 'vllm' and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise common.UsageError(f"{flag} runs in one process (one vLLM engine); drop torchrun")


def _request_seed(base: int, prompt, copy: int, G: int) -> int:
    """vLLM seed of one request (its samples get seed + 0..G-1): a hash of the base seed and the
    prompt's tokens, plus G per earlier copy of the same prompt (so copies draw different samples)."""
    h = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8,
                        key=int(base % 2**64).to_bytes(8, 'little'))
    return (int.from_bytes(h.digest(), 'little') >> 2) + copy * G  # < 2**62: seed + j stays in range


class VLLMSampler:
    """A vLLM LLM holding a copy of `model`'s weights, behind Qwen2.generate's call (see the module
    docstring). kv_bytes: vLLM's KV cache (default: our engine's DEFAULT_KV_BYTES for the device);
    max_rows: vLLM's max_num_seqs (default vLLM's); dtype: default bf16 on CUDA, fp32 on the CPU;
    llm_kwargs go to vllm.LLM as they are (e.g. enforce_eager=True on CUDA to skip compilation)."""

    def __init__(self, model, *, kv_bytes=None, max_rows=None, dtype=None, seed=0, **llm_kwargs):
        check_sampler('vllm')
        os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')
        os.environ.setdefault('VLLM_LOGGING_LEVEL', 'ERROR')
        m = common.unwrap(model)
        self.config = m.config
        cuda = torch.cuda.is_available()
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            from vllm import LLM, SamplingParams
        except Exception as e:  # installed but broken (e.g. a torchvision built for another torch)
            raise common.UsageError(f"vllm_sampler: `import vllm` failed ({type(e).__name__}: {str(e)[:200]}); "
                               f"{INSTALL_HINT}") from None
        self.SamplingParams = SamplingParams
        self.dir = tempfile.mkdtemp(prefix='vllm_model_')
        interop.export_hf(m, self.dir)
        kw = dict(model=self.dir, skip_tokenizer_init=True, dtype=dtype or ('bfloat16' if cuda else 'float32'),
                  seed=seed, max_model_len=m.config.max_seq_len, logprobs_mode='raw_logprobs',
                  kv_cache_memory_bytes=kv_bytes or engine.DEFAULT_KV_BYTES['cuda' if cuda else 'cpu'])
        if not cuda:
            kw['enforce_eager'] = True  # with an explicit KV size: no compilation, no warm-up (seconds to start)
            # whole prefills only: vLLM 0.32 rewinds a seeded request's generator after a chunked
            # prefill with get_offset(), which a CPU generator lacks (RuntimeError)
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, m.config.max_seq_len))
        if max_rows:
            kw['max_num_seqs'] = max_rows
        kw.update(llm_kwargs)
        try:
            self.llm = LLM(**kw)
        finally:
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
            torch.set_num_threads(threads)       # and drops torch to 1 thread "for serving"

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, num_samples=1, pad_id=0, logprobs=True, kv_bytes=None, max_rows=None,
                 cuda_graphs=None) -> engine.Generation:
        """Qwen2.generate's call and result (pad_id, kv_bytes, max_rows, cuda_graphs: see the module
        docstring)."""
        if any(len(p) == 0 for p in prompts):
            raise common.UsageError("generate: every prompt needs at least one token")
        too_long = [len(p) for p in prompts if len(p) >= self.config.max_seq_len]
        if too_long:
            raise common.UsageError(f"generate: a prompt of {too_long[0]} tokens leaves no room in max_seq_len "
                               f"{self.config.max_seq_len}; shorten the prompt or use a longer model")
        if num_samples < 1:
            raise common.UsageError(f"generate: num_samples must be >= 1, got {num_samples}")
        G = num_samples
        if not prompts or max_new_tokens <= 0:
            n = len(prompts) * G
            return engine.Generation([[] for _ in range(n)], [[] for _ in range(n)], [False] * n)
        base, seen, params = None, {}, []
        if temperature > 0:  # one int from the generator, as our engine takes it
            gdev = generator.device if generator is not None else 'cpu'
            base = int(torch.randint(-2**63, 2**63 - 1, (1,), generator=generator, device=gdev))
        for p in prompts:
            seed = None
            if base is not None:
                key = tuple(p)
                k = seen[key] = seen.get(key, -1) + 1
                seed = _request_seed(base, p, k, G)
            params.append(self.SamplingParams(
                n=G if base is not None else 1, temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p or 1.0), seed=seed,
                max_tokens=int(max_new_tokens), stop_token_ids=[int(s) for s in stop_ids], ignore_eos=True,
                detokenize=False, logprobs=0 if logprobs else None))
        # (our callers sample under autocast_ctx; vLLM runs its own dtype, so autocast is switched off)
        with torch.autocast('cuda', enabled=False) if torch.cuda.is_available() else contextlib.nullcontext():
            outs = self.llm.generate([{'prompt_token_ids': list(map(int, p))} for p in prompts], params,
                                     use_tqdm=False)
        tokens, lps, finished = [], [], []
        for o in outs:  # in the order of the prompts; a request's samples by their index
            cs = sorted(o.outputs, key=lambda c: c.index)
            for c in cs * (G // len(cs)):  # greedy: vLLM takes n=1 only; the G rows are copies (as ours)
                t = list(c.token_ids)
                tokens.append(t)
                finished.append(c.finish_reason == 'stop')
                lps.append([float(d[tok].logprob) for tok, d in zip(t, c.logprobs)] if logprobs else [])
        return engine.Generation(tokens, lps, finished)

    @torch.no_grad()
    def load_weights(self, model):
        """Copy `model`'s current weights into the live engine, in this process, then drop vLLM's
        prefix cache, whose keys and values were computed with the old weights. On CUDA this is what
        TRL's colocated mode does (the vLLM model's load_weights with HF names). On the CPU, vLLM 0.32
        packs every linear weight into a oneDNN handle at load time and empties the parameter, so
        load_weights fails ('Parameter' has no 'weight_loader') and the worker's reload_weights keeps
        the old handles: _load_cpu puts each weight back in vLLM's layout and packs it again."""
        m = common.unwrap(model)
        sd = interop.to_hf_state_dict(m)
        if m.config.tie_embeddings:
            sd.pop('lm_head.weight', None)  # vLLM ties it to the embedding itself
        weights = [(k, v.detach()) for k, v in sd.items()]
        if torch.cuda.is_available():
            self.llm.apply_model(lambda vm: vm.load_weights(iter(weights)))
        else:
            self.llm.apply_model(lambda vm: _load_cpu(vm, weights))
        self.llm.reset_prefix_cache()

    def close(self):
        """Shut the engine down and free its process group (a later VLLMSampler can start)."""
        llm, self.llm = getattr(self, 'llm', None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()
        shutil.rmtree(getattr(self, 'dir', ''), ignore_errors=True)


# vLLM's fused projections: HF name -> (its module, its place in the concatenation)
_STACKED = {'q_proj': ('qkv_proj', 0), 'k_proj': ('qkv_proj', 1), 'v_proj': ('qkv_proj', 2),
            'gate_proj': ('gate_up_proj', 0), 'up_proj': ('gate_up_proj', 1)}


@torch.no_grad()
def _load_cpu(vm, weights):
    """HF-named tensors into vLLM's CPU Qwen2 `vm` (see VLLMSampler.load_weights): fused projections
    concatenated, each linear given its weight back and re-packed by vLLM's own dispatch, everything
    else copied in place; a module that packed a weight it keeps (the embedding as the tied lm_head)
    is re-packed from the new values."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    parts = {}
    for name, t in weights:
        mod, pname = name.rsplit('.', 1)
        parent, _, leaf = mod.rpartition('.')
        if leaf in _STACKED:
            fused, i = _STACKED[leaf]
            parts.setdefault((f'{parent}.{fused}', pname), {})[i] = t
        else:
            parts[(mod, pname)] = {0: t}
    for (mod_name, pname), ts in parts.items():
        t = torch.cat([ts[i] for i in sorted(ts)])
        mod = vm.get_submodule(mod_name)
        p = getattr(mod, pname)
        if pname == 'weight' and p.numel() == 0 and hasattr(mod, 'cpu_linear'):  # packed and emptied
            mod.weight = torch.nn.Parameter(t.to(p.dtype).contiguous(), requires_grad=False)
            dispatch_cpu_unquantized_gemm(mod, remove_weight=True)
        else:
            # (vLLM pads the vocabulary rows of the embedding / lm_head to a multiple of 64)
            assert p.shape[1:] == t.shape[1:] and p.shape[0] >= t.shape[0], (mod_name, pname, p.shape, t.shape)
            p.data[:t.shape[0]].copy_(t)
    for mod in vm.modules():  # packed copies of weights kept in place (embedding / lm_head)
        if hasattr(mod, 'cpu_linear') and getattr(mod, 'weight', None) is not None and mod.weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
