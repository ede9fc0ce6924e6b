"""DAMRO on LLaVA-NeXT against an independent reference on transformers (tests/damro_next_reference.py).

As the release runs it: the selection on every tile at the feature layer, the contrastive stream = the base
tile's k features in descending order + one image_newline, its own cache. Outliers (base tile and grid tiles)
and tokens must be identical, greedy and seeded sampling, batched and two-forward decoding.
"""
import os

import pytest
import torch

import tiny
from damro_next_reference import NextDamroReference
from minidamro import damro
from minidamro.anyres import model_pixels
from minidamro.damro import DamroConfig
from minidamro.generation import Sampler
from minidamro.llava import load_model
from minidamro.tokenizer import Tokenizer, build_prompt, prompt_ids
from test_next import noise_image

NAMES = list(tiny.NEXT_CONFIGS)
SIZES = [(90, 25), (25, 90), (10, 7), (60, 60)]  # wide, tall, smaller than a tile, a 2 x 2 pinpoint (30 px tile)
MAX_NEW = 12
SAMPLING = [dict(), dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.7, seed=11)]


class Setup:
    def __init__(self, hf_dir, ckpt):
        self.model = load_model(ckpt)
        self.ref = NextDamroReference(hf_dir)
        self.tok = Tokenizer(os.path.join(ckpt, "tokenizer.model"), self.model.cfg.special_tokens)
        self.k = 3 if self.model.cfg.vision.num_patches == 16 else 4
        self.inputs = {}

    def case(self, size):
        if size not in self.inputs:
            pixels, image_size = model_pixels(noise_image(*size, seed=5), self.model.cfg)
            ids = prompt_ids(self.tok, build_prompt("Describe the image.", model_type="llava_next"),
                             self.model.cfg.image_token_index, self.model.cfg.image_tokens(image_size))
            self.inputs[size] = torch.tensor(ids), pixels, image_size
        return self.inputs[size]


@pytest.fixture(scope="module", params=NAMES)
def setup(request, next_hf_checkpoints, next_checkpoints):
    return Setup(next_hf_checkpoints[request.param], next_checkpoints[request.param])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sampling", range(len(SAMPLING)))
def test_outliers_and_tokens_equal_the_reference(setup, size, sampling):
    ids, pixels, image_size = setup.case(size)
    kw = SAMPLING[sampling]
    ref = setup.ref.generate(ids, pixels, torch.tensor([image_size]), k=setup.k, max_new_tokens=MAX_NEW, **kw)
    cfg = DamroConfig(topk=setup.k)
    prepared = damro.prepare(setup.model, pixels, cfg, image_size=image_size)
    cd, info = prepared.features[1], prepared.info
    assert info["outliers"] == ref.outliers
    assert info["tile_outliers"] == setup.ref.last_selections[1:]  # computed as the release does, unused
    assert len(info["tile_outliers"]) == pixels.shape[0] - 1
    assert cd.shape[0] == setup.k + 1 and torch.equal(cd[-1], setup.model.image_newline)
    for batched in (True, False):
        outliers, it = damro.generate(setup.model, ids, pixels, cfg, Sampler(**kw), MAX_NEW, batched=batched,
                                      image_size=image_size)
        assert outliers == ref.outliers
        assert list(it) == ref.tokens, (batched, kw)


def test_contrastive_stream_is_k_plus_one_and_uses_only_the_base_tile(setup):
    """Changing a grid tile's pixels changes the full stream's features but not the contrastive stream."""
    ids, pixels, image_size = setup.case((90, 25))
    cfg = DamroConfig(topk=setup.k)
    p = damro.prepare(setup.model, pixels, cfg, image_size=image_size)
    other = pixels.clone()
    other[1:] = torch.flip(other[1:], dims=[-1])
    p2 = damro.prepare(setup.model, other, cfg, image_size=image_size)
    (full, cd), (full2, cd2), info, info2 = p.features, p2.features, p.info, p2.info
    assert torch.equal(cd, cd2) and info["outliers"] == info2["outliers"]
    assert not torch.equal(full, full2)
    assert full.shape[0] == setup.model.cfg.image_tokens(image_size)


def test_vcd_runs_on_next(setup):
    """VCD on NeXT (minidamro's choice: every tile noised by one draw, both streams packed alike): the full
    stream is plain NeXT's, the noised one has the same length, and a seed fixes the tokens."""
    from minidamro import contrastive, vcd
    ids, pixels, image_size = setup.case((25, 90))
    p = vcd.prepare(setup.model, pixels, vcd.VcdConfig(), torch.Generator().manual_seed(0), image_size=image_size)
    assert torch.equal(p.features[0], setup.model.image_features(pixels, image_size))
    assert p.features[1].shape == p.features[0].shape and not torch.equal(p.features[1], p.features[0])
    runs = [list(contrastive.generate(setup.model, ids, pixels, vcd.METHOD, None, Sampler(1.0, seed=4), MAX_NEW,
                                      image_size=image_size)[1]) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) >= 1
