"""A test-side reference of VCD (Leng et al., CVPR 2024) on top of transformers' LlavaForConditionalGeneration.

Written from the description in issue 9 alone (VCD's released algorithm), independently of minidamro/vcd.py
and of minidamro's contrastive core:

- noise: a 1000-step schedule, betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5 and
  abar = cumprod(1 - betas), in torch's default float32 as VCD's code computes it; the noised image is
  x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * eps of the preprocessed pixels x0;
- randomness (minidamro's contract): one torch.Generator seeded once; eps = torch.randn(x0.shape, float32)
  from it, drawn before anything else; then one torch.multinomial per sampled token from it;
- two streams, each an ordinary HF forward with its own DynamicCache: the prompt with the clean pixels, and
  the same prompt ids with the noised pixels (so every image token, and the same positions);
- per step, in float32: cutoff = log(beta) + max(l); d = (1 + alpha) l - alpha l_cd; d[l < cutoff] = -inf;
  greedy argmax(d), or multinomial(softmax(d / T)) with transformers' TopPLogitsWarper when top_p < 1;
- two separate forward passes per token; both streams get the chosen token; stop at EOS (inclusive).
"""
from __future__ import annotations

import torch

import tiny

EOS = 2
STEPS = 1000


def schedule(dtype=torch.float32):
    """(sqrt(abar), sqrt(1 - abar)), each (1000,), of VCD's forward diffusion schedule."""
    betas = torch.linspace(-6, 6, STEPS, dtype=dtype)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(abar), torch.sqrt(1 - abar)


def add_noise(x0: torch.Tensor, t: int, g: torch.Generator | None) -> torch.Tensor:
    signal, noise = schedule()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    return signal[t] * x0 + noise[t] * eps


class VcdReference:
    def __init__(self, hf_dir: str | None = None, model=None):
        self.model = (model if model is not None else tiny.hf_model(hf_dir)).eval()
        self.cfg = self.model.config

    @staticmethod
    def scores(l, l_cd, alpha: float, beta: float):
        l, l_cd = l.float(), l_cd.float()
        cutoff = torch.log(torch.tensor(beta)) + l.max(-1, keepdim=True).values
        d = (1 + alpha) * l - alpha * l_cd
        d[l < cutoff] = -float("inf")
        return d

    @staticmethod
    def pick(d, temperature: float, top_p: float, g: torch.Generator) -> int:
        if temperature == 0:
            return int(d.argmax(-1).item())
        s = d / temperature
        if top_p < 1:
            from transformers import TopPLogitsWarper
            s = TopPLogitsWarper(top_p)(None, s)
        return int(torch.multinomial(torch.softmax(s.float(), dim=-1), 1, generator=g).item())

    @torch.no_grad()
    def generate(self, ids, pixels, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 20,
                 eos: int = EOS) -> tuple[list[int], torch.Tensor]:
        """Returns (generated ids, the noised pixels the contrastive stream saw)."""
        from transformers import DynamicCache
        ids = torch.as_tensor(ids).reshape(1, -1)
        pixels = pixels.to(torch.float32).reshape(1, *pixels.shape[-3:])
        g = torch.Generator().manual_seed(seed)
        noised = add_noise(pixels, noise_step, g)   # drawn once, before the first token

        cache, cache_cd = DynamicCache(config=self.cfg.text_config), DynamicCache(config=self.cfg.text_config)
        l = self.model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True).logits[:, -1]
        l_cd = self.model(input_ids=ids, pixel_values=noised, cache=cache_cd, use_cache=True).logits[:, -1]
        tokens: list[int] = []
        while True:
            t = self.pick(self.scores(l, l_cd, alpha, beta), temperature, top_p, g)
            tokens.append(t)
            if t == eos or len(tokens) == max_new_tokens:
                return tokens, noised
            step = torch.tensor([[t]])
            l = self.model(input_ids=step, cache=cache, use_cache=True).logits[:, -1]
            l_cd = self.model(input_ids=step, cache=cache_cd, use_cache=True).logits[:, -1]
