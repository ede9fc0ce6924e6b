"""DAMRO (Gong et al., EMNLP 2024, arXiv 2410.04514): outlier-token selection and contrastive decoding.

This module is DAMRO's part of the contrastive core (contrastive.py): `prepare` builds the two streams'
image features (steps 1-2), `rule` is Eq. 5-6 (step 3); the core prefills and decodes the streams.

1. The ViT's [CLS] attention at the layer LLaVA takes its features from picks the top-k "outlier"
   patches (Eq. 3-4). One ViT pass serves both the image features and the selection.
2. A second, contrastive stream sees the same prompt with only those k projected features in place of
   the image (in descending-attention order), and has its own KV cache.
3. Each next token comes from (1 + alpha) * l - alpha * l_cd under the plausibility cutoff
   l >= log(beta) + max(l) (Eq. 5-6), where l and l_cd are the two streams' logits.

Where the paper's text and the authors' released code differ, this module follows the code (noted inline).

LLaVA-NeXT, as the release runs it: the selection is made on every tile (base + grid tiles) at the same
layer, but only the base tile's is used: the contrastive stream sees the base tile's k features, in
descending order, then one `image_newline` (k + 1 image tokens). The grid tiles' outliers are computed
and unused by decoding (minidamro reports them as `tile_outliers`); so on NeXT DAMRO contrasts with a
squashed whole-image view, never with the high-resolution tiles.

InstructBLIP, as the release runs it (`prepare_instructblip`): the selection is the mean over the ViT's heads of
the [CLS] attention at layer -2 (layer 37 of 39, read from its fused qkv), and the contrastive stream is the
Q-Former run again on k rows of the ViT's output (its 32 query outputs, so both streams have 32 image ids). The
release gathers those rows with the patch indices on an output that still has [CLS] at row 0: index j takes
row j, i.e. patch j - 1, and [CLS] for j = 0. minidamro follows it by default (its numbers come from it);
`gather="patches"` takes the patches themselves.
"""
from dataclasses import dataclass

import torch

from . import MinidamroError
from .capture import Capture
from .contrastive import Method, Prepared, check_contrast, generate as contrastive_generate
from .generation import Sampler
from .llava import Llava

OUTLIER_ATTENTION = ("full", "heads")
GATHER = ("release", "patches")


@dataclass
class DamroConfig:
    alpha: float = 2.0   # contrast strength, Eq. 5 (the authors' LLaVA-1.5 scripts: 2)
    beta: float = 0.1    # plausibility cutoff, Eq. 6 (0.1 in every script of the authors)
    topk: int = 10       # outlier tokens kept in the contrastive stream (LLaVA-1.5 scripts: 10)
    outlier_attention: str = "full"  # "full": the released code's full-width dot product; "heads": mean of heads
    # InstructBLIP only: the ViT rows the contrastive Q-Former reads for patch indices j: "release" (its default)
    # row j (the release's off-by-one: patch j - 1, [CLS] for j = 0), "patches" row j + 1. None elsewhere: LLaVA's
    # selection is always the patches.
    gather: str | None = None

    def check(self, num_patches: int):
        if not 1 <= self.topk <= num_patches:
            raise MinidamroError(f"--topk must be between 1 and the {num_patches} image patches, got {self.topk}")
        check_contrast(self.alpha, self.beta)
        if self.outlier_attention not in OUTLIER_ATTENTION:
            raise MinidamroError(f"--outlier-attention must be one of {OUTLIER_ATTENTION}")
        if self.gather is not None and self.gather not in GATHER:
            raise MinidamroError(f"--gather must be one of {GATHER}")


def model_defaults(model_type: str) -> dict:
    """The release's InstructBLIP selection is the mean over heads (its LLaVA one the full-width product), and it
    gathers the outlier rows one off (see top)."""
    return {"outlier_attention": "heads", "gather": "release"} if model_type == "instructblip" else {}


def selection_layer(model: Llava) -> int:
    """The ViT encoder layer whose output LLaVA uses as image features (layer 22 of 24 for LLaVA-1.5). InstructBLIP:
    the release hooks `encoder.layers[-2]` (layer 37 of 39), one before the output the Q-Former reads."""
    if model.cfg.model_type == "instructblip":
        layer = model.cfg.vision.num_hidden_layers - 2
        if layer < 0:
            raise MinidamroError("DAMRO on InstructBLIP needs a vision tower of at least 2 layers")
        return layer
    layer = model.cfg.feature_hidden_index - 1
    if layer < 0:
        raise MinidamroError("DAMRO needs vision_feature_layer to be the output of an encoder layer, not the embeddings")
    return layer


def cls_attention(capture: Capture, layer: int, mode: str = "full", tile: int = 0, heads: int | None = None):
    """The [CLS] row of the ViT attention at `layer` over all 1 + N tokens (Eq. 3), float32, shape (1 + N,),
    of one image of the ViT's batch: LLaVA-1.5's only one, or tile `tile` of NeXT's (0 = the base tile)."""
    if mode == "full":
        # The released code does not split heads: one dot product over the full width D (1024 for ViT-L),
        # scaled by sqrt(D), between the [CLS] query and every key (q_proj / k_proj outputs, bias included).
        q, k = capture.vit_q[layer][tile, 0].float(), capture.vit_k[layer][tile].float()  # (D,), (1 + N, D)
        return torch.softmax(k @ q / k.shape[-1] ** 0.5, dim=-1)
    # "heads": what the ViT really attends with, the mean over heads of the per-head probabilities: those the
    # layer computed, or, given only its q / k and the head count, recomputed from them as the InstructBLIP
    # release does from its qkv hook (then the ViT's own forward is left on its fast path, untouched).
    if layer in capture.vit_attn:
        return capture.vit_attn[layer][tile, :, 0].float().mean(0)
    q, k = capture.vit_q[layer][tile, 0].float(), capture.vit_k[layer][tile].float()  # (D,), (1 + N, D)
    q, k = q.view(heads, -1), k.view(k.shape[0], heads, -1)                          # (H, hd), (1 + N, H, hd)
    return torch.softmax((k * q).sum(-1) * q.shape[-1] ** -0.5, dim=0).mean(1)       # softmax over the tokens


def select_outliers(attention, k: int):
    """Eq. 4: the k patches with the highest [CLS] attention, in descending order (torch.topk, sorted).
    Index j of the result is patch j, row-major over the grid: [CLS] (position 0) is excluded."""
    return attention[1:].topk(k).indices


def damro_scores(l, l_cd, alpha: float, beta: float):
    """Eq. 5-6 in logit space, float32: contrast the streams, then drop tokens the full stream finds implausible.

    The cutoff keeps y with p(y) >= beta * max p, i.e. l(y) >= log(beta) + max l. As in the released
    code, log(beta) is taken of a float32 tensor. alpha = 0 gives back l (the cutoff never drops the argmax).
    """
    cutoff = torch.log(torch.tensor(beta)) + l.max(dim=-1, keepdim=True).values
    d = (1 + alpha) * l - alpha * l_cd
    return d.masked_fill(l < cutoff, float("-inf"))


def check(model: Llava, cfg: DamroConfig):
    cfg.check(model.cfg.vision.num_patches)
    selection_layer(model)
    if cfg.gather is not None and model.cfg.model_type != "instructblip":
        raise MinidamroError("--gather is InstructBLIP's (its release reads the outlier rows one off); LLaVA's DAMRO "
                             "always reads the patches")


def contrastive_features(model: Llava, tiles, outliers):
    """The contrastive stream's image embeddings: the selected projected features of the first (LLaVA-1.5:
    only) tile, in descending-attention order. NeXT, as the release: the base tile's k, then one image_newline."""
    cls_kept = model.cfg.vision_feature_select_strategy == "full"  # then feature 0 is [CLS], patch j is j + 1
    picked = tiles[0][outliers + cls_kept]  # (k, D)
    if model.cfg.model_type == "llava_next":
        picked = torch.cat([picked, model.image_newline[None].to(picked.dtype)])
    return picked


@torch.inference_mode()
def prepare(model: Llava, pixels, cfg: DamroConfig, generator=None, image_size=None, instruction=None) -> Prepared:
    """Steps 1-2: one ViT pass gives the image features and the [CLS] rows; the contrastive stream sees only
    the top-k features, in descending-attention order. Returns Prepared([features, contrastive features]) with
    info["outliers"] the selection used, and on NeXT info["tile_outliers"] the grid tiles' (unused, see top).
    DAMRO draws nothing at random: `generator` is unused (the core passes every method one)."""
    if model.cfg.model_type == "instructblip":
        return prepare_instructblip(model, pixels, cfg, instruction)
    layer = selection_layer(model)
    want = Capture(vit_qk_layers=(layer,)) if cfg.outlier_attention == "full" else Capture(vit_layers=(layer,))
    tiles = model.encode_image(pixels.to(model.lm_head.weight.device), want)  # (tiles, num_image_tokens, D)
    picks = [select_outliers(cls_attention(want, layer, cfg.outlier_attention, t), cfg.topk)
             for t in range(tiles.shape[0])]  # per tile, as the release; only picks[0] is used
    info = {"outliers": picks[0].tolist()}
    if model.cfg.model_type == "llava_next":
        info["tile_outliers"] = [p.tolist() for p in picks[1:]]
    return Prepared([model.pack_features(tiles, image_size), contrastive_features(model, tiles, picks[0])], info)


def prepare_instructblip(model, pixels, cfg: DamroConfig, instruction) -> Prepared:
    """Steps 1-2 on InstructBLIP: one ViT pass gives the image tokens the Q-Former reads and the [CLS] row at
    layer -2; the full stream's features are the Q-Former's on all 1 + N tokens, the contrastive stream's on the
    k rows the release gathers (see top), in descending-attention order, under the same instruction."""
    layer = selection_layer(model)
    want = Capture(vit_qk_layers=(layer,))  # q / k only: the image tokens are plain decoding's, bit for bit
    tokens = model.encode_image(pixels.to(model.lm_head.weight.device), want)  # (1, 1 + N, D_vit), [CLS] first
    attention = cls_attention(want, layer, cfg.outlier_attention, heads=model.cfg.vision.num_attention_heads)
    picked = select_outliers(attention, cfg.topk)  # patch numbers 0..N-1, descending
    contrast = model.query_features(gather_rows(tokens, picked, cfg.gather or "release"), instruction)[0]
    return Prepared([model.query_features(tokens, instruction)[0], contrast], {"outliers": picked.tolist()})


def gather_rows(tokens, patches, gather: str):
    """The ViT output rows (1, k, D) the contrastive Q-Former reads for patch numbers `patches`, from tokens
    (1, 1 + N, D) with [CLS] at row 0: "release" takes row j for patch j (patch j - 1, and [CLS] for j = 0, the
    release's torch.gather on the patch indices), "patches" row j + 1 (the patch itself)."""
    return tokens[:, patches + 1 if gather == "patches" else patches]


def rule(cfg, logits):
    """Step 3, per token: Eq. 5-6 on the full stream's logits l = logits[0] and the contrastive l_cd = logits[1]."""
    return damro_scores(logits[0], logits[1], cfg.alpha, cfg.beta)


METHOD = Method("damro", DamroConfig, check, prepare, rule, defaults=model_defaults)


def generate(model: Llava, ids, pixels, cfg: DamroConfig, sampler: Sampler, max_new_tokens: int,
             batched: bool = True, image_size=None, instruction=None):
    """DAMRO decoding through the core. Returns (outliers, iterator over generated ids). `image_size`: the
    image's (height, width), for LLaVA-NeXT.

    `batched` decodes both streams in one forward per token (one read of the weights); False keeps the
    two separate forwards of the released code, the reference the batched path is tested against.
    """
    info, tokens = contrastive_generate(model, ids, pixels, METHOD, cfg, sampler, max_new_tokens, batched,
                                        image_size=image_size, instruction=instruction)
    return info["outliers"], tokens
