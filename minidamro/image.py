"""Image preprocessing, bit-identical to transformers' `CLIPImageProcessorPil` for the checkpoint's
`preprocessor_config.json` (whose settings the converter copies into config.json as `preprocessor`).

The order and the number types are what make it exact: convert to RGB (transparent pixels composited
onto white), resize with Pillow on the uint8 image, center-crop (zero-padding an image smaller than the
crop), rescale in float64 then cast to float32, normalise in float32.
"""
import math

import torch
from PIL import Image, ImageOps

from . import MinidamroError
from .checkpoint import raw_bytes

# llava-hf's preprocessor_config.json; a converted checkpoint carries its own copy.
LLAVA_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_resize": True, "size": {"shortest_edge": 336}, "resample": 3,  # 3 = PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 336, "width": 336},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def load_image(path: str) -> Image.Image:
    """Open an image file, upright: the EXIF orientation is applied, as transformers' load_image does."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinidamroError(f"cannot read image {path}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, mean) -> Image.Image:
    """The original LLaVA code's `expand2square` ("image_aspect_ratio: pad"): centre the image on a square
    of the mean colour, (122, 116, 104) for CLIP. Not what llava-hf's processor does; off by default."""
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, tuple(int(m * 255) for m in mean))
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    if "shortest_edge" in size:  # short side to `shortest_edge`, long side scaled and floored
        s = size["shortest_edge"]
        short, long = min(height, width), max(height, width)
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)
    return size["height"], size["width"]


def center_crop(x, crop_h: int, crop_w: int):
    """x: (C, H, W). An image smaller than the crop is zero-padded first, centred (ceil of half the gap)."""
    _, H, W = x.shape
    if H < crop_h or W < crop_w:
        nh, nw = max(H, crop_h), max(W, crop_w)
        top, left = math.ceil((nh - H) / 2), math.ceil((nw - W) / 2)
        padded = x.new_zeros((x.shape[0], nh, nw))
        padded[:, top:top + H, left:left + W] = x
        x, H, W = padded, nh, nw
    top, left = (H - crop_h) // 2, (W - crop_w) // 2
    return x[:, top:top + crop_h, left:left + crop_w]


def preprocess(image: Image.Image, cfg: dict = LLAVA_PREPROCESSOR, pad_to_square: bool = False) -> torch.Tensor:
    """A PIL image of any mode and size -> float32 pixels (1, 3, crop_h, crop_w)."""
    image = convert_rgb(image, cfg)
    if pad_to_square:
        image = expand_to_square(image, cfg["image_mean"])
    return clip_pixels(image, cfg)[None]


def convert_rgb(image: Image.Image, cfg: dict) -> Image.Image:
    if cfg.get("do_convert_rgb", True):
        try:
            return to_rgb(image)
        except ValueError as e:  # a mode Pillow cannot convert
            raise MinidamroError(f"cannot convert a {image.mode} image to RGB: {e}") from None
    return image


def clip_pixels(image: Image.Image, cfg: dict) -> torch.Tensor:
    """CLIP's steps on one (already RGB) image: resize, centre crop, rescale, normalise -> (3, crop_h, crop_w).
    LLaVA-NeXT runs them on each of its tiles (anyres.py)."""
    if cfg.get("do_resize", True):
        h, w = resize_size(image.height, image.width, cfg["size"])
        image = image.resize((w, h), resample=cfg.get("resample", 3))
    if image.mode not in ("RGB", "L"):
        raise MinidamroError(f"cannot preprocess a {image.mode} image without converting it to RGB")
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1)  # (C, H, W)
    if cfg.get("do_center_crop", True):
        x = center_crop(x, cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    if cfg.get("do_rescale", True):
        x = (x.double() * cfg["rescale_factor"]).float()  # float64 product, then float32, as HF
    else:
        x = x.float()
    if cfg.get("do_normalize", True):
        mean = torch.tensor(cfg["image_mean"], dtype=torch.float32)[:, None, None]
        std = torch.tensor(cfg["image_std"], dtype=torch.float32)[:, None, None]
        x = (x - mean) / std
    return x.contiguous()


def image_from_hwc(rgb) -> Image.Image:
    """A (height, width, 3) uint8 tensor as an RGB image, without numpy (Image.fromarray would need it)."""
    h, w, _ = rgb.shape
    rgb = rgb.to("cpu", torch.uint8).contiguous()  # held here: raw_bytes does not keep its tensor alive
    return Image.frombytes("RGB", (w, h), bytes(raw_bytes(rgb)))
