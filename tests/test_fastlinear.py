"""minidamro.fastlinear: every formulation of x W^T (+ b) is the same sum, and forcing any of them keeps the
model's greedy tokens equal to transformers' for one row (plain decoding) and two rows (two streams decoded
together, as DAMRO and VCD do)."""
import pytest
import torch

import tiny
import tolerance
from minidamro import MinidamroError, fastlinear
from minidamro.capture import eager_attention
from minidamro.generation import Sampler, generate
from minidamro.image import preprocess
from minidamro.llama import KVCache
from minidamro.llava import load_model
from test_damro import random_image


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", fastlinear.FORMS)
def test_each_formulation_is_x_wt_within_the_float32_dot_product_bound(name, bias, rows, monkeypatch):
    monkeypatch.setenv(fastlinear.ENV, name)
    g = torch.Generator().manual_seed(rows + 2 * bias)
    n, k = 300, 1000
    x, w = torch.randn(1, rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = fastlinear.linear(x, w, b)
    assert y.shape == (1, rows, n) and y.dtype == torch.float32
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    # Whatever the order of summation (blocked, FMA or not), a float32 sum of K products plus a bias has
    # |error| <= gamma_{K+1} * (sum |x_i w_i| + |b|), gamma_m = m u / (1 - m u), u = 2^-24 (Higham, 3.1).
    u, m = 2.0 ** -24, k + 1
    bound = m * u / (1 - m * u) * ((x.double().abs() @ w.double().abs().T) + (0 if b is None else b.double().abs()))
    assert ((y.double() - ref).abs() <= bound).all()
    # and it is not the same kernel by accident: the bound is far below the values themselves
    assert bound.max() < 1e-3 * ref.abs().max()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_the_packed_copy_is_x_wt_within_the_float32_dot_product_bound(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1000, generator=g), torch.randn(300, 1000, generator=g), torch.randn(300, generator=g)
    y = fastlinear._packed(x, fastlinear.pack(w), b)
    ref = x.double() @ w.double().T + b.double()
    u, m = 2.0 ** -24, 1000 + 1  # as above: gamma_{K+1} (sum |x_i w_i| + |b|)
    bound = m * u / (1 - m * u) * (x.double().abs() @ w.double().abs().T + b.double().abs())
    assert y.shape == (rows, 300) and ((y.double() - ref).abs() <= bound).all()


def test_auto_measures_once_per_shape_and_rows_and_picks_a_candidate(monkeypatch):
    monkeypatch.delenv(fastlinear.ENV, raising=False)
    monkeypatch.setattr(fastlinear, "_chosen", {})
    calls = []
    real = fastlinear.measure
    monkeypatch.setattr(fastlinear, "measure", lambda *a, **kw: calls.append(a[1:]) or real(*a, **kw))
    w, x = torch.randn(64, 96), torch.randn(2, 96)
    for _ in range(3):
        assert torch.allclose(fastlinear.linear(x[:1], w), x[:1] @ w.T, rtol=1e-5, atol=1e-5)
        fastlinear.linear(x, w)
    fastlinear.linear(torch.randn(7, 96), w)  # prefill-sized: F.linear, nothing measured
    assert calls == [(1, False), (2, False)]
    assert fastlinear._chosen[("cpu", torch.float32, 64, 96, 1, False)] in fastlinear.candidates(1)
    assert fastlinear._chosen[("cpu", torch.float32, 64, 96, 2, False)] in ("linear", "matmul")
    assert fastlinear.chosen() == {"cpu torch.float32 64 96 1 False": fastlinear._chosen[
        ("cpu", torch.float32, 64, 96, 1, False)], "cpu torch.float32 64 96 2 False": fastlinear._chosen[
        ("cpu", torch.float32, 64, 96, 2, False)]}  # what the benchmark records


def test_an_unknown_formulation_is_an_error(monkeypatch, checkpoints):
    monkeypatch.setenv(fastlinear.ENV, "gemv")
    with pytest.raises(MinidamroError, match="MINIDAMRO_LINEAR='gemv'"):
        load_model(checkpoints["mha"])


def greedy_rows(model, streams, n):
    """Greedy decoding of several prompts side by side: one forward per token takes all rows together."""
    caches = [KVCache(model.cfg.text, len(ids) + n) for ids, _ in streams]
    logits = torch.stack([model.logits(model.language_model(model.embed(ids, f), [c])[0, -1])
                          for (ids, f), c in zip(streams, caches)])
    out = []
    for _ in range(n):
        tokens = logits.argmax(-1)
        out.append(tokens.tolist())
        x = model.language_model.embed_tokens(tokens)[:, None]  # (B, 1, D)
        logits = model.logits(model.language_model(x, caches)[:, -1])
    return [list(t) for t in zip(*out)]


@pytest.mark.parametrize("name", ["auto", *fastlinear.NAMES])
def test_forced_formulations_keep_greedy_tokens_equal_to_transformers(name, monkeypatch, hf_checkpoints, checkpoints):
    from transformers import LlavaForConditionalGeneration
    monkeypatch.setenv(fastlinear.ENV, name)
    n = 16
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoints["gqa"], dtype=torch.float32).eval()
    model = load_model(checkpoints["gqa"])
    linears = [m for m in model.modules() if isinstance(m, fastlinear.Linear)]
    assert len(linears) == 7 * model.cfg.text.num_hidden_layers + 1  # every LLaMA linear and lm_head
    if name == "packed":  # oneDNN on a packed copy, for prefill and decode alike
        assert all(m.packed is not None for m in linears)
    elif name != "auto":
        assert all(m.packed is None for m in linears)
    c = model.cfg
    pixels = preprocess(random_image(3), c.preprocessor)
    image_ids = torch.tensor([1, 5, 6] + [c.image_token_index] * c.num_image_tokens + list(range(10, 30)))
    text_ids = torch.tensor([1] + list(range(40, 75)))
    with torch.no_grad():
        expected = [hf.generate(input_ids=image_ids[None], pixel_values=pixels, do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(image_ids):].tolist(),
                    hf.generate(input_ids=text_ids[None], do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(text_ids):].tolist()]
    model.cfg.text.eos_token_id = -1  # as min_new_tokens: compare all n tokens
    assert list(generate(model, image_ids, pixels, Sampler(), n)) == expected[0]  # one row
    with torch.inference_mode():
        features = model.encode_image(pixels)[0]
        got = greedy_rows(model, [(image_ids, features), (text_ids, features[:0])], n)  # two rows
    assert got == expected


# ---------------------------------------------------------------- one-query attention (decode steps)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (6, 3)])
def test_both_attention_formulations_are_one_query_attention_within_the_rounding_bound(heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    q = torch.randn(1, heads, 1, 16, generator=g)
    buf = torch.randn(2, kv_heads, 90, 16, generator=g)  # the cache: 77 of 90 positions filled, as in a KVCache
    k, v = buf[0, :, :77][None], buf[1, :, :77][None]
    rep = heads // kv_heads
    k64, v64 = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    exact = torch.softmax(q.double() @ k64.transpose(-1, -2) / 4, -1) @ v64
    sdpa, eager = fastlinear._attend_sdpa(q, k, v), fastlinear._attend_eager(q, k, v)
    assert sdpa.shape == eager.shape == (1, heads, 1, 16)
    # two summation orders of one computation: within the bound of tests/tolerance.py (C x SDPA's measured
    # rounding error + 2u|y*|); a wrong scale, head mapping or softmax axis is off by far more
    tolerance.assert_close(eager, sdpa, exact, f"eager vs SDPA one-query attention, {heads}/{kv_heads} heads")
    # the eager form is transformers' eager attention: k/v repeated per group, then capture.eager_attention
    assert torch.equal(eager, eager_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))[0])


def test_an_unknown_attention_formulation_is_an_error(monkeypatch, checkpoints):
    monkeypatch.setenv(fastlinear.ATTENTION_ENV, "flash")
    with pytest.raises(MinidamroError, match="MINIDAMRO_ATTENTION='flash'"):
        load_model(checkpoints["mha"])


@pytest.mark.parametrize("name", ["auto", *fastlinear.ATTENTION_FORMS])
def test_attention_choice_keeps_greedy_tokens_equal_to_transformers(name, monkeypatch, hf_checkpoints, checkpoints):
    """auto measures once per (dtype, heads, kv heads, head_dim, threads) and picks sdpa or eager; forced or
    measured, float32 greedy tokens (one row and two rows) equal transformers'."""
    from transformers import LlavaForConditionalGeneration
    monkeypatch.setenv(fastlinear.ATTENTION_ENV, name)
    monkeypatch.setattr(fastlinear, "_chosen", {})
    calls = []
    real = fastlinear.measure_attention
    monkeypatch.setattr(fastlinear, "measure_attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    n = 12
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoints["gqa"], dtype=torch.float32).eval()
    model = load_model(checkpoints["gqa"])
    model.cfg.text.eos_token_id = -1  # as min_new_tokens: compare all n tokens
    c = model.cfg
    pixels = preprocess(random_image(3), c.preprocessor)
    image_ids = torch.tensor([1, 5, 6] + [c.image_token_index] * c.num_image_tokens + list(range(10, 30)))
    text_ids = torch.tensor([1] + list(range(40, 75)))
    with torch.no_grad():
        expected = [hf.generate(input_ids=image_ids[None], pixel_values=pixels, do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(image_ids):].tolist(),
                    hf.generate(input_ids=text_ids[None], do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(text_ids):].tolist()]
    assert list(generate(model, image_ids, pixels, Sampler(), n)) == expected[0]
    with torch.inference_mode():
        features = model.encode_image(pixels)[0]
        assert greedy_rows(model, [(image_ids, features), (text_ids, features[:0])], n) == expected
    chosen = {k: v for k, v in fastlinear._chosen.items() if k[0] == "attention"}
    if name == "auto":
        t = c.text
        assert calls == [(torch.float32, t.num_attention_heads, t.num_key_value_heads, t.head_dim)]
        assert list(chosen) == [("attention", torch.float32, t.num_attention_heads, t.num_key_value_heads,
                                 t.head_dim, torch.get_num_threads())]
        assert list(chosen.values())[0] in fastlinear.ATTENTION_FORMS
    else:
        assert calls == [] and chosen == {}
