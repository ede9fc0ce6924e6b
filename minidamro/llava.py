"""LLaVA glue: the projector, the merge of image features into the prompt, and strict loading.

One architecture for LLaVA-1.5 and LLaVA-NeXT (1.6): NeXT is 1.5 plus an image-packing step (anyres.py)
and one learned `image_newline` vector.

A converted checkpoint directory (see weights_convert.py) holds `config.json` (minidamro's own,
flattened from the Hugging Face one), `model.safetensors` in minidamro's key names, `tokenizer.model`.
Reading and strictly loading one (read_config, load_model) serves InstructBLIP's too (instructblip.py, which
also has the Q-Former's `qformer_vocab.txt`).
"""
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import MinidamroError, anyres
from .checkpoint import read_into, read_safetensors
from .kernels import attention, choices, cpu, int8, linear
from .capture import Capture
from .llama import LlamaModel, TextConfig, linear_layer
from .tokenizer import QFORMER_VOCAB
from .vision import CLIPVisionTower, VisionConfig, hidden_state_index

FORMAT_VERSION = 1
MODEL_TYPES = ("llava", "llava_next")  # LLaVA-1.5, LLaVA-NeXT (1.6)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("", "int8")  # "int8": weight-only int8 decoder linears and lm_head (kernels/int8.py)


@dataclass
class LlavaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 32000
    vision_feature_layer: int = -2                   # hidden state LLaVA reads: output of the 2nd-last layer
    vision_feature_select_strategy: str = "default"  # "default" drops [CLS], "full" keeps it
    preprocessor: dict = field(default_factory=dict)  # see image.py
    special_tokens: dict = field(default_factory=dict)  # added tokens beyond the sentencepiece vocabulary
    torch_dtype: str = "float32"                     # dtype the weights are stored in
    model_type: str = "llava"                        # "llava" (1.5) or "llava_next" (1.6, anyres tiles)
    image_grid_pinpoints: list = field(default_factory=list)  # NeXT: the canvases (height, width) tiles fill

    @property
    def feature_hidden_index(self) -> int:  # 0 = embeddings after pre_layrnorm, i = output of layer i - 1
        return hidden_state_index(self.vision_feature_layer, self.vision.num_hidden_layers)

    @property
    def num_image_tokens(self) -> int:
        """Image features per tile (LLaVA-1.5's whole image is one tile)."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def image_tokens(self, image_size=None) -> int:
        """Image ids the prompt needs for an image of (height, width) `image_size` (NeXT's count depends on it)."""
        if self.model_type == "llava":
            return self.num_image_tokens
        return anyres.num_image_tokens(image_size, self.image_grid_pinpoints, self.vision.image_size,
                                       self.num_image_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        def pick(dc, sub: dict):  # ignore keys a newer converter may add
            return dc(**{f.name: sub[f.name] for f in fields(dc) if f.name in sub})
        return pick(cls, d | {"vision": pick(VisionConfig, d["vision"]), "text": pick(TextConfig, d["text"])})

    def to_dict(self) -> dict:
        return {"minidamro_format": FORMAT_VERSION} | asdict(self)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.linear_1 = linear.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.linear_2 = linear.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x):
        # Exact erf GELU here (LLaVA trained the projector), unlike the ViT's quick_gelu.
        return self.linear_2(F.gelu(self.linear_1(x)))


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_feature_layer)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = linear_layer(cfg.text)(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.model_type == "llava_next":  # follows every row of NeXT's tile grid (anyres.pack)
            self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))

    def encode_image(self, pixels, capture: Capture | None = None, hidden_states: list | None = None):
        """pixels (B, 3, S, S) -> projected image features (B, num_image_tokens, D_text)."""
        h = self.vision_tower(pixels, capture, hidden_states)  # (B, 1 + N, D_vit)
        if self.cfg.vision_feature_select_strategy == "default":
            # LLaVA drops [CLS]: ViT token j + 1 is image token j of the LLM (the CLS off-by-one).
            h = h[:, 1:]
        return self.multi_modal_projector(h)

    def image_features(self, pixels, image_size=None, capture: Capture | None = None, instruction=None):
        """pixels -> the (n, D_text) embeddings that replace the prompt's n image ids. LLaVA-1.5: the one
        tile's features. NeXT: pixels are [base] + tiles (anyres.preprocess), packed for an image of
        (height, width) `image_size`. instruction: unused (InstructBLIP's image features read the prompt)."""
        return self.pack_features(self.encode_image(pixels, capture), image_size)

    def pack_features(self, tiles, image_size=None):
        """Per-tile features (tiles, num_image_tokens, D) -> the prompt's image embeddings (n, D)."""
        if self.cfg.model_type == "llava":
            return tiles[0]
        return anyres.pack(tiles, image_size, self.image_newline, self.cfg.image_grid_pinpoints,
                           self.cfg.vision.image_size)

    def embed(self, ids, features):
        """Prompt ids (L,) -> embeddings (1, L, D) with the `<image>` positions replaced, in order, by `features`
        (n, D). Any n works: DAMRO's contrastive stream uses a prompt with only k image ids."""
        x = self.language_model.embed_tokens(ids)
        slots = ids == self.cfg.image_token_index
        n = int(slots.sum())
        if n != features.shape[0]:
            raise MinidamroError(f"the prompt has {n} image tokens but the image gives {features.shape[0]} features")
        x[slots] = features.to(x.dtype)
        return x[None]

    def logits(self, h):
        """Final hidden states -> next-token logits in float32 (the DAMRO rule and sampling run in float32)."""
        return self.lm_head(h).float()

    def image_rows(self, name: str) -> int | None:
        """Rows a linear layer sees per image (pack_linears); None for the decoder's, which serve decode steps."""
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return self.cfg.vision.num_patches + 1  # the ViT's rows per image (the projector's: that or one fewer)
        return None


def config_class(model_type):
    """LLaVA's config, or InstructBLIP's (instructblip.py builds on this module, so it is imported when asked)."""
    if model_type == "instructblip":
        from .instructblip import InstructBlipConfig
        return InstructBlipConfig
    return LlavaConfig


def model_class(cfg):
    if cfg.model_type == "instructblip":
        from .instructblip import InstructBlip
        return InstructBlip
    return Llava


def read_config(model_dir: str) -> LlavaConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise MinidamroError(f"model directory {model_dir} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise MinidamroError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict) or d.get("minidamro_format") != FORMAT_VERSION:
        raise MinidamroError(f"{model_dir} is not a minidamro checkpoint (convert it with weights_convert.py)")
    try:
        cfg = config_class(d.get("model_type")).from_dict(d)
    except (KeyError, TypeError) as e:
        raise MinidamroError(f"{path} is incomplete: {e}") from None
    if cfg.torch_dtype not in DTYPES or not isinstance(cfg.preprocessor, dict) or "image_mean" not in cfg.preprocessor:
        raise MinidamroError(f"{path} is malformed: torch_dtype or preprocessor settings (convert the model again)")
    if cfg.text.quantization not in QUANTIZATIONS:
        raise MinidamroError(f"{path}: quantization {cfg.text.quantization!r} is not one of "
                             f"{', '.join(map(repr, QUANTIZATIONS))} (a newer minidamro wrote it?)")
    if cfg.model_type == "instructblip":
        if not os.path.isfile(os.path.join(model_dir, QFORMER_VOCAB)):
            raise MinidamroError(f"{model_dir} has no {QFORMER_VOCAB}, InstructBLIP's Q-Former vocabulary: convert the "
                                 "model again with weights_convert.py")
        return cfg
    if cfg.model_type not in MODEL_TYPES or (cfg.model_type == "llava_next") != bool(cfg.image_grid_pinpoints):
        raise MinidamroError(f"{path} is malformed: model_type {cfg.model_type!r} or its image_grid_pinpoints "
                             "(convert the model again)")
    return cfg


def check_state_dict(expected: dict, got: dict, where: str):
    """Strict loading: every key present, none extra, every shape equal. Names the offenders."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape))

    def listed(keys, most=10):  # a wrong config can mis-shape hundreds of keys: keep the line readable
        return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
    problems = [f"{label}: {listed(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
    if problems:
        raise MinidamroError(f"{where}: " + "; ".join(problems))


def check_kernel_settings():
    """Every MINIDAMRO_* setting the kernels read, checked once: a wrong value is one clear error."""
    linear.forced()
    int8.forced()
    attention.forced_attention()
    choices.reference()
    cpu.profile()


def load_model(model_dir: str, device="cpu", dtype: str | None = None) -> Llava:
    """Build the model on the meta device and assign the memory-mapped weights: no second copy on the CPU
    when the stored dtype is the one asked for (otherwise each tensor is converted once)."""
    check_kernel_settings()  # a wrong MINIDAMRO_* setting is an error now, not at the first token
    cfg = read_config(model_dir)
    dtype = DTYPES[dtype or cfg.torch_dtype]
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    path = os.path.join(model_dir, "model.safetensors")
    mapped = read_safetensors(path)
    expected = model.state_dict()
    check_state_dict(expected, mapped, f"weights in {model_dir} do not match its config")
    wrong = sorted(k for k, v in expected.items() if (v.dtype == torch.int8) != (mapped[k].dtype == torch.int8))
    if wrong:
        raise MinidamroError(f"weights in {model_dir} do not match its config: int8 expected where the config "
                             f"says so, and only there: {', '.join(wrong[:5])}")
    # Every tensor in the asked dtype, but int8 weights and their float32 scales, which stay as stored.
    keep = {k for k, v in expected.items() if v.dtype == torch.int8 or k.endswith(".weight_scale")}
    weights = {k: v.to(device=device, dtype=v.dtype if k in keep else dtype) for k, v in mapped.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    pack_linears(model, path, {k for k, v in weights.items() if v is mapped[k]})
    return model.eval().requires_grad_(False)


def pack_linears(model: Llava, path: str, mapped: set):
    """Give each linear layer whose weight is still a view of the file a oneDNN-packed copy where kernels/linear.py
    finds that faster: decoder layers (and lm_head) for decode steps, the vision tower's and the projector's for
    a whole image's tokens, the only input they see. The copy is packed from the file's bytes read into a
    temporary buffer (page cache, not this process's memory), so the mapped original is never touched and costs
    no memory."""
    layers = [(name, m, model.image_rows(name))
              for name, m in model.named_modules() if isinstance(m, linear.Linear) and name + ".weight" in mapped]
    # Decide for every shape first, then read: the timings should not share two cores with reading a 14 GB
    # checkpoint and the page-cache reclaim it sets off (timed between reads, one 7B process left its 4096 x 4096
    # layers unpacked, and its DAMRO steps took 1.5x plain's).
    decisions = [linear.packing_pays(m.weight, rows) for _, m, rows in layers]
    for (name, m, _), pays in zip(layers, decisions):
        if pays:
            w = m.weight
            buf = torch.empty(w.shape, dtype=w.dtype)
            read_into(path, w.storage_offset() * w.element_size(), buf)  # the mapping starts at byte 0 of the file
            m.packed = linear.pack(buf)
