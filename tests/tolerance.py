"""Float tolerances derived from the rounding of the computation checked, not fixed constants.

A parity test compares two evaluations of the same arithmetic in the same precision (minidamro and
transformers, or minidamro's cached and recomputed paths). They differ only where summation order and
kernels differ, and those depend on the CPU, the BLAS build, the ATen CPU capability and the thread count.
A fixed tolerance (rtol 1e-5 / atol 1e-6 before) is too tight for some machines and too loose for others.

The rule used here. For a stage output y (ViT hidden state, projector output, logits, attention
probabilities, q/k ...) the test also evaluates the same computation in float64 (transformers, or minidamro,
on the same weights and inputs): to float32's or bfloat16's eyes that is the exact value y*. The rounding
error this very computation makes in the precision checked is then measured, on this machine and path:

    E = max |y_ref - y*|                    (y_ref: the reference implementation in the precision checked)

A priori, a product of K terms carries at most gamma_K |a|.|b| (gamma_K = K u / (1 - K u), u the unit
roundoff: 2^-24 for float32), and the stages before add theirs, amplified by what follows (layer norms,
softmax); E is what those rounding errors actually sum to, with the true K, magnitudes and amplification of
the stage, and without the worst-case pile-up the a-priori bound assumes. Another summation order makes an
error of the same size, so

    |y_got - y_ref| <= |y_got - y*| + |y_ref - y*|  <=  C E + 2 u |y*|,   C = 8

C = 8 lets the checked implementation's error be up to seven times the reference's. Two evaluations of one
computation differ in the order of the same roundings, not in their number or size, but E is the maximum of
one sample of errors, and over a small tensor (a [CLS] row of 16 probabilities) one evaluation's maximum
reached 2.3 times the other's under the CPU / BLAS / thread combinations of docs/testing.md (4 would have left
a margin of 1.2 there, 8 leaves 2.4). 2 u |y*| covers the final rounding of each when E happens to be tiny. E is measured on every run, so the bound follows the
machine, and a real mistake (a lost bias, another RoPE base, an eps off by a factor 10, two layers swapped)
changes y by far more than the rounding of y: test_parity.py's test_bounds_catch_small_real_mistakes checks
that such mistakes fail these bounds.

E is the greatest of many elements' errors (a stage's tensor), so it does not depend on the luck of one; a
scalar computed from such a tensor (a ratio of sums, say) gets the tensor's bound propagated through its
formula instead (see test_analyze.py's F).

Set MINIDAMRO_TOL_REPORT=path to append, for every comparison, the stage and max |diff| / bound (one JSON
line each): how close to the bound the machine came.
"""
import json
import os
import re

import torch

C = 8  # see above: the checked error may be up to C - 1 times the reference's measured rounding error


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2  # 2^-24 float32, 2^-8 bfloat16, 2^-11 float16


def bound(expected: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound on |got - expected| for two evaluations of the computation whose exact value is
    `exact`, in `dtype` (default: expected's dtype): C E + 2 u |exact|, E = max |expected - exact|."""
    dtype = dtype or expected.dtype
    exact = exact.double()
    E = (expected.double() - exact).abs().max()
    return C * E + 2 * unit_roundoff(dtype) * exact.abs()


def _report(what: str, ratio: float):
    path = os.environ.get("MINIDAMRO_TOL_REPORT")
    if path:
        stage = re.sub(r"\d+", "#", what)  # "layer 3" and "layer 1" are one stage
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "ratio": ratio}) + "\n")


def assert_close(got: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor, what: str,
                 dtype: torch.dtype | None = None):
    """|got - expected| <= bound(expected, exact) elementwise, shapes equal; the message names the stage."""
    assert got.shape == expected.shape == exact.shape, f"{what}: shapes {got.shape} {expected.shape} {exact.shape}"
    tol = bound(expected, exact, dtype)
    diff = (got.double() - expected.double()).abs()
    ratio = (diff / tol).max().item() if diff.numel() else 0.0
    _report(what, ratio)
    if not ratio <= 1:  # also catches NaN
        worst = (diff / tol).argmax()
        raise AssertionError(
            f"{what}: |diff| exceeds the rounding bound by {ratio:.3g}x: greatest |diff| {diff.max().item():.3g}, "
            f"bound there {tol.flatten()[worst].item():.3g} (C E + 2u|y*|, E = measured rounding error "
            f"{(expected.double() - exact.double()).abs().max().item():.3g})")


def assert_clear_argmax(scores: torch.Tensor, tol: float, what: str):
    """Each row's greatest score leads the runner-up by more than 2 tol, so an argmax (greedy token, top-k
    outlier) is the same for any evaluation within tol of these scores: token equality then follows from
    the float bound instead of from luck. A fixture failing this has a near-tie and must be changed."""
    top2 = scores.double().topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    assert gap > 2 * tol, f"{what}: a near-tie (gap {gap:.3g} <= 2 x bound {tol:.3g}); choose a clearer fixture"


def assert_clear_ranking(scores: torch.Tensor, tol: float, what: str, k: int | None = None):
    """The same for a ranking (top-k outliers in order): the k + 1 greatest scores (all, if k is None) differ
    pairwise by more than 2 tol, so every evaluation within tol of `scores` ranks its top k the same way."""
    s = scores.double().flatten().sort(descending=True).values[:None if k is None else k + 1]
    gap = (s[:-1] - s[1:]).min().item()
    assert gap > 2 * tol, f"{what}: a near-tie in the ranking (gap {gap:.3g} <= 2 x bound {tol:.3g})"
