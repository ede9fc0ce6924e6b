"""The CLIP ViT vision tower of LLaVA-1.5 (ViT-L/14 at 336 px in the released model).

Submodule names follow Hugging Face's `CLIPVisionModel`, so the converter's key table is a prefix swap.
Only the layers LLaVA reads are built: LLaVA takes its features from `vision_feature_layer`
(-2: the output of the second-to-last layer), so the last layer and `post_layernorm` are never computed.
The linear layers are kernels.linear.Linear: nn.Linear, given a oneDNN-packed copy of the weight at load where that
multiplies an image's tokens faster on this machine (llava.pack_linears).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Capture, eager_attention
from .kernels.linear import Linear


@dataclass
class VisionConfig:
    hidden_size: int = 1024        # D, the ViT width
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24    # layers in the checkpoint's tower (not all are built, see above)
    num_attention_heads: int = 16
    image_size: int = 336          # the square input the position embeddings were trained for
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x):
    # CLIP was trained with this sigmoid approximation of GELU; the exact erf GELU is a different function
    # and would drift from the checkpoint. (The projector, trained by LLaVA, uses the exact one.)
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels):  # pixels: (B, C, H, W)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D), [CLS] first


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x, layer: int, capture: Capture | None):
        B, T, D = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, D) each
        if capture is not None and layer in capture.vit_qk_layers:
            capture.vit_q[layer], capture.vit_k[layer] = q, k
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if capture is not None and layer in capture.vit_layers:
            y, capture.vit_attn[layer] = eager_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, layer: int, capture: Capture | None):  # pre-LN residual block
        x = x + self.self_attn(self.layer_norm1(x), layer, capture)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(num_layers))


def hidden_state_index(feature_layer: int, num_hidden_layers: int) -> int:
    """Index into HF's `hidden_states` tuple (0 = pre_layrnorm output, i = output of layer i - 1)."""
    n = num_hidden_layers + 1
    if not -n <= feature_layer < n:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside a tower of {num_hidden_layers} layers")
    return feature_layer % n


class CLIPVisionTower(nn.Module):
    """pixels -> the hidden state at `feature_layer`, (B, 1 + N, D) with [CLS] at position 0."""

    def __init__(self, cfg: VisionConfig, feature_layer: int = -2):
        super().__init__()
        self.cfg = cfg
        self.num_layers = hidden_state_index(feature_layer, cfg.num_hidden_layers)  # layers to run
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # CLIP's own spelling
        self.encoder = CLIPEncoder(cfg, self.num_layers)

    def forward(self, pixels, capture: Capture | None = None, hidden_states: list | None = None):
        """If `hidden_states` is a list, every hidden state up to the returned one is appended to it."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for i, layer in enumerate(self.encoder.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, i, capture)
        if hidden_states is not None:
            hidden_states.append(x)
        return x
