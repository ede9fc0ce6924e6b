"""InstructBLIP's Q-Former: a BERT-base (post-LN) whose 32 learned query rows also cross-attend to the image.

The language model never sees a ViT token. It sees 32 vectors, one per learned query, that this module distils
from the image tokens *under the instruction*: the queries and the instruction's WordPiece ids share one
self-attention, so what the queries read from the image depends on the prompt (InstructBLIP's difference from
BLIP-2). Submodule names follow Hugging Face's `InstructBlipQFormerModel`.

Per layer, on rows = [32 queries, T instruction tokens]:
  1. self-attention over all rows (bidirectional) -> dense -> LayerNorm(x + residual)   (BERT is post-LN)
  2. layers 0, 2, 4, ... (`cross_attention_frequency` 2): the query rows alone attend to the image tokens
     (keys / values projected from the ViT's width) -> dense -> LayerNorm(x + residual)
  3. feed-forward, two of them: query rows through `intermediate_query` / `output_query`, text rows through
     `intermediate` / `output`.
Output: the query rows of the last layer, (B, 32, 768).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Capture, eager_attention
from .kernels.linear import Linear


@dataclass
class QFormerConfig:
    vocab_size: int = 30523          # bert-base-uncased's 30522 + "[DEC]"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # the ViT's width: cross-attention keys / values are projected from it


class InstructBlipQFormerMultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool = False):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        source = cfg.encoder_hidden_size if cross else cfg.hidden_size
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(source, cfg.hidden_size)
        self.value = Linear(source, cfg.hidden_size)

    def forward(self, x, source, keep: bool = False):
        """x (B, T, D) attends to source (B, S, D_source), no mask. keep: also return the probabilities."""
        B, T, D = x.shape
        q, k, v = (t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, H, T or S, hd)
                   for t in (self.query(x), self.key(source), self.value(source)))
        if keep:
            y, probs = eager_attention(q, k, v)
        else:
            y, probs = F.scaled_dot_product_attention(q, k, v), None
        return y.transpose(1, 2).reshape(B, T, D), probs


class InstructBlipQFormerSelfOutput(nn.Module):  # also BERT's `BertOutput`: dense, then LayerNorm(x + residual)
    def __init__(self, cfg: QFormerConfig, width: int):
        super().__init__()
        self.dense = Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # BERT's spelling

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class InstructBlipQFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool = False):
        super().__init__()
        self.attention = InstructBlipQFormerMultiHeadAttention(cfg, cross)
        self.output = InstructBlipQFormerSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x, source, keep: bool = False):
        y, probs = self.attention(x, source, keep)
        return self.output(y, x), probs


class InstructBlipQFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU, BERT's


class InstructBlipQFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = InstructBlipQFormerAttention(cfg)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = InstructBlipQFormerAttention(cfg, cross=True)
        self.intermediate = InstructBlipQFormerIntermediate(cfg)  # the text rows' feed-forward
        self.output = InstructBlipQFormerSelfOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = InstructBlipQFormerIntermediate(cfg)  # the query rows' own feed-forward
        self.output_query = InstructBlipQFormerSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x, image, num_queries: int, layer: int, capture: Capture | None):
        x, _ = self.attention(x, x)  # (B, Q + T, D): queries and instruction see each other
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if hasattr(self, "crossattention"):
            keep = capture is not None and layer in capture.qformer_layers
            queries, probs = self.crossattention(queries, image, keep)  # only the queries read the image
            if keep:
                capture.qformer_cross_attn[layer] = probs  # (B, H, Q, S): which image tokens each query reads
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1]:
            text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class InstructBlipQFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, queries):
        """ids (B, T), queries (B, Q, D) -> LayerNorm(cat[queries, word + position]) (B, Q + T, D). The queries get
        no position embedding; the instruction's positions count from 0 on the text alone."""
        text = self.word_embeddings(ids) + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device))
        return self.layernorm(torch.cat([queries, text.to(queries.dtype)], dim=1))


class InstructBlipQFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(InstructBlipQFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class InstructBlipQFormerModel(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = InstructBlipQFormerEmbeddings(cfg)
        self.encoder = InstructBlipQFormerEncoder(cfg)

    def forward(self, ids, queries, image, capture: Capture | None = None):
        """ids (B, T) instruction ids ([CLS] ... [SEP], no padding), queries (B, Q, D) the learned query tokens,
        image (B, S, D_vit) the image tokens to read (all 257, or DAMRO's k) -> the query rows (B, Q, D)."""
        x = self.embeddings(ids, queries)
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, image.to(x.dtype), queries.shape[1], i, capture)
        return x[:, :queries.shape[1]]
