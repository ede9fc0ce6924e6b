"""Weight-only int8 (minidamro/kernels/int8.py, weights_convert.py --quantize int8): the quantisation, each
formulation within the bound the quantisation step sets, the converter and the loader, and generation under
every CPU profile."""
import json
import os

import pytest
import torch

import weights_convert
from minidamro import MinidamroError, damro, generation
from minidamro.image import preprocess
from minidamro.kernels import choices, cpu, int8
from minidamro.llava import load_model
from test_damro import random_image

U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def test_quantize_is_symmetric_round_to_nearest_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 300, generator=g) * torch.rand(50, 1, generator=g)
    w[7] = 0  # an all-zero row: scale 1, all zeros
    q, s = int8.quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (50,)
    assert int(q.abs().max()) == 127 and torch.equal(q[7], torch.zeros(300, dtype=torch.int8)) and s[7] == 1
    # every weight within half a step of its quantised value; the largest of each row exactly +-127 steps
    assert ((s.double()[:, None] * q.double() - w.double()).abs() <= s.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(q.abs().amax(1)[[i for i in range(50) if i != 7]], torch.full((49,), 127, dtype=torch.int8))
    assert all(torch.equal(a, b) for a, b in zip(int8.quantize(w), (q, s)))  # deterministic
    half = torch.tensor([[127.0, 0.5, 1.5, -0.5, 2.5]])  # scale 1: ties go to the even neighbour
    assert int8.quantize(half)[0].tolist() == [[127, 0, 2, 0, 2]]


def within_bound(y, x, w, q, s, b=None) -> torch.Tensor:
    """|y - x W^T - b| <= (s_n / 2) sum_k |x_k| (the quantisation: every weight within half a step) + the float
    rounding of the K-term sum of the dequantised products in float32 (gamma_{K+1} sum_k |x_k s_n Q_nk|, Higham
    3.1) + in half precision, the scale rounded to the dtype (u_d sum_k |x_k s_n Q_nk|: int8pack takes the
    scales in x's dtype) and one rounding of the result (u_d |y|). Elementwise, as booleans."""
    k = x.shape[-1]
    x64, deq = x.double(), s.double()[:, None] * q.double()
    exact = x64 @ w.double().T + (0 if b is None else b.double())
    gamma = (k + 1) * U[torch.float32] / (1 - (k + 1) * U[torch.float32])
    bound = x64.abs() @ (s.double()[:, None] / 2).expand(-1, k).T + gamma * (x64.abs() @ deq.abs().T)
    half = y.dtype != torch.float32
    bound = bound + half * U[y.dtype] * ((x64.abs() @ deq.abs().T) + exact.abs()) + 1e-30
    return (y.double() - exact).abs() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("form", int8.FORMS)
def test_each_formulation_is_within_the_quantisation_bound_and_a_wrong_scale_is_not(form, rows, dtype, monkeypatch):
    if form not in int8.available():
        pytest.skip(f"{form} is not in this torch build")
    monkeypatch.setenv(int8.ENV, form)
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(40, 256, generator=g), torch.randn(40, generator=g)
    x = torch.randn(1, rows, 256, generator=g).to(dtype)
    q, s = int8.quantize(w)
    y = int8.int8_linear(x, q, s, b.to(dtype))
    assert y.shape == (1, rows, 40) and y.dtype == dtype
    assert within_bound(y[0], x[0], w, q, s, b.to(dtype)).all()
    # the bound (a worst case over the signs of the rounding errors) still catches a real mistake: each row's
    # scale 25% too large, or each row scaled by its neighbour's scale
    for wrong in (s * 1.25, s.roll(1)):
        assert not within_bound(int8.int8_linear(x, q, wrong, b.to(dtype))[0], x[0], w, q, s, b.to(dtype)).all()


def test_int8_layer_state_dict_and_choice(fresh_choices):
    layer = int8.Int8Linear(64, 32)
    assert {k: v.dtype for k, v in layer.state_dict().items()} == {"weight": torch.int8, "weight_scale": torch.float32}
    layer.weight.copy_(int8.quantize(torch.randn(32, 64))[0])
    layer.weight_scale.fill_(0.01)
    layer(torch.randn(1, 2, 64))
    made = choices.chosen()
    assert list(made) == [f"int8 decode torch.float32 32 64 2 threads={torch.get_num_threads()}"]
    assert list(made.values())[0] in int8.available()


# ---------------------------------------------------------------- converted checkpoints


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, hf_checkpoints, checkpoints):
    """dtype -> the tiny GQA checkpoint converted with --quantize int8; "float" -> its float32 conversion."""
    root = tmp_path_factory.mktemp("int8")
    out = {"float": checkpoints["gqa"]}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = str(root / dtype)
        weights_convert.convert(hf_checkpoints["gqa"], out[dtype], dtype=dtype, quantize="int8")
    return out


def test_the_converter_quantizes_the_decoder_linears_and_lm_head_only(quantized):
    with open(os.path.join(quantized["bfloat16"], "config.json")) as f:
        assert json.load(f)["text"]["quantization"] == "int8"
    model, ref = load_model(quantized["bfloat16"]), load_model(quantized["float"])
    ints = {k for k, v in model.state_dict().items() if v.dtype == torch.int8}
    layers = model.cfg.text.num_hidden_layers
    assert len(ints) == 7 * layers + 1 and "lm_head.weight" in ints
    assert all(k.startswith(("language_model.layers.", "lm_head.")) for k in ints)
    assert model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    q, s = int8.quantize(ref.lm_head.weight)  # the same rounding as quantizing the float32 weights
    assert torch.equal(model.lm_head.weight, q) and torch.equal(model.lm_head.weight_scale, s)


def test_int8_checkpoint_errors_are_one_line(quantized, tmp_path):
    with pytest.raises(MinidamroError, match="already quantized"):
        weights_convert.convert(quantized["float32"], str(tmp_path / "again"), quantize="int8")
    bad = tmp_path / "bad"  # a float checkpoint whose config claims int8
    weights_convert.convert(quantized["float"], str(bad))
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    cfg["text"]["quantization"] = "int8"
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MinidamroError, match="missing: .*weight_scale"):
        load_model(str(bad))
    cfg["text"]["quantization"] = "int4"
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MinidamroError, match="quantization 'int4'"):
        load_model(str(bad))


def test_the_toy_model_converts_to_int8_and_int8_is_not_trained_further(tmp_path, capsys):
    from minidamro.toy import __main__ as toy
    out = str(tmp_path / "toy-int8")
    weights_convert.convert(os.path.join(os.path.dirname(toy.__file__), "model"), out, quantize="int8")
    model = load_model(out)
    assert model.lm_head.weight.dtype == torch.int8 and model.cfg.text.quantization == "int8"
    with pytest.raises(SystemExit):
        toy.main(["train", "--out", str(tmp_path / "again"), "--init", out])
    assert "is quantized" in capsys.readouterr().err and not (tmp_path / "again").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("profile", list(cpu.PROFILES))
def test_int8_generation_and_damro_under_every_profile(profile, dtype, quantized, monkeypatch, fresh_choices):
    monkeypatch.setenv(cpu.PROFILE_ENV, profile)
    model = load_model(quantized[dtype])
    model.cfg.text.eos_token_id = -1
    ids = torch.tensor([1, 5, 6] + [model.cfg.image_token_index] * model.cfg.num_image_tokens + list(range(10, 20)))
    pixels = preprocess(random_image(1), model.cfg.preprocessor)
    assert len(list(generation.generate(model, ids, pixels, generation.Sampler(), 6))) == 6
    outliers, tokens = damro.generate(model, ids, pixels, damro.DamroConfig(topk=3), generation.Sampler(), 6)
    assert len(outliers) == 3 and len(list(tokens)) == 6
    assert choices.unavailable() == {}
    if not cpu.support().int8pack:
        assert "int8pack" not in choices.chosen().values()
