"""minidamro.kernels: every formulation of x W^T (+ b) and of attention is the same sum, and forcing any of them
keeps the model's greedy tokens equal to transformers' for one row (plain decoding) and two rows (two streams
decoded together, as DAMRO and VCD do). The choices' cache file, reference mode and CPU profiles:
test_cpu_profiles.py."""
import copy

import pytest
import torch

import tiny
import tolerance
from minidamro import MinidamroError
from minidamro.kernels import attention as kattention, choices, cpu, linear as klinear
from minidamro.capture import causal_mask, eager_attention
from minidamro.generation import Sampler, generate
from minidamro.image import preprocess
from minidamro.llama import KVCache
from minidamro.llava import load_model
from test_damro import random_image


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", klinear.FORMS)
def test_each_formulation_is_x_wt_within_the_float32_dot_product_bound(name, bias, rows, monkeypatch):
    monkeypatch.setenv(klinear.ENV, name)
    g = torch.Generator().manual_seed(rows + 2 * bias)
    n, k = 300, 1000
    x, w = torch.randn(1, rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = klinear.linear(x, w, b)
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
    y = klinear._packed(x, klinear.pack(w), b)
    ref = x.double() @ w.double().T + b.double()
    u, m = 2.0 ** -24, 1000 + 1  # as above: gamma_{K+1} (sum |x_i w_i| + |b|)
    bound = m * u / (1 - m * u) * (x.double().abs() @ w.double().abs().T + b.double().abs())
    assert y.shape == (rows, 300) and ((y.double() - ref).abs() <= bound).all()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
def test_a_copy_of_a_packed_layer_computes_from_its_own_weight():
    layer = klinear.Linear(64, 32).requires_grad_(False)
    layer.packed = klinear.pack(layer.weight)
    twin = copy.deepcopy(layer)  # what the parity tests do before mutating or converting a model
    assert twin.packed is None and layer.packed is not None
    twin.weight[0] += 1
    x = torch.randn(3, 64)
    assert torch.equal(twin(x), torch.nn.functional.linear(x, twin.weight, twin.bias))
    assert not torch.allclose(layer(x), twin(x))


def test_auto_measures_once_per_shape_and_rows_and_picks_a_candidate(monkeypatch, fresh_choices):
    monkeypatch.delenv(klinear.ENV, raising=False)
    calls = []
    real = klinear.measure
    monkeypatch.setattr(klinear, "measure", lambda *a, **kw: calls.append(a[1:]) or real(*a, **kw))
    w, x = torch.randn(64, 96), torch.randn(2, 96)
    for _ in range(3):
        assert torch.allclose(klinear.linear(x[:1], w), x[:1] @ w.T, rtol=1e-5, atol=1e-5)
        klinear.linear(x, w)
    klinear.linear(torch.randn(7, 96), w)  # prefill-sized: F.linear, nothing measured
    assert calls == [(1, False), (2, False)]
    threads = f"threads={torch.get_num_threads()}"
    made = choices.chosen()  # what the benchmark records
    assert sorted(made) == [f"linear cpu torch.float32 64 96 {r} False {threads}" for r in (1, 2)]
    assert made[f"linear cpu torch.float32 64 96 1 False {threads}"] in klinear.candidates(1)
    assert made[f"linear cpu torch.float32 64 96 2 False {threads}"] in ("linear", "matmul")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
def test_image_layers_are_packed_by_their_speed_on_a_whole_image(monkeypatch, checkpoints, fresh_choices):
    """The vision tower and the projector only ever see an image's tokens, so their packing is chosen by the GEMM
    at that many rows; the decoder's by decode steps (rows None: 1 and 2)."""
    monkeypatch.delenv(klinear.ENV, raising=False)
    asked = []
    real = klinear.packing_pays
    monkeypatch.setattr(klinear, "packing_pays", lambda w, rows=None: asked.append(rows) or real(w, rows))
    model = load_model(checkpoints["mha"])
    image = [n for n, m in model.named_modules() if isinstance(m, klinear.Linear)
             and n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(image) == 6 * len(model.vision_tower.encoder.layers) + 2
    tokens = model.cfg.vision.num_patches + 1
    assert asked == [tokens] * len(image) + [None] * (7 * model.cfg.text.num_hidden_layers + 1)
    made = choices.chosen()
    for key, pays in made.items():  # one decision per (dtype, N, K[, rows]), a bool
        assert key.startswith("packed ") and isinstance(pays, bool)
    v = model.cfg.vision
    assert f"packed torch.float32 {v.intermediate_size} {v.hidden_size} {tokens} threads={torch.get_num_threads()}" in made


def test_an_unknown_formulation_is_an_error(monkeypatch, checkpoints):
    monkeypatch.setenv(klinear.ENV, "gemv")
    with pytest.raises(MinidamroError, match="MINIDAMRO_LINEAR='gemv'"):
        load_model(checkpoints["mha"])


def two_prompts(hf, c, n: int):
    """An image prompt and a text-only one, and transformers' n greedy tokens for each (no early stop)."""
    pixels = preprocess(random_image(3), c.preprocessor)
    image_ids = torch.tensor([1, 5, 6] + [c.image_token_index] * c.num_image_tokens + list(range(10, 30)))
    text_ids = torch.tensor([1] + list(range(40, 75)))
    with torch.no_grad():
        expected = [hf.generate(input_ids=image_ids[None], pixel_values=pixels, do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(image_ids):].tolist(),
                    hf.generate(input_ids=text_ids[None], do_sample=False, max_new_tokens=n,
                                min_new_tokens=n)[0, len(text_ids):].tolist()]
    return pixels, image_ids, text_ids, expected


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


@pytest.mark.parametrize("name", ["auto", *klinear.NAMES])
def test_forced_formulations_keep_greedy_tokens_equal_to_transformers(name, monkeypatch, hf_checkpoints, checkpoints):
    from transformers import LlavaForConditionalGeneration
    monkeypatch.setenv(klinear.ENV, name)
    n = 16
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoints["gqa"], dtype=torch.float32).eval()
    model = load_model(checkpoints["gqa"])
    linears = [m for m in model.modules() if isinstance(m, klinear.Linear)]
    # every LLaMA linear and lm_head, every linear of the ViT layers LLaVA reads, the projector's two
    assert len(linears) == 7 * model.cfg.text.num_hidden_layers + 1 + 6 * len(model.vision_tower.encoder.layers) + 2
    if name == "packed":  # oneDNN on a packed copy, for prefill and decode alike, where this CPU can pack float32
        assert all((m.packed is not None) == cpu.support().has("onednn") for m in linears)
    elif name != "auto":
        assert all(m.packed is None for m in linears)
    pixels, image_ids, text_ids, expected = two_prompts(hf, model.cfg, n)
    model.cfg.text.eos_token_id = -1  # as min_new_tokens: compare all n tokens
    assert list(generate(model, image_ids, pixels, Sampler(), n)) == expected[0]  # one row
    with torch.inference_mode():
        features = model.encode_image(pixels)[0]
        got = greedy_rows(model, [(image_ids, features), (text_ids, features[:0])], n)  # two rows
    assert got == expected


# ---------------------------------------------------------------- attention (decode steps and prefills)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (6, 3)])
def test_both_attention_formulations_are_one_query_attention_within_the_rounding_bound(heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    q = torch.randn(1, heads, 1, 16, generator=g)
    buf = torch.randn(2, kv_heads, 90, 16, generator=g)  # the cache: 77 of 90 positions filled, as in a KVCache
    k, v = buf[0, :, :77][None], buf[1, :, :77][None]
    rep = heads // kv_heads
    k64, v64 = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    exact = torch.softmax(q.double() @ k64.transpose(-1, -2) / 4, -1) @ v64
    sdpa, eager = kattention._attend_sdpa(q, k, v), kattention._attend_eager(q, k, v)
    assert sdpa.shape == eager.shape == (1, heads, 1, 16)
    # two summation orders of one computation: within the bound of tests/tolerance.py (C x SDPA's measured
    # rounding error + 2u|y*|); a wrong scale, head mapping or softmax axis is off by far more
    tolerance.assert_close(eager, sdpa, exact, f"eager vs SDPA one-query attention, {heads}/{kv_heads} heads")
    # the eager form is transformers' eager attention: k/v repeated per group, then capture.eager_attention
    assert torch.equal(eager, eager_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))[0])


@pytest.mark.parametrize("start", [0, 23])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (6, 3)])
def test_both_attention_formulations_are_causal_prefill_attention_within_the_rounding_bound(heads, kv_heads, start,
                                                                                          monkeypatch):
    """T = 37 new queries after `start` cached positions, with the causal mask llama.py passes (SDPA takes
    is_causal instead from position 0). The eager form runs blocks of 8 query rows here (the last one short),
    each over the keys up to its last row."""
    monkeypatch.setattr(kattention, "PREFILL_BLOCK", 8)
    g = torch.Generator().manual_seed(heads + kv_heads + start)
    T, S = 37, start + 37
    q = torch.randn(1, heads, T, 16, generator=g)
    buf = torch.randn(2, kv_heads, S + 13, 16, generator=g)  # a cache with room to spare, as a KVCache
    k, v = buf[0, :, :S][None], buf[1, :, :S][None]
    mask = causal_mask(start, T, torch.float32)
    rep = heads // kv_heads
    k64, v64 = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    later = torch.arange(S)[None] > torch.arange(start, S)[:, None]  # keys after each query's own position
    exact = torch.softmax((q.double() @ k64.transpose(-1, -2) / 4).masked_fill(later, -torch.inf), -1) @ v64
    sdpa, eager = kattention._attend_sdpa(q, k, v, None, mask), kattention._attend_eager(q, k, v, None, mask)
    assert sdpa.shape == eager.shape == (1, heads, T, 16)
    what = f"eager causal attention of {T} queries after {start}, {heads}/{kv_heads} heads"
    # the textbook float32 computation: a mask turned the wrong way, or a block over the wrong keys or rows, is
    # off by far more than the rounding bound
    k32, v32 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    plain = torch.softmax((q @ k32.transpose(-1, -2) / 4).masked_fill(later, -torch.inf), -1) @ v32
    tolerance.assert_close(sdpa, plain, exact, f"SDPA causal attention of {T} queries after {start}")
    tolerance.assert_close(eager, plain, exact, what)


def test_attention_that_needs_gradients_takes_sdpa(monkeypatch):
    """The eager form copies k and v into a reused scratch, which autograd cannot follow: with gradients
    wanted, even a forced eager runs SDPA, and the gradients flow."""
    monkeypatch.setenv(kattention.ATTENTION_ENV, "eager")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=g, requires_grad=True)
    k, v = torch.randn(2, 1, 2, 6, 8, generator=g).unbind()
    with torch.no_grad():  # as a KVCache's, made before the forward
        scratch = torch.empty(2, 4 * 6 * 8)
    mask = causal_mask(0, 6, torch.float32)
    y = kattention.attention(q, k, v, scratch, mask)
    y.sum().backward()
    assert q.grad is not None and torch.equal(y.detach(), kattention._attend_sdpa(q.detach(), k, v, None, mask))


def test_an_unknown_attention_formulation_is_an_error(monkeypatch, checkpoints):
    monkeypatch.setenv(kattention.ATTENTION_ENV, "flash")
    with pytest.raises(MinidamroError, match="MINIDAMRO_ATTENTION='flash'"):
        load_model(checkpoints["mha"])


@pytest.mark.parametrize("name", ["auto", *kattention.ATTENTION_FORMS])
def test_attention_choice_keeps_greedy_tokens_equal_to_transformers(name, monkeypatch, hf_checkpoints, checkpoints,
                                                                    fresh_choices):
    """auto measures once per (dtype, heads, kv heads, head_dim, threads) for prefills and once for decode steps,
    and picks sdpa or eager for each; forced or measured, float32 greedy tokens (one row and two rows) equal
    transformers'."""
    from transformers import LlavaForConditionalGeneration
    monkeypatch.setenv(kattention.ATTENTION_ENV, name)
    monkeypatch.setattr(kattention, "PREFILL_BLOCK", 16)  # an eager prefill of these prompts takes several blocks
    calls = []
    real = kattention.measure_attention
    monkeypatch.setattr(kattention, "measure_attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    n = 12
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoints["gqa"], dtype=torch.float32).eval()
    model = load_model(checkpoints["gqa"])
    model.cfg.text.eos_token_id = -1  # as min_new_tokens: compare all n tokens
    pixels, image_ids, text_ids, expected = two_prompts(hf, model.cfg, n)
    assert list(generate(model, image_ids, pixels, Sampler(), n)) == expected[0]
    with torch.inference_mode():
        features = model.encode_image(pixels)[0]
        assert greedy_rows(model, [(image_ids, features), (text_ids, features[:0])], n) == expected
    chosen = {k: v for k, v in choices.chosen().items() if k.startswith(("attention ", "prefill attention "))}
    if name == "auto":  # measured once for the prefills, once for the decode steps
        t = model.cfg.text
        shape = (torch.float32, t.num_attention_heads, t.num_key_value_heads, t.head_dim)
        p = kattention.PREFILL_POSITIONS
        assert calls == [(*shape, p, p), shape]
        assert sorted(chosen) == [" ".join(map(str, (kind, *shape, f"threads={torch.get_num_threads()}")))
                                  for kind in ("attention", "prefill attention")]
        assert set(chosen.values()) <= set(kattention.ATTENTION_FORMS)
    else:
        assert calls == [] and chosen == {}
