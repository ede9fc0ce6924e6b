"""The LLaMA decoder of LLaVA-1.5 (Vicuna-7B in the released model), with an explicit KV cache.

Submodule names follow Hugging Face's `LlamaModel`. The cache is an object the caller owns and passes
in: DAMRO decodes two sequences of different lengths side by side, each with its own `KVCache`, and
`forward` takes one cache per batch row. The linear layers see all rows at once (one read of the
weights serves both DAMRO streams); attention runs per row against that row's own cache, so rows never
need padding or masks.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Capture, causal_mask, eager_attention
from .kernels.attention import attention
from .kernels.int8 import Int8Linear
from .kernels.linear import Linear


@dataclass
class TextConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads means grouped-query attention
    head_dim: int = 128
    vocab_size: int = 32064        # llava-hf pads the 32002 used ids to a multiple of 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    quantization: str = ""         # "int8": the linear layers (and lm_head) hold int8 weights (kernels/int8.py)


def linear_layer(cfg: TextConfig):
    """The class of the decoder's linear layers: weight-only int8 where the checkpoint was converted so."""
    return Int8Linear if cfg.quantization == "int8" else Linear


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos, sin of shape (T, head_dim) for integer positions (T,), computed in float32 (HF's default RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[:, None].float() * inv_freq  # (T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)        # rotate-half layout: both halves share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: (H, T, hd); rotate_half(x) = cat(-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of one sequence, for every layer, in buffers allocated once.

    k, v: (num_layers, num_kv_heads, max_len, head_dim); `length` positions are filled. The next token
    written goes to position `length`, which is also its RoPE position. cos, sin: (max_len, head_dim), the
    rotation of every position the cache can hold, computed once here rather than at every step. scratch:
    (2, num_attention_heads * max_len * head_dim), see below.
    """

    def __init__(self, cfg: TextConfig, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.cos, self.sin = rope_cos_sin(torch.arange(max_len, device=device), cfg.head_dim, cfg.rope_theta, dtype)
        # One layer's keys and values copied contiguous (heads repeated for GQA), reused by every layer when a
        # decode step or a prefill takes the eager formulation (kernels.attention); otherwise never touched,
        # so not resident.
        self.scratch = torch.empty(2, cfg.num_attention_heads * max_len * cfg.head_dim, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, k, v):
        """Store k, v (num_kv_heads, T, head_dim) after the filled part; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 and cast back *before* the weight multiply, as HF does (the order matters
        # for exactness in float16 / bfloat16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        Lin = linear_layer(cfg)
        self.q_proj = Lin(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = Lin(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = Lin(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = Lin(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, layer: int, caches: list[KVCache], masks: list, capture: Capture | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        want = capture is not None and layer in capture.llm_layers
        out = []
        for b, cache in enumerate(caches):  # each row attends to its own sequence only
            cos, sin = cache.cos[cache.length:cache.length + T], cache.sin[cache.length:cache.length + T]
            keys, values = cache.update(layer, apply_rope(k[b], cos, sin), v[b])  # (Hkv, S, hd)
            qb = apply_rope(q[b], cos, sin)[None]  # (1, H, T, hd)
            if want:
                # GQA: each group of n_heads / n_kv query heads shares one k/v head (HF's repeat_kv).
                rep = self.n_heads // self.n_kv
                keys, values = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)
                y, probs = eager_attention(qb, keys[None], values[None], masks[b])
                capture.llm_attn.setdefault(layer, []).append(probs[0])
            else:  # SDPA or the eager formulation, whichever is faster on this machine (decode and prefill apart)
                y = attention(qb, keys[None], values[None], cache.scratch, masks[b])
            out.append(y)
        y = (out[0] if B == 1 else torch.cat(out)).transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        Lin = linear_layer(cfg)
        self.gate_proj = Lin(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Lin(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Lin(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, layer, caches, masks, capture):
        x = x + self.self_attn(self.input_layernorm(x), layer, caches, masks, capture)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, caches: list[KVCache], capture: Capture | None = None):
        """x: (B, T, D) input embeddings, row b continuing the sequence in caches[b]. Returns (B, T, D).

        Every row has T new tokens. Each cache grows by T; a row's positions continue from its own length.
        """
        B, T, _ = x.shape
        if len(caches) != B:
            raise ValueError(f"{B} rows need {B} caches, got {len(caches)}")
        masks = []
        for cache in caches:  # built once per forward, shared by every layer
            if cache.length + T > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} positions; {cache.length + T} needed")
            # Causal mask over (T new queries, length + T keys); none for a single new token, which sees
            # everything. (SDPA takes is_causal instead for a prefill from position 0: kernels/attention.py.)
            masks.append(None if T == 1 else causal_mask(cache.length, T, x.dtype, x.device))
        for i, layer in enumerate(self.layers):
            x = layer(x, i, caches, masks, capture)
        for cache in caches:
            cache.length += T
        return self.norm(x)
