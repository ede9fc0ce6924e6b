"""Reference mode in float32, float16 and bfloat16 on the CPU, against transformers in the same dtype.

In half precision the order of summation shows, so each path is compared with the HF path that runs the same
operations: minidamro's fast path (SDPA) with HF's SDPA, its capturing path with HF's eager attention, and
each pair must agree bit for bit (torch.equal). That is what reference mode (MINIDAMRO_REFERENCE=1,
minidamro/kernels/choices.py) promises: F.linear on every weight (no packed copy, no float32 GEMM for
half-precision weights) and SDPA, unless MINIDAMRO_ATTENTION forces the eager form, which each test does where
it compares with HF eager. The same holds in float32. That is a claim about the operations, not about one CPU: both models run in
one process, and torch picks a CPU kernel (BLAS / oneDNN routine, vector width, blocking, thread split) from
the operation, dtype, shapes, strides, data alignment (torch's allocator's 64 bytes for both here: the
weights are converted on loading) and the machine, never from the caller. So the same operations on the same
shapes give the same bits on any CPU, BLAS build, ATen capability or thread count (run under several of
those: docs/testing.md). A float bound could not replace it here: on these tiny random models the bfloat16
rounding bound of the logits (tests/tolerance.py, about 0.1-0.25) is larger than most gaps between the two
greatest logits, so equal greedy tokens are only a test of doing exactly what transformers does.

Across the two paths the summation order differs, and the logits must agree within the rounding bound of
tests/tolerance.py in the dtype checked (measured against transformers in float64), so a real error that
happened to be small in float32 would still have to stay within it. So must the fast path's prefill with the
eager formulation forced and HF eager: it computes the same sums, but on blocks of query rows, so the BLAS sees
other shapes than HF's and need not round alike (its float32 bound is checked in test_kernels.py).
"""
import random

import pytest
import torch
from PIL import Image

import tiny
import tolerance
from minidamro import damro, generation
from minidamro.kernels import attention as kattention, choices
from minidamro.capture import Capture
from minidamro.image import preprocess
from minidamro.llama import KVCache
from minidamro.llava import load_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(scope="module")
def setups(hf_checkpoints, checkpoints):
    cache = {}

    def get(name, dtype):
        if (name, dtype) not in cache:
            from transformers import LlavaForConditionalGeneration
            hf = {impl: LlavaForConditionalGeneration.from_pretrained(
                      hf_checkpoints[name], dtype=DTYPES[dtype], attn_implementation=impl).eval()
                  for impl in ("sdpa", "eager")}
            hf["float64"] = LlavaForConditionalGeneration.from_pretrained(
                hf_checkpoints[name], dtype=torch.float64, attn_implementation="eager").eval()  # exact values
            model = load_model(checkpoints[name], dtype=dtype)
            c = model.cfg
            image = Image.frombytes("RGB", (41, 37), random.Random(0).randbytes(41 * 37 * 3))
            ids = torch.tensor([1, 5, 6] + [c.image_token_index] * c.num_image_tokens + list(range(10, 30)))
            cache[name, dtype] = hf, model, ids, preprocess(image, c.preprocessor)
        return cache[name, dtype]
    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", tiny.CONFIGS)
def test_reference_mode_matches_transformers(name, dtype, setups, monkeypatch):
    monkeypatch.setenv(choices.REFERENCE_ENV, "1")
    monkeypatch.setenv(kattention.ATTENTION_ENV, "sdpa")  # the fast path's prefill as HF SDPA's (see above)
    hf, model, ids, pixels = setups(name, dtype)
    assert all(p.dtype == DTYPES[dtype] for p in model.parameters())
    with torch.no_grad():
        ref = {impl: m(input_ids=ids[None], pixel_values=pixels).logits for impl, m in hf.items()}
    exact = ref.pop("float64")
    logits = {}
    for path, capture in (("sdpa", None),
                          ("eager", Capture(vit_layers=tuple(range(len(model.vision_tower.encoder.layers))),
                                            llm_layers=tuple(range(model.cfg.text.num_hidden_layers))))):
        features = model.encode_image(pixels, capture)[0]
        cache = KVCache(model.cfg.text, len(ids), dtype=DTYPES[dtype])
        assert cache.k.dtype == DTYPES[dtype]
        h = model.language_model(model.embed(ids, features), [cache], capture)
        assert h.dtype == DTYPES[dtype]
        logits[path] = model.logits(h)
        assert logits[path].dtype == torch.float32  # the rule and sampling always run in float32
        assert torch.equal(logits[path], ref[path].float()), f"{path} path differs from HF {path} in {dtype}"
    # Across paths: within the rounding bound of the logits in this dtype.
    tolerance.assert_close(logits["eager"], logits["sdpa"], exact, f"{dtype} logits, eager vs SDPA path",
                           dtype=DTYPES[dtype])
    # The fast path with the eager formulation's blocked prefill: HF eager's sums, on other shapes (see above).
    monkeypatch.setenv(kattention.ATTENTION_ENV, "eager")
    monkeypatch.setattr(kattention, "PREFILL_BLOCK", 16)  # several blocks, the last one short, on this prompt
    assert len(ids) % 16 != 0 and len(ids) > 32
    cache = KVCache(model.cfg.text, len(ids), dtype=DTYPES[dtype])
    blocks = model.logits(model.language_model(model.embed(ids, model.encode_image(pixels)[0]), [cache]))
    tolerance.assert_close(blocks, ref["eager"].float(), exact, f"{dtype} logits, blocked eager prefill vs HF eager",
                           dtype=DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", tiny.CONFIGS)
def test_reference_mode_greedy_tokens_match_transformers(name, dtype, setups, monkeypatch):
    """The fast path in reference mode (SDPA for decode steps too) against HF SDPA."""
    monkeypatch.setenv(choices.REFERENCE_ENV, "1")
    hf, model, ids, pixels = setups(name, dtype)
    with torch.no_grad():
        expected = hf["sdpa"].generate(input_ids=ids[None], pixel_values=pixels, do_sample=False,
                                       max_new_tokens=20)[0, len(ids):].tolist()
    assert list(generation.generate(model, ids, pixels, generation.Sampler(), 20)) == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float32: the logits above, the tokens in test_parity.py
@pytest.mark.parametrize("name", tiny.CONFIGS)
def test_reference_mode_eager_decode_steps_match_transformers_eager(name, dtype, setups, monkeypatch):
    """Decode steps of the fast path with the eager formulation forced, bit for bit against HF eager's: the
    prompt goes through the capturing path (eager, as HF eager's prefill), then each step captures nothing."""
    monkeypatch.setenv(choices.REFERENCE_ENV, "1")
    monkeypatch.setenv(kattention.ATTENTION_ENV, "eager")
    hf, model, ids, pixels = setups(name, dtype)
    n = 12
    with torch.no_grad():
        out = hf["eager"].generate(input_ids=ids[None], pixel_values=pixels, do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(ids):].tolist()
    capture = Capture(vit_layers=tuple(range(len(model.vision_tower.encoder.layers))),
                      llm_layers=tuple(range(model.cfg.text.num_hidden_layers)))
    cache = KVCache(model.cfg.text, len(ids) + n, dtype=DTYPES[dtype])
    logits = generation.prefill(model, model.embed(ids, model.encode_image(pixels, capture)[0]), cache, capture)
    got = []
    for step in range(n):
        assert torch.equal(logits, out.logits[step][0].float()), f"step {step}: logits differ from HF eager's"
        got.append(int(logits.argmax()))
        if step + 1 < n:
            logits = generation.decode_step(model, torch.tensor(got[-1:]), [cache])[0]
    assert got == expected


@pytest.mark.parametrize("name", tiny.CONFIGS)
def test_damro_in_bfloat16_batched_equals_two_calls(name, setups):
    _, model, ids, pixels = setups(name, "bfloat16")
    cfg = damro.DamroConfig(topk=3)
    a = damro.generate(model, ids, pixels, cfg, generation.Sampler(1.0, 0.9, seed=5), 16)
    b = damro.generate(model, ids, pixels, cfg, generation.Sampler(1.0, 0.9, seed=5), 16, batched=False)
    oa, ob = a[0], b[0]
    assert oa == ob and len(oa) == 3
    assert list(a[1]) == list(b[1])
