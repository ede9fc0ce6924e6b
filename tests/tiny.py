"""Tiny random LLaVA checkpoints and tokenizers, built on the spot with transformers and sentencepiece.

Three configurations differ in what parity must not depend on: MHA vs GQA, image and patch size,
vision_feature_layer (negative, positive, last) and the select strategy. Weights are scaled x2 from
transformers' init so greedy decoding has no near-ties, and biases and norm weights are random too.
"""
import json
import os
import random

import sentencepiece as spm
import torch

SP_VOCAB = 400            # sentencepiece pieces; <image> = 400, <pad> = 401 as in llava-hf (32000, 32001)
IMAGE_TOKEN, PAD_TOKEN = SP_VOCAB, SP_VOCAB + 1
EOS_GAIN = 1.0
VOCAB = 448               # rows padded to a multiple of 64, as llava-hf's 32064: ids 402.. have no piece

CONFIGS = {
    # MHA, 4x4 patches of 7 px, layer -2, [CLS] dropped: the LLaVA-1.5 shape in miniature
    "mha": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=28, patch_size=7),
                text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, rms_norm_eps=1e-5),
                vision_feature_layer=-2, vision_feature_select_strategy="default", size=28),
    # GQA (8 query heads over 2 kv heads), 5x5 patches of 6 px, positive layer 2, [CLS] kept, other theta
    "gqa": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                            image_size=30, patch_size=6),
                text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                          num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0),
                vision_feature_layer=2, vision_feature_select_strategy="full", size=36),
    # GQA 6 over 3, 4x4 patches of 8 px, the last layer (-1), resize larger than the crop
    "last": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                           num_key_value_heads=3, rms_norm_eps=1e-5),
                 vision_feature_layer=-1, vision_feature_select_strategy="default", size=40),
}

# LLaVA-NeXT in miniature: the v1.6 pinpoints scaled from 336 px to the tile size (1x2, 2x1, 2x2, 1x3, 3x1
# tiles). "next_mha": the real proportions (processor size = crop = tile). "next_gqa": GQA, a positive feature
# layer, more canvases (3x2, 1x1) and a processor that resizes to 36 before cropping 30, so every tile is
# resized and cropped as in transformers, not merely passed through.
NEXT_CONFIGS = {
    "next_mha": dict(CONFIGS["mha"], pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]),
    "next_gqa": dict(CONFIGS["gqa"], vision_feature_select_strategy="default",
                     pinpoints=[[30, 60], [60, 30], [60, 60], [90, 30], [30, 90], [90, 60], [30, 30]]),
}
ALL_CONFIGS = CONFIGS | NEXT_CONFIGS

CORPUS_LINES = [
    "USER: What is in this image? ASSISTANT: A cat sits on a red sofa next to a window.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Ünïcödé café naïve façade 東京 北京 — “quotes” and emoji 🙂 too.",
    "  leading spaces, trailing spaces  \tand tabs\nand newlines\n\n",
    "A chat between a curious human and an artificial intelligence assistant.",
]


def train_tokenizer(path: str) -> str:
    """A BPE sentencepiece model laid out like LLaMA's: byte fallback, <unk> 0, <s> 1, </s> 2, no normalisation."""
    rnd = random.Random(0)
    lines = [rnd.choice(CORPUS_LINES) + f" {rnd.randint(0, 10**6)}" for _ in range(2000)]
    corpus = path + ".txt"
    with open(corpus, "w") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=path, vocab_size=SP_VOCAB, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2)
    return path + ".model"


def hf_config(name: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig
    c = ALL_CONFIGS[name]
    common = dict(vision_config=CLIPVisionConfig(**c["vision"]),
                  text_config=LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, **c["text"]),
                  image_token_index=IMAGE_TOKEN, vision_feature_layer=c["vision_feature_layer"],
                  vision_feature_select_strategy=c["vision_feature_select_strategy"])
    if name in NEXT_CONFIGS:
        return LlavaNextConfig(**common, image_grid_pinpoints=c["pinpoints"])
    return LlavaConfig(**common)


def preprocessor_config(name: str) -> dict:
    s, crop = ALL_CONFIGS[name]["size"], ALL_CONFIGS[name]["vision"]["image_size"]
    if name in NEXT_CONFIGS:
        return preprocessor_config("mha") | {
            "size": {"shortest_edge": s}, "crop_size": {"height": crop, "width": crop},
            "image_processor_type": "LlavaNextImageProcessor", "do_pad": True,
            "image_grid_pinpoints": NEXT_CONFIGS[name]["pinpoints"]}
    return {
        "crop_size": {"height": crop, "width": crop}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": s},
    }


def build_hf_checkpoint(name: str, out: str, tokenizer_model: str, seed: int = 0, dtype=torch.float32) -> str:
    """Save a random LlavaForConditionalGeneration in llava-hf's hub layout: weights (transformers' default
    save format), tokenizer.model, tokenizer_config.json with the added tokens, preprocessor_config.json."""
    import shutil
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if name in NEXT_CONFIGS else LlavaForConditionalGeneration
    model = cls(hf_config(name))
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.mul_(2)
            # transformers starts biases at 0 and norm weights at 1: randomise them, or a lost or misplaced
            # bias / norm weight could never show in a parity test.
            if key.endswith("bias") or "norm" in key:
                p.add_(torch.randn_like(p) * 0.3)
        # A louder EOS row, so that some runs stop at EOS and the inclusive stop is compared too.
        model.lm_head.weight[2].mul_(EOS_GAIN)
    model.to(dtype).save_pretrained(out)
    shutil.copy(tokenizer_model, os.path.join(out, "tokenizer.model"))
    added = {str(IMAGE_TOKEN): {"content": "<image>", "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True},
             str(PAD_TOKEN): {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True}}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "legacy": False, "tokenizer_class": "LlamaTokenizer", "pad_token": "<pad>"}, f, indent=2)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(name), f, indent=2)
    return out


def hf_tokenizer(tokenizer_model: str):
    """transformers' LlamaTokenizer(legacy=False) with llava-hf's added tokens, the tokenization reference."""
    import shutil
    import tempfile
    from transformers import LlamaTokenizer
    d = tempfile.mkdtemp()
    shutil.copy(tokenizer_model, os.path.join(d, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(d, legacy=False, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_tokens(["<pad>"], special_tokens=True)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_TOKEN, PAD_TOKEN]
    return tok


def hf_model(checkpoint: str, dtype=torch.float32, attn_implementation="eager"):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    with open(os.path.join(checkpoint, "config.json")) as f:
        next_ = json.load(f)["model_type"] == "llava_next"
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    return cls.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn_implementation).eval()
