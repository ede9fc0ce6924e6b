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
"""
from dataclasses import dataclass

import torch

from . import MinidamroError
from .capture import Capture
from .contrastive import Method, Prepared, check_contrast, generate as contrastive_generate
from .generation import Sampler
from .llava import Llava

OUTLIER_ATTENTION = ("full", "heads")


@dataclass
class DamroConfig:
    alpha: float = 2.0   # contrast strength, Eq. 5 (the authors' LLaVA-1.5 scripts: 2)
    beta: float = 0.1    # plausibility cutoff, Eq. 6 (0.1 in every script of the authors)
    topk: int = 10       # outlier tokens kept in the contrastive stream (LLaVA-1.5 scripts: 10)
    outlier_attention: str = "full"  # "full": the released code's full-width dot product; "heads": mean of heads

    def check(self, num_patches: int):
        if not 1 <= self.topk <= num_patches:
            raise MinidamroError(f"--topk must be between 1 and the {num_patches} image patches, got {self.topk}")
        check_contrast(self.alpha, self.beta)
        if self.outlier_attention not in OUTLIER_ATTENTION:
            raise MinidamroError(f"--outlier-attention must be one of {OUTLIER_ATTENTION}")


def selection_layer(model: Llava) -> int:
    """The ViT encoder layer whose output LLaVA uses as image features (layer 22 of 24 for LLaVA-1.5)."""
    layer = model.cfg.feature_hidden_index - 1
    if layer < 0:
        raise MinidamroError("DAMRO needs vision_feature_layer to be the output of an encoder layer, not the embeddings")
    return layer


def cls_attention(capture: Capture, layer: int, mode: str = "full", tile: int = 0):
    """The [CLS] row of the ViT attention at `layer` over all 1 + N tokens (Eq. 3), float32, shape (1 + N,),
    of one image of the ViT's batch: LLaVA-1.5's only one, or tile `tile` of NeXT's (0 = the base tile)."""
    if mode == "full":
        # The released code does not split heads: one dot product over the full width D (1024 for ViT-L),
        # scaled by sqrt(D), between the [CLS] query and every key (q_proj / k_proj outputs, bias included).
        q, k = capture.vit_q[layer][tile, 0].float(), capture.vit_k[layer][tile].float()  # (D,), (1 + N, D)
        return torch.softmax(k @ q / k.shape[-1] ** 0.5, dim=-1)
    # "heads": what the ViT really attends with, the mean over heads of the per-head probabilities.
    return capture.vit_attn[layer][tile, :, 0].float().mean(0)


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


def contrastive_features(model: Llava, tiles, outliers):
    """The contrastive stream's image embeddings: the selected projected features of the first (LLaVA-1.5:
    only) tile, in descending-attention order. NeXT, as the release: the base tile's k, then one image_newline."""
    cls_kept = model.cfg.vision_feature_select_strategy == "full"  # then feature 0 is [CLS], patch j is j + 1
    picked = tiles[0][outliers + cls_kept]  # (k, D)
    if model.cfg.model_type == "llava_next":
        picked = torch.cat([picked, model.image_newline[None].to(picked.dtype)])
    return picked


@torch.inference_mode()
def prepare(model: Llava, pixels, cfg: DamroConfig, generator=None, image_size=None) -> Prepared:
    """Steps 1-2: one ViT pass gives the image features and the [CLS] rows; the contrastive stream sees only
    the top-k features, in descending-attention order. Returns Prepared([features, contrastive features]) with
    info["outliers"] the selection used, and on NeXT info["tile_outliers"] the grid tiles' (unused, see top).
    DAMRO draws nothing at random: `generator` is unused (the core passes every method one)."""
    layer = selection_layer(model)
    want = Capture(vit_qk_layers=(layer,)) if cfg.outlier_attention == "full" else Capture(vit_layers=(layer,))
    tiles = model.encode_image(pixels.to(model.lm_head.weight.device), want)  # (tiles, num_image_tokens, D)
    picks = [select_outliers(cls_attention(want, layer, cfg.outlier_attention, t), cfg.topk)
             for t in range(tiles.shape[0])]  # per tile, as the release; only picks[0] is used
    info = {"outliers": picks[0].tolist()}
    if model.cfg.model_type == "llava_next":
        info["tile_outliers"] = [p.tolist() for p in picks[1:]]
    return Prepared([model.pack_features(tiles, image_size), contrastive_features(model, tiles, picks[0])], info)


def rule(cfg, logits):
    """Step 3, per token: Eq. 5-6 on the full stream's logits l = logits[0] and the contrastive l_cd = logits[1]."""
    return damro_scores(logits[0], logits[1], cfg.alpha, cfg.beta)


METHOD = Method("damro", DamroConfig, check, prepare, rule)


def generate(model: Llava, ids, pixels, cfg: DamroConfig, sampler: Sampler, max_new_tokens: int,
             batched: bool = True, image_size=None):
    """DAMRO decoding through the core. Returns (outliers, iterator over generated ids). `image_size`: the
    image's (height, width), for LLaVA-NeXT.

    `batched` decodes both streams in one forward per token (one read of the weights); False keeps the
    two separate forwards of the released code, the reference the batched path is tested against.
    """
    info, tokens = contrastive_generate(model, ids, pixels, METHOD, cfg, sampler, max_new_tokens, batched,
                                        image_size=image_size)
    return info["outliers"], tokens
