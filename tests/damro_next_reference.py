"""A test-side reference of DAMRO on LLaVA-NeXT, on top of transformers' LlavaNextForConditionalGeneration.

Written from the DAMRO release's LLaVA-NeXT path (docs/llava-next.md, "DAMRO on NeXT"), independently of
minidamro, in the manner of the release's patched model:

- forward hooks on `q_proj` / `k_proj` of the ViT encoder layer whose output is hidden_states[vision_feature_layer],
  while the vision tower runs on every tile of the image (base + grid tiles, one batch);
- per tile: softmax(q_cls k^T / sqrt(D)) over the full width (no head split), the row without [CLS],
  torch.topk(k) in descending order: one index set per tile;
- only the base tile's set is used: the contrastive stream's image embeddings are the base tile's k projected
  features at those indices, in that order, then one `image_newline` (k + 1 image tokens), with the text
  embeddings from HF's own embedding table, run with inputs_embeds and a second DynamicCache;
- the full stream is HF's ordinary forward with pixel_values and image_sizes and its own DynamicCache;
- the decoding rule and the sampling contract are DamroReference's (damro_reference.py), two forwards per token.
"""
from __future__ import annotations

import math

import torch

from damro_reference import EOS, DamroReference, RefResult, _as_list, _cache_len


class NextDamroReference(DamroReference):
    @torch.no_grad()
    def tile_selections(self, pixel_values: torch.Tensor, k: int) -> list[list[int]]:
        """pixel_values (1 + n, 3, S, S): the top-k patches of every tile, base tile first."""
        layer = self._encoder_layers()[self.selection_layer()]
        captured = {}
        handles = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
                   layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
        try:
            self.model.model.vision_tower(pixel_values, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        q, k_ = captured["q"].float(), captured["k"].float()  # (tiles, 1 + N, D)
        out = []
        for t in range(q.shape[0]):
            a = torch.softmax(q[t, 0] @ k_[t].T / math.sqrt(q.shape[-1]), dim=-1)[1:]
            out.append([int(x) for x in torch.topk(a, k).indices.tolist()])
        return out

    @torch.no_grad()
    def base_tile_features(self, pixel_values, image_sizes) -> torch.Tensor:
        """The base tile's projected features (N, D), as get_image_features computes them before packing."""
        seen = []
        h = self.model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            self.model.model.get_image_features(pixel_values[None], image_sizes)
        finally:
            h.remove()
        return seen[0][0]

    @torch.no_grad()
    def generate(self, ids, pixel_values, image_sizes, alpha: float = 2.0, beta: float = 0.1, k: int = 10,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 20,
                 eos: int = EOS) -> RefResult:
        from transformers import DynamicCache
        ids = _as_list(ids)
        g = torch.Generator().manual_seed(seed) if temperature > 0 else None
        selections = self.tile_selections(pixel_values, k)
        outliers = selections[0]  # the release keeps the first (base) tile's selection only
        self.last_selections = selections

        pos = [i for i, t in enumerate(ids) if t == self.image_token]
        start, end = pos[0], pos[-1] + 1
        cd_ids = ids[:start] + [self.image_token] * (k + 1) + ids[end:]
        emb = self.model.get_input_embeddings()(torch.tensor([cd_ids])).clone()
        base = self.base_tile_features(pixel_values, image_sizes)
        emb[0, start:start + k] = base[torch.tensor(outliers)]
        emb[0, start + k] = self.model.model.image_newline

        cache_full, cache_cd = DynamicCache(config=self.cfg.text_config), DynamicCache(config=self.cfg.text_config)
        out_full = self.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values[None], image_sizes=image_sizes,
                              cache=cache_full, use_cache=True)
        out_cd = self.model(inputs_embeds=emb, cache=cache_cd, use_cache=True)
        full_lengths, cd_lengths = [_cache_len(cache_full)], [_cache_len(cache_cd)]
        l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            t = self.pick(self.damro_scores(l, l_cd, alpha, beta), temperature, top_p, g)
            tokens.append(t)
            if t == eos or len(tokens) == max_new_tokens:
                break
            step = torch.tensor([[t]])
            out_full = self.model(input_ids=step, cache=cache_full, use_cache=True)
            out_cd = self.model(input_ids=step, cache=cache_cd, use_cache=True)
            full_lengths.append(_cache_len(cache_full))
            cd_lengths.append(_cache_len(cache_cd))
            l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()
        return RefResult(outliers, tokens, full_lengths, cd_lengths)
