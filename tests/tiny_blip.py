"""Tiny random InstructBLIP checkpoints in the hub layout of Salesforce/instructblip-vicuna-7b, built on the spot.

The LLM tokenizer is tiny.py's sentencepiece model with the release's settings: bos_token "</s>" (id 2), "[PAD]"
and "<image>" added after the pieces (32000 / 32001 in the release). The Q-Former's WordPiece vocabulary is
written here, its special tokens deliberately not at bert-base-uncased's ids (a hard-coded 101 / 102 would
show). Weights are scaled and biases randomised as in tiny.py (the ViT's matrices drawn first: transformers
starts them at std 1e-10); the key third of the ViT's qkv bias stays zero, as EVA's (cat(q_bias, 0, v_bias)).
"""
import json
import os
import shutil
import string

import torch

import tiny

PAD_TOKEN, IMAGE_TOKEN = tiny.SP_VOCAB, tiny.SP_VOCAB + 1   # as the release's [PAD] 32000, <image> 32001
BOS = 2  # "</s>"

CONFIGS = {
    # MHA decoder, 4x4 patches of 7 px, 5 queries, Q-Former of 3 layers (cross-attention in 0 and 2)
    "blip_mha": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=28, patch_size=7),
                     qformer=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  max_position_embeddings=64),
                     text=tiny.CONFIGS["mha"]["text"], num_query_tokens=5),
    # GQA decoder (8 over 2), 5x5 patches of 6 px, 7 queries, 4 Q-Former layers of width 32 (8 heads)
    "blip_gqa": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                                 image_size=30, patch_size=6),
                     qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
                                  max_position_embeddings=64),
                     text=tiny.CONFIGS["gqa"]["text"], num_query_tokens=7),
}

SPECIALS = ["[PAD]", "[MASK]", "[UNK]", "[SEP]", "[CLS]"]  # not bert-base-uncased's order
WORDS = ("is there a an the in on of this image photo picture please answer question with one word yes no "
         "generate short caption write description for dog cat car person table chair what color how many "
         "describe detail taken place worship").split()


def qformer_vocab() -> list[str]:
    pieces = SPECIALS + list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    pieces += WORDS + ["##" + c for c in string.ascii_lowercase + string.digits] + ["##s", "##ing", "##ed"]
    seen = []
    for p in pieces:
        if p not in seen:
            seen.append(p)
    return seen


def hf_config(name: str):
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig
    c = CONFIGS[name]
    vocab = len(qformer_vocab()) + 1  # + "[DEC]", as the release's 30523
    return InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**c["vision"]).to_dict(),
        qformer_config=InstructBlipQFormerConfig(vocab_size=vocab, **c["qformer"]).to_dict(),
        text_config=LlamaConfig(vocab_size=tiny.VOCAB, max_position_embeddings=512, **c["text"]).to_dict(),
        num_query_tokens=c["num_query_tokens"], image_token_index=IMAGE_TOKEN)


def preprocessor_config(name: str) -> dict:
    s = CONFIGS[name]["vision"]["image_size"]
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "BlipImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"height": s, "width": s}}


def build_hf_checkpoint(name: str, out: str, tokenizer_model: str, seed: int = 0, dtype=torch.float32) -> str:
    from transformers import InstructBlipForConditionalGeneration
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(hf_config(name))
    with torch.no_grad():
        for key, p in model.named_parameters():
            # InstructBlipVisionConfig initialises the ViT at std 1e-10 (it is always loaded pretrained): every
            # token would be alike and every attention uniform. Give its matrices a unit-variance-preserving scale.
            if key.startswith("vision_model.") and p.dim() >= 2:
                p.normal_(0, 1 if "embedding" in key and "patch" not in key else (p[0].numel()) ** -0.5)
            p.mul_(2)
            if key.endswith("bias") or "norm" in key.lower():
                p.add_(torch.randn_like(p) * 0.3)
            if key.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d:2 * d] = 0  # EVA has no key bias
        model.query_tokens.normal_(0, 1)
    model.to(dtype).save_pretrained(out)
    shutil.copy(tokenizer_model, os.path.join(out, "tokenizer.model"))
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, c in ((PAD_TOKEN, "[PAD]"), (IMAGE_TOKEN, "<image>"))}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "[PAD]", "legacy": False, "add_bos_token": True, "add_eos_token": False,
                   "tokenizer_class": "LlamaTokenizer"}, f, indent=2)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(name), f, indent=2)
    qdir = os.path.join(out, "qformer_tokenizer")
    os.makedirs(qdir)
    with open(os.path.join(qdir, "vocab.txt"), "w") as f:
        f.write("\n".join(qformer_vocab()) + "\n")
    with open(os.path.join(qdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, f)
    return out


def hf_model(checkpoint: str, dtype=torch.float32, attn_implementation="eager"):
    from transformers import InstructBlipForConditionalGeneration
    return InstructBlipForConditionalGeneration.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation=attn_implementation).eval()


def hf_processor(checkpoint: str):
    """transformers' InstructBlipProcessor on the checkpoint's files: PIL image processor (the release's
    use_fast=False), LlamaTokenizer with the release's bos "</s>", BertTokenizer for the Q-Former."""
    from transformers import BertTokenizer, BlipImageProcessorPil, InstructBlipProcessor
    tok = llama_tokenizer(checkpoint)
    image = BlipImageProcessorPil(**{k: v for k, v in preprocessor_config_of(checkpoint).items()
                                     if k != "image_processor_type"})
    qtok = BertTokenizer(os.path.join(checkpoint, "qformer_tokenizer", "vocab.txt"), do_lower_case=True)
    return InstructBlipProcessor(image_processor=image, tokenizer=tok, qformer_tokenizer=qtok,
                                 num_query_tokens=json.load(open(os.path.join(checkpoint, "config.json")))
                                 ["num_query_tokens"])


def preprocessor_config_of(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "preprocessor_config.json")) as f:
        return json.load(f)


def llama_tokenizer(checkpoint: str, check: bool = True):
    from transformers import LlamaTokenizer
    tok = LlamaTokenizer.from_pretrained(checkpoint, legacy=False)
    assert not check or tok.bos_token_id == BOS and tok.convert_tokens_to_ids(["[PAD]", "<image>"]) == [PAD_TOKEN, IMAGE_TOKEN]
    return tok
