"""The decoder's attention, softmax(q k^T / sqrt(d) + mask) v, in whichever exact formulation is fastest here.

A decode step attends one query over the whole KV cache. torch's fused SDPA kernel is not always the fastest
way: on a 2-core AMD Zen 5 (torch 2.13, one thread) one 7B-shaped layer (32 heads x 128, 600 positions) took
~3.4 ms in bfloat16 with SDPA against ~0.7-1.7 ms with transformers' eager formulation (two batched matmuls
and a float32 softmax), while in float32 SDPA was the faster (~0.7-1.4 ms against ~1.8-2.3). A prefill (T > 1
causal queries) differs again: the same layer's 590-token bfloat16 prefill took ~30 ms with SDPA's flash loop
(2 threads), ~38 ms eager over the whole (T, T) score matrix (the float32 softmax of 11M scores is most of
it), and 12-20 ms eager taken PREFILL_BLOCK query rows at a time, each block over the keys up to its last row
only: the scores above the diagonal are never computed, nor their softmax. So, as for the linears, the first
decode step and the first prefill of a (dtype, heads, kv heads, head_dim, threads) each time both forms on
scratch tensors laid out as a KV cache (~40 ms, resp. ~0.2 s, once at the 7B shape; a few ms at small ones),
keep the faster (for good: choices.py), and MINIDAMRO_ATTENTION=sdpa|eager forces one for both. "sdpa" is exactly
transformers' SDPA call. "eager" is transformers' eager attention: the same call for a decode step (its bits
equal HF eager's); for a prefill, row for row the same sums (a masked score adds an exact 0 to the softmax
and to the product with v), but on row blocks, so the BLAS sees other shapes and may round differently.

Both forms run on every CPU (ATen); the choice is kept per machine like every other (choices.py), and reference
mode takes SDPA unless MINIDAMRO_ATTENTION forces eager.
"""
import torch
import torch.nn.functional as F

from ..capture import causal_mask, eager_attention
from . import choices
from .linear import forced_name, interleaved

ATTENTION_ENV = "MINIDAMRO_ATTENTION"
ATTENTION_FORMS = ("sdpa", "eager")
MEASURE_POSITIONS = 768  # a representative cache: LLaVA-1.5's 576 image tokens, a prompt and an answer
PREFILL_POSITIONS = 512  # the prefill timed (a prompt with an image is ~600 tokens; the timing grows as T^2)
PREFILL_BLOCK = 128      # query rows per block of the eager prefill (64-128 were fastest at the 7B shape)


def _attend_sdpa(q, k, v, scratch=None, mask=None):
    # A prefill from position 0 (S == T) is plainly causal: is_causal, as transformers' SDPA path passes it, lets
    # the fused kernel skip the key blocks above the diagonal (the same outputs as with the mask).
    causal = 1 < q.shape[2] == k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _attend_eager(q, k, v, scratch=None, mask=None):
    """k and v are first copied into `scratch` (2, >= H S d), contiguous, each k/v head repeated for its group
    of H / Hkv query heads as transformers' repeat_kv does (so the matmuls see HF's own operands; a grouped
    matmul without the repeat sums in another order, and its float32 bits differ from HF eager's). Contiguous
    matters: a KVCache slice has its heads max_len positions apart, and torch's bfloat16 batched matmul over
    such strides took 1.7 ms per 7B layer for q k^T on the Zen 5 machine against 0.13 ms contiguous. And a
    reused scratch matters: fresh 5 MB copies per layer were page-faulted in again on most calls (0.7 -> 1-5 ms).
    T > 1 queries (the cache's last T positions) attend causally under `mask`, block by block (see above)."""
    _, Hkv, S, d = k.shape
    H, T = q.shape[1], q.shape[2]
    if scratch is None:
        scratch = torch.empty(2, H * S * d, dtype=k.dtype, device=k.device)
    kc, vc = scratch[:, :H * S * d].view(2, Hkv, H // Hkv, S, d).unbind()
    kc.copy_(k[0, :, None].expand_as(kc))  # (Hkv, rep, S, d): head h of the result is kv head h // rep
    vc.copy_(v[0, :, None].expand_as(vc))
    k, v = kc.view(1, H, S, d), vc.view(1, H, S, d)
    if T == 1:
        return eager_attention(q, k, v, mask)[0]  # the probabilities are not kept
    out = torch.empty_like(q)
    for a in range(0, T, PREFILL_BLOCK):
        b = min(T, a + PREFILL_BLOCK)
        end = S - T + b  # keys after the block's last row are masked for all of its rows
        out[:, :, a:b] = eager_attention(q[:, :, a:b], k[:, :, :end], v[:, :, :end], mask[a:b, :end])[0]
    return out


ATTEND = {"sdpa": _attend_sdpa, "eager": _attend_eager}


def forced_attention() -> str | None:
    return forced_name(ATTENTION_ENV, ATTENTION_FORMS)


def measure_attention(dtype, heads: int, kv_heads: int, head_dim: int, positions: int = MEASURE_POSITIONS,
                      queries: int = 1, reps: int = 5) -> dict[str, float]:
    """Seconds per call of each formulation for `queries` new queries (1: a decode step; more: a prefill from
    position 0, causal) over `positions` cached keys, the best of `reps` interleaved calls after one warm-up
    call each. k and v are laid out as a KVCache's: slices of a buffer of more positions (the speed depends on
    the strides)."""
    q = torch.ones(1, heads, queries, head_dim, dtype=dtype)  # the values do not change the speed
    k, v = torch.ones(2, 1, kv_heads, positions + 64, head_dim, dtype=dtype)[:, :, :, :positions]
    scratch = torch.zeros(2, heads * positions * head_dim, dtype=dtype)  # written: real pages, as a reused one
    mask = causal_mask(positions - queries, queries, dtype) if queries > 1 else None
    forms = {name: lambda f=f: f(q, k, v, scratch, mask) for name, f in ATTEND.items()}
    return interleaved(forms, reps + 1)  # one more pass: the first, slower one warms up and never wins


def attention(q, k, v, scratch=None, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v for T new queries, the cache's last T positions: q (1, H, T, d), k, v
    (1, Hkv, S, d) -> (1, H, T, d). mask: the (T, S) causal mask (capture.causal_mask) when T > 1; None for a
    decode step, which sees every key. SDPA or the eager formulation, whichever is faster here for a decode
    step, resp. a prefill (CPU only; other devices, reference mode and forwards that need gradients take SDPA). scratch: room for the eager form's contiguous k and
    v (2, >= H S d), reused across calls (KVCache.scratch)."""
    name = forced_attention()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        name = "sdpa"  # the eager form writes into a reused scratch, which autograd cannot follow
    elif name is None:
        if q.device.type != "cpu" or choices.reference():
            name = "sdpa"
        else:
            dtype, heads, kv_heads, head_dim = q.dtype, q.shape[1], k.shape[1], q.shape[-1]
            if q.shape[2] == 1:
                name = choices.decide(("attention", dtype, heads, kv_heads, head_dim), lambda: choices.fastest(
                    measure_attention(dtype, heads, kv_heads, head_dim)), ATTENTION_FORMS)
            else:
                name = choices.decide(("prefill attention", dtype, heads, kv_heads, head_dim), lambda: choices.fastest(
                    measure_attention(dtype, heads, kv_heads, head_dim, PREFILL_POSITIONS, PREFILL_POSITIONS, reps=2)),
                    ATTENTION_FORMS)
    return ATTEND[name](q, k, v, scratch, mask)
