"""Outlier-token diagnostics of a ViT: does it have the high-norm tokens that DAMRO's [CLS] attention picks?

Large ViTs (CLIP ViT-L among them) grow a few patch tokens whose hidden-state norm is many times the others',
mostly on redundant background patches, that take a large share of the [CLS] attention (Darcet et al., "Vision
Transformers Need Registers", ICLR 2024). DAMRO's outliers are the top-k patches of that attention. Per image:

    norm_ratio[l]      the largest patch-token norm over the median patch-token norm, in hidden state l
                       (0: the embeddings after pre_layrnorm; l: the output of encoder layer l - 1; the last
                       is the state LLaVA reads). Hidden state `selection_layer` is what the selection layer's
                       attention reads, so its ratio is the one that matters for DAMRO.
    top_k              DAMRO's outliers (damro.select_outliers on damro.cls_attention, as DAMRO selects them)
    top_k_norm_ratio   each outlier's norm over the median, in that same hidden state
    top_k_share        the share of the [CLS] attention row (all 1 + N tokens) the top-k patches take
    cls_self           the share [CLS] gives itself
    top_k_background   (when patch labels are given, as the toy world has them) the share of the top-k on
                       background patches
    high_norm          per hidden state, the patches whose norm is >= HIGH_NORM x the median (and, with labels,
                       high_norm_background: how many of them are background); summary gives the totals

`summary` aggregates images; `figure` draws the norm ratio per hidden state and the top-k share, so that two
models can be compared at a glance. LLaVA-NeXT: the base tile's (the one DAMRO uses).
"""
import math
import statistics

import torch
from PIL import Image, ImageDraw

from . import damro, draw
from .capture import Capture

HIGH_NORM = 3.0   # "outlier" norm: at least this many times the median patch norm (the criterion reported)
HALF = 0.5        # and the top-k together taking at least this share of the [CLS] attention


@torch.inference_mode()
def diagnose(model, pixels, k: int, mode: str = "full", labels=None) -> dict:
    """One image (pixels as model.encode_image takes them; only tile 0 is run and measured) -> the numbers
    above. labels: (N,) ints per patch, 0 = background (optional)."""
    layer = damro.selection_layer(model)
    want = Capture(vit_qk_layers=(layer,)) if mode == "full" else Capture(vit_layers=(layer,))
    states = []
    model.encode_image(pixels[:1].to(model.lm_head.weight.device), want, states)  # any model's vision tower
    norms = [s[0, 1:].float().norm(dim=-1) for s in states]           # per hidden state: (N,) patch norms
    medians = [n.median() for n in norms]
    row = damro.cls_attention(want, layer, mode)                      # (1 + N,) float32
    top = damro.select_outliers(row, k)                               # patch indices, descending attention
    out = {"selection_layer": layer, "k": k,
           "norm_ratio": [float(n.max() / m) for n, m in zip(norms, medians)],
           "top_k": top.tolist(),
           "top_k_norm_ratio": [float(norms[layer][j] / medians[layer]) for j in top.tolist()],
           "top_k_share": float(row[1:][top].sum()),
           "cls_self": float(row[0])}
    high = [(n / m >= HIGH_NORM).nonzero()[:, 0].tolist() for n, m in zip(norms, medians)]
    out["high_norm"] = [len(h) for h in high]  # per hidden state: patches at >= HIGH_NORM x the median norm
    if labels is not None:
        out["top_k_background"] = sum(int(labels[j]) == 0 for j in top.tolist()) / k
        out["high_norm_background"] = [sum(int(labels[j]) == 0 for j in h) for h in high]
    return out


def has_outliers(d: dict) -> bool:
    """The criterion: every one of the top-k has norm >= HIGH_NORM x the median, and together they take >= HALF
    of the [CLS] attention."""
    return min(d["top_k_norm_ratio"]) >= HIGH_NORM and d["top_k_share"] >= HALF


def summary(per_image: list[dict]) -> dict:
    """Medians over images (and the share of images that meet the criterion)."""
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    n_states = len(per_image[0]["norm_ratio"])
    out = {"images": len(per_image), "selection_layer": per_image[0]["selection_layer"], "k": per_image[0]["k"],
           "norm_ratio": [med([d["norm_ratio"][i] for d in per_image]) for i in range(n_states)],
           "top_k_norm_ratio_min": med([min(d["top_k_norm_ratio"]) for d in per_image]),
           "top_k_share": med([d["top_k_share"] for d in per_image]),
           "cls_self": med([d["cls_self"] for d in per_image]),
           "with_outliers": sum(map(has_outliers, per_image)) / len(per_image),
           "criterion": f"all top-k norms >= {HIGH_NORM:g}x the median patch norm and top-k share >= {HALF:g}"}
    out["high_norm"] = [sum(d["high_norm"][i] for d in per_image) for i in range(n_states)]  # totals
    if "top_k_background" in per_image[0]:
        out["top_k_background"] = sum(d["top_k_background"] for d in per_image) / len(per_image)
        out["high_norm_background"] = [sum(d["high_norm_background"][i] for d in per_image) for i in range(n_states)]
    return out


def table(named: dict[str, dict]) -> str:
    """summary() dicts -> text: per model the norm ratio per hidden state, the top-k's smallest norm ratio,
    their [CLS] share, [CLS]'s own, the share on background, and the images that meet the criterion."""
    first = next(iter(named.values()))
    states = len(first["norm_ratio"])
    head = (f"{'model':16} " + " ".join(f"{'norm' + str(i):>6}" for i in range(states)) +
            f" {'topk-n':>6} {'share':>6} {'self':>6} {'bg':>6} {'with':>6}")
    lines = [head]
    for name, v in named.items():
        bg = v.get("top_k_background")
        lines.append(f"{name[:16]:16} " + " ".join(f"{r:6.2f}" for r in v["norm_ratio"]) +
                     f" {v['top_k_norm_ratio_min']:6.2f} {v['top_k_share']:6.3f} {v['cls_self']:6.3f} "
                     + ("   -  " if bg is None else f"{bg:6.2f}") + f" {v['with_outliers']:6.2f}")
    lines.append(f"normN: max / median patch norm in hidden state N (N = {first['selection_layer']} is what the "
                 f"selection layer reads); topk-n: the smallest of the top-{first['k']}'s norm ratios; share: "
                 "their [CLS] attention; self: [CLS] on itself; bg: top-k on background; with: images where "
                 + first["criterion"])
    return "\n".join(lines)


def figure(named: dict[str, dict], title: str = "ViT outlier diagnostics") -> Image.Image:
    """named: {label: a diagnose() or summary() dict} -> one PNG-ready image: left, the max / median patch-norm
    ratio per hidden state (log scale, one line per model, the selection layer's input marked); right, the
    top-k share of the [CLS] attention and [CLS]'s own share, one bar pair per model."""
    W, H, L, T, B = 980, 380, 60, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.font = draw.font(13)
    colours = [(30, 70, 230), (220, 60, 30), (30, 160, 60), (150, 60, 190), (200, 150, 0), (0, 150, 170)]
    # left panel: norm ratios
    x0, x1, y0, y1 = L, 560, T, H - B
    ratios = [r for v in named.values() for r in v["norm_ratio"]]
    hi = max(10.0, max(ratios) * 1.2)
    n_states = max(len(v["norm_ratio"]) for v in named.values())

    def ys(r):
        return y1 - (y1 - y0) * math.log(max(r, 1.0)) / math.log(hi)

    def xs(i):
        return x0 + (x1 - x0) * i / max(1, n_states - 1)
    for r in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500):
        if r <= hi:
            d.line((x0, ys(r), x1, ys(r)), fill=(220, 220, 220) if r != HIGH_NORM else (255, 170, 170))
            d.text((8, ys(r) - 6), f"{r}x", fill="black")
    for i in range(n_states):
        d.text((xs(i) - 3, y1 + 6), str(i), fill="black")
    sel = next(iter(named.values()))["selection_layer"]
    d.line((xs(sel), y0, xs(sel), y1), fill=(160, 160, 160))
    d.text((xs(sel) + 3, y0 + 2), "read by the selection layer", fill=(100, 100, 100))
    for c, (name, v) in zip(colours * 10, named.items()):
        pts = [(xs(i), ys(r)) for i, r in enumerate(v["norm_ratio"])]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=c)
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text((x0, y1 + 24), "hidden state (0 = embeddings); max / median patch-token norm (log)", fill="black")
    # right panel: shares
    bx0, bx1 = 620, W - 20
    bw = (bx1 - bx0) / max(1, len(named))
    for i, (c, (name, v)) in enumerate(zip(colours * 10, named.items())):
        for j, (key, shade) in enumerate((("top_k_share", c), ("cls_self", tuple(min(255, x + 120) for x in c)))):
            left = bx0 + i * bw + 6 + j * (bw - 12) / 2
            top = y1 - (y1 - y0) * v[key]
            d.rectangle((left, top, left + (bw - 12) / 2 - 2, y1), fill=shade)
            d.text((left, top - 16), f"{v[key]:.2f}", fill="black")
    d.line((bx0, y1 - (y1 - y0) * HALF, bx1, y1 - (y1 - y0) * HALF), fill=(255, 170, 170))
    d.rectangle((bx0, y0, bx1, y1), outline="black")
    k = next(iter(named.values()))["k"]
    d.text((bx0, y1 + 24), f"[CLS] attention: top-{k} (dark), self (light)", fill="black")
    d.text((L, 10), title, fill="black")
    x = L + d.textlength(title) + 24
    for c, name in zip(colours * 10, named):
        d.rectangle((x, 12, x + 10, 22), fill=c)
        d.text((x + 14, 10), name, fill="black")
        x += 14 + d.textlength(name) + 16
    return img
