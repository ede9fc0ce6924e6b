"""Convert a Hugging Face LLaVA-1.5 or LLaVA-NeXT (1.6) checkpoint directory into a minidamro one.

    python weights_convert.py llava-1.5-7b-hf checkpoints/llava-1.5-7b [--dtype float16] [--force]

Reads config.json, the safetensors weights (single file or sharded), preprocessor / tokenizer settings and
tokenizer.model; writes config.json (minidamro's LlavaConfig), model.safetensors (minidamro's key names,
only the weights the model uses) and tokenizer.model. The weights are streamed one tensor at a time from the
memory-mapped source, so a 7B checkpoint converts in little memory. Everything is written into a temporary
sibling directory that is renamed into place at the end: an error leaves nothing half-written.

Why one file of ~420 lines: the design card puts the converter at the top level as one script, and most of it
is checking: three key layouts in circulation, single-file and sharded weights, two model types, the
tokenizer's added tokens and the preprocessor settings, each refused in one line when it does not fit; the
rest writes the checkpoint (any dtype, or int8 with --quantize, also from a minidamro checkpoint).
"""
import argparse
import json
import os
import re
import shutil
import sys
from contextlib import ExitStack

from minidamro import MinidamroError, checkpoint  # first: it quiets torch's warning that numpy is absent

import torch
from safetensors import safe_open
from sentencepiece import SentencePieceProcessor

from minidamro.checkpoint import write_safetensors
from minidamro.image import LLAVA_PREPROCESSOR
from minidamro.llama import TextConfig
from minidamro.checkpoint import read_safetensors
from minidamro.kernels.int8 import quantize as quantize_int8
from minidamro.eva import EvaConfig
from minidamro.instructblip import InstructBlipConfig
from minidamro.llava import DTYPES, MODEL_TYPES, LlavaConfig, check_state_dict, model_class, read_config
from minidamro.qformer import QFormerConfig
from minidamro.tokenizer import QFORMER_VOCAB
from minidamro.vision import VisionConfig
from minidamro.wordpiece import WordPiece


# Source prefix -> minidamro prefix, first match wins. Three layouts: the hub's (transformers v4), v5's
# save_pretrained default (the same without `vision_model.`), v5's in-memory names (`model.*`, `lm_head`).
PREFIXES = [
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("model.language_model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.image_newline", "image_newline"),  # NeXT; the other two layouts store it as `image_newline`
]
BUFFERS = (".position_ids", ".inv_freq")  # saved by some versions, not weights
SAFETENSORS_DTYPES = checkpoint.DTYPES
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# transformers' defaults for fields a config.json omits (the llava-hf one omits most of text_config).
CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# LlavaConfig builds ViT-L/14 at 336 px when vision_config is absent altogether.
LLAVA_VISION = CLIP_VISION | dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1,
             eos_token_id=2)
# Where tokenizers keep added tokens: file -> its (content, id) pairs. The first file naming a token wins.
ADDED_TOKENS = {
    "tokenizer_config.json": lambda d: [(t["content"], int(i)) for i, t in d.get("added_tokens_decoder", {}).items()],
    "tokenizer.json": lambda d: [(t["content"], int(t["id"])) for t in d.get("added_tokens") or []],
    "added_tokens.json": lambda d: [(c, int(i)) for c, i in d.items()],
}
# CLIPImageProcessor's defaults: llava-hf's settings at CLIP's 224 px.
CLIP_PROCESSOR = LLAVA_PREPROCESSOR | {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
# BlipImageProcessor's: resize to 384 x 384 (the hub's InstructBLIP says 224 x 224), no crop; CLIP's mean and std.
BLIP_PROCESSOR = CLIP_PROCESSOR | {"size": {"height": 384, "width": 384}, "do_center_crop": False}


def get(d: dict, key: str, default):  # as transformers: absent or null means the default
    return default if d.get(key) is None else d[key]


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise MinidamroError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise MinidamroError(f"{path} is not a JSON object")
    return d


# LlavaNextConfig's default canvases (height, width), those of llava-v1.6: 1x2, 2x1, 2x2, 1x3, 3x1 tiles of 336.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_config(hf: dict, path: str) -> LlavaConfig:
    model_type = hf.get("model_type")
    if model_type == "instructblip":
        return build_instructblip_config(hf, path)
    if model_type not in MODEL_TYPES:
        raise MinidamroError(f"{path}: model_type {model_type!r} is not supported (only 'llava', LLaVA-1.5, "
                             "'llava_next', LLaVA-NeXT, and 'instructblip' with a LLaMA / Vicuna decoder)")
    vision_defaults = LLAVA_VISION if hf.get("vision_config") is None else CLIP_VISION
    vc, tc = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vision = {k: get(vc, k, v) for k, v in vision_defaults.items()}
    text = text_settings(tc)
    feature_layer = get(hf, "vision_feature_layer", -2)
    strategy = get(hf, "vision_feature_select_strategy", "default")

    unsupported = [f"{what} {value!r}" for what, value, allowed in [
        ("vision_config model_type", vc.get("model_type", "clip_vision_model"), ["clip_vision_model"]),
        ("vision hidden_act", vision["hidden_act"], ["quick_gelu", "gelu"]),
        ("projector_hidden_act", get(hf, "projector_hidden_act", "gelu"), ["gelu"]),
        ("multimodal_projector_bias", get(hf, "multimodal_projector_bias", True), [True]),
        ("vision_feature_select_strategy", strategy, ["default", "full"]),
    ] if value not in allowed] + text_unsupported(tc, text)
    # A list of feature layers (concatenated features) is not LLaVA-1.5; nor are non-square patches.
    unsupported += [f"{what} {value!r}" for what, value in [
        ("vision_feature_layer", feature_layer), ("image_size", vision["image_size"]),
        ("patch_size", vision["patch_size"])] if type(value) is not int]
    unsupported += sizes_unsupported(vision)
    pinpoints = get(hf, "image_grid_pinpoints", NEXT_PINPOINTS) if model_type == "llava_next" else []
    if model_type == "llava_next":
        unsupported += next_unsupported(pinpoints, strategy, vision["image_size"])
    if unsupported:
        raise MinidamroError(f"{path}: unsupported " + ", ".join(unsupported))
    cfg = LlavaConfig(vision=VisionConfig(**vision), text=TextConfig(**text),
                      image_token_index=get(hf, "image_token_index", get(hf, "image_token_id", 32000)),
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      model_type=model_type, image_grid_pinpoints=[list(p) for p in pinpoints])
    try:
        cfg.feature_hidden_index
    except ValueError as e:
        raise MinidamroError(f"{path}: {e}") from None
    if not 0 <= cfg.image_token_index < cfg.text.vocab_size:
        raise MinidamroError(f"{path}: image_token_index {cfg.image_token_index} is outside the vocabulary")
    return cfg


def text_settings(tc: dict) -> dict:
    """The LLaMA decoder's settings from a text_config, transformers' defaults for what it omits."""
    text = {k: get(tc, k, v) for k, v in LLAMA.items()}
    text["num_key_value_heads"] = get(tc, "num_key_value_heads", text["num_attention_heads"])
    text["head_dim"] = get(tc, "head_dim", text["hidden_size"] // text["num_attention_heads"])
    rope = get(tc, "rope_parameters", None) or get(tc, "rope_scaling", None) or {}  # v5 / v4
    text["rope_theta"] = float(get(rope, "rope_theta", get(tc, "rope_theta", 10000.0)))
    return text


def text_unsupported(tc: dict, text: dict) -> list[str]:
    """What minidamro's LLaMA decoder (llama.py) cannot run: another architecture, biases, other RoPE."""
    rope = get(tc, "rope_parameters", None) or get(tc, "rope_scaling", None) or {}
    out = [f"{what} {value!r}" for what, value, allowed in [
        ("text_config model_type", tc.get("model_type", "llama"), ["llama"]),
        ("text hidden_act", get(tc, "hidden_act", "silu"), ["silu"]),
        ("attention_bias", get(tc, "attention_bias", False), [False]),
        ("mlp_bias", get(tc, "mlp_bias", False), [False]),
        ("rope_type", rope.get("rope_type", rope.get("type", "default")), ["default"]),
    ] if value not in allowed]
    out += [f"eos_token_id {text['eos_token_id']!r}"] if type(text["eos_token_id"]) is not int else []
    return out + sizes_unsupported(text)


def sizes_unsupported(part: dict) -> list[str]:
    sizes = [(k, v) for k, v in part.items() if k.endswith(("_size", "_layers", "_heads", "num_channels", "head_dim",
                                                            "_frequency", "_embeddings", "_tokens"))]
    return [f"{k} {v!r}" for k, v in sizes if type(v) is not int or v < 1]  # widths, counts: positive


# InstructBlipVisionConfig's / InstructBlipQFormerConfig's defaults (those of the released EVA ViT-g and Q-Former).
EVA_VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6)
QFORMER = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, layer_norm_eps=1e-12, cross_attention_frequency=2)


def build_instructblip_config(hf: dict, path: str) -> InstructBlipConfig:
    """InstructBLIP with a LLaMA (Vicuna) decoder; the Flan-T5 variants (an encoder-decoder LLM) are refused."""
    vc, qc, tc = (hf.get(k) or {} for k in ("vision_config", "qformer_config", "text_config"))
    vision = {k: get(vc, k, v) for k, v in EVA_VISION.items()}
    qformer = {k: get(qc, k, v) for k, v in QFORMER.items()} | {"encoder_hidden_size": vision["hidden_size"]}
    text = text_settings(tc)
    unsupported = [f"{what} {value!r}" for what, value, allowed in [
        ("vision hidden_act", get(vc, "hidden_act", "gelu"), ["gelu"]),
        ("vision qkv_bias", get(vc, "qkv_bias", True), [True]),
        ("qformer hidden_act", get(qc, "hidden_act", "gelu"), ["gelu"]),
        ("qformer position_embedding_type", get(qc, "position_embedding_type", "absolute"), ["absolute"]),
    ] if value not in allowed]
    if tc.get("model_type", "llama") != "llama":
        raise MinidamroError(f"{path}: InstructBLIP with a {tc.get('model_type')!r} language model is not supported "
                             "(only LLaMA / Vicuna, e.g. Salesforce/instructblip-vicuna-7b)")
    unsupported += text_unsupported(tc, text)
    unsupported += sizes_unsupported(vision) + sizes_unsupported(qformer)
    unsupported += [f"{what} hidden_size {part['hidden_size']!r} over {part['num_attention_heads']!r} heads"
                    for what, part in (("vision", vision), ("qformer", qformer))
                    if not unsupported and part["hidden_size"] % part["num_attention_heads"]]
    unsupported += [f"num_query_tokens {v!r}" for v in [get(hf, "num_query_tokens", 32)] if type(v) is not int or v < 1]
    image_token = get(hf, "image_token_index", get(hf, "image_token_id", None))
    if type(image_token) is not int:
        unsupported.append(f"image_token_index {image_token!r} (transformers' InstructBLIP needs one)")
    if unsupported:
        raise MinidamroError(f"{path}: unsupported " + ", ".join(unsupported))
    if not 0 <= image_token < text["vocab_size"]:
        raise MinidamroError(f"{path}: image_token_index {image_token} is outside the vocabulary")
    return InstructBlipConfig(vision=EvaConfig(**vision), qformer=QFormerConfig(**qformer), text=TextConfig(**text),
                              num_query_tokens=get(hf, "num_query_tokens", 32), image_token_index=image_token)


def next_unsupported(pinpoints, strategy: str, tile) -> list[str]:
    """What LLaVA-NeXT's packing cannot run: canvases that are not whole tiles, or [CLS] kept as a feature
    (577 features per tile do not form a square grid; transformers cannot run it either)."""
    def whole_tiles(p):
        return (isinstance(p, (list, tuple)) and len(p) == 2 and type(tile) is int and tile > 0
                and all(type(x) is int and x > 0 and x % tile == 0 for x in p))
    out = []
    if not isinstance(pinpoints, list) or not pinpoints or not all(whole_tiles(p) for p in pinpoints):
        out.append(f"image_grid_pinpoints {pinpoints!r} (each must be [height, width], multiples of the "
                   f"image size {tile!r})")
    if strategy != "default":
        out.append(f"vision_feature_select_strategy {strategy!r} for llava_next (only 'default')")
    return out


def read_preprocessor(src: str, cfg: LlavaConfig) -> dict:
    path = os.path.join(src, "preprocessor_config.json")
    if os.path.exists(path):
        p = read_json(path)
    elif os.path.exists(os.path.join(src, "processor_config.json")):  # what transformers v5 writes
        path = os.path.join(src, "processor_config.json")
        p = read_json(path).get("image_processor") or {}
    elif cfg.model_type == "instructblip":
        s = cfg.vision.image_size
        print(f"note: {src} has no preprocessor_config.json; using BLIP's image preprocessing at {s} x {s}")
        p = {"size": {"height": s, "width": s}}
    else:
        print(f"note: {src} has no preprocessor_config.json; using llava-hf's image preprocessing")
        p = LLAVA_PREPROCESSOR
    defaults = BLIP_PROCESSOR if cfg.model_type == "instructblip" else CLIP_PROCESSOR
    out = {k: get(p, k, v) for k, v in defaults.items()}
    if isinstance(out["size"], int):  # old configs: an int size is the short side, an int crop a square
        out["size"] = {"shortest_edge": out["size"]}
    if isinstance(out["crop_size"], int):
        out["crop_size"] = {"height": out["crop_size"], "width": out["crop_size"]}
    # The position embeddings fix the ViT's input size: the preprocessed image must be exactly that.
    final = out["crop_size"] if out["do_center_crop"] else out["size"]
    s = cfg.vision.image_size
    if (final.get("height"), final.get("width")) != (s, s):
        raise MinidamroError(f"{path}: images are preprocessed to {final}, but the vision tower takes {s}x{s}")
    if cfg.model_type == "llava_next":
        # NeXT's tiles are crop_size squares; the model lays them out by the config's pinpoints, the
        # processor by its own: they must be the same, or the image-token count would not match.
        crop = out["crop_size"]
        if (crop.get("height"), crop.get("width")) != (s, s):
            raise MinidamroError(f"{path}: LLaVA-NeXT tiles are crop_size {crop}, the vision tower takes {s}x{s}")
        theirs = get(p, "image_grid_pinpoints", cfg.image_grid_pinpoints)
        if [list(x) for x in theirs] != cfg.image_grid_pinpoints:
            raise MinidamroError(f"{path}: image_grid_pinpoints {theirs} differ from config.json's "
                                 f"{cfg.image_grid_pinpoints}")
    return out


def read_special_tokens(src: str, cfg: LlavaConfig, sp_size: int) -> dict:
    """Added tokens beyond the sentencepiece vocabulary (`<image>`, `<pad>`): content -> id."""
    tokens = {}
    for name, read in ADDED_TOKENS.items():
        path = os.path.join(src, name)
        try:
            found = read(read_json(path)) if os.path.exists(path) else []
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MinidamroError(f"{path}: malformed added tokens ({type(e).__name__}: {e})") from None
        for content, i in found:
            if i >= sp_size:  # ids inside the sentencepiece vocabulary are its own pieces
                tokens.setdefault(content, i)
    if tokens.get("<image>", cfg.image_token_index) != cfg.image_token_index:
        raise MinidamroError(f"{src}: the tokenizer gives <image> id {tokens['<image>']}, "
                             f"config.json image_token_index {cfg.image_token_index}")
    return tokens | {"<image>": cfg.image_token_index}


def token_name(value):
    """A tokenizer file's token: a string, or an AddedToken as a dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value


def read_bos(src: str, sp_path: str, special: dict) -> int | None:
    """The id InstructBLIP's processor puts before the prompt: the tokenizer's bos_token. The release's is "</s>"
    (id 2: LAVIS trained it so), while text_config says 1; so it is read from the tokenizer files, as
    transformers does, and LlamaTokenizer's "<s>" only when they name none. None: a tokenizer_config.json that
    says add_bos_token false (then the processor puts none)."""
    bos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(src, name)
        if os.path.exists(path):
            d = read_json(path)
            if name == "tokenizer_config.json" and d.get("add_bos_token") is False:
                return None
            bos = token_name(d.get("bos_token")) if bos is None else bos
    bos = "<s>" if bos is None else bos
    if bos in special:
        return special[bos]
    i = SentencePieceProcessor(model_file=sp_path).piece_to_id(bos) if isinstance(bos, str) else 0
    if not isinstance(bos, str) or i == 0 and bos != "<unk>":
        raise MinidamroError(f"{src}: bos_token {bos!r} is not in the tokenizer")
    return i


def read_qformer_vocab(src: str, cfg) -> str:
    """The Q-Former's WordPiece vocabulary (qformer_tokenizer/vocab.txt on the hub), checked against the model."""
    path = next((p for p in (os.path.join(src, "qformer_tokenizer", "vocab.txt"), os.path.join(src, QFORMER_VOCAB))
                 if os.path.isfile(p)), None)
    if path is None:
        raise MinidamroError(f"{src} has no qformer_tokenizer/vocab.txt: InstructBLIP's Q-Former tokenizer is needed")
    size = max(WordPiece(path).vocab.values()) + 1
    if size > cfg.qformer.vocab_size:
        raise MinidamroError(f"{path} has {size} tokens, more than the Q-Former's {cfg.qformer.vocab_size} embeddings")
    return path


def open_weights(src: str, stack: ExitStack) -> dict:
    """Source key -> the memory-mapped safe_open handle holding it."""
    single, index = os.path.join(src, "model.safetensors"), os.path.join(src, "model.safetensors.index.json")
    weight_map = None
    if os.path.exists(single):
        shards = ["model.safetensors"]
    elif os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MinidamroError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
    else:
        raise MinidamroError(f"{src} has no model.safetensors or model.safetensors.index.json")
    handles = {}
    for shard in shards:
        path = os.path.join(src, shard)
        if os.path.basename(shard) != shard or not os.path.exists(path):
            raise MinidamroError(f"{index} names shard {shard}, which is not in {src}")
        try:
            f = stack.enter_context(safe_open(path, framework="pt"))
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header or short file
            raise MinidamroError(f"cannot read weights {path}: {e}") from None
        for k in f.keys():
            if k in handles:
                raise MinidamroError(f"{src}: weight {k} is stored twice")
            handles[k] = f
    if weight_map is not None:
        wrong = sorted(k for k, shard in weight_map.items() if k not in handles)
        if wrong:
            raise MinidamroError(f"{index} names weights its shards lack: {', '.join(wrong)}")
    return handles


def map_keys(handles: dict, cfg: LlavaConfig, tied: bool) -> tuple[dict, int]:
    """minidamro name -> source name, for the weights minidamro builds; and how many were dropped."""
    # LLaVA: ViT layers past the feature layer and post_layernorm are never run. (InstructBLIP runs every layer; its
    # `vision_model.*` keys never match `unused`.)
    built = cfg.feature_hidden_index if cfg.model_type != "instructblip" else None
    unused = re.compile(r"vision_tower\.(post_layernorm\.|encoder\.layers\.(\d+)\.)")
    names, dropped = {}, 0
    for key in handles:
        if key.endswith(BUFFERS):
            continue
        new = next((to + key[len(p):] for p, to in PREFIXES if key.startswith(p)), key)  # unknown: kept as is
        m = unused.match(new)
        if m and (m[2] is None or built <= int(m[2]) < cfg.vision.num_hidden_layers):
            dropped += 1
            continue
        if new in names:
            raise MinidamroError(f"weights {names[new]} and {key} are the same weight in different layouts")
        names[new] = key
    if "lm_head.weight" not in names and "language_model.embed_tokens.weight" in names and tied:
        names["lm_head.weight"] = names["language_model.embed_tokens.weight"]  # tied: one matrix for both
    return names, dropped


def convert(src: str, out: str, dtype: str | None = None, force: bool = False, quantize: str | None = None) -> None:
    if not os.path.isdir(src):
        raise MinidamroError(f"source directory {src} does not exist")
    if os.path.lexists(out) and not force:
        raise MinidamroError(f"{out} already exists (use --force to replace it)")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([real_src, real_out]) in (real_src, real_out):
        raise MinidamroError(f"the output {out} and the source {src} must not contain each other")
    if os.path.lexists(out) and not replaceable(out):
        raise MinidamroError(f"{out} exists and is not a minidamro checkpoint: --force only replaces those")
    if dtype is not None and dtype not in DTYPES:
        raise MinidamroError(f"unknown dtype {dtype} (choose from {', '.join(DTYPES)})")
    if quantize not in (None, "int8"):
        raise MinidamroError(f"unknown quantization {quantize} (int8 is the one there is)")
    hf = read_json(os.path.join(src, "config.json"))
    if isinstance(hf, dict) and "minidamro_format" in hf:  # a minidamro checkpoint: to another dtype, or int8
        return reconvert(src, out, dtype, force, quantize)
    try:  # a value of the wrong type anywhere in the JSON: one line, not a traceback
        cfg = build_config(hf, os.path.join(src, "config.json"))
        tied = bool(hf.get("tie_word_embeddings") or (hf.get("text_config") or {}).get("tie_word_embeddings"))
        cfg.preprocessor = read_preprocessor(src, cfg)
        with torch.device("meta"):
            model_class(cfg)(cfg)
    except (TypeError, AttributeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise MinidamroError(f"{src}: malformed configuration ({type(e).__name__}: {e})") from None
    sp_path = os.path.join(src, "tokenizer.model")
    if not os.path.exists(sp_path):
        raise MinidamroError(f"{src} has no tokenizer.model: a sentencepiece tokenizer.model is needed")
    try:
        sp_size = SentencePieceProcessor(model_file=sp_path).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise MinidamroError(f"cannot load tokenizer {sp_path}: {e}") from None
    cfg.special_tokens = read_special_tokens(src, cfg, sp_size)
    qformer_vocab = None
    if cfg.model_type == "instructblip":
        cfg.prompt_bos_id = read_bos(src, sp_path, cfg.special_tokens)
        qformer_vocab = read_qformer_vocab(src, cfg)

    with ExitStack() as stack:
        handles = open_weights(src, stack)
        names, dropped = map_keys(handles, cfg, tied)
        with torch.device("meta"):
            expected = model_class(cfg)(cfg).state_dict()
        stored = {n: handles[s].get_slice(s) for n, s in names.items()}
        got = {n: torch.empty(sl.get_shape(), device="meta") for n, sl in stored.items()}
        check_state_dict(expected, got, f"the weights in {src} do not match its config.json")
        stored_dtypes = {sl.get_dtype() for sl in stored.values()}
        if not stored_dtypes <= set(SAFETENSORS_DTYPES):
            raise MinidamroError(f"{src}: unsupported weight dtype {', '.join(sorted(stored_dtypes))}")
        if dtype is None and len(stored_dtypes) > 1:
            raise MinidamroError(f"{src} mixes weight dtypes {', '.join(sorted(stored_dtypes))}: choose one "
                                 "with --dtype")
        target = DTYPES[dtype] if dtype else SAFETENSORS_DTYPES[stored_dtypes.pop()]
        write_checkpoint(out, cfg, target, quantize, lambda n: handles[names[n]].get_tensor(names[n]), sp_path, force,
                         qformer_vocab)
    params = sum(t.numel() for t in expected.values())
    print(f"converted {src} -> {out}: {len(names)} tensors, {params / 1e6:.1f}M parameters in {cfg.torch_dtype}"
          f"{' (decoder linears and lm_head in int8)' if quantize else ''} ({dropped} unused vision weights dropped)")


def reconvert(src: str, out: str, dtype: str | None, force: bool, quantize: str | None):
    """A minidamro checkpoint (the shipped toy model, an earlier conversion) to another dtype, or to int8."""
    cfg = read_config(src)
    if not os.path.isfile(os.path.join(src, "tokenizer.model")):
        raise MinidamroError(f"{src} has no tokenizer.model")
    if cfg.text.quantization:
        raise MinidamroError(f"{src} is already quantized ({cfg.text.quantization}): convert from its source")
    mapped = read_safetensors(os.path.join(src, "model.safetensors"))
    with torch.device("meta"):
        check_state_dict(model_class(cfg)(cfg).state_dict(), mapped, f"weights in {src} do not match its config")
    target = DTYPES[dtype or cfg.torch_dtype]
    vocab = os.path.join(src, QFORMER_VOCAB) if cfg.model_type == "instructblip" else None  # read_config checked it
    write_checkpoint(out, cfg, target, quantize, mapped.__getitem__, os.path.join(src, "tokenizer.model"), force,
                     vocab)
    print(f"converted {src} -> {out}: {len(mapped)} tensors in {DTYPE_NAMES[target]}"
          f"{' (decoder linears and lm_head in int8)' if quantize else ''}")


def write_checkpoint(out: str, cfg: LlavaConfig, target: torch.dtype, quantize: str | None, read, sp_path: str,
                     force: bool, qformer_vocab: str | None = None):
    """config.json, model.safetensors (every tensor read(name) in `target`, or with --quantize int8 the decoder's
    linear weights and lm_head as int8 + float32 scales, kernels/int8.py), tokenizer.model and, for InstructBLIP,
    the Q-Former's vocabulary, into a temporary sibling directory renamed into place when complete."""
    cfg.torch_dtype = DTYPE_NAMES[target]
    cfg.text.quantization = quantize or ""
    with torch.device("meta"):
        expected = model_class(cfg)(cfg).state_dict()  # in minidamro's order; int8 layers: weight, then weight_scale
    dtypes = {n: t.dtype if t.dtype == torch.int8 or n.endswith(".weight_scale") else target
              for n, t in expected.items()}
    last = {}

    def tensor(name):
        if dtypes[name] == torch.int8 or name.endswith(".weight_scale"):
            source = name.removesuffix("_scale")  # the float weight both come from, quantized once
            if last.get("name") != source:
                last.update(name=source, qs=quantize_int8(read(source)))
            return last["qs"][0] if dtypes[name] == torch.int8 else last["qs"][1]
        return read(name)
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        write_safetensors(os.path.join(tmp, "model.safetensors"), {n: t.shape for n, t in expected.items()},
                          dtypes, tensor)
        shutil.copyfile(sp_path, os.path.join(tmp, "tokenizer.model"))
        if qformer_vocab:
            shutil.copyfile(qformer_vocab, os.path.join(tmp, QFORMER_VOCAB))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        replace(tmp, out, force)
    except OSError as e:
        raise MinidamroError(f"cannot write {out}: {e}") from None
    finally:  # BaseException too: an interrupt leaves nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)


def replaceable(out: str) -> bool:
    """--force replaces an earlier conversion or an empty directory, never anything else a user has there."""
    if os.path.islink(out) or not os.path.isdir(out):
        return False
    if not os.listdir(out):
        return True
    try:
        with open(os.path.join(out, "config.json")) as f:
            return "minidamro_format" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def replace(tmp: str, out: str, force: bool):
    """Move the finished `tmp` to `out`; an existing `out` (with --force) is removed only after that."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not force:
        raise MinidamroError(f"{out} already exists (use --force to replace it)")
    if not replaceable(out):  # checked again: it may have changed while we converted
        raise MinidamroError(f"{out} exists and is not a minidamro checkpoint: --force only replaces those")
    old = f"{out.rstrip(os.sep)}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the old one back
        raise
    shutil.rmtree(old)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a Hugging Face LLaVA-1.5 or LLaVA-NeXT checkpoint for minidamro.")
    ap.add_argument("src", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.model)")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", choices=list(DTYPES), help="stored dtype (default: the source's)")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    ap.add_argument("--quantize", choices=["int8"], help="store the decoder's linear weights and lm_head as int8 "
                    "with one float32 scale per output row (symmetric, round-to-nearest): half of bfloat16's "
                    "memory and reads")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, args.dtype, args.force, args.quantize)
    except MinidamroError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # always exactly one line
        sys.exit(1)


if __name__ == "__main__":
    main()
