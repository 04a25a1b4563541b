"""
model.py: the language model of tocode, a transformer of the Llama / Qwen2 family, and its checkpoints.

Read top to bottom:
  1. the transformer: RMSNorm, rotary embeddings (with the long-context rope_scaling variants of Llama 3 and
     Qwen2.5), grouped-query attention with optional q/k/v bias, a SwiGLU MLP, tied or untied head;
  2. loading an HF checkpoint dir and saving one back (transformers reloads it with identical logits), and the
     "tiny" preset, the embedded task's 0.46M-parameter model (its tokenizer is task.tiny_tokenizer).

The model stores the q/k/v projections as one matrix and gate/up as another ("fused at load time"): one matmul instead
of three (or two) per layer, which is most of what a decode step on a CPU pays for at small sizes. save() splits them
back into the HF names. Sampling is in sampler.py, the M-step's log-probs in logprobs.py.
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import task

# ----------------------------------------------------------------------------------------------------------------------
# 1. The transformer.

@dataclass
class Config:
    """HF-style field names, so that config.json maps onto this one to one."""
    vocab_size: int = 98
    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 384       # the context: prompt + response never exceed it
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # HF's rope_parameters minus rope_theta; None = plain RoPE
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False                   # Qwen2: True
    o_bias: bool = False                     # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"   # or "Qwen2ForCausalLM"
    extra: dict = field(default_factory=dict)  # other config.json fields, written back unchanged by save()
    generation_config: dict | None = None    # generation_config.json as read (sampling defaults), written back by save()

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        # grouped-query attention: each key/value head serves the same number of query heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            f"num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}")


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), the statistics in fp32 whatever the weights' dtype (as HF does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: Config) -> tuple[torch.Tensor, float]:
    """θ_i = base^(-2i/d) for i < d/2, rescaled by the long-context variants. Returns (inv_freq, attention_scale).
    Each formula is the one transformers applies (modeling_rope_utils), so checkpoints load with identical logits.
    Computed on the CPU even when the model is built under torch.device("meta"): inv_freq is not in the state dict, so
    it needs real values, and arithmetic on meta tensors would import torch._dynamo (seconds of CPU per process)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by this model")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        # position interpolation: position p is seen as p / factor.
        return inv_freq / scaling["factor"], 1.0
    if kind == "dynamic":
        # dynamic NTK changes the base only for sequences longer than max_position_embeddings; our context never exceeds
        # it (generate refuses longer prompts), so inside it this is plain RoPE — exactly what transformers computes.
        return inv_freq, 1.0
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if kind == "llama3":
        # Llama 3.1: high frequencies (short wavelengths) kept, low ones divided by factor, smooth blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        # YaRN (Peng et al. 2023): interpolate the low-frequency dims, extrapolate the high ones, linear ramp between,
        # and scale cos/sin by 0.1·ln(factor) + 1 (attention temperature).
        factor = scaling.get("factor") or config.max_position_embeddings / original
        attention_scale = scaling.get("attention_factor")
        if attention_scale is None:
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_scale = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        return (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate, float(attention_scale)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, dynamic, llama3, yarn)")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """RoPE (Su et al. 2021) in the "half-split" layout of HF Llama: pairs (x_i, x_{i+d/2}) rotate by angle p·θ_i."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (K = H is plain multi-head attention)."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)

    def forward(self, x, cos, sin, cache=None, decode=None, packing=None):
        """x [B,T,D]. Without decode or packing: causal self-attention over x (training, scoring). With decode = (write
        index, additive mask) and this layer's cache (k, v, each [slots, K, capacity, hd]): one step, each row writing
        its key/value at its own position and attending to its own prefix of the cache. With packing = (scatter index,
        prompts, longest): a prefill, x [1,N,D] holding N tokens of several prompts back to back (see Transformer.prefill);
        the keys and values are written to the first `prompts` slots of the cache."""
        B, T, _ = x.shape
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # RoPE on the query and key heads in one go, (B, H+K, T, hd): they share the rotation of each position
        qk = apply_rope(qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        if packing is not None:
            # The projections above ran on real tokens only; attention needs each prompt on its own, so q, k and v are
            # scattered into a right-padded [prompts, heads, longest, hd] layout (cheap copies), attended causally (the
            # padding sits after every real token, so no real token sees it), and the real rows gathered back.
            index, prompts, longest = packing
            heads = self.n_head + 2 * self.n_kv_head
            padded = x.new_zeros(prompts * longest, heads, self.head_dim)
            padded[index] = torch.cat((qk, v), dim=1)[0].transpose(0, 1)  # the N real tokens, (N, H+2K, hd)
            q, k, v = padded.view(prompts, longest, heads, self.head_dim).transpose(1, 2).split(
                [self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (prompts, H or K, longest, hd)
            cache[0][:prompts, :, :longest] = k
            cache[1][:prompts, :, :longest] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
            y = y.transpose(1, 2).reshape(prompts * longest, self.q_size)[index]  # (N, H·hd), real tokens only
            return self.o_proj(y[None])
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        if decode is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        else:
            write_index, mask = decode
            k_cache, v_cache = cache
            # the cache seen as rows of head_dim numbers: row ((slot·K + head)·capacity + position), one write per head
            k_cache.view(-1, self.head_dim).index_copy_(0, write_index, k.reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, write_index, v.reshape(-1, self.head_dim))
            # one query per row: fold each group of H/K query heads into the "query length" axis of its key/value head,
            # so SDPA reads every cached key once and nothing is repeated (same math as repeat_kv). The keys are the whole
            # capacity, a contiguous block (see CACHE_BLOCK); the mask hides the positions past each row's own.
            q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)  # (B, K, H/K, hd)
            y = F.scaled_dot_product_attention(q, k_cache[:B], v_cache[:B], attn_mask=mask)  # (B, K, H/K, hd)
        # (B, H, T, hd) -> (B, T, H·hd)
        return self.o_proj(y.reshape(B, self.n_head, T, self.head_dim).transpose(1, 2).reshape(B, T, self.q_size))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) · up(x)); gate and up are one fused matrix."""

    def __init__(self, config: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, decode=None, packing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, decode, packing)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.attention_scale = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_cache = None  # (cos, sin) for positions [0, n), grown on demand

    def rope_tables(self, n, dtype):
        """cos/sin of p·θ_i for positions p < n (at least), in fp32 like HF, cast to the activations' dtype."""
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < n or cached[0].dtype != dtype or cached[0].device != self.inv_freq.device:
            size = max(n, min(self.config.max_position_embeddings, 4096), 2 * cached[0].shape[0] if cached else 0)
            # Built outside inference mode even when the sampler asks first: an inference tensor cached here
            # could not be saved for backward by a later training step in the same process.
            with torch.inference_mode(False):
                freqs = torch.arange(size, device=self.inv_freq.device, dtype=torch.float)[:, None] * self.inv_freq.float()
                angles = torch.cat((freqs, freqs), dim=-1)
                scale = self.attention_scale
                self._rope_cache = ((angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype))
        return self._rope_cache

    def forward(self, input_ids, return_hidden=False):
        """input_ids [B,T] -> logits [B,T,V], or the final (post-norm) hidden states [B,T,D] with return_hidden=True.
        Causal, no padding mask: right-padded batches are exact for every real token."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_tables(T, x.dtype)
        cos, sin = cos[:T], sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def prefill(self, prompts, cache):
        """The first forward of generate(): the token lists in `prompts` packed back to back into one sequence, no
        padding, so the matmuls (nearly all of a forward's work) see only real tokens. Writes each prompt's keys and
        values into its slot of cache = (k, v), each [layers, slots, K, capacity, hd], from position 0; returns the final
        hidden state at each prompt's last token [P, D]."""
        lengths = torch.tensor([len(p) for p in prompts])
        longest = int(lengths.max())
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
        prompt_of_token = torch.arange(len(prompts)).repeat_interleave(lengths)
        last = lengths.cumsum(0) - 1  # each prompt's last token in the packed sequence
        # index lists are built on the CPU and moved once (on a GPU, hundreds of tiny aranges would each be a launch)
        device = self.embed_tokens.weight.device
        tokens = torch.tensor([t for p in prompts for t in p]).to(device)
        positions, scatter_index, last = (t.to(device) for t in (positions, prompt_of_token * longest + positions, last))
        x = self.embed_tokens(tokens)[None]
        cos, sin = self.rope_tables(longest, x.dtype)
        cos, sin = cos[positions], sin[positions]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, (cache[0][i], cache[1][i]), packing=(scatter_index, len(prompts), longest))
        return self.norm(x[0, last])

    def step(self, input_ids, cache, positions):
        """One decode step of generate(): input_ids [n,1] at positions [n] for the first n slots of cache = (k, v), each
        [layers, slots, K, capacity, hd], each row attending to the cache up to its own position. Returns the final
        hidden states [n,1,D]. Everything it builds comes from device tensors and shapes, never from host data, so a
        CUDA graph can hold it (StaticDecoder)."""
        x = self.embed_tokens(input_ids)
        n = input_ids.shape[0]
        _, slots, kv_heads, capacity, _ = cache[0].shape
        cos, sin = self.rope_tables(capacity, x.dtype)
        cos, sin = cos[positions][:, None, None], sin[positions][:, None, None]
        heads = torch.arange(kv_heads, device=x.device)
        slot = torch.arange(n, device=x.device)
        write_index = ((slot[:, None] * kv_heads + heads) * capacity + positions[:, None]).reshape(-1)
        # additive mask, 0 where key position <= the row's own position, -inf after (built once, shared by layers)
        keys = torch.arange(capacity, device=x.device)
        mask = torch.zeros(n, 1, 1, capacity, dtype=x.dtype, device=x.device)
        mask.masked_fill_(keys > positions[:, None, None, None], float("-inf"))
        decode = (write_index, mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, (cache[0][i], cache[1][i]), decode)
        return self.norm(x)


def init_weights(model: Transformer, std=0.02):
    """GPT-2 / HF style: N(0, std) for matrices and the embedding, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


@contextlib.contextmanager
def no_init():
    """Build modules without running their initialisation: nn.Linear and nn.Embedding draw random weights in their
    constructors (kaiming_uniform_, uniform_, normal_), wasted work when a checkpoint's weights replace them, and on the
    meta device those ops import torch._dynamo. Construction only allocates while this is active; use it for nothing
    else (it swaps functions of torch.nn.init for the whole process until it exits)."""
    names = ("uniform_", "normal_", "kaiming_uniform_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Loading and saving HF checkpoint dirs, and the tiny preset.

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# config.json fields that become Config fields (the rest is kept in Config.extra and written back)
_OWN_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
               "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
               "pad_token_id", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}


def config_from_hf(raw: dict, where: str) -> Config:
    """Map an HF config.json (Llama / Qwen2, transformers 4.x or 5.x layout) onto Config."""
    arch = (raw.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (expected silu)")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{where}: sliding-window attention (use_sliding_window=true) is not supported")
    # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...}; 4.x wrote rope_theta and rope_scaling.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    qwen = arch == "Qwen2ForCausalLM"
    config = Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"], head_dim=raw.get("head_dim"),
        max_position_embeddings=raw.get("max_position_embeddings", 2048), rope_theta=float(rope_theta),
        rope_scaling=rope if kind != "default" else None, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=True if qwen else bool(raw.get("attention_bias", False)),
        o_bias=False if qwen else bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"),
        architecture=arch, extra={k: v for k, v in raw.items() if k not in _OWN_FIELDS})
    rope_inverse_frequencies(config)  # unsupported rope types fail here, at load time
    return config


def config_to_hf(config: Config, dtype: torch.dtype) -> dict:
    qwen = config.architecture == "Qwen2ForCausalLM"
    raw = dict(config.extra)
    raw.update(architectures=[config.architecture], model_type="qwen2" if qwen else "llama",
               vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
               num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
               intermediate_size=config.intermediate_size, head_dim=config.head_dim,
               max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
               tie_word_embeddings=config.tie_word_embeddings, mlp_bias=config.mlp_bias, hidden_act="silu",
               bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
               rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
               rope_parameters={"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta},
               dtype=str(dtype).removeprefix("torch."))
    if not qwen:
        raw["attention_bias"] = config.qkv_bias
    return raw


def _hf_names(config: Config):
    """(our parameter name, [HF tensor names] concatenated along dim 0 to form it) — the fusion done at load time."""
    names = [("embed_tokens.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"]))
    for i in range(config.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names += [(ours + "input_layernorm.weight", [hf + "input_layernorm.weight"]),
                  (ours + "post_attention_layernorm.weight", [hf + "post_attention_layernorm.weight"]),
                  (ours + "self_attn.qkv_proj.weight", [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]),
                  (ours + "self_attn.o_proj.weight", [hf + "self_attn.o_proj.weight"]),
                  (ours + "mlp.gate_up_proj.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]),
                  (ours + "mlp.down_proj.weight", [hf + "mlp.down_proj.weight"])]
        if config.qkv_bias:
            names.append((ours + "self_attn.qkv_proj.bias", [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]))
        if config.o_bias:
            names.append((ours + "self_attn.o_proj.bias", [hf + "self_attn.o_proj.bias"]))
        if config.mlp_bias:
            names += [(ours + "mlp.gate_up_proj.bias", [hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"]),
                      (ours + "mlp.down_proj.bias", [hf + "mlp.down_proj.bias"])]
    return names


def _load_safetensors_file(file: str) -> dict:
    """The tensors of one .safetensors file; a file cut short (an interrupted copy or download) is named, with the size
    its header promises: 8 bytes of header length, the header, then the data up to its largest end offset."""
    from safetensors.torch import load_file
    try:
        return load_file(file)
    except Exception as e:
        expected = "?"
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            expected = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except Exception:
            pass
        raise ValueError(f"{file}: not a complete safetensors file ({e}): {os.path.getsize(file)} bytes on disk, "
                         f"{expected} expected; truncated by an interrupted copy or download? Copy it again") from None


def _read_safetensors(path: str) -> dict:
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _load_safetensors_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors_file(os.path.join(path, shard)))
        return tensors
    raise FileNotFoundError(f"{path}: no weights found; expected model.safetensors or model.safetensors.index.json")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def load(path: str, dtype=torch.float32, device="cpu", seed=0):
    """(model, tokenizer) from an HF checkpoint dir, or a fresh random model for the preset name "tiny"."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if path == "tiny":
        return tiny(seed=seed, dtype=dtype, device=device)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a checkpoint dir (config.json + model.safetensors) nor a preset "
                                f"name (tiny)")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: config.json not found (expected an HF checkpoint dir)")
    with open(config_path) as f:
        config = config_from_hf(json.load(f), config_path)
    # generation_config.json may list more stop tokens than config.json (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>)
    generation_path = os.path.join(path, "generation_config.json")
    if os.path.exists(generation_path):
        with open(generation_path) as f:
            config.generation_config = json.load(f)
        extra_eos = config.generation_config.get("eos_token_id")
        if extra_eos is not None:
            ids = lambda e: [] if e is None else ([e] if isinstance(e, int) else list(e))
            merged = list(dict.fromkeys(ids(config.eos_token_id) + ids(extra_eos)))
            config.eos_token_id = merged[0] if len(merged) == 1 else merged
    tensors = _read_safetensors(path)
    # on meta, uninitialised: the parameters take the file's tensors below; only inv_freq is computed (on the CPU)
    with torch.device("meta"), no_init():
        model = Transformer(config)
    state = {}
    for ours, theirs in _hf_names(config):
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise KeyError(f"{path}: tensor {missing[0]} missing from the checkpoint")
        state[ours] = torch.cat([tensors[n] for n in theirs]).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters()), "a parameter was not loaded"
    model = model.to(device).eval()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def save(model: Transformer, tokenizer, out_dir: str):
    """Write an HF-format dir (config.json, model.safetensors, generation_config.json, tokenizer files) atomically:
    everything goes to a temporary sibling dir that is renamed onto out_dir at the end."""
    from safetensors.torch import save_file
    config = model.config
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.abspath(out_dir)) + "-", dir=parent)
    try:
        state = model.state_dict()
        tensors = {}
        for ours, theirs in _hf_names(config):
            sizes = [config.num_attention_heads * config.head_dim] + [config.num_key_value_heads * config.head_dim] * 2 \
                if "qkv_proj" in ours else [state[ours].shape[0] // len(theirs)] * len(theirs)
            for name, part in zip(theirs, state[ours].split(sizes)):
                tensors[name] = part.detach().to("cpu").contiguous()
        dtype = model.embed_tokens.weight.dtype
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(config, dtype), f, indent=2)
        # the loaded checkpoint's sampling defaults (temperature, top_p, ...) are kept; bos/eos/pad come from the config,
        # into which load() merged generation_config.json's EOS ids
        generation = dict(config.generation_config or {})
        generation.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                          pad_token_id=config.pad_token_id)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # mkdtemp made the dir private (0700); a checkpoint should be as readable as any file the user writes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The tiny preset: the embedded task's model, a 0.46M-parameter Llama, with task.tiny_tokenizer() (why this size:
# docs/TASK.md).
TINY_CONFIG = dict(
    vocab_size=len(task.TINY_SPECIAL_TOKENS) + len(task.TINY_CHARACTERS) + len(task.TINY_WORDS),  # 197
    hidden_size=96,                  # model width
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,           # plain multi-head attention
    intermediate_size=256,           # SwiGLU width
    max_position_embeddings=384,     # prompt + a worked solution fit with room to spare
    rope_theta=10000.0,
    tie_word_embeddings=True,        # the embedding is a large share of a 0.46M model; tying halves it
    eos_token_id=0,
    pad_token_id=1,
)


def tiny(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    model = Transformer(Config(**TINY_CONFIG))
    init_weights(model)
    return model.to(dtype=dtype, device=device), task.tiny_tokenizer()
