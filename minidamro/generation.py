"""The decoding steps: a prefill step over the prompt with the image, one decode step per token, the sampler.

Sampling is reproducible by contract: one `torch.Generator` seeded once, and exactly one
`torch.multinomial(probs, 1, generator=g)` per generated token, `probs` being the float32 softmax of the
final scores. Temperature 0 is greedy: the argmax of the same scores.
"""
from dataclasses import dataclass, field

import torch

from .capture import Capture
from .llama import KVCache
from .llava import Llava


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0        # 1 = off
    seed: int = 0
    device: str | torch.device = "cpu"
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def choose(self, scores):
        """scores: (V,) float32 -> the chosen token id as a (1,) tensor on the scores' device."""
        if self.temperature == 0:
            return scores.argmax(-1, keepdim=True)
        scores = scores / self.temperature
        if self.top_p < 1.0:
            # Nucleus filter as transformers' TopPLogitsWarper: drop the low tail whose total mass is at
            # most 1 - top_p, always keeping the most likely token.
            sorted_scores, order = torch.sort(scores)  # ascending
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.multinomial(probs, 1, generator=self.generator)


def new_cache(model: Llava, length: int) -> KVCache:
    w = model.language_model.embed_tokens.weight  # the activations' dtype (lm_head may be int8)
    return KVCache(model.cfg.text, length, device=w.device, dtype=w.dtype)


def prefill(model: Llava, embeds, cache: KVCache, capture: Capture | None = None):
    """embeds (1, L, D) -> logits (V,) of the last position; fills `cache` with the L positions."""
    h = model.language_model(embeds, [cache], capture)
    return model.logits(h[0, -1])


def decode_step(model: Llava, tokens, caches: list[KVCache], capture: Capture | None = None):
    """tokens (B,): the last chosen token of each stream -> logits (B, V). Appends one position to each cache.
    All rows go through the weights together: for DAMRO the two streams cost one read of the weights."""
    x = model.language_model.embed_tokens(tokens)[:, None]  # (B, 1, D)
    h = model.language_model(x, caches, capture)
    return model.logits(h[:, -1])


def generate(model: Llava, ids, pixels, sampler: Sampler, max_new_tokens: int, image_size=None, instruction=None):
    """Plain decoding. ids: (L,) prompt ids with the image ids expanded; pixels (1, 3, S, S), or LLaVA-NeXT's
    [base] + tiles (1 + n, 3, S, S) of an image of (height, width) `image_size`. Returns an iterator over the
    generated ids: the contrastive core (contrastive.py) with one stream and no rule."""
    from . import contrastive  # the core builds on the steps above, so it is imported when used
    return contrastive.generate(model, ids, pixels, contrastive.PLAIN, None, sampler, max_new_tokens,
                                image_size=image_size, instruction=instruction)[1]
