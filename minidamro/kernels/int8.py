"""Weight-only int8 linear layers: y = x (s * Q)^T (+ b), Q int8 (N, K), s float32 (N,), one scale per output row.

Decoding reads every weight once per token, so on a CPU the weights' bytes set its speed and its memory, and
int8 halves bfloat16's (LLaVA-1.5-7B's decoder and lm_head: 6.6 GB instead of 13.2). gpt-fast and torchao ship the same
weight-only scheme; llama.cpp's Q8_0 is its block-scaled cousin. Opt-in: `weights_convert.py --quantize int8`
writes the decoder's linear weights and lm_head this way (the vision tower and the projector keep their dtype:
they run once per image), and a checkpoint whose config says so loads these layers as `Int8Linear`. Nothing is
ever quantised silently at load.

Quantisation (`quantize`, once, deterministic): symmetric round-to-nearest per output row, in float32 from the
stored weights,

    s_n = max_k |W_nk| / 127   (1 for an all-zero row),   Q_nk = round(W_nk / s_n)   (ties to even, |Q| <= 127)

so every weight is off by at most half a step, |s_n Q_nk - W_nk| <= s_n / 2, and a layer's output by at most
(s_n / 2) sum_k |x_k| before the float rounding of the sums (tests/test_int8.py holds each formulation to it).

Formulations, chosen like linear.py's (measured once per machine, kept by choices.py; MINIDAMRO_INT8 forces):
- "int8pack": torch.ops.aten._weight_int8pack_mm, ATen's CPU kernel that reads the int8 weights directly, with x
  and the scales in x's dtype (so in bfloat16 each scale is rounded once more, by at most 2^-8 of itself). It
  needs that operator in the torch build (cpu.Support.int8pack). Its fast path is for half-precision
  activations: on an AVX2-only AMD Zen 3 (torch 2.13) it read 14.1 GB/s of int8 weights for one bfloat16 row
  and 10.9 for two, but 1.3 and 0.7 with float32 activations, where the measurement then picks "dequant": an
  int8 checkpoint is meant to run with --dtype bfloat16;
- "dequant": F.linear(x, s * Q) with the weight dequantised to float32 for the call: any device and any build,
  and the prefill's GEMMs (many rows) where that is faster (a float32 GEMM, as linear.gemm_in_float32).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import choices, cpu
from .linear import MAX_ROWS, POOL_BYTES, forced_name, interleaved

ENV = "MINIDAMRO_INT8"


def quantize(w: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> Q int8 (N, K), s float32 (N,): symmetric round-to-nearest per output row (see above), `block`
    rows at a time (the float32 temporaries of a 32000 x 4096 lm_head would otherwise take ~1.5 GB)."""
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0], dtype=torch.float32)
    for a in range(0, w.shape[0], block):
        wb = w[a:a + block].float()
        sb = wb.abs().amax(dim=1) / 127
        s[a:a + block] = sb = torch.where(sb > 0, sb, torch.ones_like(sb))
        q[a:a + block] = torch.round(wb / sb[:, None]).clamp_(-127, 127)
    return q, s


def _int8pack(x, q, s, b):
    cpu.require("int8pack", "torch.ops.aten._weight_int8pack_mm")
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, s.to(x.dtype))
    return y if b is None else y + b


def _dequant(x, q, s, b):
    # q * s promotes to float32 in one pass (the same values as q.float() * s, without a second temporary)
    y = F.linear(x.float(), q * s[:, None], None if b is None else b.float())
    return y.to(x.dtype)


FORMULAS = {"int8pack": _int8pack, "dequant": _dequant}
FORMS = tuple(FORMULAS)


def forced() -> str | None:
    return forced_name(ENV, FORMS)


def available() -> list[str]:
    return [name for name in FORMS if name != "int8pack" or cpu.support().has("int8pack")]


def measure(q, s, rows: int, dtype, reps: int = 2) -> dict[str, float]:
    """Seconds per call of each available form on `rows` rows: decode steps (rows <= MAX_ROWS) over a pool of
    POOL_BYTES of int8 weights of q's width (memory-bound), a GEMM on q itself (compute-bound)."""
    n, k = q.shape
    if rows <= MAX_ROWS:
        copies = max(1, min(64, POOL_BYTES // (n * k)))
        pool = [(torch.ones(n, k, dtype=torch.int8), s) for _ in range(copies)]
    else:
        pool = [(q, s)]
    x = torch.ones(rows, k, dtype=dtype)
    forms = {name: lambda f=FORMULAS[name]: [f(x, qq, ss, None) for qq, ss in pool] for name in available()}
    return interleaved(forms, reps)


def choose(q, s, rows: int, dtype) -> str:
    """Decode steps per row count; GEMMs by size, timed at 32 rows for up to 64 (a short prompt, DAMRO's outlier
    stream) and at 512 above (an image prompt): "dequant" converts the whole weight once per call, which a
    long prompt amortises and a short one does not (at LLaMA-7B's 11008 x 4096 with 590 bfloat16 rows on the
    Zen 3: dequant 0.59 s, int8pack 0.82)."""
    if rows <= MAX_ROWS:
        key, timed = ("int8", "decode", dtype, *q.shape, rows), rows
    else:
        timed = 32 if rows <= 64 else 512
        key = ("int8", "gemm", dtype, *q.shape, f"rows~{timed}")
    return choices.decide(key, lambda: choices.fastest(measure(q, s, timed, dtype)), available)


def int8_linear(x, q, s, b=None):
    """x (..., K) @ (s * q)^T + b -> (..., N) in x's dtype."""
    rows = x.numel() // x.shape[-1]
    name = forced()
    if x.device.type != "cpu" or choices.reference():
        name = "dequant"
    elif name is None or name not in available():
        name = choose(q, s, rows, x.dtype)
    y = FORMULAS[name](x.reshape(rows, x.shape[-1]), q, s, b)
    return y.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-row float32 scales; state_dict keys `weight` (int8) and
    `weight_scale` (and `bias`), as weights_convert.py --quantize int8 writes them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return int8_linear(x, self.weight, self.weight_scale, self.bias)
