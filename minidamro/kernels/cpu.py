"""What this CPU and this torch build can run, found once and in one place, and simulated CPU profiles.

The fast CPU paths lean on oneDNN, whose half-precision kernels need instructions that many x86-64 CPUs lack:
bfloat16 weight packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (an AMD Zen 3, AVX2 only, refuses it with a
RuntimeError), float16 needs AVX-512 FP16 or AMX. So every formulation in kernels/ states what it needs
(`Support` below), and one that this machine lacks is never tried. The worst case on any x86-64 CPU is
F.linear and SDPA, which ATen runs everywhere.

A guard that only matters on CPUs the developers do not have is a guard nobody tests, so a machine can also
pretend to be a lesser one: MINIDAMRO_CPU_PROFILE=<profile> (or `simulate` in the tests) removes features from
what the host reports (never adds any), and the oneDNN calls kernels/ makes then fail exactly as they would on
such a CPU (`require`). The suite runs loading, conversion and generation under every profile on every machine.
"""
import os
from dataclasses import dataclass, fields, replace

import torch

from .. import MinidamroError

PROFILE_ENV = "MINIDAMRO_CPU_PROFILE"


@dataclass(frozen=True)
class Support:
    onednn: bool       # torch was built with oneDNN (mkldnn) and it runs here: float32 packing
    onednn_bf16: bool  # oneDNN's bfloat16 kernels: bfloat16 packing
    onednn_fp16: bool  # oneDNN's float16 kernels (not used for packing yet: no CPU here has had them to test)
    int8pack: bool     # ATen's weight-only int8 matmul (torch.ops.aten._weight_int8pack_mm, torch >= 2.3)
    capability: str    # ATen's vector code path (DEFAULT, AVX2, AVX512, ...), for the record

    def has(self, feature: str) -> bool:
        return bool(getattr(self, feature))


# What each simulated CPU lacks. "avx2" is an AVX2-only x86-64 CPU (oneDNN runs, in float32 only); "no-onednn"
# a torch build without oneDNN, or a CPU it does not support; "no-int8pack" a torch build without ATen's int8
# matmul.
PROFILES = {
    "host": {},
    "no-onednn": dict(onednn=False, onednn_bf16=False, onednn_fp16=False),
    "avx2": dict(onednn_bf16=False, onednn_fp16=False),
    "no-fp16": dict(onednn_fp16=False),
    "no-int8pack": dict(int8pack=False),
}


def host() -> Support:
    """What the host really supports."""
    onednn = torch.backends.mkldnn.is_available()
    return Support(onednn=onednn,
                   onednn_bf16=onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                   onednn_fp16=onednn and torch.ops.mkldnn._is_mkldnn_fp16_supported(),
                   int8pack=hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                   capability=torch.backends.cpu.get_cpu_capability())


_host = None


def profile() -> str:
    name = os.environ.get(PROFILE_ENV, "host") or "host"
    if name not in PROFILES:
        raise MinidamroError(f"{PROFILE_ENV}={name!r}: must be one of {', '.join(PROFILES)}")
    return name


def support() -> Support:
    """What this process may use: the host's features less those the simulated profile removes."""
    global _host
    if _host is None:
        _host = host()
    lacks = {k: v for k, v in PROFILES[profile()].items() if k in {f.name for f in fields(Support)}}
    return replace(_host, **{k: getattr(_host, k) and v for k, v in lacks.items()})


def require(feature: str, what: str):
    """Raise as the missing instruction set would make oneDNN raise: called by each oneDNN-backed call, so a
    simulated CPU fails where the real one would, and a missing guard shows on every machine."""
    if not support().has(feature):
        raise RuntimeError(f"{what}: this CPU ({profile()} profile) lacks {feature}")
