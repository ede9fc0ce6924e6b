"""InstructBLIP's vision tower: the EVA ViT-g/14 of BLIP-2 (39 layers, width 1408, 224 px -> 16 x 16 patches).

Submodule names follow Hugging Face's `InstructBlipVisionModel`, so the checkpoint's keys load as they are.
It is CLIP's pre-LN ViT (vision.py) with four differences that matter for exactness:

- one fused `qkv` Linear(D, 3D) whose bias is cat(q_bias, 0, v_bias): EVA has no key bias (the hub checkpoint
  stores the concatenation, zeros included, as `qkv.bias`);
- the exact erf GELU (CLIP's quick_gelu is a different function);
- no pre-LayerNorm, but a `post_layernorm` over all 1 + N tokens: InstructBLIP's Q-Former cross-attends to the
  whole last layer's output, [CLS] included (LLaVA drops [CLS] and reads layer -2);
- the output projection is called `projection`, the position embedding is a (1, 1 + N, D) parameter.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Capture, eager_attention
from .kernels.linear import Linear


@dataclass
class EvaConfig:
    hidden_size: int = 1408        # D
    intermediate_size: int = 6144  # MLP width
    num_hidden_layers: int = 39
    num_attention_heads: int = 16  # head_dim 88
    image_size: int = 224          # the square input the position embeddings were trained for
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class InstructBlipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)  # with bias
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.hidden_size))

    def forward(self, pixels):  # pixels: (B, 3, S, S)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding  # (B, 1 + N, D), [CLS] first


class InstructBlipAttention(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # bias = cat(q_bias, zeros, v_bias), see top
        self.projection = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, layer: int, capture: Capture | None):
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B, T, 3D): the output DAMRO's release hooks at layer -2, biases included
        if capture is not None and layer in capture.vit_qk_layers:
            capture.vit_q[layer], capture.vit_k[layer] = qkv[..., :D], qkv[..., D:2 * D]
        q, k, v = qkv.view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if capture is not None and layer in capture.vit_layers:
            # transformers' eager path here takes the softmax in the model's dtype (no float32 upcast); the
            # same numbers in float32, which is what parity and the release run in.
            y, capture.vit_attn[layer] = eager_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        return self.projection(y.transpose(1, 2).reshape(B, T, D))


class InstructBlipMLP(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class InstructBlipEncoderLayer(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.self_attn = InstructBlipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = InstructBlipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, layer: int, capture: Capture | None):  # pre-LN residual block, as CLIP's
        x = x + self.self_attn(self.layer_norm1(x), layer, capture)
        return x + self.mlp(self.layer_norm2(x))


class InstructBlipEncoder(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.layers = nn.ModuleList(InstructBlipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InstructBlipVisionModel(nn.Module):
    """pixels (B, 3, S, S) -> post_layernorm(last layer's output), (B, 1 + N, D) with [CLS] at position 0."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = InstructBlipVisionEmbeddings(cfg)
        self.encoder = InstructBlipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels, capture: Capture | None = None, hidden_states: list | None = None):
        """If `hidden_states` is a list, the embeddings and every layer's output are appended to it (HF's
        `hidden_states`, before post_layernorm)."""
        x = self.embeddings(pixels)
        for i, layer in enumerate(self.encoder.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, i, capture)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.post_layernorm(x)
