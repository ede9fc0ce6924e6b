"""python -m minidamro.analyze IMAGE: where the ViT and the LLM look while the model answers (DAMRO paper, §3).

    python -m minidamro.analyze photo.jpg --model checkpoints/llava-1.5-7b --out analysis/
    python -m minidamro.analyze photo.jpg --method damro --alpha 2 --topk 10 --out analysis-damro/
    python -m minidamro.analyze photo.jpg --method vcd --noise-step 500 --out analysis-vcd/

Writes into --out: vit_attention.png (the [CLS] attention at the selection layer, outliers numbered: the
paper's Figure 1), decoder_attention.png (one map per generated word: Figures 2-3), vit_outliers.png (the ViT's
outlier-token diagnostics: patch-norm ratio per layer, the top-k's share of the [CLS] attention; outliers.py)
and analysis.json (every number behind them, with H_i of Eq. 1 and F of Eq. 2 per generated token, and the
diagnostics under "outlier_diagnostics").

Decoder attention, as minidamro defines it (the paper does not say how it aggregates): the mean over all
LLM layers and all heads of the attention row of the position whose logits chose the token (for the
first token the last prompt position, for token t > 1 the position of token t - 1), restricted to the
image tokens of the prompt. With --method damro or vcd it is the full stream's attention (the model seeing the
clean image) while the method chooses the tokens; the ViT figure is always the clean image's.
H_i and F are over the patches: with vision_feature_select_strategy "full" ([CLS] kept as image feature 0)
patch j is image token j + 1. A word's map uses the row of its first piece (see split_words for the rule).

LLaVA-NeXT: the [CLS] map, the outliers, H_i, F and the figures are the base tile's (the whole image
squashed to one tile, the first num_patches image tokens; the tile DAMRO's contrastive stream uses), drawn
over the base tile's pixels; analysis.json also has each grid tile's outliers (`tile_outliers`, which DAMRO
computes and does not use) and each token's decoder attention over all image tokens.

InstructBLIP: the LLM sees 32 query outputs, not patches. A token's decoder attention over the 32 query slots is
carried to the ViT's tokens through the Q-Former's cross-attention (mean over its cross-attention layers and
heads): attention(patch) = sum over queries of attention(query) x cross-attention(query -> patch), minidamro's
choice; H_i, F and the maps are measured on that.
"""
import json
import os
import random
import sys
import unicodedata
from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image

from . import MinidamroError, contrastive, damro, draw, generation, methods, outliers
from .capture import Capture
from .generate import Parser, add_arguments, check_options, encode_prompt, guarded, method_config, system_text
from .anyres import model_pixels
from .image import load_image
from .llava import Llava, load_model
from .tokenizer import Tokenizer, instruction_ids, load_tokenizer

H_MAX = 10   # H_i for i = 1..10, as the paper reports
F_TOP = 3    # F: the decoder's image attention share on the ViT's top-3 patches
FILES = ("analysis.json", "vit_attention.png", "decoder_attention.png", "vit_outliers.png")


@dataclass
class Token:
    id: int
    piece: str               # the sentencepiece piece ("▁" marks a word start)
    attention: list[float]   # decoder attention over the image tokens (see the module docstring)
    H: list[float]           # H_1 .. H_10 (Eq. 1), on the patches
    F: float                 # Eq. 2, on the patches


@dataclass
class Analysis:
    model: str
    prompt: str
    answer: str
    settings: dict
    selection_layer: int      # ViT encoder layer (0-based) of the [CLS] attention
    grid: int                 # patches per side; patch j is row j // grid, column j % grid
    patch_offset: int         # image token of patch j is j + patch_offset (1 when [CLS] is kept as feature 0)
    vit_attention: list[float]  # [CLS] attention over the patches (Eq. 3)
    outliers: list[int]       # top-k patches, descending (Eq. 4): the ones DAMRO's contrastive stream sees
    tile_outliers: list[list[int]]  # NeXT: the same selection on each grid tile, row-major (unused by DAMRO)
    tokens: list[Token]
    words: list[dict]         # {"text", "tokens": indices into tokens}
    outlier_diagnostics: dict  # the ViT's outlier-token diagnostics (outliers.diagnose, k = topk)
    image: Image.Image = field(repr=False)  # the preprocessed input, back in RGB (not written to the JSON)


def top(row, i: int) -> set[int]:
    """Indices of the i largest values; ties go to the lower index (a stable sort, so H_i is well defined)."""
    return set(torch.sort(torch.as_tensor(row), descending=True, stable=True).indices[:i].tolist())


def overlap(vit, dec, i: int) -> float:
    """Eq. 1: H_i = |S_v(i) ∩ S_l(i)| / i, the top-i patches of the ViT's and of the decoder's attention."""
    return len(top(vit, i) & top(dec, i)) / i


def outlier_share(vit, dec, n: int = F_TOP) -> float:
    """Eq. 2: F = the decoder attention on the ViT's top-n patches over its attention on all patches."""
    dec = torch.as_tensor(dec, dtype=torch.float64)
    return float(dec[list(top(vit, n))].sum() / dec.sum())


def piece_of(tok: Tokenizer, i: int) -> str:
    """The sentencepiece piece, an added token's name (<image>), or "<id N>" for a padded row with no piece."""
    if 0 <= i < tok.sp.get_piece_size():
        return tok.sp.id_to_piece(i)
    return next((name for name, j in tok.special.items() if j == i), f"<id {i}>")


def kind(tok: Tokenizer, i: int) -> str:
    """How a generated piece joins words: "start" (it carries sentencepiece's word-start "▁"), "alone"
    (punctuation, a symbol, a newline or other whitespace, or a special token such as </s>: a word by
    itself) or "cont" (a sub-word piece, or a byte of a byte-fallback character, continuing the word)."""
    sp = tok.sp
    if tok.skipped(i):
        return "alone"
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # "<0x0A>": ASCII bytes are characters; the others are parts of one
        b = int(piece[3:5], 16)
        text = chr(b) if b < 0x80 else "x"
    else:
        text = piece.replace("▁", "")
    if text and all(unicodedata.category(c)[0] in "PSZC" for c in text):
        return "alone"
    return "start" if piece.startswith("▁") else "cont"


def split_words(tok: Tokenizer, ids: list[int]) -> list[dict]:
    """Whole words from generated pieces: a piece of kind "start" or "alone" opens a new word, and so does
    any piece after an "alone" one ("dog." is "dog", "."); a "cont" piece joins the current word.
    Returns [{"text", "tokens": indices into ids}], the text decoded from the word's ids."""
    words, after_alone = [], True
    for n, i in enumerate(ids):
        k = kind(tok, i)
        if after_alone or k != "cont":
            words.append({"tokens": []})
        words[-1]["tokens"].append(n)
        after_alone = k == "alone"
    for w in words:
        w_ids = [ids[n] for n in w["tokens"]]
        text = tok.decode(w_ids).strip()
        if not text or not text.isprintable() or "\ufffd" in text:  # newline, </s>, stray bytes: the pieces
            text = "".join(piece_of(tok, i) for i in w_ids).replace("▁", " ").replace("<0x0A>", "\\n").strip()
        w["text"] = text
    return words


def to_rgb_image(pixels, preprocessor: dict) -> Image.Image:
    """Undo the normalisation: (1, 3, S, S) float pixels -> the RGB image the model saw."""
    mean = torch.tensor(preprocessor["image_mean"])[:, None, None]
    std = torch.tensor(preprocessor["image_std"])[:, None, None]
    x = ((pixels[0].float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.frombytes("RGB", (x.shape[2], x.shape[1]), bytes(x.permute(1, 2, 0).flatten().tolist()))


@torch.inference_mode()
def vit_attention(model: Llava, pixels, mode: str, image_size=None, instruction=None):
    """[CLS] attention over all 1 + N ViT tokens at the selection layer (damro.cls_attention), per tile (one
    for LLaVA-1.5; base first for NeXT), the prompt's image embeddings, and for InstructBLIP which image tokens
    its queries read: the Q-Former's cross-attention, mean over its cross-attention layers and heads, (Q, 1 + N)
    (None for LLaVA, whose image embeddings are the patches themselves)."""
    layer = damro.selection_layer(model)
    want = Capture(vit_qk_layers=(layer,)) if mode == "full" else Capture(vit_layers=(layer,))
    tiles = model.encode_image(pixels, want)
    rows = [damro.cls_attention(want, layer, mode, t) for t in range(tiles.shape[0])]
    if model.cfg.model_type != "instructblip":
        return layer, rows, model.pack_features(tiles, image_size), None
    q = model.cfg.qformer
    want.qformer_layers = tuple(range(0, q.num_hidden_layers, q.cross_attention_frequency))
    features = model.query_features(tiles, instruction, want)[0]
    reads = torch.stack([want.qformer_cross_attn[i][0] for i in want.qformer_layers]).float().mean((0, 1))
    return layer, rows, features, reads


@torch.inference_mode()
def decoder_attention(model: Llava, ids, features, tokens: list[int]):
    """(len(tokens), num_image_tokens): for each generated token, the mean over layers and heads of the attention
    row of the position whose logits chose it, over the image tokens.

    The tokens are replayed (teacher-forced) through the full stream with attention captured: the prompt
    minus its last position is prefilled on the fast path, then each position that chose a token is one
    captured step, so only (H, 1, S) per layer is ever kept."""
    lm, layers = model.language_model, tuple(range(model.cfg.text.num_hidden_layers))
    images = (ids == model.cfg.image_token_index).nonzero()[:, 0]
    cache = generation.new_cache(model, len(ids) + len(tokens))
    x = model.embed(ids, features)
    lm(x[:, :-1], [cache])
    steps = [x[:, -1:]] + [lm.embed_tokens(torch.tensor([[t]], device=ids.device)) for t in tokens[:-1]]
    rows = []
    for x_t in steps:
        capture = Capture(llm_layers=layers)
        lm(x_t, [cache], capture)
        probs = torch.stack([capture.llm_attn[layer][0][:, -1] for layer in layers]).float()  # (layers, H, S)
        rows.append(probs.mean((0, 1))[images])
    return torch.stack(rows).cpu()


def analyze(model: Llava, tok: Tokenizer, image: Image.Image, prompt: str, method: str = "plain",
            dcfg: damro.DamroConfig | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            max_new_tokens: int = 64, system: str | None = None, pad_square: bool = False,
            model_dir: str = "", cfg=None) -> Analysis:
    """Generate an answer exactly as contrastive.generate would with `method` (a name in methods.METHODS),
    then measure the ViT's [CLS] attention and the decoder's attention for every generated token.

    dcfg sets the ViT figure (its topk and outlier_attention) and, for method "damro", the decoding too;
    cfg is the settings of another method (e.g. a vcd.VcdConfig; None: its defaults)."""
    dcfg = dcfg or damro.METHOD.default_config(model.cfg.model_type)
    m = methods.get(method)
    cfg = dcfg if method == "damro" else (cfg if cfg is not None else m.config())
    dcfg.check(model.cfg.vision.num_patches)
    m.check(model, cfg)
    if max_new_tokens < 1:
        raise MinidamroError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    device = model.lm_head.weight.device
    pixels, image_size = model_pixels(image, model.cfg, pad_to_square=pad_square)
    pixels = pixels.to(device)
    ids, max_new = encode_prompt(model, tok, prompt, system, max_new_tokens, image_size)
    instruction = instruction_ids(tok, model.cfg, prompt, system)  # InstructBLIP's Q-Former reads the prompt

    # The tokens come from the core itself, untouched by any capture (a captured layer takes the eager
    # path, which can differ from SDPA in the last bit), so they are exactly what generate gives.
    sampler = generation.Sampler(temperature, top_p, seed, device)
    tokens = list(contrastive.generate(model, ids, pixels, m, cfg, sampler, max_new, image_size=image_size,
                                       instruction=instruction)[1])

    layer, cls_rows, features, reads = vit_attention(model, pixels, dcfg.outlier_attention, image_size, instruction)
    cls_row = cls_rows[0]                                         # the (base) tile's
    vit = cls_row[1:].cpu()                                       # patches only (Eq. 3 keeps A_cls[1:])
    dec = decoder_attention(model, ids, features, tokens)         # (n, image tokens of the prompt)
    if reads is None:
        offset = int(model.cfg.vision_feature_select_strategy == "full")  # [CLS] kept: patch j is image token j + 1
    else:
        # InstructBLIP's decoder reads 32 queries, not patches. minidamro's choice (docs/instructblip.md): a token's
        # attention to the queries is carried to the image tokens through the queries' cross-attention,
        # (n, Q) @ (Q, 1 + N), so H and F are measured on patches as for LLaVA. [CLS] is column 0.
        dec, offset = dec @ reads.cpu(), 1
    n_h = min(H_MAX, len(vit))
    records = []
    for t, row in zip(tokens, dec):
        patches = row[offset:offset + len(vit)]  # the (base) tile's patches: NeXT's grid tokens follow them
        records.append(Token(t, piece_of(tok, t), row.tolist(), [overlap(vit, patches, i) for i in range(1, n_h + 1)],
                             outlier_share(vit, patches)))
    settings = {"method": method, "alpha": dcfg.alpha, "beta": dcfg.beta, "topk": dcfg.topk,
                "outlier_attention": dcfg.outlier_attention} | methods.settings(cfg) | {
                "temperature": temperature, "top_p": top_p,
                "seed": seed, "max_new_tokens": max_new, "system": system, "pad_square": pad_square,
                "dtype": str(model.language_model.embed_tokens.weight.dtype).removeprefix("torch.")}
    return Analysis(model_dir, prompt, tok.decode(tokens), settings, layer, int(len(vit) ** 0.5), offset,
                    vit.tolist(), damro.select_outliers(cls_row, dcfg.topk).tolist(),
                    [damro.select_outliers(r, dcfg.topk).tolist() for r in cls_rows[1:]], records,
                    split_words(tok, tokens), outliers.diagnose(model, pixels, dcfg.topk, dcfg.outlier_attention),
                    to_rgb_image(pixels, model.cfg.preprocessor))


def figures(a: Analysis) -> tuple[Image.Image, Image.Image, Image.Image]:
    s, top3 = a.settings, sum(sorted(a.vit_attention, reverse=True)[:F_TOP])
    how = {"full": "full-width [CLS] q.k as DAMRO's code", "heads": "mean over heads"}[s["outlier_attention"]]
    name = os.path.basename(os.path.normpath(a.model)) if a.model else "model"
    vit = draw.vit_figure(
        a.image, a.vit_attention, a.grid, a.outliers,
        f"ViT [CLS] attention at encoder layer {a.selection_layer} (0-based), top-{len(a.outliers)} outliers",
        f"{how}; the top 3 patches take {top3:.1%} of it; {name}")
    # A word's map is its first piece's row: the position whose logits committed to the word.
    tiles = [(w["text"], f"F {t.F:.3f}  H3 {t.H[min(2, len(t.H) - 1)]:.2f}",
              t.attention[a.patch_offset:a.patch_offset + a.grid ** 2])
             for w in a.words for t in [a.tokens[w["tokens"][0]]]]
    dec = draw.decoder_figure(
        a.image, tiles, a.grid, a.outliers[:F_TOP],
        f"Decoder attention over the image per generated word ({s['method']} decoding; {name})",
        "mean of all layers and heads, row of the word's first piece; outlined: the ViT's top 3 patches; "
        "F: their share (Eq. 2); H3: top-3 overlap (Eq. 1)")
    return vit, dec, outliers.figure({name: a.outlier_diagnostics}, "ViT outlier-token diagnostics of this image")


def write(a: Analysis, out_dir: str) -> None:
    """Write analysis.json, vit_attention.png and decoder_attention.png into out_dir (created); each file is
    written under a temporary name and renamed, so a reader never sees half a file."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        obj = asdict(replace(a, image=None))
        del obj["image"]
        obj["F_top"], obj["H_indices"] = F_TOP, list(range(1, len(a.tokens[0].H) + 1)) if a.tokens else []
        vit, dec, diag = figures(a)

        def save_json(path):
            with open(path, "w") as f:
                json.dump(obj, f, ensure_ascii=False)
        for name, save in (("analysis.json", save_json),
                           ("vit_attention.png", lambda path: vit.save(path, format="PNG", optimize=True)),
                           ("decoder_attention.png", lambda path: dec.save(path, format="PNG", optimize=True)),
                           ("vit_outliers.png", lambda path: diag.save(path, format="PNG", optimize=True))):
            path = os.path.join(out_dir, name)
            save(path + ".tmp")
            os.replace(path + ".tmp", path)
    except OSError as e:
        raise MinidamroError(f"cannot write to {out_dir}: {e}") from None


def parse_args(argv=None):
    p = Parser(prog="python -m minidamro.analyze", description=__doc__.split("\n")[0])
    add_arguments(p, prompt="What can you see in this image?", max_new_tokens=64)  # the paper's analysis prompt
    p.add_argument("--out", default="analysis", help="output directory (default: analysis)")
    return p.parse_args(argv)


def run(a):
    check_options(a)
    if os.path.exists(a.out) and not os.path.isdir(a.out):  # fail before the work, not after it
        raise MinidamroError(f"cannot write to {a.out}: it is a file, not a directory")
    image = load_image(a.image)
    model = load_model(a.model, a.device, a.dtype)
    tok = load_tokenizer(a.model, model.cfg)
    seed = a.seed if a.seed is not None else random.randrange(2**63)
    result = analyze(model, tok, image, a.prompt, a.method, method_config(a, "damro"),
                     temperature=a.temperature, top_p=a.top_p, seed=seed, max_new_tokens=a.max_new_tokens,
                     system=system_text(a), pad_square=a.pad_square, model_dir=a.model,
                     cfg=method_config(a, a.method))
    write(result, a.out)
    print(result.answer)
    print(f"wrote {', '.join(os.path.join(a.out, name) for name in FILES)}", file=sys.stderr)


def main(argv=None):
    guarded(run, parse_args(argv))


if __name__ == "__main__":
    main()
