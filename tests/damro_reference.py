"""A test-side reference of DAMRO (Gong et al., EMNLP 2024) on top of transformers' LlavaForConditionalGeneration.

Written from docs/damro-method.md alone, independently of minidamro/damro.py, in the manner of the authors'
released code:

- outlier selection: forward hooks on the CLIP encoder layer whose output is hidden_states[vision_feature_layer]
  capture its q_proj / k_proj outputs (bias included); one full-width dot product of the [CLS] query with all
  1 + N keys, scaled by 1/sqrt(D) with D the full vision width, softmax, the row without [CLS], torch.topk(k)
  (descending). A per-head variant uses the mean over heads of that layer's eager attention probabilities
  (output_attentions) for the [CLS] row instead.
- contrastive stream: the prompt with the run of image ids cut to k ids, whose embeddings are the projected
  features of the selected patches in selection order; embeddings of the text come from HF's own
  get_input_embeddings; run with inputs_embeds and its own DynamicCache.
- full stream: the ordinary HF forward with pixel_values and its own DynamicCache.
- per step, in float32: cutoff = log(beta) + max(l); d = (1 + alpha) l - alpha l_cd; d[l < cutoff] = -inf;
  greedy argmax(d), or one torch.multinomial per token from a torch.Generator seeded once
  (scores = d / T, transformers' TopPLogitsWarper when top_p < 1, float32 softmax).
- two separate forward passes per token; both streams get the chosen token; stop at EOS (inclusive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import tiny

EOS = 2


@dataclass
class RefResult:
    outliers: list[int]          # selected patch indices (0-based over the N patches, [CLS] excluded)
    tokens: list[int]            # generated ids
    full_lengths: list[int]      # full-stream cache length after prefill and after each decode step
    cd_lengths: list[int]        # contrastive-stream cache length, same points
    logits: list = field(default_factory=list)  # (l, l_cd) the choice of each token was made from


def _as_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(x) for x in ids.reshape(-1).tolist()]
    return [int(x) for x in ids]


def _cache_len(cache) -> int:
    return int(cache.get_seq_length())


def _at_least_float32(dtype):
    return torch.promote_types(dtype, torch.float32)


class DamroReference:
    def __init__(self, hf_dir: str | None = None, model=None):
        self.model = model if model is not None else tiny.hf_model(hf_dir)
        self.model.eval()
        cfg = self.model.config
        self.cfg = cfg
        self.image_token = int(cfg.image_token_index if hasattr(cfg, "image_token_index") else cfg.image_token_id)
        self.vfl = int(cfg.vision_feature_layer)
        self.strategy = cfg.vision_feature_select_strategy
        vc = cfg.vision_config
        self.num_layers = vc.num_hidden_layers
        self.num_patches = (vc.image_size // vc.patch_size) ** 2
        self.width = vc.hidden_size

    # ---------------------------------------------------------------- outlier selection
    def selection_layer(self) -> int:
        """Index of the encoder layer whose output is hidden_states[vision_feature_layer]
        (hidden_states[0] = embeddings, hidden_states[i] = output of layer i - 1)."""
        n_states = self.num_layers + 1
        idx = self.vfl if self.vfl >= 0 else n_states + self.vfl
        if not 1 <= idx < n_states:
            raise ValueError(f"vision_feature_layer {self.vfl} names no encoder layer")
        return idx - 1

    def _encoder_layers(self):
        vt = self.model.model.vision_tower
        vm = getattr(vt, "vision_model", vt)
        return vm.encoder.layers

    @torch.no_grad()
    def cls_attention(self, pixels: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """[N] attention of [CLS] to the patches at the selection layer (float32)."""
        pixels = pixels.to(torch.float32)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        layer = self._encoder_layers()[self.selection_layer()]
        if per_head:
            out = self.model.model.vision_tower(pixels, output_attentions=True, return_dict=True)
            att = out.attentions[self.selection_layer()]          # [1, H, 1+N, 1+N]
            return att[0, :, 0, :].to(_at_least_float32(att.dtype)).mean(0)[1:]
        captured = {}

        def hook(name):
            def fn(module, inputs, output):
                captured[name] = output.detach()
            return fn

        handles = [layer.self_attn.q_proj.register_forward_hook(hook("q")),
                   layer.self_attn.k_proj.register_forward_hook(hook("k"))]
        try:
            self.model.model.vision_tower(pixels, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        dtype = _at_least_float32(captured["q"].dtype)  # float64 for the tests' exact values
        q, k = captured["q"][0].to(dtype), captured["k"][0].to(dtype)    # [1+N, D]
        assert q.shape == (1 + self.num_patches, self.width), q.shape
        scores = (q[0] @ k.T) / math.sqrt(q.shape[-1])                 # full width, no head split
        return torch.softmax(scores, dim=-1)[1:]

    def select(self, pixels: torch.Tensor, k: int, per_head: bool = False) -> list[int]:
        a = self.cls_attention(pixels, per_head=per_head)
        return [int(x) for x in torch.topk(a, k).indices.tolist()]

    # ---------------------------------------------------------------- streams
    @torch.no_grad()
    def projected_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[F, text width]: HF's projected image features (F = N, or 1 + N with the "full" strategy)."""
        pixels = pixels.to(torch.float32)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        out = self.model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=self.vfl,
            vision_feature_select_strategy=self.strategy, return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        return feats

    def _contrastive_embeds(self, ids: list[int], pixels, outliers: list[int]) -> tuple[torch.Tensor, int]:
        pos = [i for i, t in enumerate(ids) if t == self.image_token]
        assert pos and pos == list(range(pos[0], pos[0] + len(pos))), "expected one contiguous run of image ids"
        start, end = pos[0], pos[-1] + 1
        k = len(outliers)
        cd_ids = ids[:start] + [self.image_token] * k + ids[end:]
        emb = self.model.get_input_embeddings()(torch.tensor([cd_ids])).clone()
        feats = self.projected_features(pixels)
        offset = 1 if self.strategy == "full" else 0       # feature 0 is [CLS] with "full"
        assert feats.shape[0] == len(pos), (feats.shape, len(pos))
        emb[0, start:start + k] = feats[torch.tensor(outliers) + offset].to(emb.dtype)
        return emb, len(cd_ids)

    # ---------------------------------------------------------------- decoding
    @staticmethod
    def damro_scores(l: torch.Tensor, l_cd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        l, l_cd = l.float(), l_cd.float()
        cutoff = torch.log(torch.tensor(beta)) + l.max(-1, keepdim=True).values
        d = (1 + alpha) * l - alpha * l_cd
        d[l < cutoff] = -float("inf")
        return d

    @staticmethod
    def pick(d: torch.Tensor, temperature: float, top_p: float, g: torch.Generator | None) -> int:
        """d: [1, V] float32 scores."""
        if temperature == 0:
            return int(d.argmax(-1).item())
        scores = d / temperature
        if top_p < 1:
            from transformers import TopPLogitsWarper
            scores = TopPLogitsWarper(top_p)(None, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        return int(torch.multinomial(probs, 1, generator=g).item())

    @torch.no_grad()
    def generate(self, ids, pixels, alpha: float = 2.0, beta: float = 0.1, k: int = 10,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 20,
                 per_head: bool = False, eos: int = EOS) -> RefResult:
        from transformers import DynamicCache
        ids = _as_list(ids)
        pixels = pixels.to(torch.float32)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        g = torch.Generator().manual_seed(seed) if temperature > 0 else None
        outliers = self.select(pixels, k, per_head=per_head)

        cache_full = DynamicCache(config=self.cfg.text_config)
        cache_cd = DynamicCache(config=self.cfg.text_config)
        out_full = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels, cache=cache_full, use_cache=True)
        emb_cd, _ = self._contrastive_embeds(ids, pixels, outliers)
        out_cd = self.model(inputs_embeds=emb_cd, cache=cache_cd, use_cache=True)
        full_lengths, cd_lengths = [_cache_len(cache_full)], [_cache_len(cache_cd)]
        l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()

        tokens: list[int] = []
        logits = []
        for _ in range(max_new_tokens):
            d = self.damro_scores(l, l_cd, alpha, beta)
            t = self.pick(d, temperature, top_p, g)
            tokens.append(t)
            logits.append((l[0], l_cd[0]))
            if t == eos or len(tokens) == max_new_tokens:
                break
            step = torch.tensor([[t]])
            out_full = self.model(input_ids=step, cache=cache_full, use_cache=True)   # two separate passes
            out_cd = self.model(input_ids=step, cache=cache_cd, use_cache=True)
            full_lengths.append(_cache_len(cache_full))
            cd_lengths.append(_cache_len(cache_cd))
            l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()
        return RefResult(outliers, tokens, full_lengths, cd_lengths, logits)

    @torch.no_grad()
    def generate_plain(self, ids, pixels, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       max_new_tokens: int = 20, eos: int = EOS) -> list[int]:
        """Plain decoding of the full stream under the same sampling contract (a cross-check of alpha = 0)."""
        from transformers import DynamicCache
        ids = _as_list(ids)
        pixels = pixels.to(torch.float32)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        g = torch.Generator().manual_seed(seed) if temperature > 0 else None
        cache = DynamicCache(config=self.cfg.text_config)
        out = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels, cache=cache, use_cache=True)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            t = self.pick(out.logits[:, -1].float(), temperature, top_p, g)
            tokens.append(t)
            if t == eos or len(tokens) == max_new_tokens:
                break
            out = self.model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
        return tokens
