"""Every CPU profile on every machine, the kernel choices' cache file, and the float32 GEMM of half-precision
weights (minidamro/kernels/cpu.py, choices.py, linear.py).

The fallbacks only run where the host lacks a feature, so a suite that passes on the developers' CPU would prove
nothing about the others (an AVX2-only AMD Zen 3 crashed where an AVX-512 one passed). Here the host pretends
to be each lesser CPU (MINIDAMRO_CPU_PROFILE): the capability check reports the features removed, and the
oneDNN calls kernels/ makes raise as they would on such a CPU. Each test then loads, converts, generates and
runs DAMRO under every profile, and checks that no candidate the profile lacks was even tried: without the
guard in linear.can_pack, the measurement would try it and record it unavailable, and these tests fail.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import tolerance
import weights_convert
from minidamro import MinidamroError, damro, generation
from minidamro.image import preprocess
from minidamro.kernels import choices, cpu, linear as klinear
from minidamro.llava import load_model
from test_damro import random_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_checkpoints):
    """dtype -> the tiny GQA checkpoint converted to it."""
    root = tmp_path_factory.mktemp("profiles")
    out = {}
    for dtype in DTYPES:
        out[dtype] = str(root / dtype)
        weights_convert.convert(hf_checkpoints["gqa"], out[dtype], dtype=dtype)
    return out


def test_a_profile_only_removes_features(monkeypatch):
    host = cpu.host()
    for name, lacks in cpu.PROFILES.items():
        monkeypatch.setenv(cpu.PROFILE_ENV, name)
        s = cpu.support()
        for feature in ("onednn", "onednn_bf16", "onednn_fp16", "int8pack"):
            assert s.has(feature) == (host.has(feature) and lacks.get(feature, True))
    monkeypatch.setenv(cpu.PROFILE_ENV, "avx2")
    with pytest.raises(RuntimeError, match="lacks onednn_bf16"):  # as oneDNN raises on such a CPU
        klinear.pack(torch.ones(8, 8, dtype=torch.bfloat16))


def test_an_unknown_profile_is_an_error(monkeypatch, converted):
    monkeypatch.setenv(cpu.PROFILE_ENV, "zen9")
    with pytest.raises(MinidamroError, match="MINIDAMRO_CPU_PROFILE='zen9'"):
        load_model(converted["float32"])


@pytest.mark.parametrize("forced", ["auto", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("profile", list(cpu.PROFILES))
def test_every_profile_loads_generates_and_runs_damro_without_trying_what_it_lacks(profile, dtype, forced,
                                                                                  monkeypatch, converted,
                                                                                  fresh_choices):
    monkeypatch.setenv(cpu.PROFILE_ENV, profile)
    monkeypatch.setenv(klinear.ENV, forced)
    model = load_model(converted[dtype])
    linears = [m for m in model.modules() if isinstance(m, klinear.Linear)]
    can = dtype in ("float32", "bfloat16") and cpu.support().has(klinear.PACKED_NEEDS[getattr(torch, dtype)])
    if forced == "packed":
        assert all((m.packed is not None) == can for m in linears)
    elif not can:
        assert all(m.packed is None for m in linears)
    ids = torch.tensor([1, 5, 6] + [model.cfg.image_token_index] * model.cfg.num_image_tokens + list(range(10, 20)))
    pixels = preprocess(random_image(1), model.cfg.preprocessor)
    model.cfg.text.eos_token_id = -1  # always 6 tokens
    assert len(list(generation.generate(model, ids, pixels, generation.Sampler(), 6))) == 6
    outliers, tokens = damro.generate(model, ids, pixels, damro.DamroConfig(topk=3), generation.Sampler(), 6)
    assert len(outliers) == 3 and len(list(tokens)) == 6
    assert choices.unavailable() == {}, "a candidate this CPU lacks was tried (the capability guard is missing)"


def test_a_candidate_that_raises_while_measured_is_marked_unavailable(monkeypatch, fresh_choices):
    def broken(x, w, b):
        raise RuntimeError("this build has no such kernel")
    monkeypatch.setitem(klinear.FORMS, "matmul", broken)
    w, x = torch.randn(64, 96), torch.randn(2, 96)
    y = klinear.linear(x, w)  # measured: matmul raises and drops out
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    assert choices.unavailable() == {"matmul": "this build has no such kernel"}
    assert list(choices.chosen().values()) == ["linear"]


# ---------------------------------------------------------------- the cache file of choices


def test_choices_are_kept_in_the_cache_file_and_the_next_process_makes_the_same(monkeypatch, fresh_choices):
    calls = []
    real = klinear.measure
    monkeypatch.setattr(klinear, "measure", lambda *a, **kw: calls.append(a[1:]) or real(*a, **kw))
    w, x = torch.randn(64, 96), torch.randn(2, 96)
    klinear.linear(x[:1], w)
    klinear.linear(x, w)
    assert calls == [(1, False), (2, False)]
    data = json.loads(fresh_choices.read_text())
    assert data["format"] == choices.FORMAT and list(data["machines"]) == [choices.machine_key()]
    assert data["machines"][choices.machine_key()] == choices.chosen()
    choices.forget()  # as a new process: nothing measured, the file's decisions taken
    klinear.linear(x[:1], w)
    klinear.linear(x, w)
    assert calls == [(1, False), (2, False)] and choices.chosen() == data["machines"][choices.machine_key()]
    fresh_choices.unlink()  # deleting the file measures again
    choices.forget()
    klinear.linear(x, w)
    assert calls[-1] == (2, False) and fresh_choices.exists()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 0, "machines": {}}',
                                     '{"format": 1, "machines": {"KEY": 5}}', "",
                                     '{"format": 1, "machines": {"KEY": {"linear cpu torch.float32 64 96 1 False '
                                     'THREADS": "renamed"}}}'])
def test_a_corrupt_or_stale_cache_file_is_measured_again_and_rewritten(content, fresh_choices):
    threads = f"threads={torch.get_num_threads()}"
    fresh_choices.write_text(content.replace("KEY", choices.machine_key()).replace("THREADS", threads))
    w, x = torch.randn(64, 96), torch.randn(1, 96)
    klinear.linear(x, w)
    data = json.loads(fresh_choices.read_text())
    assert data["machines"][choices.machine_key()] == choices.chosen() and len(choices.chosen()) == 1
    assert choices.chosen()[f"linear cpu torch.float32 64 96 1 False {threads}"] in klinear.candidates(1)
    assert sorted(os.listdir(fresh_choices.parent)) == ["choices.json", "choices.json.lock"]  # no temporary file


def test_an_unwritable_cache_location_still_works(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(choices.CACHE_ENV, str(blocker / "choices.json"))  # its directory cannot be made
    choices.forget()
    try:
        w, x = torch.randn(64, 96), torch.randn(1, 96)
        assert torch.allclose(klinear.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    finally:
        choices.forget()


def test_reference_mode_measures_nothing_and_ignores_packed_copies(monkeypatch, converted, fresh_choices):
    model = load_model(converted["float32"])
    monkeypatch.setenv(choices.REFERENCE_ENV, "1")
    choices.forget()
    layer = model.language_model.layers[0].mlp.up_proj
    if cpu.support().onednn:
        layer.packed = klinear.pack(layer.weight)
    x = torch.randn(1, 3, layer.in_features)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
    assert torch.equal(layer(x[:, :1]), torch.nn.functional.linear(x[:, :1], layer.weight))
    ids = torch.tensor([1, 5] + [model.cfg.image_token_index] * model.cfg.num_image_tokens + list(range(10, 30)))
    list(generation.generate(model, ids, preprocess(random_image(2), model.cfg.preprocessor), generation.Sampler(), 4))
    assert choices.chosen() == {}
    monkeypatch.setenv(choices.REFERENCE_ENV, "yes")
    with pytest.raises(MinidamroError, match="MINIDAMRO_REFERENCE"):
        load_model(converted["float32"])


def generate_in_a_process(model_dir: str, cache: str) -> tuple[list, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDAMRO_")} | {choices.CACHE_ENV: cache}
    p = subprocess.run([sys.executable, "-m", "minidamro.generate", os.path.join(ROOT, "docs", "toy-1.png"),
                        "--model", model_dir, "--method", "damro", "--max-new-tokens", "5", "--seed", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    with open(cache) as f:
        return json.loads(p.stdout.strip().splitlines()[-1]), json.load(f)


def test_two_processes_make_the_same_choices_and_the_same_tokens(converted, tmp_path):
    cache = str(tmp_path / "choices.json")
    first, made = generate_in_a_process(converted["bfloat16"], cache)
    stamp = os.stat(cache).st_mtime_ns
    second, kept = generate_in_a_process(converted["bfloat16"], cache)
    assert first == second and made == kept
    assert os.stat(cache).st_mtime_ns == stamp  # nothing was measured, so nothing was written
    assert any(k.startswith("linear ") for k in next(iter(made["machines"].values())))


# ---------------------------------------------------------------- half-precision GEMMs computed in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_gemm_in_float32_is_within_one_rounding_of_the_exact_product(dtype, monkeypatch):
    """Where the CPU has no fast half-precision GEMM, rows > MAX_ROWS are multiplied in float32 and rounded to
    the dtype once. The products of two bf16 / fp16 numbers are exact in float32, so the error is the float32
    sum's, gamma_{K+1} (sum |x_i w_i| + |b|) (Higham 3.1, u = 2^-24), plus one rounding to the dtype, u_d |y|
    (u_d = 2^-8 for bfloat16, 2^-11 for float16). The half-precision GEMM itself is held to the same bound: a
    wrong transpose, bias or cast is off by far more."""
    monkeypatch.setattr(klinear, "gemm_in_float32", lambda d: True)
    g = torch.Generator().manual_seed(3)
    k = 300
    x, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((7, k), (50, k), (50,)))
    y = klinear.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (7, 50)
    exact = x.double() @ w.double().T + b.double()
    u, m, ud = 2.0 ** -24, k + 1, {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    bound = m * u / (1 - m * u) * (x.double().abs() @ w.double().abs().T + b.double().abs()) + ud * exact.abs()
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-12)).all()
    assert ((torch.nn.functional.linear(x, w, b).double() - exact).abs() <= bound * (1 + 1e-12)).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generation_and_damro_with_half_precision_gemms_in_float32(dtype, monkeypatch, converted, fresh_choices):
    """End to end, as on a CPU without fast half-precision GEMMs (the host may have them): the prefill's and the
    vision tower's GEMMs in float32, decode steps in the dtype. The prompt's logits stay within the rounding
    bound of tests/tolerance.py in that dtype around reference mode's (the bound is C x reference mode's own
    measured error against the same weights computed in float32, + 2 u_d |y|): another summation order of the
    same computation. Then DAMRO decodes."""
    model = load_model(converted[dtype])
    wide = load_model(converted[dtype], dtype="float32")  # the same (rounded) weights, computed in float32
    ids = torch.tensor([1, 5, 6] + [model.cfg.image_token_index] * model.cfg.num_image_tokens + list(range(10, 20)))
    pixels = preprocess(random_image(4), model.cfg.preprocessor)
    monkeypatch.setenv(choices.REFERENCE_ENV, "1")
    exact = generation.prefill(wide, wide.embed(ids, wide.image_features(pixels)), generation.new_cache(wide, 40))
    ref = generation.prefill(model, model.embed(ids, model.image_features(pixels)), generation.new_cache(model, 40))
    monkeypatch.setenv(choices.REFERENCE_ENV, "0")
    calls = []
    monkeypatch.setattr(klinear, "gemm_in_float32", lambda d: calls.append(d) or d != torch.float32)
    got = generation.prefill(model, model.embed(ids, model.image_features(pixels)), generation.new_cache(model, 40))
    assert calls and set(calls) == {getattr(torch, dtype)}
    tolerance.assert_close(got, ref, exact, f"{dtype} logits, float32 GEMMs vs reference mode", dtype=getattr(torch, dtype))
    model.cfg.text.eos_token_id = -1
    outliers, tokens = damro.generate(model, ids, pixels, damro.DamroConfig(topk=3), generation.Sampler(), 5)
    assert len(list(tokens)) == 5


def test_the_float32_gemm_decision_is_measured_once_per_dtype(fresh_choices):
    assert klinear.gemm_in_float32(torch.float32) is False and choices.chosen() == {}
    decision = klinear.gemm_in_float32(torch.bfloat16)
    assert isinstance(decision, bool)
    assert list(choices.chosen()) == [f"gemm in float32 torch.bfloat16 threads={torch.get_num_threads()}"]
