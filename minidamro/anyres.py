"""LLaVA-NeXT's "anyres": an image of any size -> a base tile and a grid of tiles -> one run of image tokens.

The only thing LLaVA-NeXT (LLaVA-1.6) adds to LLaVA-1.5. Image side, bit-identical to transformers'
`LlavaNextImageProcessorPil`:

1. pick the canvas among `image_grid_pinpoints` that keeps the most of the image's resolution;
2. resize the image to fit it (aspect kept), centre it on the canvas with zero padding;
3. cut the canvas into tiles of the ViT's input size, row-major; the base tile is the whole image squashed
   to one tile. Each of [base] + tiles then goes through CLIP's steps, as LLaVA-1.5's single image.

Token side, as `LlavaNextModel.pack_image_features`: the tiles' features are laid out as one big feature
grid, the rows or columns that only saw padding are cut off ("unpadding"), one learned `image_newline`
follows every remaining row, and the base tile's features come first.
"""
import math

import torch
from PIL import Image

from . import MinidamroError
from .image import clip_pixels, convert_rgb, preprocess as preprocess_single

Size = tuple[int, int]  # (height, width), as transformers writes sizes


# ------------------------------------------------------------------------------------------- image side


def select_best_resolution(size: Size, pinpoints) -> Size:
    """The canvas (h, w) that shows most of the image: the largest effective resolution (the image scaled to
    fit it, never counted above its own pixel count), ties to the least wasted canvas area, then list order."""
    H, W = size
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / W, h / H)
        effective = min(int(W * scale) * int(H * scale), W * H)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def fit_size(size: Size, canvas: Size) -> Size:
    """The image resized to fit the canvas, aspect kept: the tighter side fills it, the other is rounded up."""
    (H, W), (h, w) = size, canvas
    if w / W < h / H:
        return min(math.ceil(H * w / W), h), w
    return h, min(math.ceil(W * h / H), w)


def pad_centred(image: Image.Image, canvas: Size) -> Image.Image:
    """Zero pixels around the image up to the canvas; an odd leftover pixel goes to the bottom / right."""
    h, w = canvas
    out = Image.new(image.mode, (w, h))  # all zeros: after normalisation a padded pixel is -mean / std
    out.paste(image, ((w - image.width) // 2, (h - image.height) // 2))
    return out


def cut_tiles(canvas: Image.Image, tile: int) -> list[Image.Image]:
    """Tiles of tile x tile pixels, row by row (the canvas is a whole number of tiles each way)."""
    return [canvas.crop((x, y, x + tile, y + tile))
            for y in range(0, canvas.height, tile) for x in range(0, canvas.width, tile)]


def base_tile_size(cfg: dict) -> Size:
    """The base tile: the whole image resized to `size` (height x width, or shortest_edge squared)."""
    size = cfg["size"]
    return (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2


def preprocess(image: Image.Image, cfg: dict, pinpoints) -> tuple[torch.Tensor, Size]:
    """A PIL image -> pixels (1 + n, 3, S, S), [base] + n tiles, and the image's (height, width)."""
    image = convert_rgb(image, cfg)
    size, resample = (image.height, image.width), cfg.get("resample", 3)
    canvas = select_best_resolution(size, pinpoints)
    h, w = fit_size(size, canvas)
    tiles = cut_tiles(pad_centred(image.resize((w, h), resample=resample), canvas), cfg["crop_size"]["height"])
    bh, bw = base_tile_size(cfg)
    base = image.resize((bw, bh), resample=resample)  # square: the aspect is NOT kept here
    return torch.stack([clip_pixels(t, cfg) for t in [base] + tiles]), size


def model_pixels(image: Image.Image, cfg, pad_to_square: bool = False) -> tuple[torch.Tensor, Size | None]:
    """Pixels for any model: LLaVA-1.5's one tile (1, 3, S, S) and no size, or NeXT's tiles and the size;
    InstructBLIP's image is LLaVA-1.5's kind (BLIP's settings: resized to S x S, no crop). `cfg`: the model's."""
    if pad_to_square and cfg.model_type == "instructblip":
        raise MinidamroError("--pad-square is LLaVA-1.5's; InstructBLIP squashes the image to its square size")
    if cfg.model_type == "llava_next":
        if pad_to_square:
            raise MinidamroError("--pad-square is LLaVA-1.5's; LLaVA-NeXT keeps the aspect ratio itself (anyres)")
        return preprocess(image, cfg.preprocessor, cfg.image_grid_pinpoints)
    return preprocess_single(image, cfg.preprocessor, pad_to_square), None


# ------------------------------------------------------------------------------------------- token side


def grid_shape(size: Size, pinpoints, tile: int) -> Size:
    """(rows, cols) of tiles the image was cut into."""
    h, w = select_best_resolution(size, pinpoints)
    return h // tile, w // tile


def unpadded_box(size: Size, grid_h: int, grid_w: int) -> tuple[slice, slice]:
    """Rows and columns of the (grid_h, grid_w) feature grid that cover the image, not its padding.

    The image's side that fills the canvas keeps all features; on the other, the padding's share is cut
    off evenly from both ends. `int(round(x, 7))` is transformers' definition (it absorbs float error)."""
    H, W = size
    if W / H > grid_w / grid_h:  # wider than the grid: padding above and below
        pad = (grid_h - int(round(H * (grid_w / W), 7))) // 2
        return slice(pad, grid_h - pad), slice(0, grid_w)
    pad = (grid_w - int(round(W * (grid_h / H), 7))) // 2
    return slice(0, grid_h), slice(pad, grid_w - pad)


def pack(features, size: Size, newline, pinpoints, tile: int):
    """features (1 + n, N, D) projected, [base] + tiles -> (num_image_tokens, D): the base tile's N features,
    then the unpadded tile grid row by row, each row followed by `newline` (D,)."""
    base, tiles = features[0], features[1:]
    rows, cols = grid_shape(size, pinpoints, tile)
    g = math.isqrt(features.shape[1])  # features per tile side (24 for ViT-L/14 at 336 px)
    D = features.shape[-1]
    grid = tiles.view(rows, cols, g, g, D).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, D)  # tiles side by side
    r, c = unpadded_box(size, rows * g, cols * g)
    grid = grid[r, c]                                                                  # (h, w, D)
    grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, D)], dim=1)  # (h, w + 1, D)
    return torch.cat([base, grid.reshape(-1, D)])


def num_image_tokens(size: Size, pinpoints, tile: int, per_tile: int) -> int:
    """What `pack` returns for an image of this size: per_tile + h * (w + 1)."""
    rows, cols = grid_shape(size, pinpoints, tile)
    g = math.isqrt(per_tile)
    r, c = unpadded_box(size, rows * g, cols * g)
    return per_tile + (r.stop - r.start) * (c.stop - c.start + 1)
