"""Pillow-only figures for analyze.py: the ViT [CLS] attention map (the paper's Figure 1) and one decoder
attention map per generated word (Figures 2-3). No plotting library: a colour map, nearest-neighbour
upscaling of the patch grid, a colour bar and text.
"""
import functools
import math

from PIL import Image, ImageDraw, ImageFont

# viridis (van der Walt & Smith, matplotlib 2.0's default colour map, CC0), sampled at 11 evenly spaced
# points (the common #440154 ... #fde725 table); between anchors we interpolate linearly in sRGB, which
# keeps it perceptually ordered and readable in grey.
VIRIDIS = ["440154", "482475", "414487", "355f8d", "2a788e", "21918c", "22a884", "44bf70", "7ad151",
           "bddf26", "fde725"]
ANCHORS = [tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in VIRIDIS]
OVERLAY = 0.65     # opacity of the heat map over the image
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (90, 90, 90)


def colour(t: float) -> tuple[int, int, int]:
    """t in [0, 1] (clamped) -> an RGB colour of the map."""
    t = min(max(t, 0.0), 1.0) * (len(ANCHORS) - 1)
    i = min(int(t), len(ANCHORS) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(ANCHORS[i], ANCHORS[i + 1]))


def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable FreeType font, Pillow >= 10.1
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _glyph(f, c: str) -> bytes:
    im = Image.new("L", (64, 64))
    ImageDraw.Draw(im).text((16, 16), c, fill=255, font=f)
    return im.tobytes()


def printable(text: str, f) -> str:
    """`text` with the characters `f` has no glyph for written as <U+XXXX> (Pillow's built-in font covers
    little beyond ASCII; a missing glyph would otherwise be an anonymous box)."""
    return "".join(c if c.isascii() or _glyph(f, c) != _glyph(f, "\U0010FFFD") else f"<U+{ord(c):04X}>"
                   for c in text)


def fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def heat(values: list[float], grid: int, lo: float, hi: float, size: int) -> Image.Image:
    """Row-major patch values -> a size x size colour image, each patch a flat block (nearest neighbour)."""
    span = hi - lo or 1.0
    small = Image.new("RGB", (grid, grid))
    small.putdata([colour((v - lo) / span) for v in values])
    return small.resize((size, size), Image.NEAREST)


def overlay(image: Image.Image, values, grid: int, lo: float, hi: float) -> Image.Image:
    """The heat map over the image in grey: the image's own hues would otherwise mix into the colour scale."""
    return Image.blend(image.convert("L").convert("RGB"), heat(values, grid, lo, hi, image.width), OVERLAY)


def colour_bar(height: int, lo: float, hi: float, f, label: str = "") -> Image.Image:
    """A vertical bar, max at the top, with its min and max written beside it."""
    bar_w = 18
    ticks = [fmt(hi), fmt((lo + hi) / 2), fmt(lo)]
    text_w = max(int(f.getlength(t)) for t in ticks + [label]) + 8
    out = Image.new("RGB", (bar_w + text_w, height), WHITE)
    strip = Image.new("RGB", (1, height))
    strip.putdata([colour(1 - y / max(height - 1, 1)) for y in range(height)])
    out.paste(strip.resize((bar_w, height)), (0, 0))
    d = ImageDraw.Draw(out)
    d.rectangle([0, 0, bar_w - 1, height - 1], outline=GREY)
    asc = f.getbbox("0")[3]
    for t, y in zip(ticks, (0, (height - asc) // 2, height - asc - 2)):
        d.text((bar_w + 5, y), t, fill=BLACK, font=f)
    return out


def mark(d: ImageDraw.ImageDraw, patch: int, grid: int, cell: float, x0: int, y0: int, text: str | None, f):
    """Outline patch `patch` (row-major) and write `text` in it, white on a black outline."""
    r, c = divmod(patch, grid)
    box = [x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1]
    d.rectangle(box, outline=BLACK, width=3)
    d.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], outline=WHITE, width=1)
    if text is not None:
        d.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=WHITE, font=f, anchor="mm",
               stroke_width=2, stroke_fill=BLACK)


def panel_size(grid: int, target: int) -> int:
    return grid * max(1, math.ceil(target / grid))  # a whole number of pixels per patch


def vit_figure(image: Image.Image, attention: list[float], grid: int, outliers: list[int], title: str,
               subtitle: str) -> Image.Image:
    """The image beside the [CLS] attention over it, the outliers outlined and numbered by rank."""
    size = panel_size(grid, 448)
    cell = size // grid
    image = image.resize((size, size), Image.NEAREST if size % image.width == 0 else Image.BICUBIC)
    lo, hi = min(attention), max(attention)
    f_title, f_text, f_rank = font(22), font(17), font(max(10, min(24, int(cell * 0.75))))
    bar = colour_bar(size, lo, hi, f_text)
    pad, top = 16, 92
    out = Image.new("RGB", (pad * 4 + 2 * size + bar.width, top + size + pad), WHITE)
    d = ImageDraw.Draw(out)
    d.text((pad, 10), title, fill=BLACK, font=f_title)
    d.text((pad, 40), subtitle, fill=GREY, font=f_text)
    x_map = 2 * pad + size
    d.text((pad, top - 24), "input (preprocessed)", fill=BLACK, font=f_text)
    d.text((x_map, top - 24), "[CLS] attention over the patches", fill=BLACK, font=f_text)
    out.paste(image, (pad, top))
    out.paste(overlay(image, attention, grid, lo, hi), (x_map, top))
    for rank, p in enumerate(outliers, 1):
        mark(d, p, grid, cell, x_map, top, str(rank), f_rank)
    out.paste(bar, (x_map + size + pad, top))
    return out


def decoder_figure(image: Image.Image, tiles: list[tuple[str, str, list[float]]], grid: int, outliers: list[int],
                   title: str, subtitle: str, columns: int = 6) -> Image.Image:
    """One tile per (title, caption, patch row): the row over the image, on one shared colour scale, with the
    ViT's `outliers` outlined in every tile for comparison."""
    size = panel_size(grid, 180)
    cell = size // grid
    image = image.resize((size, size), Image.NEAREST if size % image.width == 0 else Image.BICUBIC)
    values = [v for _, _, row in tiles for v in row] or [0.0]
    lo, hi = min(values), max(values)
    f_title, f_text, f_word = font(22), font(17), font(18)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    pad, top, label = 16, 76, 46
    tile_w, tile_h = size + pad, size + label + pad
    grid_w = columns * tile_w
    bar = colour_bar(min(rows * tile_h - label - pad, 3 * size) if rows else size, lo, hi, f_text)
    width = max(pad + grid_w + bar.width + pad, int(f_text.getlength(subtitle)) + 2 * pad)
    out = Image.new("RGB", (width, top + rows * tile_h), WHITE)
    d = ImageDraw.Draw(out)
    d.text((pad, 10), title, fill=BLACK, font=f_title)
    d.text((pad, 40), subtitle, fill=GREY, font=f_text)
    for n, (word, caption, row) in enumerate(tiles):
        x, y = pad + (n % columns) * tile_w, top + (n // columns) * tile_h
        word = printable(word, f_word)
        while f_word.getlength(word) > size and len(word) > 2:
            word = word[:-2] + "…"
        d.text((x, y), word, fill=BLACK, font=f_word)
        d.text((x, y + 22), caption, fill=GREY, font=f_text)
        out.paste(overlay(image, row, grid, lo, hi), (x, y + label))
        for p in outliers:
            mark(d, p, grid, cell, x, y + label, None, None)
    out.paste(bar, (pad + grid_w, top + label))
    return out
