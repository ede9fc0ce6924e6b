"""A test-side reference of DAMRO on InstructBLIP, on top of transformers' InstructBlipForConditionalGeneration.

Written from the description of the DAMRO release's InstructBLIP path (its patched modeling_instructblip.py),
independently of minidamro, in the manner of that code:

- a forward hook on `vision_model.encoder.layers[-2].self_attn.qkv` captures its output (q / v bias included);
  split into heads as the model does, softmax(q k^T * head_dim^-0.5) per head, the mean over the heads, the
  [CLS] row over the patches (without [CLS]), torch.topk(k), descending;
- the vision model's output (`last_hidden_state`, after post_layernorm, [CLS] still at row 0) is gathered with
  those patch indices as they are (the release's off-by-one: index j is row j), or, corrected, with j + 1;
- the contrastive stream: HF's own Q-Former on the gathered rows (an image mask of ones), the same query tokens
  and Q-Former ids, then `language_projection`; its 32 outputs replace the image ids' embeddings of the same
  prompt (HF's embedding table), run with inputs_embeds and a second DynamicCache;
- the full stream: HF's ordinary forward with pixel_values and its own DynamicCache;
- the rule and the sampling contract are DamroReference's (Eq. 5-6 in float32, one multinomial per token from a
  generator seeded once), two forwards per token.
"""
from __future__ import annotations

import torch

from damro_reference import EOS, DamroReference, RefResult, _as_list, _cache_len


class BlipDamroReference:
    damro_scores = staticmethod(DamroReference.damro_scores)
    pick = staticmethod(DamroReference.pick)

    def __init__(self, model):
        self.model = model.eval()
        self.image_token = int(model.config.image_token_index)

    @torch.no_grad()
    def cls_attention(self, pixel_values) -> torch.Tensor:
        """(N,) the mean over heads of the [CLS] row's attention to the patches at layer -2, in the model's dtype
        (a float64 model gives the tests' exact values)."""
        vm = self.model.vision_model
        seen = {}
        h = vm.encoder.layers[-2].self_attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
        try:
            vm(pixel_values=pixel_values, return_dict=True)
        finally:
            h.remove()
        qkv = seen["qkv"]
        B, T, three_d = qkv.shape
        heads = self.model.config.vision_config.num_attention_heads
        qkv = qkv.reshape(B, T, 3, heads, three_d // 3 // heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # (B, H, T, hd)
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return attn[0, :, 0, 1:].mean(0)

    def select(self, pixel_values, k: int) -> list[int]:
        return [int(x) for x in torch.topk(self.cls_attention(pixel_values), k).indices]

    @torch.no_grad()
    def contrastive_features(self, pixel_values, qformer_ids, outliers: list[int], corrected: bool):
        m = self.model
        image = m.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state  # (1, 1 + N, D)
        rows = torch.tensor(outliers) + (1 if corrected else 0)
        picked = image[:, rows]  # (1, k, D)
        queries = m.query_tokens.expand(1, -1, -1)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), torch.ones_like(qformer_ids)], dim=1)
        out = m.qformer(input_ids=qformer_ids, attention_mask=mask, query_embeds=queries,
                        encoder_hidden_states=picked,
                        encoder_attention_mask=torch.ones(picked.shape[:2], dtype=torch.long), return_dict=True)
        return m.language_projection(out.last_hidden_state[:, :queries.shape[1]])  # (1, Q, D_text)

    @torch.no_grad()
    def generate(self, ids, pixel_values, qformer_ids, alpha: float = 2.0, beta: float = 0.1, k: int = 10,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 20,
                 corrected: bool = False, eos: int = EOS) -> RefResult:
        from transformers import DynamicCache
        ids = _as_list(ids)
        g = torch.Generator().manual_seed(seed) if temperature > 0 else None
        outliers = self.select(pixel_values, k)
        text_config = self.model.config.text_config
        cache_full, cache_cd = DynamicCache(config=text_config), DynamicCache(config=text_config)
        input_ids = torch.tensor([ids])
        out_full = self.model(input_ids=input_ids, pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                              cache=cache_full, use_cache=True)
        emb = self.model.get_input_embeddings()(input_ids).clone()
        slots = input_ids[0] == self.image_token
        emb[0, slots] = self.contrastive_features(pixel_values, qformer_ids, outliers, corrected)[0].to(emb.dtype)
        out_cd = self.model.language_model(inputs_embeds=emb, cache=cache_cd, use_cache=True)
        full_lengths, cd_lengths = [_cache_len(cache_full)], [_cache_len(cache_cd)]
        l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()
        tokens, logits = [], []
        for _ in range(max_new_tokens):
            t = self.pick(self.damro_scores(l, l_cd, alpha, beta), temperature, top_p, g)
            tokens.append(t)
            logits.append((l[0], l_cd[0]))
            if t == eos or len(tokens) == max_new_tokens:
                break
            step = torch.tensor([[t]])
            out_full = self.model.language_model(input_ids=step, cache=cache_full, use_cache=True)
            out_cd = self.model.language_model(input_ids=step, cache=cache_cd, use_cache=True)
            full_lengths.append(_cache_len(cache_full))
            cd_lengths.append(_cache_len(cache_cd))
            l, l_cd = out_full.logits[:, -1].float(), out_cd.logits[:, -1].float()
        return RefResult(outliers, tokens, full_lengths, cd_lengths, logits)
