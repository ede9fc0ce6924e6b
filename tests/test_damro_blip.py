"""DAMRO on InstructBLIP against an independent reference on transformers (tests/damro_blip_reference.py).

As the release runs it: the mean over heads of the [CLS] attention at ViT layer -2 (read from the fused qkv),
top-k, the k rows gathered from the post-LayerNorm output with the release's off-by-one (or, as an option, the
patches), the Q-Former run again on them under the same instruction, a second cache. Outliers and tokens must be
identical on every tiny configuration and several images (RGB, grayscale, tiny, very wide), greedy and seeded
sampling, batched and two-forward decoding; alpha = 0 must be plain decoding.
"""
import pytest
import torch

import tiny_blip
import tolerance
from damro_blip_reference import BlipDamroReference
from minidamro import contrastive, damro, methods
from minidamro.damro import DamroConfig
from minidamro.generation import Sampler, generate
from test_instructblip import IMAGES, PROMPTS, Case

NAMES = list(tiny_blip.CONFIGS)
MAX_NEW = 12
SAMPLING = [dict(), dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.7, seed=11)]


class Setup(Case):
    def __init__(self, hf_dir, model_dir):
        super().__init__(hf_dir, model_dir)
        self.ref = BlipDamroReference(self.hf)
        self.ref64 = BlipDamroReference(self.hf64)
        self.k = 4

    def case(self, image, prompt=0):
        (pixels, ids, instruction), inputs = self.inputs(IMAGES[image], PROMPTS[prompt])
        # The ranking of the top k + 1 must not be a near-tie for the float32 rounding (then equal outliers follow
        # from the bound, not from luck).
        a, exact = self.ref.cls_attention(pixels), self.ref64.cls_attention(pixels.double())
        tolerance.assert_clear_ranking(a, tolerance.bound(a, exact).max().item(), "[CLS] attention", self.k)
        return pixels, ids, instruction, inputs.qformer_input_ids


@pytest.fixture(scope="module", params=NAMES)
def setup(request, blip_hf_checkpoints, blip_checkpoints):
    return Setup(blip_hf_checkpoints[request.param], blip_checkpoints[request.param])


@pytest.mark.parametrize("image", ["rgb", "gray", "tiny", "wide"])
@pytest.mark.parametrize("sampling", range(len(SAMPLING)))
@pytest.mark.parametrize("gather", damro.GATHER)
def test_outliers_and_tokens_equal_the_reference(setup, image, sampling, gather):
    pixels, ids, instruction, qformer_ids = setup.case(image)
    kw = SAMPLING[sampling]
    ref = setup.ref.generate(ids, pixels, qformer_ids, k=setup.k, max_new_tokens=MAX_NEW,
                             corrected=gather == "patches", **kw)
    cfg = methods.make_config(damro.METHOD, "instructblip", topk=setup.k, gather=gather)
    assert cfg.outlier_attention == "heads"  # InstructBLIP's default, as the release
    for batched in (True, False):
        sampler = Sampler(kw.get("temperature", 0.0), kw.get("top_p", 1.0), seed=kw.get("seed", 0))
        outliers, tokens = damro.generate(setup.model, ids, pixels, cfg, sampler, MAX_NEW, batched=batched,
                                          instruction=instruction)
        assert outliers == ref.outliers
        assert list(tokens) == ref.tokens, f"batched={batched}"


def test_release_gather_is_off_by_one():
    """The release reads row j for patch j: with [CLS] at row 0 that is the patch before, and [CLS] itself for
    patch 0. The corrected option reads the patches."""
    tokens = torch.arange(5.0)[None, :, None].expand(1, 5, 3)  # row r holds r: [CLS] 0, patch j is row j + 1
    patches = torch.tensor([3, 0, 2])
    assert damro.gather_rows(tokens, patches, "release")[0, :, 0].tolist() == [3, 0, 2]  # 0: [CLS]
    assert damro.gather_rows(tokens, patches, "patches")[0, :, 0].tolist() == [4, 1, 3]


@pytest.mark.parametrize("gather", damro.GATHER)
def test_streams_are_plain_features_and_the_qformer_on_the_gathered_rows(setup, gather):
    """The full stream is plain decoding's image features bit for bit (the selection only reads the layer's q / k);
    the contrastive stream is the Q-Former on the gathered rows; both have num_query_tokens image ids."""
    pixels, ids, instruction, _ = setup.case("rgb")
    m = setup.model
    p = damro.prepare(m, pixels, DamroConfig(topk=setup.k, outlier_attention="heads", gather=gather),
                      instruction=instruction)
    assert torch.equal(p.features[0], m.image_features(pixels, instruction=instruction))
    rows = damro.gather_rows(m.encode_image(pixels), torch.tensor(p.info["outliers"]), gather)
    assert torch.equal(p.features[1], m.query_features(rows, instruction)[0])
    assert p.features[1].shape == (m.cfg.num_query_tokens, m.cfg.text.hidden_size)


def test_alpha_zero_is_plain_decoding(setup):
    """Greedy for any beta (the cutoff never drops the argmax); seeded sampling with a beta whose cutoff drops
    nothing (every logit of these tiny models is within -log(1e-30) = 69 of the max): d = l exactly."""
    pixels, ids, instruction, _ = setup.case("gray", prompt=1)
    for sampler, betas in ((lambda: Sampler(), (0.1, 1.0)), (lambda: Sampler(0.8, seed=2), (1e-30,))):
        plain = list(generate(setup.model, ids, pixels, sampler(), MAX_NEW, instruction=instruction))
        for beta in betas:
            cfg = DamroConfig(alpha=0.0, beta=beta, topk=setup.k, outlier_attention="heads")
            _, tokens = damro.generate(setup.model, ids, pixels, cfg, sampler(), MAX_NEW, instruction=instruction)
            assert list(tokens) == plain


def test_default_config_on_instructblip_is_the_releases(setup):
    """contrastive.generate with no config takes the model type's defaults: the mean over heads, the release's
    gather (on this image the full-width product would pick other outliers, so a wrong default would show)."""
    pixels, ids, instruction, qformer_ids = setup.case("rgb24")
    d = DamroConfig()
    a, exact = setup.ref.cls_attention(pixels), setup.ref64.cls_attention(pixels.double())
    tolerance.assert_clear_ranking(a, tolerance.bound(a, exact).max().item(), "[CLS] attention", d.topk)
    info, tokens = contrastive.generate(setup.model, ids, pixels, damro.METHOD, None, Sampler(), MAX_NEW,
                                        instruction=instruction)
    ref = setup.ref.generate(ids, pixels, qformer_ids, alpha=d.alpha, beta=d.beta, k=d.topk, max_new_tokens=MAX_NEW)
    assert info["outliers"] == ref.outliers and list(tokens) == ref.tokens
    full = damro.prepare(setup.model, pixels, DamroConfig(outlier_attention="full"), instruction=instruction)
    assert full.info["outliers"] != ref.outliers
