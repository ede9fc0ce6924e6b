"""VCD (Leng et al., CVPR 2024, "Mitigating Object Hallucinations in Large Vision-Language Models through
Visual Contrastive Decoding"), as its released code computes it, on the contrastive core (contrastive.py).

The contrastive stream sees the same prompt with a noised image: the preprocessed (CLIP-normalised) pixels
x0 go through the forward diffusion process at step t = noise_step of a 1000-step schedule,

    betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5,   abar = cumprod(1 - betas)
    x_t   = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * eps,   eps ~ N(0, I) of x0's shape

(at t = 500: x_t = 0.863017 x0 + 0.505175 eps). x_t goes through the vision tower and the projector like
the real image, so the second stream has every image token, its own KV cache and the same positions as the
first. The rule is DAMRO's Eq. 5-6 (VCD's is the same): damro.rule.
"""
from dataclasses import dataclass

import torch

from . import MinidamroError
from .contrastive import Method, Prepared, check_contrast, image_features
from .damro import rule
from .llava import Llava

NUM_STEPS = 1000


@dataclass
class VcdConfig:
    alpha: float = 1.0      # contrast strength, Eq. 5 (VCD's default; its LLaVA-1.5 POPE script passes 1 too)
    beta: float = 0.1       # plausibility cutoff, Eq. 6 (VCD's default; its LLaVA-1.5 POPE script passes 0.2)
    noise_step: int = 500   # diffusion step t of the noised image, 0..999 (VCD's default)

    def check(self):
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int) \
                or not 0 <= self.noise_step < NUM_STEPS:
            raise MinidamroError(f"--noise-step must be an integer in 0..{NUM_STEPS - 1}, got {self.noise_step}")
        check_contrast(self.alpha, self.beta)


def noise_scales(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar[t]) and sqrt(1 - abar[t]) as 0-dim float32 CPU tensors.

    Computed in float32 on the CPU, as VCD's released code does (torch's default dtype), so the noised
    pixels are that code's bit for bit given the same eps. In float64 the two scales differ from these by
    ~2e-7 (0.86301711 / 0.50517470 vs 0.86301726 / 0.50517452 at t = 500): both round to 0.863017 / 0.505175.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_STEPS)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(abar)[t], torch.sqrt(1 - abar)[t]


def noised_pixels(pixels, t: int, generator: torch.Generator | None = None):
    """x_t of the forward diffusion process: pixels (1, 3, S, S) float32 -> the same shape, float32.

    eps is one torch.randn of the pixels' shape (float32) drawn from `generator` (None: torch's global one,
    as VCD's code draws it) on the generator's device. The arithmetic is float32 (pixels in half precision
    are noised in float32 and cast back by the caller's vision tower)."""
    device = generator.device if generator is not None else pixels.device
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32, device=device).to(pixels.device)
    a, b = (s.to(pixels.device) for s in noise_scales(t))
    return a * pixels.float() + b * eps


def check(model: Llava, cfg: VcdConfig):
    cfg.check()


@torch.inference_mode()
def prepare(model: Llava, pixels, cfg: VcdConfig, generator: torch.Generator | None = None,
            image_size=None, instruction=None) -> Prepared:
    """Two vision-tower passes: the image's features (stream 0) and the noised image's (stream 1).
    The noise is drawn first thing, so under the sampling contract it comes before every token's draw.
    LLaVA-NeXT (minidamro's choice, no released VCD-on-NeXT to follow): every tile, base included, is noised
    by the one draw of the pixels' shape (1 + n, 3, S, S), and both streams are packed alike."""
    noised = noised_pixels(pixels, cfg.noise_step, generator)
    return Prepared([image_features(model, pixels, image_size, instruction),
                     image_features(model, noised, image_size, instruction)],
                    {"noise_step": cfg.noise_step})


METHOD = Method("vcd", VcdConfig, check, prepare, rule, random=True)
