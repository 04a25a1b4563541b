"""
model.py — the language model of tocode, from the embedding table to the sampler that runs Python mid-generation.

Read top to bottom:
  1. the tool-call format (ToRA / Qwen2.5-Math) that the sampler and the data share;
  2. the transformer of the Llama / Qwen2 family: RMSNorm, rotary embeddings (with the long-context rope_scaling
     variants of Llama 3 and Qwen2.5), grouped-query attention with optional q/k/v bias, a SwiGLU MLP, tied or untied head;
  3. loading an HF checkpoint dir and saving one back (transformers reloads it with identical logits), and the "tiny"
     preset with its tokenizer of characters and whole words;
  4. generate(): a batched sampler with a packed prefill, a KV cache, per-row seeds, stop strings and tool calls, after
     generate_reference(), the same sampling in a few lines without cache, batch or tools (its specification);
  5. fused_logprobs(): log-probs of chosen tokens, forward and backward, without ever holding N x V logits.

The model stores the q/k/v projections as one matrix and gate/up as another ("fused at load time"): one matmul instead
of three (or two) per layer, which is most of what a decode step on a CPU pays for at small sizes. save() splits them
back into the HF names.
"""
import collections
import concurrent.futures
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# 1. The tool format. The model writes a ```python block, then "```output"; generation of that row pauses, the code runs,
# and the sampler feeds tool_injection(output) to the row as forced tokens, then the row continues sampling.

TOOL_TRIGGER = "```output"  # whitespace after it may arrive in the same token (byte-level BPE has "output\n\n")
# What the model reads as the output of a call beyond max_calls (ToRA injects a similar notice). Asking again ends the row.
MAX_CALLS_NOTICE = "Reached the maximum number of code executions. Continue without running code."


def tool_injection(output: str, after_newline: bool = False) -> str:
    """The text fed after the trigger: the output and the closing fence. The leading newline is left out when the
    model's text already ends with one or more, which its trigger token carried (tokenizers that merge "```output\\n"
    or "output\\n\\n" into one piece)."""
    return ("" if after_newline else "\n") + output + "\n```\n"


# ----------------------------------------------------------------------------------------------------------------------
# 2. The transformer.

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
    Each formula is the one transformers applies (modeling_rope_utils), so checkpoints load with identical logits."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
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
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
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


# ----------------------------------------------------------------------------------------------------------------------
# 3. Loading and saving HF checkpoint dirs, and the tiny preset.

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


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(path, shard)))
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
            extra_eos = json.load(f).get("eos_token_id")
        if extra_eos is not None:
            ids = lambda e: [] if e is None else ([e] if isinstance(e, int) else list(e))
            merged = list(dict.fromkeys(ids(config.eos_token_id) + ids(extra_eos)))
            config.eos_token_id = merged[0] if len(merged) == 1 else merged
    tensors = _read_safetensors(path)
    with torch.device("meta"):
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
    inv_freq, model.attention_scale = rope_inverse_frequencies(config)
    model.inv_freq = inv_freq
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
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                       "pad_token_id": config.pad_token_id}, f, indent=2)
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


# The embedded preset: a tokenizer of characters and whole words, and a 0.45M-parameter Llama. This size learned the
# embedded task fastest on 2 CPU cores: 1M and 3M models did worse in the same time (fewer steps, and they learned
# copying before single-digit arithmetic; measured with one token per character).
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]   # EOS (id 0) and PAD (id 1)
TINY_CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
# Whole tokens for the embedded task's fixed text: the worked solutions' line labels, the code block's fences, the
# three prompts' instructions and the words of data.TEMPLATES. A warm-start example is then 69 tokens on average
# instead of 144 with one token per character, and 400 warm-start steps take 0.65 times the wall time. No word
# holds a digit: numbers are read and written one digit a token everywhere (problem, steps, program, tool output),
# which digit-level arithmetic needs. The operators and " = " stay characters: as whole tokens (" + ", " = ") the
# warm start copied chain's five numbers into its program with one digit position mostly wrong (forced code on
# chain 0%; the middle digits in one warm start, the fourth number's first digit in another), and right with them
# as characters. Any other text is one token per character.
TINY_WORDS = [
    "ones: ", "tens: ", ", carry ", ", borrow ", "result: ", "last digit: ", "\\boxed{",
    "```python", "\nprint(", ")\n```\n", "```output", "\n```\n",
    "\nUse code.\n", "\nThink step by step.\n", "\nSolve.\n",
    "Ann", "Ben", "Sam", "There", "Start", "Take", " Total", " Result", " What", " How", " Last",
    " a", " all", " and", " are", " at", " each", " for", " get", " had", " has", " hold", " holds", " in", " is",
    " many", " more", " now", " of", " off", " plus", " the", " then", " there", " with",
    " add", " subtract", " added", " adds", " buys", " came", " carries", " fell", " finds", " left", " reads",
    " remain", " sells", " spent", " takes", " count", " digit", " extra", " last", " loose", " sum", " total",
    " apples", " bags", " books", " box", " boxes", " bus", " cans", " coins", " crates", " day", " days", " eggs",
    " farm", " fields", " hens", " kg", " marbles", " pages", " people", " pins", " plants", " rows", " shelf",
    " shells", " shop", " tree", " van",
]
TINY_CONFIG = dict(
    vocab_size=len(TINY_SPECIAL_TOKENS) + len(TINY_CHARACTERS) + len(TINY_WORDS),  # 197
    hidden_size=96,                  # model width
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,           # plain multi-head attention
    intermediate_size=256,           # SwiGLU width
    max_position_embeddings=384,     # prompt + a worked solution fit with room to spare
    rope_theta=10000.0,
    tie_word_embeddings=True,        # the embedding is a large share of a 0.45M model; tying halves it
    eos_token_id=0,
    pad_token_id=1,
)


def tiny_tokenizer():
    """TINY_WORDS whole, any other character on its own (characters outside the vocabulary are dropped). The text
    is first split into pieces, a word where one starts (the longest) and else one character, and each piece is
    one token: nothing merges across pieces, so the model's text and the tool output, encoded apart, give the
    tokens their concatenation gives wherever the cut falls between pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHARACTERS + TINY_WORDS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    words = "|".join(re.escape(word) for word in sorted(TINY_WORDS, key=len, reverse=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="right", clean_up_tokenization_spaces=False)


def tiny(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    model = Transformer(Config(**TINY_CONFIG))
    init_weights(model)
    return model.to(dtype=dtype, device=device), tiny_tokenizer()


# ----------------------------------------------------------------------------------------------------------------------
# 4. The sampler.

@dataclass
class Sample:
    tokens: list          # all new tokens, sampled and injected, in order (a final EOS included)
    sampled_mask: list    # 1 = sampled by the model, 0 = injected tool output
    logprobs: list        # per token: log-prob under the distribution it was drawn from, softmax(logits / T)
                          # renormalised over the tokens top-k / top-p keep (log softmax(logits) when greedy); 0 if
                          # injected
    text: str             # tokens decoded, EOS left out
    calls: int            # code executions
    statuses: list        # the tool's status of each execution
    finish_reason: str    # "eos", "stop", "length" or "max_calls"


def _hash32(x):
    """A 32-bit integer mixer (xorshift-multiply, after C. Wellons' lowbias32) on int64 tensors holding values < 2^32:
    a bijection whose output bits each depend on all input bits, so hash(seed, position, token) gives
    independent-looking uniform noise. Both multipliers are odd and < 2^31, so no product overflows int64: the same
    bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gumbel_noise(seeds, positions, vocab_size):
    """Gumbel(0,1) noise [B,V] that depends only on (seed, position, token id): argmax(logits/T + g) is then an exact
    sample of softmax(logits/T) (the Gumbel-max trick), reproducible per row whatever else is in the batch."""
    key = _hash32((seeds + _hash32((positions + 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    tokens = torch.arange(vocab_size, device=seeds.device)
    bits = _hash32(key[:, None] ^ tokens[None, :])
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # 24 bits, in (0, 1)
    return -torch.log(-torch.log(uniform))


def choose_tokens(logits, temperature, top_k, top_p, seeds, positions):
    """logits [B,V] fp32 -> (tokens [B], behaviour log-probs [B]). The log-prob is under the distribution the token was
    drawn from: softmax(logits / T) renormalised over the tokens top-k / top-p keep, the denominator pi_b of the
    trainer's importance ratio. Greedy (T = 0) gives log_softmax(logits)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    filtered = scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p: drop a token when the mass strictly
        # before it (in descending order) is already >= top_p.
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0].fill_(False)  # the most likely token always stays (fill_: no tensor built from Python data)
        filtered = filtered.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    tokens = (filtered + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)
    # the dropped tokens are -inf, so this renormalises over the kept ones; with nothing dropped it is exactly
    # log_softmax(scaled), the same bits as before truncation was accounted for
    return tokens, torch.log_softmax(filtered, -1).gather(1, tokens[:, None])[:, 0]


@torch.inference_mode()
def generate_reference(model, prompts, max_new_tokens, temperature=1.0, seeds=None, eos=(), top_k=0, top_p=1.0):
    """What generate() computes, without its machinery: one row at a time, a full forward over the whole sequence for
    every new token, no cache, no tools. seeds: one per prompt (None: 0 for all, enough when greedy); eos: token ids.
    Returns (prompt + new tokens, log-probs of the new tokens) per prompt. generate() with the same seeds draws the same
    tokens (the noise depends only on seed and position) and the same log-probs up to float rounding (a cached step
    adds up the attention in another order than a full forward)."""
    device = model.embed_tokens.weight.device
    results = []
    for i, prompt in enumerate(prompts):
        ids, logprobs = list(prompt), []
        seed = torch.tensor([(seeds[i] if seeds is not None else 0) & 0xFFFFFFFF], device=device)
        while len(ids) - len(prompt) < max_new_tokens and len(ids) < model.config.max_position_embeddings:
            logits = model(torch.tensor([ids], device=device))[0, -1:].float()
            position = torch.tensor([len(ids)], device=device)
            token, logprob = choose_tokens(logits, temperature, top_k, top_p, seed, position)
            ids.append(int(token))
            logprobs.append(float(logprob))
            if ids[-1] in eos:
                break
        results.append((ids, logprobs))
    return results


# A decode step attends over the cache's whole capacity (the positions past a row's own are masked), because that
# block is contiguous: a shorter slice of a longer buffer is strided, and SDPA copies strided keys and values on every
# call (on CPU that copy cost more than the attention). So the capacity grows in blocks of CACHE_BLOCK positions, one
# copy per block rather than a concatenation per step, up to the longest sequence any row can reach.
CACHE_BLOCK = 32
# Stop strings and the tool trigger are tested on a row's last tokens, decoded. Tokens can decode to fewer characters
# than their count (a character split over several byte-level tokens decodes to one), so a few more tokens are decoded
# than the longest string tested has characters.
TAIL_EXTRA_TOKENS = 8


class KVCache:
    """The keys and values of the sampler's sequences: k and v, each [layers, slots, kv_heads, capacity, head_dim]."""

    def __init__(self, config: Config, slots, capacity, dtype, device):
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self):
        return self.k.shape[3]

    def make_room(self, needed, longest):
        """Grow, by CACHE_BLOCK positions at a time, to hold sequences of `needed` tokens (never beyond `longest`)."""
        if needed > self.capacity:
            self.grow(min(longest, needed + CACHE_BLOCK - 1))

    def grow(self, capacity, copy_of=None):
        """Move to a zeroed cache of `capacity` positions holding what this one holds; with copy_of (a tensor of slot
        indices), new slot i holds old slot copy_of[i], which is how rows sharing a prompt get its prefilled keys."""
        layers, slots, kv_heads, old_capacity, head_dim = self.k.shape
        slots = slots if copy_of is None else len(copy_of)
        old = (self.k, self.v)
        shape = (layers, slots, kv_heads, capacity, head_dim)
        new = tuple(torch.zeros(shape, dtype=t.dtype, device=t.device) for t in old)
        for new_tensor, old_tensor in zip(new, old):
            for layer in range(layers):  # one layer at a time: a gather's copy stays small
                rows = old_tensor[layer] if copy_of is None else old_tensor[layer, copy_of]
                new_tensor[layer, :, :, :old_capacity] = rows
        self.k, self.v = new

    def swap(self, a, b):
        """Exchange slots a[i] and b[i] (index tensors) in every layer."""
        both, other = torch.cat([a, b]), torch.cat([b, a])
        for tensor in (self.k, self.v):
            tensor[:, both] = tensor[:, other]


# What encode_continuation puts before a text so that a SentencePiece tokenizer's prefix space goes to it, not to the
# text. A newline, because Llama-2-family vocabularies have no piece holding one (it is the byte-fallback token
# <0x0A>): the anchor's tokens never merge with the text after it.
ENCODE_ANCHOR = "\n"


def encode_continuation(tokenizer, text, context):
    """Token ids that continue the token ids `context` with exactly `text`: decode(context + ids) == decode(context) +
    text. Encoded on its own, text gets a leading "▁" (a space) from SentencePiece tokenizers (Llama 2's, with
    add_prefix_space or legacy), text the model would never have produced. So when the plain encoding does not decode
    to text in context, text is encoded after ENCODE_ANCHOR, which takes the prefix, and the anchor's tokens are
    dropped. A tokenizer that defeats both gets the plain encoding: the sample's text, decoded from its tokens, then
    shows what the model read."""
    plain = tokenizer.encode(text, add_special_tokens=False)
    before = tokenizer.decode(context)
    if tokenizer.decode(context + plain) == before + text:
        return plain
    anchor = tokenizer.encode(ENCODE_ANCHOR, add_special_tokens=False)
    anchored = tokenizer.encode(ENCODE_ANCHOR + text, add_special_tokens=False)
    rest = anchored[len(anchor):]
    if anchored[:len(anchor)] == anchor and tokenizer.decode(context + rest) == before + text:
        return rest
    return plain


@dataclass
class _Rules:
    """What ends a row or pauses it on a tool call: generate()'s arguments, the same for every row."""
    eos: set
    max_new_tokens: int
    context: int            # the model's: prompt + response never exceed it
    tokenizer: object
    stop_strings: list
    has_tool: bool          # whether TOOL_TRIGGER calls a tool
    max_calls: int

    def __post_init__(self):
        # the characters a row's tail must hold to end with any stop string, or with the trigger (whitespace after it
        # comes in the trigger's own last token, so it needs no more tokens)
        self.tail_chars = max([len(s) for s in self.stop_strings] + [len(TOOL_TRIGGER) if self.has_tool else 0])


@dataclass
class _Row:
    """Bookkeeping of one prompt while it is generated."""
    prompt_length: int
    seed: int
    tokens: list = field(default_factory=list)
    sampled_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    forced: collections.deque = field(default_factory=collections.deque)  # injected tokens still to feed
    calls: int = 0
    statuses: list = field(default_factory=list)
    noticed: bool = False        # MAX_CALLS_NOTICE already injected
    finish_reason: str | None = None
    waiting: bool = False        # paused on a tool call

    @property
    def decoding(self):
        return self.finish_reason is None and not self.waiting

    def add_token(self, token, sampled, logprob, rules: _Rules):
        """Append one token (sampled, or injected with log-prob 0) and decide what the row does next: go on, finish
        ("eos", "length", "stop", "max_calls"), queue MAX_CALLS_NOTICE as the output of a call beyond max_calls, or
        wait for the tool. Returns True when the row now waits: the caller submits its call."""
        self.tokens.append(token)
        self.sampled_mask.append(int(sampled))
        self.logprobs.append(logprob if sampled else 0.0)
        if sampled and token in rules.eos:
            self.finish_reason = "eos"
        elif len(self.tokens) >= rules.max_new_tokens or self.prompt_length + len(self.tokens) >= rules.context:
            self.finish_reason = "length"
        elif sampled and rules.tail_chars:  # injected text never stops a row nor calls the tool
            tail = rules.tokenizer.decode(self.tokens[-(rules.tail_chars + TAIL_EXTRA_TOKENS):])
            if any(tail.endswith(s) for s in rules.stop_strings):
                self.finish_reason = "stop"
            # the trigger's last token may carry whitespace after it ("output\n\n"). A token of whitespace alone
            # completes no trigger: the one it follows was complete a token earlier and was answered then
            elif (rules.has_tool and tail.rstrip().endswith(TOOL_TRIGGER)
                  and rules.tokenizer.decode([token]).strip()):
                if self.calls < rules.max_calls:
                    self.waiting = True
                elif not self.noticed:
                    self.noticed = True
                    self.inject(MAX_CALLS_NOTICE, tail.endswith("\n"), rules.tokenizer)
                else:
                    self.finish_reason = "max_calls"
        return self.waiting

    def inject(self, output, after_newline, tokenizer):
        self.forced.extend(encode_continuation(tokenizer, tool_injection(output, after_newline), self.tokens))

    def tool_returned(self, output, status, tokenizer):
        self.calls += 1
        self.statuses.append(status)
        self.waiting = False
        self.inject(output, tokenizer.decode(self.tokens).endswith("\n"), tokenizer)

    def sample(self, tokenizer):
        text_tokens = self.tokens[:-1] if self.finish_reason == "eos" else self.tokens
        text = tokenizer.decode(text_tokens) if tokenizer is not None else ""
        return Sample(self.tokens, self.sampled_mask, self.logprobs, text, self.calls, self.statuses,
                      self.finish_reason)


class _Slots:
    """The batch as a decode step sees it: slot s of the cache holds row row_of[s]. The slots are kept ordered [rows
    still decoding | paused or finished rows], so a step runs on the views [:n] without copying; a row changing state
    swaps slots with another (two rows copied, not the whole cache)."""

    def __init__(self, rows, cache: KVCache, device=None):
        # the per-slot state lives with the cache by default; the static path (StaticDecoder) keeps it on the host,
        # where the rows are, and copies what a step needs into its own buffers
        device = cache.k.device if device is None else device
        self.rows, self.cache = rows, cache
        self.row_of = list(range(len(rows)))
        # tokens of each slot's sequence, counting next_input, the chosen token not yet fed (so not yet cached)
        self.lengths = torch.tensor([row.prompt_length for row in rows], device=device)
        self.next_input = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.seeds = torch.tensor([row.seed for row in rows], device=device)

    def swap(self, a, b):
        """Exchange slots a[i] and b[i] (lists): their cache rows, per-slot state and rows."""
        if not a:
            return
        device = self.lengths.device
        ia, ib = torch.tensor(a, device=device), torch.tensor(b, device=device)
        self.cache.swap(ia.to(self.cache.k.device), ib.to(self.cache.k.device))
        both, other = torch.cat([ia, ib]), torch.cat([ib, ia])
        for tensor in (self.lengths, self.next_input, self.seeds):
            tensor[both] = tensor[other]
        for x, y in zip(a, b):
            self.row_of[x], self.row_of[y] = self.row_of[y], self.row_of[x]

    def compact(self):
        """Reorder slots so the rows still decoding come first; returns their count."""
        live = {s for s, r in enumerate(self.row_of) if self.rows[r].decoding}
        n = len(live)
        holes = [s for s in range(n) if s not in live]
        outsiders = sorted(s for s in live if s >= n)
        self.swap(holes, outsiders)
        return n

    def add_tokens(self, tokens, logprobs, rules: _Rules):
        """Give each of the first len(tokens) slots its next token: the chosen one, or the next injected token where the
        row has some pending. Returns the rows that now wait for the tool."""
        n = len(tokens)
        self.lengths[:n] += 1
        self.next_input[:n] = tokens
        forced_slots, forced_tokens, asking = [], [], []
        for slot, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            row = self.rows[self.row_of[slot]]
            if row.forced:
                token = row.forced.popleft()
                forced_slots.append(slot)
                forced_tokens.append(token)
                waits = row.add_token(token, False, 0.0, rules)
            else:
                waits = row.add_token(token, True, logprob, rules)
            if waits:
                asking.append(row)
        if forced_slots:
            device = self.next_input.device
            self.next_input[torch.tensor(forced_slots, device=device)] = torch.tensor(forced_tokens, device=device)
        return asking


class _ToolCalls:
    """The tool calls of one step go to a worker thread as one batch (sandbox.tool runs them concurrently); their rows
    wait outside the active slots, and come back when their future is done."""

    def __init__(self, tool, workers, tokenizer):
        self.tool, self.tokenizer = tool, tokenizer
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if tool is not None else None
        self.pending = {}  # future -> rows

    def submit(self, rows):
        if rows:
            self.pending[self.pool.submit(self.tool, [self.tokenizer.decode(r.tokens) for r in rows])] = rows

    def collect(self, block):
        """Inject the outputs of the finished calls into their rows; with block, first wait for one call to finish."""
        if not self.pending:
            return
        if block:
            concurrent.futures.wait(list(self.pending), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in [f for f in self.pending if f.done()]:
            rows = self.pending.pop(future)
            try:
                results = future.result()
            except Exception as error:
                raise RuntimeError(f"generate: the tool callback raised {type(error).__name__}: {error}") from error
            if len(results) != len(rows):
                raise RuntimeError(f"generate: the tool callback returned {len(results)} results for {len(rows)} "
                                   f"requests")
            for row, (output, status) in zip(rows, results):
                row.tool_returned(output, status, self.tokenizer)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _eos_set(model, tokenizer, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _row_seeds(seed, B):
    if seed is None:
        return torch.randint(0, 2**32, (B,)).tolist()  # from torch's global RNG: torch.manual_seed makes it repeatable
    if isinstance(seed, int):
        return [seed + i for i in range(B)]
    if len(seed) != B:
        raise ValueError(f"generate: {len(seed)} seeds for {B} prompts")
    return list(seed)


def _check_prompts(prompts, context, tokenizer, tool, stop_strings):
    if (tool is not None or stop_strings) and tokenizer is None:
        raise ValueError("generate: tool calls and stop strings need the tokenizer")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if len(prompt) > context:
            raise ValueError(f"generate: prompt {i} has {len(prompt)} tokens, longer than the model's context of "
                             f"{context}")


def _prefill(model, prompts, rows, slot_count, capacity, state_device):
    """One packed forward over each distinct prompt once (explore.py draws K rollouts of every prompt in one batch, so
    most prompts come K times); the rows sharing a prompt then copy its keys and values into a cache of slot_count
    slots and `capacity` positions. Returns the slots (their state on state_device) and each row's last hidden
    state, from which its first token comes."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    distinct = {}
    copy_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    cache = KVCache(model.config, len(distinct), max(map(len, prompts)), dtype, device)
    last = model.prefill(list(distinct), (cache.k, cache.v))[torch.tensor(copy_of, device=device)]
    # the slots past the rows (StaticDecoder's bucket can hold more) copy prompt 0: no row reads them
    cache.grow(capacity, torch.tensor(copy_of + [0] * (slot_count - len(rows)), device=device))
    return _Slots(rows, cache, state_device), last


def _first_tokens(model, slots, last, sampling, rules):
    """Each row's first token, chosen from its prompt's last hidden state. Returns the rows that now wait."""
    n = slots.compact()
    if n == 0:
        return []
    device, state_device = last.device, slots.lengths.device
    logits = model.lm_head(last[torch.tensor(slots.row_of[:n], device=device)])
    # the noise is keyed by the new token's index in the sequence: lengths, before add_tokens counts it
    tokens, logprobs = choose_tokens(logits.float(), *sampling, slots.seeds[:n].to(device),
                                     slots.lengths[:n].to(device))
    return slots.add_tokens(tokens.to(state_device), logprobs.to(state_device), rules)


class GrowingDecoder:
    """Decode steps run eagerly on exactly the rows still decoding, over a cache that grows with them (CACHE_BLOCK):
    the CPU's default path."""

    def __init__(self, model, cache: KVCache, sampling, longest):
        self.model, self.cache, self.sampling, self.longest = model, cache, sampling, longest

    def step(self, slots: _Slots, n):
        """The first n slots each feed one token at its own position and attend to their prefix. Returns their tokens
        and log-probs."""
        cache = self.cache
        cache.make_room(int(slots.lengths[:n].max()), self.longest)
        hidden = self.model.step(slots.next_input[:n, None], (cache.k, cache.v), slots.lengths[:n] - 1)
        logits = self.model.lm_head(hidden[:, 0])
        # the noise is keyed by the new token's index in the sequence: lengths, before add_tokens counts it
        return choose_tokens(logits.float(), *self.sampling, slots.seeds[:n], slots.lengths[:n])


# The static path: a decode step with every shape fixed, so that a GPU can capture it once as a CUDA graph and replay
# it, one launch for the whole step instead of hundreds. At the 0.5B size on a GPU the eager step is bound by Python
# and kernel launches, not by memory (it reached 2% of the bandwidth bound). A step runs on a bucket of slots, the
# smallest of these that holds the rows still decoding, one graph per bucket; the slots past those rows are padding.
DECODE_BUCKETS = (8, 16, 32, 64, 128, 256)
# Eager runs of a step before it is captured, on a side stream: a first run sets things up (cuBLAS workspaces,
# kernel choices) that a capture cannot. Each writes what the replay then writes again, so they change nothing.
GRAPH_WARMUP_STEPS = 2


def decode_bucket(n):
    """How many slots a step for n rows runs on: the smallest bucket that holds them, past the largest a multiple of
    it."""
    for size in DECODE_BUCKETS:
        if n <= size:
            return size
    return -(-n // DECODE_BUCKETS[-1]) * DECODE_BUCKETS[-1]


class StaticDecoder:
    """The decode step over static buffers: the cache (on a GPU allocated at full length, so it never moves), the
    inputs of every slot and the outputs. step() copies the inputs in from the host, runs the step on a bucket of
    slots (replaying that bucket's CUDA graph, or eagerly: on the CPU, or with cuda_graphs=False) and brings the
    outputs back in one small copy. The step samples too (choose_tokens' noise is a hash of device tensors, so it
    needs no RNG state) and checks EOS and the length limit; stop strings and the tool trigger need the text, so they
    stay on the host (_Row.add_token, on the copied tokens).

    Padding slots [n, bucket) hold finished or waiting rows, or none. They feed token 0 at the cache's last position,
    a scratch position: no row attends to another slot, and a waiting row's positions from its next one on are
    written again before it reads them, so the scratch write costs it nothing. Their outputs are ignored."""

    def __init__(self, model, cache: KVCache, rows, rules: _Rules, sampling, longest, cuda_graphs=True):
        device = cache.k.device
        self.model, self.cache, self.sampling, self.longest = model, cache, sampling, longest
        self.use_graphs = cuda_graphs and device.type == "cuda"
        slots, pinned = cache.k.shape[1], device.type == "cuda"
        # One row per slot: the token fed, its position, the row's seed, its length limit, and the injected token it
        # takes instead of the sampled one (-1: none). Staged on the host (pinned memory: the copy is asynchronous)
        # and copied to the device in one piece: slots [:b] are a contiguous block.
        self.staging = torch.zeros(slots, 5, dtype=torch.long, pin_memory=pinned)
        self.inputs = torch.zeros(slots, 5, dtype=torch.long, device=device)
        # each slot's token, its behaviour log-prob and its done flag; float64 holds token ids and fp32 log-probs
        # exactly, so one copy brings all three back
        self.outputs = torch.zeros(slots, 3, dtype=torch.float64, device=device)
        self.host_outputs = torch.zeros(slots, 3, dtype=torch.float64, pin_memory=pinned)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.eos = torch.tensor(sorted(rules.eos), dtype=torch.long, device=device)
        self.limits = torch.tensor([min(row.prompt_length + rules.max_new_tokens, rules.context) for row in rows])
        self.graphs, self.pool = {}, None   # bucket -> torch.cuda.CUDAGraph, all in one memory pool
        self.done = None

    def step(self, slots: _Slots, n):
        """One decode step for the rows in slots [:n]. Returns their tokens and log-probs (host tensors) for
        slots.add_tokens. self.done then holds the device's verdict on each, EOS sampled or the length limit reached:
        _Row.add_token comes to the same one on the host, where it also tests what needs the text; the flag is what a
        loop keeping several steps on the device would mask with."""
        b = decode_bucket(n)
        self.cache.make_room(int(slots.lengths[:b].max()), self.longest)  # the CPU's growing cache; on a GPU a no-op
        self._stage(slots, n, b)
        # the last step's outputs were waited for, so its copy in is done too: the staging buffer is free again
        self.inputs[:b].copy_(self.staging[:b], non_blocking=True)
        if self.use_graphs:
            self._graph(b).replay()
        else:
            self._forward(b)
        self.host_outputs[:b].copy_(self.outputs[:b], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
            self.copied.synchronize()
        tokens, logprobs, done = self.host_outputs[:n].T
        self.done = done.bool()
        return tokens.long(), logprobs.clone()  # copies: the buffer is the next step's

    def _stage(self, slots, n, b):
        """The inputs of slots [:b] into the staging buffer: the rows of slots [:n], padding after."""
        staging = self.staging[:b].T  # one row per field
        staging[0, :n] = slots.next_input[:n]
        staging[1, :n] = slots.lengths[:n] - 1  # the input is its sequence's last token
        staging[2, :n] = slots.seeds[:n]
        staging[3, :n] = self.limits[slots.row_of[:n]]
        rows = (slots.rows[r] for r in slots.row_of[:n])
        staging[4, :n] = torch.tensor([row.forced[0] if row.forced else -1 for row in rows])
        staging[:, n:] = torch.tensor([0, self.cache.capacity - 1, 0, 0, -1])[:, None]

    def _forward(self, b):
        """The device part of a step on slots [:b]: reads self.inputs, writes self.outputs. It reads no host data and
        builds no shape from data (no .item(), no boolean-mask indexing): what a CUDA graph can hold."""
        input_ids, positions, seeds, limits, forced = self.inputs[:b].T.contiguous()  # one row per field
        hidden = self.model.step(input_ids[:, None], (self.cache.k, self.cache.v), positions)
        logits = self.model.lm_head(hidden[:, 0]).float()
        # the noise is keyed by the new token's index in its sequence, one past the input's
        chosen, logprobs = choose_tokens(logits, *self.sampling, seeds, positions + 1)
        sampled = forced < 0
        tokens = torch.where(sampled, chosen, forced)
        eos = sampled & (tokens[:, None] == self.eos).any(-1)
        outputs = self.outputs[:b].T
        outputs[0] = tokens
        outputs[1] = torch.where(sampled, logprobs, 0.0)
        outputs[2] = eos | (positions + 2 >= limits)  # the sequence is now position + 2 tokens long

    def _graph(self, b):
        """The CUDA graph of the step on b slots, captured at its first use (when its inputs are staged)."""
        if b not in self.graphs:
            # One memory pool for all buckets: what a graph keeps in it is scratch that every replay writes before
            # reading (all it reads or leaves behind lives in the buffers above, outside the pool), so the graphs can
            # share it and replay in any order, one at a time.
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(b)
            self.graphs[b] = graph
        return self.graphs[b]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None, tokenizer=None,
             stop_strings=None, tool=None, max_calls=4, eos_token_id=None, tool_workers=4, static_slots=False,
             cuda_graphs=True):
    """Sample continuations of a batch of token-id prompts (different lengths welcome); returns one Sample per prompt.

    temperature=0 is greedy. seed: an int (row i uses seed + i) or a list of ints, one per prompt; a row's tokens depend
    only on its prompt and its seed (the noise is a hash of (seed, position, token id), not a shared RNG stream).
    eos_token_id: defaults to the model's (or tokenizer's) EOS ids; an empty list never stops at EOS.
    max_new_tokens counts every new token, injected ones included; a row also ends ("length") at the model's context.
    Sample.logprobs holds the behaviour log-prob of each sampled token under the distribution it was drawn from:
    softmax(logits / temperature) renormalised over the tokens top-k / top-p keep (log_softmax(logits) when greedy),
    and 0.0 for injected tokens.

    Tools: when a sampled token completes TOOL_TRIGGER (whitespace after it in the same token allowed), tool(list of
    response texts) -> list of (output, status) runs in a worker thread; the row is paused, the other rows keep
    decoding, and when the call returns tool_injection(output) is fed to the row as forced tokens, encoded as a
    continuation of the row (encode_continuation: no SentencePiece prefix space; the model's own tokens are never
    re-tokenized). Injected tokens never call the tool nor stop a row. Each execution counts in .calls and adds its
    status. After max_calls executions, the next trigger gets MAX_CALLS_NOTICE as its output (no execution, no status)
    and the one after that ends the row with "max_calls". An exception raised by the callback is re-raised here as
    RuntimeError (cause chained); a callback that never returns blocks the rows waiting for it, so give it a timeout
    (sandbox.tool has one).

    static_slots: decode with StaticDecoder (fixed buffers, steps on padded buckets of slots, sampling inside the step)
    instead of the growing cache; None = on a GPU only. It is off by default everywhere for now: it is tested eagerly
    on the CPU, but its CUDA graphs have not run on a GPU yet (no device was lent while it was written), and a
    default must be a tested path. cuda_graphs: on a GPU, replay each bucket's step as a CUDA graph (False: run it
    eagerly, for debugging). Every path draws the same tokens, with the same log-probs up to float rounding.
    """
    if not prompts:
        return []
    context, device = model.config.max_position_embeddings, model.embed_tokens.weight.device
    _check_prompts(prompts, context, tokenizer, tool, stop_strings)
    rows = [_Row(len(p), s & 0xFFFFFFFF) for p, s in zip(prompts, _row_seeds(seed, len(prompts)))]
    for row in rows:  # zero room: nothing to generate
        if max_new_tokens <= 0 or row.prompt_length >= context:
            row.finish_reason = "length"
    rules = _Rules(_eos_set(model, tokenizer, eos_token_id), max_new_tokens, context, tokenizer,
                   list(stop_strings or []), tool is not None, max_calls)
    longest_prompt = max(len(p) for p in prompts)
    longest = min(context, longest_prompt + max_new_tokens)  # the cache never needs more positions
    static = device.type == "cuda" if static_slots is None else static_slots
    sampling = (temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    tools = _ToolCalls(tool, tool_workers, tokenizer)
    try:
        # A graph's buffers never move, so on a GPU the static path's cache holds the longest sequence from the start;
        # otherwise it grows, with room for the first CACHE_BLOCK new tokens to begin with.
        capacity = longest if static and device.type == "cuda" else min(longest, longest_prompt + CACHE_BLOCK)
        slot_count = decode_bucket(len(rows)) if static else len(rows)
        slots, last = _prefill(model, prompts, rows, slot_count, capacity, "cpu" if static else device)
        if static:
            decoder = StaticDecoder(model, slots.cache, rows, rules, sampling, longest, cuda_graphs)
        else:
            decoder = GrowingDecoder(model, slots.cache, sampling, longest)
        tools.submit(_first_tokens(model, slots, last, sampling, rules))
        # Decode until no row decodes and no tool call is out.
        while True:
            n = slots.compact()
            if n == 0 and not tools.pending:
                break
            tools.collect(block=(n == 0))  # nothing else to do: wait for a call to return
            n = slots.compact()
            if n:
                tools.submit(slots.add_tokens(*decoder.step(slots, n), rules))
    finally:
        tools.close()
        model.train(was_training)
    return [row.sample(tokenizer) for row in rows]


# ----------------------------------------------------------------------------------------------------------------------
# 5. The fused log-prob kernel (the M-step's log pi_theta(y_t | x, y_<t) without N x V logits).
#
# Fused log-probs: log softmax(hidden @ weight.T / T)[i, targets[i]] without the N x V logits.
#
# The M-step needs log pi_theta(y_t | x, y_<t) for every trainable response token. The naive way,
#
#     logprobs = log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])
#
# materialises N x V logits, then an N x V log-softmax, and in the backward an N x V gradient of the
# gather and an N x V gradient of the logits: with Qwen's V = 151,936 that is 1.2 GB per 2,048 tokens
# for EACH of them, and it is where RL trainers usually run out of memory.
#
# Per row only two numbers matter: the target logit z_t and the log-normaliser lse = log sum_j exp z_j,
#
#     log p_t = z_t - lse                                                              (1)
#
# and the gradient of (1) with respect to the logits is the familiar
#
#     d log p_t / d z_j = onehot_j(t) - softmax_j(z)                                   (2)
#
# So the forward keeps only lse per row, and the backward recomputes the logits it needs (one more
# matmul: 4 instead of naive's 3) and turns them into softmax - onehot with the saved lse.
#
# The work is cut in tiles: a chunk of rows (chunk_size) times a slice of the vocabulary (vocab_tile).
# A tile's logits are a few MB, so everything done to them between the matmuls (max, exp, sums) runs
# in the CPU's cache instead of streaming 1.2 GB arrays through memory, and the weight gradient of a
# vocabulary slice is written once per row chunk. The price is that lse is built up tile by tile,
# the "online" log-sum-exp of flash attention: with m the running max and s = sum exp(z - m),
#
#     m' = max(m, max_tile z),   s' = s exp(m - m') + sum_tile exp(z - m'),   lse = m + log s    (3)
#
# Two more savings in the backward: the onehot part of (2) touches one logit per row, so it is added
# outside the tiles (a gather of W's target rows and an index_add into dW); and the upstream gradient
# g (one number per row) is folded into the rows before the dW matmul and applied to dh once per
# chunk, so a tile goes through exactly two elementwise passes (subtract lse, exp).
#
# Time: at V = 151,936 the four matmuls are nearly all of it; the naive path pays three matmuls plus
# its N x V passes (fresh 1.2 GB tensors, page faults, log-softmax, the gather's zero gradient, the
# softmax backward). Measured: `python bench.py fused`.


# Rows per chunk: the rows whose log-sum-exp is built up together, and the unit the weight gradient
# is accumulated over (dW of a vocabulary slice gets one update per chunk, so large is better).
CHUNK_SIZE = 2048
# Logits per tile (chunk_size x vocab_tile). CPU: 2^22 fp32 = 16 MB, small enough to stay near the
# cores, large enough that each matmul is still efficient (see the bench). GPU: 2^25 = 128 MB, where
# each extra tile costs kernel launches and the caches matter less.
TILE_ELEMENTS = {"cpu": 2**22, "gpu": 2**25}


def _default_vocab_tile(rows, vocab, device):
    budget = TILE_ELEMENTS["cpu" if device.type == "cpu" else "gpu"]
    return max(1, min(vocab, budget // max(rows, 1)))


def _tile_logits(weight_tile, rows, buffer):
    """Logits of a tile, TRANSPOSED ([vocab slice, rows] fp32), in the reusable flat buffer: W_tile @ rows.T measured
    faster than rows @ W_tile.T on this CPU, and the weight slice is then a contiguous block of rows of W."""
    logits_t = buffer[: weight_tile.shape[0] * rows.shape[0]].view(weight_tile.shape[0], rows.shape[0])
    if rows.dtype == buffer.dtype:
        torch.mm(weight_tile, rows.t(), out=logits_t)
    else:
        # bf16/fp16: the GEMM runs in the input dtype (fp32 accumulation inside it), the softmax
        # arithmetic in fp32 -- exactly what the naive `log_softmax(logits.float())` does.
        logits_t.copy_(weight_tile @ rows.t())
    return logits_t


class FusedLogprobs(torch.autograd.Function):
    """Autograd function for fused_logprobs; saves hidden, weight, targets and one lse per row.

    Inside, a tile's logits are [vocab slice, rows], so every per-row reduction is over dim 0."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, vocab_tile, temperature, return_entropy):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        # softmax and accumulation dtype: fp32 for fp32/bf16/fp16 inputs (float64 stays float64)
        float_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprobs = torch.empty(num_rows, dtype=float_dtype, device=hidden.device)
        log_normaliser = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if return_entropy else None
        buffer = torch.empty(vocab_tile * min(chunk_size, num_rows), dtype=float_dtype, device=hidden.device)
        # the entropy needs the logits and their exponentials at once: a second tile, logging only
        exp_buffer = torch.empty_like(buffer) if return_entropy else None

        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            # temperature is folded into the chunk's rows: W (h / T)^T = z / T, a C x D op, not V x C
            rows = hidden[start:end] / temperature if temperature != 1.0 else hidden[start:end]
            for first in range(0, vocab, vocab_tile):
                shifted = _tile_logits(weight[first:first + vocab_tile], rows, buffer)
                tile_max = shifted.amax(dim=0)
                if first == 0:
                    row_max, rescale = tile_max, None
                else:
                    new_max = torch.maximum(row_max, tile_max)
                    max_step, row_max = new_max - row_max, new_max
                    rescale = torch.exp(-max_step)
                shifted.sub_(row_max)
                if return_entropy:
                    # H = log s - t / s with t = sum e (z - m), e = exp(z - m), carried along with s: when m
                    # grows by d, each old term e (z - m) becomes exp(-d) e (z - m - d), so t' = exp(-d) (t - d s)
                    exps = torch.exp(shifted, out=exp_buffer[: shifted.numel()].view_as(shifted))
                    tile_sum, tile_weighted = exps.sum(dim=0), exps.mul_(shifted).sum(dim=0)
                    if rescale is None:
                        sum_exp, weighted = tile_sum, tile_weighted
                    else:
                        weighted = rescale * (weighted - max_step * sum_exp) + tile_weighted
                        sum_exp = rescale * sum_exp + tile_sum
                else:
                    tile_sum = shifted.exp_().sum(dim=0)
                    sum_exp = tile_sum if rescale is None else rescale * sum_exp + tile_sum   # eq. (3)
            log_normaliser[start:end] = row_max + sum_exp.log()
            if return_entropy:
                entropy[start:end] = sum_exp.log() - weighted / sum_exp
            # the target logit is one dot product per row, taken outside the tiles; eq. (1)
            target_logit = (rows.to(float_dtype) * weight[targets[start:end]].to(float_dtype)).sum(-1)
            logprobs[start:end] = target_logit - log_normaliser[start:end]

        ctx.save_for_backward(hidden, weight, targets, log_normaliser)
        ctx.chunk_size, ctx.vocab_tile, ctx.temperature = chunk_size, vocab_tile, temperature
        if return_entropy:
            ctx.mark_non_differentiable(entropy)
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, log_normaliser = ctx.saved_tensors
        chunk_size, vocab_tile, temperature = ctx.chunk_size, ctx.vocab_tile, ctx.temperature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        float_dtype = log_normaliser.dtype
        same_dtype = hidden.dtype == float_dtype
        grad_logprobs = grad_logprobs.to(float_dtype)

        # both accumulated in fp32 whatever the input dtype, cast once at the end. With z = (h/T) W^T and
        # dL/dz = g (onehot - p) by eq. (2):  dL/dh = g (W_t - p W) / T  and  dL/dW = (onehot - p)^T (g h/T).
        grad_hidden = torch.zeros(hidden.shape, dtype=float_dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=float_dtype, device=weight.device) if need_weight else None
        buffer = torch.empty(vocab_tile * min(chunk_size, num_rows), dtype=float_dtype, device=hidden.device)

        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            rows = hidden[start:end] / temperature if temperature != 1.0 else hidden[start:end]
            grad_rows = grad_logprobs[start:end, None]
            # the -p part of dL/dW needs g h / T, so g goes into the rows once instead of into every tile
            weighted_rows = rows * (-grad_rows).to(rows.dtype)
            # p W summed over the tiles, for dL/dh
            probs_times_weight = grad_hidden[start:end] if need_hidden else None
            for first in range(0, vocab, vocab_tile):
                weight_tile = weight[first:first + vocab_tile]
                logits_t = _tile_logits(weight_tile, rows, buffer)
                # softmax from the saved log-normaliser, in place: p = exp(z - lse)
                probs_t = logits_t.sub_(log_normaliser[start:end]).exp_()
                if not same_dtype:
                    probs_t = probs_t.to(rows.dtype)  # run the two GEMMs in bf16/fp16 too
                if need_hidden:
                    if same_dtype:
                        probs_times_weight.addmm_(probs_t.t(), weight_tile)
                    else:
                        probs_times_weight += probs_t.t() @ weight_tile
                if need_weight:
                    if same_dtype:
                        grad_weight[first:first + vocab_tile].addmm_(probs_t, weighted_rows)
                    else:
                        grad_weight[first:first + vocab_tile] += probs_t @ weighted_rows
            # the onehot part of eq. (2): one logit per row
            target_rows = targets[start:end]
            if need_hidden:
                probs_times_weight.mul_(-grad_rows).addcmul_(grad_rows, weight[target_rows].to(float_dtype))
                if temperature != 1.0:
                    probs_times_weight /= temperature
            if need_weight:
                grad_weight.index_add_(0, target_rows, grad_rows * rows.to(float_dtype))

        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_logprobs(hidden, weight, targets, chunk_size=CHUNK_SIZE, temperature=1.0, return_entropy=False,
                   vocab_tile=None):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] for each row i, as fp32 [N].

    hidden [N, D] and weight [V, D] (fp32, or bf16/fp16 with fp32 softmax and accumulation),
    targets [N] int64. Differentiable in hidden and weight; never holds more than
    chunk_size x vocab_tile logits (vocab_tile=None: TILE_ELEMENTS worth).
    Select the trainable rows (e.g. hidden[mask]) BEFORE calling: masked positions then cost nothing.
    With return_entropy=True also returns each row's entropy of softmax(logits / temperature),
    detached (for logging).
    """
    if chunk_size < 1 or (vocab_tile is not None and vocab_tile < 1):
        raise ValueError(f"fused_logprobs: chunk_size and vocab_tile must be >= 1, got {chunk_size}, {vocab_tile}")
    if vocab_tile is None:
        vocab_tile = _default_vocab_tile(min(chunk_size, hidden.shape[0]), weight.shape[0], weight.device)
    # the kernel picks its own precisions (GEMMs in weight's dtype, softmax and sums in fp32), so
    # autocast is switched off inside it; hidden is cast to weight's dtype (its gradient casts back)
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.to(weight.dtype)
        return FusedLogprobs.apply(hidden, weight, targets.long(), chunk_size, vocab_tile, float(temperature),
                                   return_entropy)
