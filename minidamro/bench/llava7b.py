"""A random checkpoint with LLaVA-1.5-7B's exact shapes, written tensor by tensor (no transformers needed).

llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (24 x 1024, 16 heads, MLP 4096), a 1024 -> 4096 -> 4096 projector,
Vicuna-7B (32 x 4096, 32 heads, MLP 11008, 32064-row vocabulary, 4096 positions). `write_hf` writes the hub's
llava-hf layout (config.json, model.safetensors with `vision_tower.vision_model.*`, `language_model.model.*`,
`language_model.lm_head.weight`) in bfloat16, generating and writing one tensor at a time, so building it
holds at most one tensor (the 525 MB lm_head in float32) in memory; weights_convert.py then streams it into
minidamro's format. 7.06e9 parameters: 14.1 GB per copy.
"""
import json
import os

import torch

from ..checkpoint import write_safetensors

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
            hidden_act="silu", bos_token_id=1, eos_token_id=2)


def hf_config(image_token: int, dtype: str = "bfloat16") -> dict:
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": dtype,
            "image_token_index": image_token, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
            "vision_config": VISION | {"model_type": "clip_vision_model", "projection_dim": 768},
            "text_config": TEXT | {"model_type": "llama", "tie_word_embeddings": False,
                                   "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}}


def hf_shapes() -> dict:
    """llava-hf key -> shape, in the hub's (transformers v4) layout."""
    d, f, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    n_pos = (VISION["image_size"] // p) ** 2 + 1
    D, F, V = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    vt, lm = "vision_tower.vision_model.", "language_model.model."
    s = {vt + "embeddings.class_embedding": (d,), vt + "embeddings.patch_embedding.weight": (d, 3, p, p),
         vt + "embeddings.position_embedding.weight": (n_pos, d),
         vt + "pre_layrnorm.weight": (d,), vt + "pre_layrnorm.bias": (d,)}
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{vt}encoder.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                            ("self_attn.out_proj", (d, d)), ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f))):
            s[layer + name + ".weight"], s[layer + name + ".bias"] = shape, shape[:1]
        for norm in ("layer_norm1", "layer_norm2"):
            s[layer + norm + ".weight"], s[layer + norm + ".bias"] = (d,), (d,)
    s |= {vt + "post_layernorm.weight": (d,), vt + "post_layernorm.bias": (d,),
          "multi_modal_projector.linear_1.weight": (D, d), "multi_modal_projector.linear_1.bias": (D,),
          "multi_modal_projector.linear_2.weight": (D, D), "multi_modal_projector.linear_2.bias": (D,),
          lm + "embed_tokens.weight": (V, D)}
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"{lm}layers.{i}."
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (D, D)), ("self_attn.v_proj", (D, D)),
                            ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                            ("mlp.down_proj", (D, F))):
            s[layer + name + ".weight"] = shape
        s[layer + "input_layernorm.weight"] = s[layer + "post_attention_layernorm.weight"] = (D,)
    s |= {lm + "norm.weight": (D,), "language_model.lm_head.weight": (V, D)}
    return s


def random_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, other weights N(0, 0.02^2) (transformers' init): activations stay finite."""
    lower = name.lower()  # BERT spells its norms "LayerNorm"
    if lower.endswith("norm.weight") or ("layer_norm" in lower and lower.endswith(".weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))


def write_hf(out: str, image_token: int, dtype=torch.bfloat16):
    """config.json and model.safetensors (llava-hf layout, `dtype`) into the directory `out`, streamed."""
    shapes = hf_shapes()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(image_token, str(dtype).removeprefix("torch.")), f, indent=2)
    path = os.path.join(out, "model.safetensors")
    seeds = {name: seed for seed, name in enumerate(shapes)}
    write_safetensors(path + ".tmp", shapes, dtype, lambda name: random_tensor(name, shapes[name], seeds[name]))
    os.replace(path + ".tmp", path)
