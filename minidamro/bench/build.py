"""The benchmark's random checkpoints: built once per size into a work directory, then converted.

medium and quick are built by transformers from a config; 7b is streamed tensor by tensor (llava7b.py).
"""
import json
import os
import shutil

from . import llava7b


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = {
    "medium": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=336, patch_size=14, hidden_act="quick_gelu"),
                 text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)),
    "7b": dict(vision=llava7b.VISION, text=llava7b.TEXT, dtype="bfloat16"),  # llava-1.5-7b-hf's shapes
    "quick": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14, hidden_act="quick_gelu"),
                  text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)),
}
IMAGE_TOKEN, PAD_TOKEN, SP_VOCAB = 32000, 32001, 400  # a small sentencepiece model: ids only need to be valid
PROMPT, TOPK, ALPHA, BETA = "Describe this image in detail.", 10, 2.0, 0.1
IMPLS = ("hf", "hf_damro", "md_plain", "md_damro", "md_damro_2call", "md_vcd", "md_plain_int8", "md_damro_int8")


# ---------------------------------------------------------------- the checkpoint
def write_tokenizer(workdir: str, hf: str, image_size: int, **processor):
    """A small sentencepiece model (ids only need to be valid) and llava-hf's tokenizer and preprocessor JSON in
    hf; `processor` adds or overrides preprocessor_config.json entries (the image processor type, NeXT's pinpoints)."""
    import sentencepiece as spm
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(f"USER: {PROMPT} ASSISTANT: a cat on a red sofa, {i} windows and {i * 7} birds."
                          for i in range(3000)))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(hf, "tokenizer"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                     "single_word": False, "special": True}
    s = image_size
    for name, d in {
        "tokenizer_config.json": {"added_tokens_decoder": {str(IMAGE_TOKEN): tok("<image>"),
                                                           str(PAD_TOKEN): tok("<pad>")},
                                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                  "legacy": False, "tokenizer_class": "LlamaTokenizer"},
        "preprocessor_config.json": {
            "crop_size": {"height": s, "width": s}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": s}, **processor},
    }.items():
        with open(os.path.join(hf, name), "w") as f:
            json.dump(d, f, indent=2)


def build(workdir: str, size: str):
    """Random llava-hf checkpoint in workdir/hf, converted to workdir/minidamro; skipped if already there."""
    stamp = os.path.join(workdir, "spec.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == SPEC[size]:
                return
    import torch
    import weights_convert
    hf, spec = os.path.join(workdir, "hf"), SPEC[size]
    os.makedirs(hf, exist_ok=True)
    if size == "7b":  # streamed: no transformers, never the whole model in memory
        from .llava7b import write_hf
        write_hf(hf, IMAGE_TOKEN)
    else:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
        torch.manual_seed(0)
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
        LlavaForConditionalGeneration(cfg).save_pretrained(hf)
    write_tokenizer(workdir, hf, spec["vision"]["image_size"], image_processor_type="CLIPImageProcessor")
    weights_convert.convert(hf, os.path.join(workdir, "minidamro"), force=True)
    shutil.rmtree(os.path.join(workdir, "minidamro-int8"), ignore_errors=True)  # converted from the old weights
    with open(stamp, "w") as f:
        json.dump(spec, f)


def build_int8(workdir: str):
    """The same random checkpoint converted with --quantize int8 into workdir/minidamro-int8 (the activations in
    the checkpoint's dtype), once."""
    import weights_convert
    out = os.path.join(workdir, "minidamro-int8")
    if not os.path.exists(os.path.join(out, "config.json")):
        weights_convert.convert(os.path.join(workdir, "hf"), out, quantize="int8", force=True)


def weight_bytes(workdir: str) -> dict:
    """Bytes by part, from the converted safetensors header. `per_token` is what one decode step must read:
    lm_head, every decoder layer (attention, MLP, both RMSNorms), the final norm, and one embedding row."""
    with open(os.path.join(workdir, "minidamro", "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    emb = size["language_model.embed_tokens.weight"]
    llm = sum(v for k, v in size.items() if k.startswith(("language_model.", "lm_head.")))
    row = emb // header["language_model.embed_tokens.weight"]["shape"][0]
    vision = sum(v for k, v in size.items() if k.startswith("vision_tower."))
    itemsize = row // header["language_model.embed_tokens.weight"]["shape"][1]
    return {"total": sum(size.values()), "llm": llm, "vision": vision, "per_token": llm - emb + row,
            "itemsize": itemsize}

