"""y = x W^T (+ b) and the decoder's attention, in whichever exact formulation is fastest on this machine.

Decoding a token reads every weight once, so its speed is the speed at which the matrix-vector kernel reads
W, and that depends on the CPU, the BLAS build, the dtype, the shape and the number of rows. Measured on a
2-core AMD Zen 5 with MKL (torch 2.13): in float32, `F.linear` reads W at ~20 GB/s with one row and ~11 GB/s
with two, while `W @ x^T` with two rows reads at 30-37 GB/s, so even one row is faster padded to two; in
bfloat16 it is the other way round (`F.linear` ~29 GB/s with two rows, `W @ x^T` ~19) and `torch.mv` wins
on some shapes only. On Intel with AMX the order differs again. So nothing is hard-coded: the first call
for a (device, dtype, N, K, rows) times each formulation on a pool of weights of that shape larger than the
caches, keeps the fastest for the rest of the process (a few tens of milliseconds once per shape), and
`MINIDAMRO_LINEAR=<name>` forces one for reproduction. All compute the same sums; they may round differently
(the order of the K products differs), within the usual float bound of a K-term dot product.

Only CPU inputs of at most MAX_ROWS rows (decode steps) are tuned or forced; prefill (many rows, a GEMM) and
other devices always use `F.linear`. Apart from these, a layer can hold a oneDNN-packed copy of its weight
(chosen at load, see `packing_pays` and llava.pack_linears), used then for every input: chosen by decode
speed for the decoder, by GEMM speed for the vision tower and the projector, which only see whole images.
The decoder's attention is chosen the same way, for decode steps and for prefills apart (see `attention`).
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import MinidamroError
from .capture import causal_mask, eager_attention

ENV = "MINIDAMRO_LINEAR"
MAX_ROWS = 2          # decode: 1 row plain, 2 rows DAMRO / VCD (both streams in one read of the weights)
POOL_BYTES = 64 << 20  # weights cycled while timing: twice a 32 MB L3, so the timing reads memory, not cache
MAX_COPIES = 64       # tiny shapes: their timing is call overhead anyway, keep it short


def _linear(x, w, b):
    return F.linear(x, w, b)


def _matmul(x, w, b):  # W @ x^T: BLAS sees W untransposed, a different kernel than F.linear's x @ W^T
    y = (w @ x.T).T
    return y if b is None else y + b


def _mv(x, w, b):  # one row only
    y = torch.mv(w, x[0])[None]
    return y if b is None else y + b


def _pad2(x, w, b):  # one row only: repeated to two rows so that the two-row W @ x^T kernel serves it
    y = (w @ x.expand(2, -1).contiguous().T)[:, 0][None]
    return y if b is None else y + b


FORMS = {"linear": _linear, "matmul": _matmul, "mv": _mv, "pad2": _pad2}
ONE_ROW = ("mv", "pad2")  # forced with more rows, these fall back to "linear"
NAMES = (*FORMS, "packed")  # "packed": oneDNN on a prepacked copy of the weight, chosen at load (see below)
_chosen: dict = {}        # (device, dtype, N, K, rows, bias) -> name: the process-wide cache of measurements


def chosen() -> dict:
    """What this process has measured and chosen so far, "device dtype N K rows bias" -> formulation (the
    benchmark records it: choices, and so the last bits and the speed, can differ between processes); the
    packing decisions appear as "packed dtype N K" (decoder layers) or "packed dtype N K rows" (image layers)
    -> True or False."""
    return {" ".join(map(str, key)): name for key, name in _chosen.items()}


def candidates(rows: int) -> list[str]:
    return [name for name in FORMS if rows == 1 or name not in ONE_ROW]


def _forced(env: str, names) -> str | None:
    """The formulation environment variable `env` forces, None for "auto" / unset; an unknown name is an error."""
    name = os.environ.get(env, "auto")
    if name == "auto":
        return None
    if name not in names:
        raise MinidamroError(f"{env}={name!r}: must be auto or one of {', '.join(names)}")
    return name


def forced() -> str | None:
    return _forced(ENV, NAMES)


def _best_time(f, reps: int, best: float = math.inf) -> float:
    """The shortest of `reps` wall-clock timings of f()."""
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def measure(w, rows: int, has_bias: bool, reps: int = 2) -> dict[str, float]:
    """Seconds per call of each candidate, the best of `reps` interleaved passes over POOL_BYTES of weights
    of w's width and dtype: row blocks of w itself if it is that large (the kernels' speed per byte does not
    depend on N once N is large), else scratch copies of w's shape. About 10 ms per candidate at 30 GB/s."""
    n, k = w.shape
    size = w.numel() * w.element_size()
    if size >= POOL_BYTES:
        pool = [w[:POOL_BYTES // (k * w.element_size())]]
    else:
        copies = min(MAX_COPIES, math.ceil(POOL_BYTES / size))
        pool = list(torch.ones(copies, n, k, dtype=w.dtype, device=w.device).unbind())  # written: real pages
    x = torch.ones(rows, k, dtype=w.dtype, device=w.device)  # the values do not change the speed
    b = torch.zeros(pool[0].shape[0], dtype=w.dtype, device=w.device) if has_bias else None
    best = {}
    for _ in range(reps):  # interleaved: a passing disturbance hits every candidate alike
        for name in candidates(rows):
            best[name] = _best_time(lambda: [FORMS[name](x, p, b) for p in pool], 1, best.get(name, math.inf))
    return best


def choose(w, rows: int, has_bias: bool) -> str:
    key = (w.device.type, w.dtype, *w.shape, rows, has_bias)
    if key not in _chosen:
        t = measure(w, rows, has_bias)
        _chosen[key] = min(t, key=t.get)
    return _chosen[key]


def linear(x, w, b=None):
    """F.linear(x, w, b) for x (..., K), w (N, K), b (N,) or None -> (..., N), in the fastest formulation."""
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or x.device.type != "cpu":
        return F.linear(x, w, b)
    name = forced()
    if name is None or name == "packed":  # a weight that was not packed: the measured choice
        name = choose(w, rows, b is not None)
    if name in ONE_ROW and rows != 1:
        name = "linear"
    y = FORMS[name](x.reshape(rows, x.shape[-1]), w, b)
    return y.reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------- prepacked weights (oneDNN)
# A weight reordered once into oneDNN's blocked layout (what torch.compile's `freezing` does) is read much
# faster: bfloat16 LLaMA-7B MLP weights at 26-27 GB/s per CPU second against 15-17 for F.linear on the Zen 5
# machine, with outputs bitwise equal to F.linear there, for 1, 2 and 600 rows. The packed copy is a second
# copy of the weight, so the loader packs from a copy read from the file (never touching the memory-mapped
# original, which then costs no memory) and `forward` reads only the packed one, for every number of rows.
def _packed(x, packed, b):
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def pack(w):
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def packing_pays(w, rows: int | None = None) -> bool:
    """Whether to use a packed copy of w: forced by MINIDAMRO_LINEAR=packed; with auto, measured once per
    (dtype, N, K, rows) against the fastest unpacked formulation. rows None: a decoder layer, which serves every
    decode step, one row (plain) and two rows (DAMRO, VCD), so it is packed only if packing is no slower for
    either (a choice made on one row alone left two-row steps on a slower kernel). rows = R: a layer that only
    ever sees whole images of R tokens (the vision tower, the projector), packed if oneDNN's GEMM on the packed
    copy is no slower than F.linear's at R rows: bfloat16 ViT-L shapes at 577 rows took 0.70-0.79x F.linear's
    time on the Zen 5 machine (the same bits), float32 0.53-0.63x (MKL's sgemm runs there at half oneDNN's
    speed). Never for other devices, or where oneDNN lacks the dtype (float16 needs AVX-512 FP16)."""
    name = forced()
    if name not in (None, "packed") or w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if w.dtype not in (torch.float32, torch.bfloat16):
        return False
    if name == "packed":
        return True
    key = ("packed", w.dtype, *w.shape) + (() if rows is None else (rows,))
    if key not in _chosen:  # timed on scratch weights: the real ones stay untouched (memory-mapped, not resident)
        _chosen[key] = _packed_gemm_pays(w, rows) if rows is not None else _packed_decode_pays(w)
    return _chosen[key]


def _packed_decode_pays(w) -> bool:
    """Packed no slower than the fastest unpacked formulation for one row and for two, over a POOL_BYTES pool."""
    n, k = w.shape
    pool_rows = min(n, POOL_BYTES // (k * w.element_size()))
    copies = min(MAX_COPIES, math.ceil(POOL_BYTES / (pool_rows * k * w.element_size())))  # as measure's pool
    pool = [pack(torch.ones(pool_rows, k, dtype=w.dtype)) for _ in range(copies)]
    for r in range(1, MAX_ROWS + 1):
        eager = min(measure(torch.ones(pool_rows, k, dtype=w.dtype), r, False).values())
        x = torch.ones(r, k, dtype=w.dtype)
        if _best_time(lambda: [_packed(x, p, None) for p in pool], reps=2) > eager:
            return False
    return True


def _packed_gemm_pays(w, rows: int) -> bool:
    """Packed no slower than F.linear at `rows` rows: a GEMM, compute-bound, so one weight in cache is
    representative. Three interleaved passes; the first warms both up."""
    x, scratch = torch.ones(rows, w.shape[1], dtype=w.dtype), torch.ones(w.shape, dtype=w.dtype)
    p = pack(scratch)
    t = {}
    for _ in range(3):
        t["linear"] = _best_time(lambda: F.linear(x, scratch), 1, t.get("linear", math.inf))
        t["packed"] = _best_time(lambda: _packed(x, p, None), 1, t.get("packed", math.inf))
    return t["packed"] <= t["linear"]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose forward is `linear` above, or oneDNN on a packed
    copy of the weight once `packed` is set (see llava.load_model)."""
    packed = None

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) computes from its own weight: it may be changed or converted (the tests'
        # mutated and float64 copies), and oneDNN's packed tensor cannot be copied anyway.
        return {k: v for k, v in super().__getstate__().items() if k != "packed"}

    def forward(self, x):
        if self.packed is not None:
            return _packed(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- the decoder's attention (decode and prefill)
# A decode step attends one query over the whole KV cache. torch's fused SDPA kernel is not always the fastest
# way: on a 2-core AMD Zen 5 (torch 2.13, one thread) one 7B-shaped layer (32 heads x 128, 600 positions) took
# ~3.4 ms in bfloat16 with SDPA against ~0.7-1.7 ms with transformers' eager formulation (two batched matmuls
# and a float32 softmax), while in float32 SDPA was the faster (~0.7-1.4 ms against ~1.8-2.3). A prefill (T > 1
# causal queries) differs again: the same layer's 590-token bfloat16 prefill took ~30 ms with SDPA's flash loop
# (2 threads), ~38 ms eager over the whole (T, T) score matrix (the float32 softmax of 11M scores is most of
# it), and 12-20 ms eager taken PREFILL_BLOCK query rows at a time, each block over the keys up to its last row
# only: the scores above the diagonal are never computed, nor their softmax. So, as for the linears, the first
# decode step and the first prefill of a (dtype, heads, kv heads, head_dim, threads) each time both forms on
# scratch tensors laid out as a KV cache (~40 ms, resp. ~0.2 s, once at the 7B shape; a few ms at small ones),
# keep the faster for the process, and MINIDAMRO_ATTENTION=sdpa|eager forces one for both. "sdpa" is exactly
# transformers' SDPA call. "eager" is transformers' eager attention: the same call for a decode step (its bits
# equal HF eager's); for a prefill, row for row the same sums (a masked score adds an exact 0 to the softmax
# and to the product with v), but on row blocks, so the BLAS sees other shapes and may round differently.
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
    return _forced(ATTENTION_ENV, ATTENTION_FORMS)


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
    for f in ATTEND.values():
        f(q, k, v, scratch, mask)
    best = {}
    for _ in range(reps):
        for name, f in ATTEND.items():
            best[name] = _best_time(lambda: f(q, k, v, scratch, mask), 1, best.get(name, math.inf))
    return best


def attention(q, k, v, scratch=None, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v for T new queries, the cache's last T positions: q (1, H, T, d), k, v
    (1, Hkv, S, d) -> (1, H, T, d). mask: the (T, S) causal mask (capture.causal_mask) when T > 1; None for a
    decode step, which sees every key. SDPA or the eager formulation, whichever is faster here for a decode step, resp. a prefill (CPU only; other
    devices, and forwards that need gradients, take SDPA). scratch: room for the eager form's contiguous k and
    v (2, >= H S d), reused across calls (KVCache.scratch)."""
    name = forced_attention()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        name = "sdpa"  # the eager form writes into a reused scratch, which autograd cannot follow
    elif name is None:
        if q.device.type != "cpu":
            name = "sdpa"
        else:
            decode = q.shape[2] == 1
            key = ("attention" if decode else "prefill attention", q.dtype, q.shape[1], k.shape[1], q.shape[-1],
                   torch.get_num_threads())
            if key not in _chosen:
                t = (measure_attention(q.dtype, q.shape[1], k.shape[1], q.shape[-1]) if decode else
                     measure_attention(q.dtype, q.shape[1], k.shape[1], q.shape[-1], PREFILL_POSITIONS,
                                       PREFILL_POSITIONS, reps=2))
                _chosen[key] = min(t, key=t.get)
            name = _chosen[key]
    return ATTEND[name](q, k, v, scratch, mask)
