"""Attention capture: the explicit hook that DAMRO's outlier selection and the analysis tools use.

A caller builds a `Capture` naming the layers it wants and passes it to a forward. Only those layers
compute attention probabilities by hand (matmul, float32 softmax, matmul, as transformers' eager path
does); every other layer, and every forward called without a capture, stores nothing and takes SDPA or
the eager formulation, whichever kernels/attention.py measured faster.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class Capture:
    vit_layers: tuple[int, ...] = ()     # ViT encoder layers (0-based) whose attention probabilities to keep
    vit_qk_layers: tuple[int, ...] = ()  # ViT encoder layers whose q_proj / k_proj outputs to keep
    llm_layers: tuple[int, ...] = ()     # LLM decoder layers (0-based) whose attention probabilities to keep
    qformer_layers: tuple[int, ...] = ()  # InstructBLIP: Q-Former layers whose cross-attention to keep

    vit_attn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, T, T)
    vit_q: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> (B, T, D), bias included
    vit_k: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> (B, T, D)
    # layer -> one (H, T, S) tensor per stream per forward call, in call order (T new queries, S keys)
    llm_attn: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # layer -> (B, H, queries, image tokens): which image tokens InstructBLIP's 32 queries read
    qformer_cross_attn: dict[int, torch.Tensor] = field(default_factory=dict)


def causal_mask(start: int, T: int, dtype, device=None):
    """The additive mask of T new queries at positions start .. start + T - 1 over keys 0 .. start + T - 1, as
    transformers builds it: 0 where a query may attend, the dtype's most negative value above the diagonal."""
    pos, keys = torch.arange(start, start + T, device=device), torch.arange(start + T, device=device)
    return torch.zeros(T, start + T, dtype=dtype, device=device).masked_fill(keys[None] > pos[:, None],
                                                                              torch.finfo(dtype).min)


def eager_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v with the softmax in float32, as transformers' eager attention.

    q: (B, H, T, d), k, v: (B, H, S, d), mask: additive, broadcastable to (B, H, T, S).
    Returns the output (B, H, T, d) and the probabilities (B, H, T, S) in q's dtype.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), probs
