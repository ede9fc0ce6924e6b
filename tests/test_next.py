"""LLaVA-NeXT (anyres) parity with transformers' LlavaNextForConditionalGeneration and LlavaNextProcessor.

Two tiny random NeXT checkpoints (tests/tiny.py NEXT_CONFIGS: MHA and GQA, pinpoints scaled to the tile)
and images of many aspect ratios: very wide, very tall, smaller than a tile, 1 x 1 px, exactly a pinpoint,
square, near-square. Pixels and image-token counts must be equal; the packing step is pure data movement
and must be bit-equal; projected features and logits must be within a bound derived from float32 rounding;
greedy tokens must equal transformers' generate().
"""
import json
import os
import random
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

import tiny
import tolerance
import weights_convert
from minidamro import MinidamroError, anyres
from minidamro import analyze as analyze_cmd
from minidamro.generate import main
from minidamro.generation import Sampler, generate, new_cache
from minidamro.llava import load_model, read_config
from minidamro.tokenizer import build_prompt

NAMES = list(tiny.NEXT_CONFIGS)
PROMPT = build_prompt("What is shown in this picture?", model_type="llava_next")
# (width, height): very wide, very tall, one pixel thin (the unpadded grid keeps no row / column: only the
# newlines are left), smaller than a tile, one pixel, exact pinpoints (1x2, 2x1, 3x1 of the
# 28 px tile; 2x2 of the 30 px one), square, near-square, large.
SIZES = [(200, 20), (20, 200), (3000, 1), (1, 3000), (10, 7), (1, 1), (56, 28), (28, 56), (28, 84), (60, 60), (45, 45), (53, 71),
         (301, 299), (640, 480)]
U = 2.0 ** -24  # float32 unit roundoff


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(w * 1000 + h + seed).randbytes(3 * w * h))


def linear_bound(linear, x_got, x_ref):
    """Elementwise bound on |linear(x_got) - linear_ref(x_ref)| for y = x W^T + b computed by two float32
    implementations, derived, not tuned:

    - the input difference propagates exactly through the weights: |W| |x_got - x_ref|;
    - each implementation's dot product of K terms plus the bias rounds by at most (K + 1) u sum_i |w_i x_i|
      + |b| (the classic gamma_(K+1) bound, first order; u = 2^-24), in any summation order or blocking:
      two of them, 2 (K + 1) u (|W| max(|x_got|, |x_ref|) + |b|).

    Computed in float64 so the bound itself does not round."""
    w = linear.weight.detach().double().abs()
    b = linear.bias.detach().double().abs() if linear.bias is not None else 0.0
    K = w.shape[1]
    mag = torch.maximum(x_got.abs(), x_ref.abs()).double() @ w.T + b
    return (x_got - x_ref).double().abs() @ w.T + 2 * (K + 1) * U * mag


def inputs_of(module, run):
    """The first positional input of `module` during `run()` (a forward pre-hook), cloned."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


class Next:
    def __init__(self, name, hf_dir, model_dir, hf_tok):
        self.name = name
        self.hf = tiny.hf_model(hf_dir, attn_implementation="sdpa")  # minidamro's fast path is SDPA too
        # the same model in float64: the exact values tests/tolerance.py measures the rounding error against
        self.hf64 = tiny.hf_model(hf_dir, dtype=torch.float64, attn_implementation="sdpa")
        self.model, self.model_dir = load_model(model_dir), model_dir
        c = tiny.NEXT_CONFIGS[name]
        self.processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(**tiny.preprocessor_config(name)), tokenizer=hf_tok,
            patch_size=c["vision"]["patch_size"], vision_feature_select_strategy="default",
            num_additional_image_tokens=1)  # as llava-hf's v1.6 processor_config.json

    def inputs(self, size):
        return self.processor(images=noise_image(*size), text=PROMPT, return_tensors="pt")


@pytest.fixture(scope="module")
def hf_tok(tokenizer_model):
    return tiny.hf_tokenizer(tokenizer_model)


@pytest.fixture(scope="module", params=NAMES)
def nx(request, next_hf_checkpoints, next_checkpoints, hf_tok) -> Next:
    return Next(request.param, next_hf_checkpoints[request.param], next_checkpoints[request.param], hf_tok)


# ------------------------------------------------------------------------------------------ image side


def test_best_resolution_and_token_count_equal_transformers_for_every_size():
    """The pure arithmetic, over llava-v1.6's real pinpoints and a sweep of sizes (1 px to 4000 px, every
    aspect): the canvas as transformers chooses it, and the image-token count as LlavaNextProcessor counts it."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only its counting methods, no tokenizer needed
    proc.image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints)
    proc.patch_size, proc.num_additional_image_tokens = 14, 1
    rnd = random.Random(0)
    sizes = [(h, w) for h in (1, 2, 7, 335, 336, 337, 480, 672, 673, 1008, 1009) for w in (1, 3, 336, 500, 672, 1008)]
    sizes += [(rnd.randint(1, 4000), rnd.randint(1, 4000)) for _ in range(300)]
    for size in sizes:
        assert anyres.select_best_resolution(size, pinpoints) == hf_select_best_resolution(size, pinpoints), size
        assert anyres.num_image_tokens(size, pinpoints, 336, 576) == proc._get_number_of_features(*size, 336, 336) - 1
        rows, cols = anyres.grid_shape(size, pinpoints, 336)
        grid = torch.zeros(1, rows * 24, cols * 24)
        r, c = anyres.unpadded_box(size, rows * 24, cols * 24)
        assert unpad_image(grid, list(size)).shape[1:] == grid[:, r, c].shape[1:], size
    # worked facts: a square image up to 336 px gets the 1 x 2 canvas (ties on effective resolution go to the
    # least waste), a larger one 2 x 2; an exact pinpoint keeps every row: 576 + h (w + 1) tokens
    assert anyres.select_best_resolution((300, 300), pinpoints) == (336, 672)
    assert anyres.select_best_resolution((500, 500), pinpoints) == (672, 672)
    assert anyres.num_image_tokens((336, 672), pinpoints, 336, 576) == 576 + 24 * 49


@pytest.mark.parametrize("size", SIZES)
def test_pixels_sizes_and_token_counts_equal_the_processor(nx, size):
    inputs = nx.inputs(size)
    pixels, image_size = anyres.model_pixels(noise_image(*size), nx.model.cfg)
    assert torch.equal(pixels, inputs.pixel_values[0])  # bit for bit, base tile first
    assert list(image_size) == inputs.image_sizes[0].tolist() == [size[1], size[0]]
    n = int((inputs.input_ids[0] == tiny.IMAGE_TOKEN).sum())
    assert nx.model.cfg.image_tokens(image_size) == n
    assert nx.model.image_features(pixels, image_size).shape == (n, nx.model.cfg.text.hidden_size)


def test_modes_other_than_rgb_match_the_processor(nx):
    for image in [noise_image(40, 23).convert("L"), noise_image(23, 40).convert("RGBA"),
                  noise_image(31, 31).convert("P"), noise_image(70, 20).convert("CMYK")]:
        inputs = nx.processor(images=image, text=PROMPT, return_tensors="pt")
        assert torch.equal(anyres.model_pixels(image, nx.model.cfg)[0], inputs.pixel_values[0]), image.mode


def test_pad_square_is_refused_for_next(nx):
    with pytest.raises(MinidamroError, match="pad-square"):
        anyres.model_pixels(noise_image(20, 30), nx.model.cfg, pad_to_square=True)


# ------------------------------------------------------------------------------------------ model side


@pytest.mark.parametrize("size", SIZES)
def test_packing_is_transformers_bit_for_bit(nx, size):
    """pack_image_features is data movement only: on the same per-tile features, the result is identical."""
    inputs = nx.inputs(size)
    D = nx.model.cfg.text.hidden_size
    tiles = torch.randn(inputs.pixel_values.shape[1], nx.model.cfg.num_image_tokens, D)
    newline = torch.randn(D)
    expected = nx.hf.model.pack_image_features([tiles], inputs.image_sizes, "default", newline)[0][0]
    got = anyres.pack(tiles, tuple(inputs.image_sizes[0].tolist()), newline, nx.model.cfg.image_grid_pinpoints,
                      nx.model.cfg.vision.image_size)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [(200, 20), (20, 200), (10, 7), (56, 28), (53, 71)])
def test_features_and_logits_within_float32_bounds(nx, size):
    """Projected features: the projector's last linear within linear_bound of transformers' (its input, the
    GELU output, taken from both); packed features: those, moved bit for bit; logits: lm_head within
    linear_bound given both final hidden states; and the inputs of both linears within tests/tolerance.py's
    rounding bound, measured against transformers in float64, as test_parity.py holds the shared code."""
    inputs = nx.inputs(size)
    pixels, image_size = inputs.pixel_values[0], tuple(inputs.image_sizes[0].tolist())
    ids = inputs.input_ids[0]
    m, hf = nx.model, nx.hf
    with torch.no_grad():
        hf_out = []
        hf_in = inputs_of(hf.model.multi_modal_projector.linear_2, lambda: hf_out.append(
            hf.model.get_image_features(inputs.pixel_values, inputs.image_sizes).pooler_output[0]))
        mine_out = []
        mine_in = inputs_of(m.multi_modal_projector.linear_2,
                            lambda: mine_out.append(m.image_features(pixels, image_size)))
        hf_tiles = hf.model.multi_modal_projector(  # transformers' per-tile projected features, unpacked
            hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[m.cfg.vision_feature_layer][:, 1:])
        mine_tiles = m.encode_image(pixels)
        exact_in = inputs_of(nx.hf64.model.multi_modal_projector.linear_2, lambda: nx.hf64.model.get_image_features(
            inputs.pixel_values.double(), inputs.image_sizes))
    tolerance.assert_close(mine_in[0], hf_in[0], exact_in[0], "NeXT projector linear_2 input")
    assert ((mine_tiles - hf_tiles).abs() <= linear_bound(m.multi_modal_projector.linear_2, mine_in[0], hf_in[0])).all()
    assert torch.equal(mine_out[0], anyres.pack(mine_tiles, image_size, m.image_newline, m.cfg.image_grid_pinpoints,
                                                m.cfg.vision.image_size))
    assert torch.equal(hf_out[0], hf.model.pack_image_features([hf_tiles], inputs.image_sizes, "default",
                                                               hf.model.image_newline)[0][0])
    assert torch.equal(m.image_newline, hf.model.image_newline)

    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        hf_h = out.hidden_states[-1][0]  # after the final norm
        h = m.language_model(m.embed(ids, mine_out[0]), [new_cache(m, len(ids))])[0]
        logits = m.logits(h)
        exact_h = nx.hf64(**{**inputs, "pixel_values": inputs.pixel_values.double()},
                          output_hidden_states=True).hidden_states[-1][0]
    tolerance.assert_close(h, hf_h, exact_h, "NeXT final hidden state")
    assert ((logits - out.logits[0]).abs() <= linear_bound(m.lm_head, h, hf_h)).all()


@pytest.mark.parametrize("size", [(200, 20), (20, 200), (10, 7), (28, 56), (53, 71)])
def test_greedy_tokens_equal_generate(nx, size):
    inputs = nx.inputs(size)
    with torch.no_grad():
        ref = nx.hf.generate(**inputs, do_sample=False, max_new_tokens=16)[0, inputs.input_ids.shape[1]:]
    pixels, image_size = anyres.model_pixels(noise_image(*size), nx.model.cfg)
    got = list(generate(nx.model, inputs.input_ids[0], pixels, Sampler(), 16, image_size=image_size))
    assert got == ref.tolist()


# ------------------------------------------------------------------------------------------ converter


def test_three_layouts_convert_to_the_same_model(next_hf_checkpoints, tmp_path):
    """transformers v5 save_pretrained (the fixture), its in-memory names (`model.image_newline`, ...), and
    the hub's v4 layout (`vision_tower.vision_model.*`): identical converted weights; the config records the
    model kind and the pinpoints."""
    src = next_hf_checkpoints["next_gqa"]
    layouts = {"v5": src, "inmem": str(tmp_path / "inmem"), "hub": str(tmp_path / "hub")}
    tiny.hf_model(src).save_pretrained(layouts["inmem"], save_original_format=False)
    os.makedirs(layouts["hub"])
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()},
              os.path.join(layouts["hub"], "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), layouts["hub"])
    assert "model.image_newline" in safe_open(os.path.join(layouts["inmem"], "model.safetensors"), "pt").keys()
    for d in layouts.values():
        for f in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
            if not os.path.exists(os.path.join(d, f)):
                shutil.copy(os.path.join(src, f), d)
    states = {}
    for name, d in layouts.items():
        weights_convert.convert(d, str(tmp_path / f"out-{name}"))
        cfg = read_config(str(tmp_path / f"out-{name}"))
        assert cfg.model_type == "llava_next" and cfg.image_grid_pinpoints == tiny.NEXT_CONFIGS["next_gqa"]["pinpoints"]
        states[name] = load_model(str(tmp_path / f"out-{name}")).state_dict()
        with open(os.path.join(str(tmp_path / f"out-{name}"), "config.json")) as f:
            assert json.load(f)["model_type"] == "llava_next"
    for name in ("inmem", "hub"):
        assert states[name].keys() == states["v5"].keys()
        assert all(torch.equal(states[name][k], states["v5"][k]) for k in states["v5"]), name
    assert torch.equal(states["v5"]["image_newline"], tensors["image_newline"])


def edit(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


NEXT_ERRORS = {
    "pinpoint-not-tiles": (lambda c, p: c.update(image_grid_pinpoints=[[28, 50]]), "unsupported image_grid_pinpoints"),
    "pinpoints-malformed": (lambda c, p: c.update(image_grid_pinpoints=[28, 56]), "unsupported image_grid_pinpoints"),
    "cls-kept": (lambda c, p: c.update(vision_feature_select_strategy="full"),
                 "vision_feature_select_strategy 'full' for llava_next"),
    "mistral": (lambda c, p: c["text_config"].update(model_type="mistral"), "text_config model_type 'mistral'"),
    "processor-pinpoints": (lambda c, p: p.update(image_grid_pinpoints=[[28, 56]]), "differ from config.json's"),
}


@pytest.mark.parametrize("case", list(NEXT_ERRORS))
def test_next_refusals_are_one_line(case, next_hf_checkpoints, tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(next_hf_checkpoints["next_mha"], src)
    pre = {}  # what to change in preprocessor_config.json
    fn, message = NEXT_ERRORS[case]
    edit(os.path.join(src, "config.json"), lambda c: fn(c, pre))
    if pre:
        edit(os.path.join(src, "preprocessor_config.json"), lambda p: p.update(pre))
    with pytest.raises(SystemExit) as e:
        weights_convert.main([src, out])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------ command line


def test_generate_and_analyze_commands_run_next_unchanged(nx, next_checkpoints, tmp_path, capsys):
    """The user's side is unchanged: an image file and a converted NeXT directory; the tokens are transformers'."""
    path = str(tmp_path / "wide.png")
    noise_image(90, 25).save(path)
    main([path, "--model", next_checkpoints[nx.name], "--prompt", "What is shown in this picture?", "--json",
          "--max-new-tokens", "10", "--seed", "1"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    inputs = nx.inputs((90, 25))
    with torch.no_grad():
        ref = nx.hf.generate(**inputs, do_sample=False, max_new_tokens=10)[0, inputs.input_ids.shape[1]:]
    assert got["token_ids"] == ref.tolist()

    main([path, "--model", next_checkpoints[nx.name], "--method", "damro", "--topk", "3", "--json",
          "--max-new-tokens", "4"])
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outliers"]) == 3

    out = str(tmp_path / "analysis")
    analyze_cmd.main([path, "--model", next_checkpoints[nx.name], "--max-new-tokens", "3", "--topk", "3",
                      "--out", out])
    capsys.readouterr()
    with open(os.path.join(out, "analysis.json")) as f:
        a = json.load(f)
    grid = nx.model.cfg.vision.image_size // nx.model.cfg.vision.patch_size
    assert a["grid"] == grid and len(a["vit_attention"]) == grid ** 2 and len(a["outliers"]) == 3
    assert len(a["tile_outliers"]) == inputs.pixel_values.shape[1] - 1  # one per grid tile, base excluded
    n = int((inputs.input_ids[0] == tiny.IMAGE_TOKEN).sum())
    assert all(len(t["attention"]) == n for t in a["tokens"])

    with pytest.raises(SystemExit):
        main([path, "--model", next_checkpoints[nx.name], "--pad-square"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pad-square" in err and err.count("\n") == 1
