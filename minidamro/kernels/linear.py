"""y = x W^T (+ b) in whichever exact formulation is fastest on this machine, among those it can run.

Decoding a token reads every weight once, so its speed is the speed at which the matrix-vector kernel reads
W, and that depends on the CPU, the BLAS build, the dtype, the shape and the number of rows. Measured on a
2-core AMD Zen 5 with MKL (torch 2.13): in float32, `F.linear` reads W at ~20 GB/s with one row and ~11 GB/s
with two, while `W @ x^T` with two rows reads at 30-37 GB/s, so even one row is faster padded to two; in
bfloat16 it is the other way round (`F.linear` ~29 GB/s with two rows, `W @ x^T` ~19) and `torch.mv` wins
on some shapes only. On Intel with AMX the order differs again. So nothing is hard-coded: the first call for
a (device, dtype, N, K, rows) times each formulation on a pool of weights of that shape larger than the
caches and keeps the fastest (choices.py: once per machine, kept in a cache file); `MINIDAMRO_LINEAR=<name>`
forces one. All compute the same sums; they may round differently (the order of the K products differs),
within the usual float bound of a K-term dot product.

Three kinds of input:
- decode steps (CPU, at most MAX_ROWS rows): one of FORMS, measured per shape and row count;
- GEMMs (more rows: prefills, the vision tower): `F.linear`, except that half-precision weights may be
  multiplied in float32 where this CPU has no fast half-precision GEMM (`gemm`): on an AVX2-only AMD Zen 3
  a bfloat16 GEMM ran at 1/8 of float32's speed (no oneDNN bf16 path; ATen's fallback is scalar). The
  products of two bf16 / fp16 numbers are exact in float32 and both paths accumulate in float32, so this only
  changes the order of the sums, once rounded to the dtype at the end, like any other formulation here;
- a layer holding a oneDNN-packed copy of its weight (chosen at load, `packing_pays`, llava.pack_linears),
  used then for every input.
Other devices always use `F.linear`, and so does everything in reference mode (choices.py).
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import MinidamroError
from . import choices, cpu

ENV = "MINIDAMRO_LINEAR"
MAX_ROWS = 2          # decode: 1 row plain, 2 rows DAMRO / VCD (both streams in one read of the weights)
POOL_BYTES = 64 << 20  # weights cycled while timing: twice a 32 MB L3, so the timing reads memory, not cache
MAX_COPIES = 64       # tiny shapes: their timing is call overhead anyway, keep it short
GEMM_SHAPE = (256, 1024, 1024)  # rows, N, K of the GEMM timed for the float32-GEMM decision (compute-bound)


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


FORMS = {"linear": _linear, "matmul": _matmul, "mv": _mv, "pad2": _pad2}  # ATen: every CPU runs them
ONE_ROW = ("mv", "pad2")  # forced with more rows, these fall back to "linear"
NAMES = (*FORMS, "packed")  # "packed": oneDNN on a prepacked copy of the weight, chosen at load (see below)


def candidates(rows: int) -> list[str]:
    return [name for name in FORMS if rows == 1 or name not in ONE_ROW]


def forced_name(env: str, names) -> str | None:
    """The formulation environment variable `env` forces, None for "auto" / unset; an unknown name is an error."""
    name = os.environ.get(env, "auto")
    if name == "auto":
        return None
    if name not in names:
        raise MinidamroError(f"{env}={name!r}: must be auto or one of {', '.join(names)}")
    return name


def forced() -> str | None:
    return forced_name(ENV, NAMES)


def best_time(f, reps: int, best: float = math.inf) -> float:
    """The shortest of `reps` wall-clock timings of f()."""
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved(forms: dict, reps: int) -> dict[str, float]:
    """Seconds of each callable in `forms`, the best of `reps` interleaved calls (a passing disturbance hits every
    candidate alike); one that raises is left out (choices.timed_candidates: unavailable here)."""
    best, names = {}, list(forms)
    for _ in range(reps):
        best |= choices.timed_candidates(names, lambda n: best_time(forms[n], 1, best.get(n, math.inf)))
        names = list(best)
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
    return interleaved({name: lambda f=FORMS[name]: [f(x, p, b) for p in pool] for name in candidates(rows)}, reps)


def choose(w, rows: int, has_bias: bool) -> str:
    return choices.decide(("linear", w.device.type, w.dtype, *w.shape, rows, has_bias),
                          lambda: choices.fastest(measure(w, rows, has_bias)), lambda: candidates(rows))


def gemm_in_float32(dtype) -> bool:
    """Whether a CPU GEMM with `dtype` weights is faster computed in float32 (inputs and weight upcast, the
    result rounded to dtype once): timed once per machine on a GEMM_SHAPE GEMM, compute-bound, so one shape
    in cache stands for all, and applied to every call of more than MAX_ROWS rows. The upcast itself costs
    about as much as the products of a couple of rows (it reads and writes the weight once), so where the
    native GEMM is several times slower (AVX2 only: 8.7 against 33 GFLOP/s at 128 rows, upcasts included) it
    pays from about two rows; where it is not, the decision is False for all row counts."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False

    def measure_gemm():
        rows, n, k = GEMM_SHAPE
        x, w = torch.ones(rows, k, dtype=dtype), torch.ones(n, k, dtype=dtype)
        t = interleaved({"native": lambda: F.linear(x, w), "float32": lambda: F.linear(x.float(), w.float())}, 3)
        return choices.fastest(t) == "float32"
    return choices.decide(("gemm in float32", dtype), measure_gemm)


def linear(x, w, b=None):
    """F.linear(x, w, b) for x (..., K), w (N, K), b (N,) or None -> (..., N), in the fastest formulation."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or choices.reference():
        return F.linear(x, w, b)
    if rows > MAX_ROWS:
        if gemm_in_float32(w.dtype):
            return F.linear(x.float(), w.float(), None if b is None else b.float()).to(w.dtype)
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
# oneDNN packs float32 on any x86-64 CPU it runs on, bfloat16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT
# (cpu.py); float16 packing is not offered (no CPU it was tested on had AVX-512 FP16).
PACKED_NEEDS = {torch.float32: "onednn", torch.bfloat16: "onednn_bf16"}


def _packed(x, packed, b):
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def pack(w):
    cpu.require(PACKED_NEEDS.get(w.dtype, "onednn_fp16"), f"oneDNN packing of a {w.dtype} weight")
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def can_pack(w) -> bool:
    return (w.device.type == "cpu" and w.dtype in PACKED_NEEDS and cpu.support().has(PACKED_NEEDS[w.dtype])
            and not choices.reference())


def packing_pays(w, rows: int | None = None) -> bool:
    """Whether to use a packed copy of w: forced by MINIDAMRO_LINEAR=packed (where this CPU can pack w's dtype);
    with auto, measured once per (dtype, N, K, rows) against the fastest unpacked formulation. rows None: a
    decoder layer, which serves every decode step, one row (plain) and two rows (DAMRO, VCD), so it is packed
    only if packing is no slower for either (a choice made on one row alone left two-row steps on a slower
    kernel). rows = R: a layer that only ever sees whole images of R tokens (the vision tower, the projector),
    packed if oneDNN's GEMM on the packed copy is no slower than the unpacked GEMM at R rows: bfloat16 ViT-L
    shapes at 577 rows took 0.70-0.79x F.linear's time on the Zen 5 machine (the same bits), float32 0.53-0.63x
    (MKL's sgemm runs there at half oneDNN's speed). Never in reference mode, for other devices, or where this
    CPU cannot pack the dtype."""
    name = forced()
    if name not in (None, "packed") or not can_pack(w):
        return False
    if name == "packed":
        return True
    key = ("packed", w.dtype, *w.shape) + (() if rows is None else (rows,))
    # timed on scratch weights: the real ones stay untouched (memory-mapped, not resident)
    return choices.decide(key, lambda: _packed_gemm_pays(w, rows) if rows is not None else _packed_decode_pays(w))


def _packed_decode_pays(w) -> bool:
    """Packed no slower than the fastest unpacked formulation for one row and for two, over a POOL_BYTES pool."""
    n, k = w.shape
    pool_rows = min(n, POOL_BYTES // (k * w.element_size()))
    copies = min(MAX_COPIES, math.ceil(POOL_BYTES / (pool_rows * k * w.element_size())))  # as measure's pool
    try:
        pool = [pack(torch.ones(pool_rows, k, dtype=w.dtype)) for _ in range(copies)]
    except RuntimeError as e:  # the build or CPU refuses after all: unavailable, not an error
        choices.mark_unavailable("packed", e)
        return False
    for r in range(1, MAX_ROWS + 1):
        eager = min(measure(torch.ones(pool_rows, k, dtype=w.dtype), r, False).values())
        x = torch.ones(r, k, dtype=w.dtype)
        t = choices.timed_candidates(["packed"], lambda _: best_time(lambda: [_packed(x, p, None) for p in pool], 2))
        if t.get("packed", math.inf) > eager:
            return False
    return True


def _packed_gemm_pays(w, rows: int) -> bool:
    """Packed no slower than the unpacked GEMM at `rows` rows (F.linear, in float32 where `gemm_in_float32`):
    compute-bound, so one weight in cache is representative. Three interleaved passes; the first warms up."""
    x, scratch = torch.ones(rows, w.shape[1], dtype=w.dtype), torch.ones(w.shape, dtype=w.dtype)
    try:
        p = pack(scratch)
    except RuntimeError as e:
        choices.mark_unavailable("packed", e)
        return False
    t = interleaved({"unpacked": lambda: linear(x, scratch), "packed": lambda: _packed(x, p, None)}, 3)
    return t.get("packed", math.inf) <= t["unpacked"]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose forward is `linear` above, or oneDNN on a packed
    copy of the weight once `packed` is set (see llava.load_model)."""
    packed = None

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) computes from its own weight: it may be changed or converted (the tests'
        # mutated and float64 copies), and oneDNN's packed tensor cannot be copied anyway.
        return {k: v for k, v in super().__getstate__().items() if k != "packed"}

    def forward(self, x):
        if self.packed is not None and not choices.reference():
            return _packed(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias)
