"""Image preprocessing: bit-identical to transformers' CLIPImageProcessorPil, for any mode, size and file format.

The reference is `CLIPImageProcessorPil(**preprocessor_config)(image, return_tensors="pt").pixel_values`
(the v5 default `CLIPImageProcessor` uses torchvision and differs slightly). Pixels are random noise:
noise makes every resampling, rounding and cropping difference visible.
"""
import io
import random

import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

import tiny
from minidamro import MinidamroError
from minidamro.image import LLAVA_PREPROCESSOR, load_image, preprocess

PREPROCESSORS = {name: tiny.preprocessor_config(name) for name in tiny.CONFIGS} | {"llava-hf": LLAVA_PREPROCESSOR}
# Two unusual settings a checkpoint may carry: a resize below a non-square crop (the crop zero-pads), and a
# fixed-size resize.
PREPROCESSORS["pad-crop"] = PREPROCESSORS["mha"] | {"size": {"shortest_edge": 20},
                                                     "crop_size": {"height": 30, "width": 25}}
PREPROCESSORS["fixed-size"] = PREPROCESSORS["mha"] | {"size": {"height": 40, "width": 33},
                                                       "crop_size": {"height": 31, "width": 28}}


def crop_size(cfg: dict) -> tuple[int, int]:  # (width, height)
    return cfg["crop_size"]["width"], cfg["crop_size"]["height"]


def sizes(cfg: dict) -> list[tuple[int, int]]:
    """(width, height): tiny (smaller than every crop), very wide, very tall, odd, exactly the crop size."""
    return [(5, 9), (9, 5), (200, 21), (21, 200), (337, 251), (61, 77), crop_size(cfg)]


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_image(kind: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    if kind == "RGB":
        return Image.frombytes("RGB", size, noise(3 * w * h, seed))
    if kind == "RGBA":  # alpha noise covers fully transparent (0), opaque (255) and everything between
        return Image.frombytes("RGBA", size, noise(4 * w * h, seed))
    if kind == "L":
        return Image.frombytes("L", size, noise(w * h, seed))
    if kind == "LA":
        return Image.frombytes("LA", size, noise(2 * w * h, seed))
    if kind in ("P", "P-transparent"):
        im = Image.frombytes("P", size, noise(w * h, seed))
        im.putpalette(noise(3 * 256, seed + 1))
        if kind == "P-transparent":
            im.info["transparency"] = 7  # one palette index is fully transparent (PNG's tRNS)
        return im
    if kind == "CMYK":
        return Image.frombytes("CMYK", size, noise(4 * w * h, seed))
    if kind == "I;16":
        return Image.frombytes("I;16", size, noise(2 * w * h, seed))
    raise ValueError(kind)


KINDS = ["RGB", "RGBA", "L", "LA", "P", "P-transparent", "CMYK", "I;16"]
# Formats that store each mode as it is (JPEG has no alpha, no palette, no 16-bit; PNG has no CMYK).
FORMATS = {"RGB": ["PNG", "JPEG"], "RGBA": ["PNG"], "L": ["PNG", "JPEG"], "LA": ["PNG"], "P": ["PNG"],
           "P-transparent": ["PNG"], "CMYK": ["JPEG"], "I;16": ["PNG"]}
CASES = [(kind, fmt) for kind in KINDS for fmt in [None] + FORMATS[kind]]


def roundtrip(im: Image.Image, fmt: str | None) -> Image.Image:
    if fmt is None:
        return im
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def hf_pixels(im: Image.Image, cfg: dict) -> torch.Tensor:
    return CLIPImageProcessorPil(**cfg)(im, return_tensors="pt").pixel_values


@pytest.fixture(scope="module")
def hf_processors():
    return {name: CLIPImageProcessorPil(**cfg) for name, cfg in PREPROCESSORS.items()}


@pytest.mark.parametrize("kind,fmt", CASES, ids=[f"{k}-{f or 'memory'}" for k, f in CASES])
@pytest.mark.parametrize("config", PREPROCESSORS)
def test_preprocess_is_bit_identical_to_hf(config, kind, fmt, hf_processors):
    cfg = PREPROCESSORS[config]
    for i, size in enumerate(sizes(cfg)):
        im = roundtrip(make_image(kind, size, seed=i), fmt)
        if fmt is not None:  # the file really holds the mode under test
            assert im.mode == kind.split("-")[0] and im.size == size
            assert (im.info.get("transparency") is not None) == (kind == "P-transparent")
        expected = hf_processors[config](im, return_tensors="pt").pixel_values
        got = preprocess(im, cfg)
        ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
        assert got.shape == (1, 3, ch, cw) and got.dtype == torch.float32
        assert torch.equal(got, expected), f"{kind} {size} {fmt}: max diff {(got - expected).abs().max()}"


def test_transparency_is_composited_onto_white():
    """A fully transparent image preprocesses as a white one (transformers' convert_to_rgb), whatever its colour."""
    cfg = LLAVA_PREPROCESSOR
    clear = Image.new("RGBA", (40, 30), (10, 200, 30, 0))
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    assert torch.equal(preprocess(clear, cfg), preprocess(white, cfg))
    assert not torch.equal(preprocess(clear.convert("RGB"), cfg), preprocess(white, cfg))


def expand2square(image: Image.Image, background_color) -> Image.Image:
    """The original LLaVA code's padding ("image_aspect_ratio: pad"), from its definition."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("config", PREPROCESSORS)
def test_pad_to_square_matches_llava_expand2square(config):
    cfg = PREPROCESSORS[config]
    mean_colour = tuple(int(x * 255) for x in cfg["image_mean"])
    if config == "llava-hf":
        assert mean_colour == (122, 116, 104)
    for i, size in enumerate(sizes(cfg) + [(100, 47), (47, 100), (120, 33)]):  # odd and even side differences
        for kind in ("RGB", "RGBA", "L"):
            im = make_image(kind, size, seed=i)
            # LLaVA converts to RGB before padding; transparency composites onto white as in the HF processor.
            rgb = Image.fromarray(convert_to_rgb(im, return_numpy=True))
            expected = hf_pixels(expand2square(rgb, mean_colour), cfg)
            got = preprocess(im, cfg, pad_to_square=True)
            assert torch.equal(got, expected), f"{kind} {size}"
    # Padding changes the result of a non-square image (the test above is not vacuous).
    im = make_image("RGB", (100, 47))
    assert not torch.equal(preprocess(im, cfg, pad_to_square=True), preprocess(im, cfg))


def test_load_image_missing_file(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(MinidamroError) as e:
        load_image(path)
    assert "\n" not in str(e.value) and path in str(e.value)


@pytest.mark.parametrize("content", [b"", noise(4096, 1), "truncated"], ids=["empty", "random-bytes", "truncated"])
def test_load_image_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        make_image("RGB", (64, 48)).save(buf, format="JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(MinidamroError) as e:
        load_image(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_load_image_directory(tmp_path):
    with pytest.raises(MinidamroError) as e:
        load_image(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_image_applies_exif_orientation(tmp_path, fmt):
    """Orientation 6 (rotate 90 degrees clockwise to view): a 40x24 stored image is 24x40 upright."""
    path = tmp_path / f"rotated.{fmt.lower()}"
    im = make_image("RGB", (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    im.save(path, format=fmt, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 24) and raw.getexif().get(0x0112) == 6
    loaded = load_image(str(path))
    assert loaded.size == (24, 40)
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
    assert loaded.tobytes() == upright.tobytes()
    assert loaded.tobytes() == hf_load_image(str(path)).tobytes()  # what transformers' load_image returns


def test_load_image_keeps_mode_for_preprocess(tmp_path):
    """Loading keeps the file's mode and transparency: the loaded image preprocesses exactly as the HF processor
    handles the opened file. (transformers' own load_image converts to RGB first, dropping alpha without
    compositing, so it is not the reference here.)"""
    for kind, fmt in (("P-transparent", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")):
        path = tmp_path / f"{kind}.{fmt.lower()}"
        make_image(kind, (50, 37)).save(path, format=fmt)
        im = load_image(str(path))
        assert im.mode == kind.split("-")[0], kind
        with Image.open(path) as raw:
            assert torch.equal(preprocess(im), hf_pixels(raw, LLAVA_PREPROCESSOR)), kind
