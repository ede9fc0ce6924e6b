"""DAMRO: minidamro.damro against an independent reference on top of transformers (tests/damro_reference.py).

The reference follows docs/damro-method.md (the authors' released code): outliers by the full-width [CLS]
q.k at the layer LLaVA reads its features from, a contrastive stream with only those k projected features,
and (1 + alpha) l - alpha l_cd under the cutoff l >= log(beta) + max l, two forwards per token.
"""
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import tolerance
from damro_reference import DamroReference

from minidamro import MinidamroError
from minidamro import damro
from minidamro import generation
from minidamro import llama as mllama
from minidamro.capture import Capture
from minidamro.damro import DamroConfig, damro_scores, select_outliers
from minidamro.generation import Sampler
from minidamro.image import preprocess
from minidamro.llava import load_model
from minidamro.tokenizer import Tokenizer, build_prompt, prompt_ids

NAMES = list(tiny.CONFIGS)
MAX_NEW = 24


def random_image(seed: int, size=(45, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


class Setup:
    """A converted minidamro model, the HF reference on the same weights, prompt ids and pixels."""

    def __init__(self, hf_dir: str, ckpt: str, prompt: str = "What is in this image?", image_seed: int = 0):
        self.model = load_model(ckpt)
        self.ref = DamroReference(hf_dir)
        self.ref64 = DamroReference(model=tiny.hf_model(hf_dir, dtype=torch.float64))  # exact values for the bounds
        tok = Tokenizer(os.path.join(ckpt, "tokenizer.model"), self.model.cfg.special_tokens)
        self.ids = torch.tensor(prompt_ids(tok, build_prompt(prompt), self.model.cfg.image_token_index,
                                           self.model.cfg.num_image_tokens))
        self.pixels = preprocess(random_image(image_seed), self.model.cfg.preprocessor)
        self.num_patches = self.model.cfg.vision.num_patches
        self._ref_cache = {}

    def mini(self, alpha, beta, k, temperature=0.0, top_p=1.0, seed=0, batched=True, mode="full",
             max_new_tokens=MAX_NEW):
        cfg = DamroConfig(alpha=alpha, beta=beta, topk=k, outlier_attention=mode)
        outliers, it = damro.generate(self.model, self.ids, self.pixels, cfg,
                                      Sampler(temperature=temperature, top_p=top_p, seed=seed), max_new_tokens,
                                      batched=batched)
        return [int(o) for o in outliers], list(it)

    def reference(self, alpha, beta, k, temperature=0.0, top_p=1.0, seed=0, per_head=False, max_new_tokens=MAX_NEW):
        key = (alpha, beta, k, temperature, top_p, seed, per_head, max_new_tokens)
        if key not in self._ref_cache:
            self._ref_cache[key] = self.ref.generate(self.ids, self.pixels, alpha=alpha, beta=beta, k=k,
                                                     temperature=temperature, top_p=top_p, seed=seed,
                                                     max_new_tokens=max_new_tokens, per_head=per_head)
        return self._ref_cache[key]

    def logit_bound(self) -> float:
        """The rounding bound of the reference's float32 logits (tests/tolerance.py), from its prompt forward
        against the same in float64; the decode steps' logits have the same magnitudes and depths."""
        if "logit_bound" not in self._ref_cache:
            with torch.no_grad():
                l32, l64 = (r.model(input_ids=self.ids[None], pixel_values=self.pixels).logits
                            for r in (self.ref, self.ref64))
            self._ref_cache["logit_bound"] = tolerance.bound(l32, l64).max().item()
        return self._ref_cache["logit_bound"]

    def plain(self, temperature=0.0, top_p=1.0, seed=0, max_new_tokens=MAX_NEW):
        return list(generation.generate(self.model, self.ids, self.pixels,
                                        Sampler(temperature=temperature, top_p=top_p, seed=seed), max_new_tokens))


@pytest.fixture(scope="module")
def setups(hf_checkpoints, checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            # Images whose [CLS] attention has no near-tie in its whole ranking (outliers for k = N compare it
            # all; tolerance.assert_clear_ranking checks it): seeds 0-2 had one in "last", 5e-6 wide.
            cache[name] = Setup(hf_checkpoints[name], checkpoints[name], image_seed=NAMES.index(name) + 4)
        return cache[name]
    return get


# ------------------------------------------------------------------ the reference checks itself against HF


@pytest.mark.parametrize("name", NAMES)
def test_reference_selection_layer_is_the_feature_layer(name, hf_checkpoints, setups):
    """The hooked layer's output is hidden_states[vision_feature_layer]; its q/k are q_proj/k_proj of its LN1
    input; the per-head variant is the mean of the per-head softmax of those q/k."""
    s = setups(name)
    ref = s.ref
    vt = ref.model.model.vision_tower
    layer_idx = ref.selection_layer()
    layer = ref._encoder_layers()[layer_idx]
    got = {}
    h = layer.register_forward_hook(lambda m, i, o: got.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        out = vt(s.pixels, output_hidden_states=True, return_dict=True)
    finally:
        h.remove()
    hs = out.hidden_states
    torch.testing.assert_close(got["out"], hs[ref.vfl], rtol=0, atol=0)
    x = layer.layer_norm1(hs[layer_idx])  # this layer's input is hidden_states[layer_idx]
    q, k = layer.self_attn.q_proj(x)[0], layer.self_attn.k_proj(x)[0]
    D = q.shape[-1]
    full = torch.softmax(q[0] @ k.T / math.sqrt(D), -1)[1:]
    # float bounds: tests/tolerance.py, against the float64 reference's values
    tolerance.assert_close(ref.cls_attention(s.pixels), full, s.ref64.cls_attention(s.pixels),
                           "reference [CLS] attention (full width)")
    H = ref.cfg.vision_config.num_attention_heads
    qh, kh = q.view(-1, H, D // H).transpose(0, 1), k.view(-1, H, D // H).transpose(0, 1)
    per = torch.softmax(qh[:, 0:1] @ kh.transpose(1, 2) / math.sqrt(D // H), -1)[:, 0].mean(0)[1:]
    tolerance.assert_close(ref.cls_attention(s.pixels, per_head=True), per,
                           s.ref64.cls_attention(s.pixels, per_head=True), "reference [CLS] attention (per head)")


@pytest.mark.parametrize("name", ["mha", "last"])
def test_reference_contrastive_embeds_with_every_patch_in_order_is_the_full_stream(name, setups):
    """With all patches in natural order the reference's contrastive embeddings rebuild HF's own merge."""
    s = setups(name)
    ids = s.ids.tolist()
    emb, n = s.ref._contrastive_embeds(ids, s.pixels, list(range(s.num_patches)))
    assert n == len(ids)
    with torch.no_grad():
        a = s.ref.model(inputs_embeds=emb).logits
        b = s.ref.model(input_ids=s.ids[None], pixel_values=s.pixels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ outlier selection


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["full", "heads"])
def test_cls_attention_and_outliers_match_reference(name, mode, setups):
    s = setups(name)
    model = s.model
    layer = damro.selection_layer(model)
    assert layer == s.ref.selection_layer()
    cap = Capture(vit_qk_layers=(layer,)) if mode == "full" else Capture(vit_layers=(layer,))
    with torch.inference_mode():
        model.encode_image(s.pixels, cap)
    att = damro.cls_attention(cap, layer, mode)
    assert att.shape == (1 + s.num_patches,) and att.dtype == torch.float32
    ref_att = s.ref.cls_attention(s.pixels, per_head=(mode == "heads"))
    exact = s.ref64.cls_attention(s.pixels, per_head=(mode == "heads"))
    tolerance.assert_close(att[1:], ref_att, exact, f"[CLS] attention ({mode})")
    # Equal outliers follow from the bound when the ranking has no near-tie (checked, not hoped for).
    tolerance.assert_clear_ranking(ref_att, tolerance.bound(ref_att, exact).max().item(), f"[CLS] attention ({mode})")
    for k in (1, 3, s.num_patches):
        got = select_outliers(att, k).tolist()
        assert got == s.ref.select(s.pixels, k, per_head=(mode == "heads"))
        assert len(got) == k and all(0 <= j < s.num_patches for j in got)


def test_full_width_and_per_head_selections_differ_somewhere(setups):
    """Otherwise the per-head tests would not tell the two options apart."""
    differ = [n for n in NAMES
              if setups(n).ref.select(setups(n).pixels, 3) != setups(n).ref.select(setups(n).pixels, 3, per_head=True)]
    assert differ, "full-width and per-head top-3 agree on every tiny config"


# ------------------------------------------------------------------ decoding parity


CASES = [  # alpha, beta, k ("all" = every patch), temperature, top_p, seed
    (2.0, 0.1, 3, 0.0, 1.0, 0),
    (0.5, 0.5, 1, 0.0, 1.0, 0),
    (3.0, 0.1, "all", 0.0, 1.0, 0),
    (2.0, 0.1, 3, 1.0, 1.0, 11),     # the released code's "direct sampling"
    (0.5, 0.1, "all", 0.7, 0.9, 12),
    (3.0, 0.5, 1, 1.0, 1.0, 13),
    (2.0, 0.5, 3, 0.7, 0.9, 14),
]


def _k(s, k):
    return s.num_patches if k == "all" else k


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "a{}-b{}-k{}-T{}-p{}".format(*c[:5]))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
def test_generate_matches_reference(name, case, batched, setups):
    alpha, beta, k, temperature, top_p, seed = case
    s = setups(name)
    k = _k(s, k)
    ref = s.reference(alpha, beta, k, temperature, top_p, seed)
    outliers, tokens = s.mini(alpha, beta, k, temperature, top_p, seed, batched=batched)
    assert outliers == ref.outliers
    if temperature == 0:
        assert_clear_damro_choices(ref, alpha, beta, s.logit_bound())
    assert tokens == ref.tokens
    assert 1 <= len(tokens) <= MAX_NEW and (len(tokens) == MAX_NEW or tokens[-1] == tiny_eos())


def assert_clear_damro_choices(ref, alpha, beta, tol):
    """Equal greedy DAMRO tokens follow from the float bound: with l, l_cd each within tol of the reference's,
    the cutoff log(beta) + max l moves by at most tol, and d = (1 + alpha) l - alpha l_cd by (1 + 2 alpha) tol.
    So at every step the chosen token must pass the cutoff by more than 2 tol, and every token that could pass
    it (l >= cutoff - 2 tol) must score below the chosen one by more than 2 (1 + 2 alpha) tol."""
    tol_d = (1 + 2 * alpha) * tol
    for step, ((l, l_cd), t) in enumerate(zip(ref.logits, ref.tokens)):
        l, l_cd = l.double(), l_cd.double()
        cutoff = math.log(beta) + l.max()
        d = (1 + alpha) * l - alpha * l_cd
        assert l[t] >= cutoff + 2 * tol, f"step {step}: the chosen token is within rounding of the cutoff"
        rivals = (l >= cutoff - 2 * tol) & (torch.arange(len(l)) != t)
        assert (d[rivals] < d[t] - 2 * tol_d).all(), f"step {step}: a near-tie within rounding ({tol_d:.3g})"


def tiny_eos():
    return 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
def test_per_head_option_matches_reference(name, batched, setups):
    s = setups(name)
    for alpha, beta, k, temperature, top_p, seed in [(2.0, 0.1, 3, 0.0, 1.0, 0), (2.0, 0.1, 3, 1.0, 1.0, 5)]:
        ref = s.reference(alpha, beta, k, temperature, top_p, seed, per_head=True)
        outliers, tokens = s.mini(alpha, beta, k, temperature, top_p, seed, batched=batched, mode="heads")
        assert outliers == ref.outliers
        if temperature == 0:
            assert_clear_damro_choices(ref, alpha, beta, s.logit_bound())
        assert tokens == ref.tokens


def test_parity_cases_are_not_vacuous(setups):
    """DAMRO must change the output somewhere (else the parity tests would not see the contrast), and seeds
    must matter."""
    changed = seeds = 0
    for name in NAMES:
        s = setups(name)
        plain = s.plain()
        for alpha, beta, k, temperature, top_p, seed in CASES:
            r = s.reference(alpha, beta, _k(s, k), temperature, top_p, seed)
            changed += temperature == 0 and r.tokens != plain
        a = s.reference(2.0, 0.1, 3, 1.0, 1.0, 11).tokens
        b = s.ref.generate(s.ids, s.pixels, alpha=2.0, beta=0.1, k=3, temperature=1.0, seed=99,
                           max_new_tokens=MAX_NEW).tokens
        seeds += a != b
    assert changed >= 2 and seeds >= 2, (changed, seeds)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
def test_stops_at_eos_inclusive_like_the_reference(name, batched, setups, monkeypatch):
    """Random tiny models rarely emit EOS, so take as EOS a token the DAMRO run really produces mid-answer:
    both sides must stop right after its first occurrence, EOS included."""
    s = setups(name)
    full = s.reference(2.0, 0.1, 3, 1.0, 1.0, 11).tokens
    eos = full[len(full) // 2]
    monkeypatch.setattr(s.model.cfg.text, "eos_token_id", eos)
    ref = s.ref.generate(s.ids, s.pixels, alpha=2.0, beta=0.1, k=3, temperature=1.0, seed=11,
                         max_new_tokens=MAX_NEW, eos=eos).tokens
    _, tokens = s.mini(2.0, 0.1, 3, 1.0, 1.0, 11, batched=batched)
    assert tokens == ref == full[:full.index(eos) + 1]


# ------------------------------------------------------------------ reductions to plain decoding


@pytest.mark.parametrize("name", NAMES)
def test_alpha_zero_is_plain_decoding(name, setups):
    s = setups(name)
    plain = s.plain()
    for beta in (0.1, 0.5, 1.0):
        for batched in (True, False):
            assert s.mini(0.0, beta, 3, batched=batched)[1] == plain
    # Seeded sampling: alpha = 0 makes d = l exactly; with a beta whose cutoff removes nothing (every logit of
    # these tiny models is within -log(1e-30) = 69 of the max) the draws are the plain draws, one per token.
    for temperature, top_p, seed in [(1.0, 1.0, 3), (0.7, 0.9, 4)]:
        want = s.plain(temperature, top_p, seed)
        assert want != plain
        for batched in (True, False):
            assert s.mini(0.0, 1e-30, 3, temperature, top_p, seed, batched=batched)[1] == want
        assert s.ref.generate_plain(s.ids, s.pixels, temperature=temperature, top_p=top_p, seed=seed,
                                    max_new_tokens=MAX_NEW) == want


@pytest.mark.parametrize("name", NAMES)
def test_beta_one_is_plain_greedy(name, setups):
    """beta = 1 keeps only the full stream's argmax, whatever alpha and the contrastive stream say; sampling
    then has one candidate per step, so it gives the greedy tokens too."""
    s = setups(name)
    plain = s.plain()
    for alpha in (0.5, 2.0, 3.0):
        assert s.mini(alpha, 1.0, 1)[1] == plain
        assert s.mini(alpha, 1.0, s.num_patches, batched=False)[1] == plain
    assert s.mini(3.0, 1.0, 3, temperature=1.0, seed=7)[1] == plain


# ------------------------------------------------------------------ the two KV caches


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
def test_caches_grow_in_step(name, batched, setups, monkeypatch):
    s = setups(name)
    k = 3
    calls = []  # (new tokens per row, cache lengths before, cache lengths after), one per LLM forward
    original = mllama.LlamaModel.forward

    def recording(self, x, caches, capture=None):
        before = [c.length for c in caches]
        out = original(self, x, caches, capture)
        calls.append((x.shape[1], before, [c.length for c in caches], [id(c) for c in caches]))
        return out

    monkeypatch.setattr(mllama.LlamaModel, "forward", recording)
    outliers, tokens = s.mini(2.0, 0.1, k, batched=batched)
    monkeypatch.undo()
    assert len(tokens) >= 3

    L = len(s.ids)
    short = L - (s.model.cfg.num_image_tokens - k)
    # prefill: the full stream and the contrastive stream, one cache each
    (t0, b0, a0, c0), (t1, b1, a1, c1) = calls[:2]
    assert (t0, b0, a0) == (L, [0], [L]) and (t1, b1, a1) == (short, [0], [short])
    full_id, cd_id = c0[0], c1[0]
    assert full_id != cd_id
    lengths = {full_id: L, cd_id: short}
    decode = calls[2:]
    steps = []
    if batched:  # both streams in one forward per token
        assert len(decode) == len(tokens) - 1
        for T, before, after, ids in decode:
            assert T == 1 and ids == [full_id, cd_id]
            steps.append((before, after))
    else:        # two forwards per token, full stream first
        assert len(decode) == 2 * (len(tokens) - 1)
        for (T0, bf, af, i0), (T1, bc, ac, i1) in zip(decode[::2], decode[1::2]):
            assert T0 == T1 == 1 and i0 == [full_id] and i1 == [cd_id]
            steps.append((bf + bc, af + ac))
    for before, after in steps:
        assert before == [lengths[full_id], lengths[cd_id]]
        assert after == [b + 1 for b in before]
        lengths = {full_id: after[0], cd_id: after[1]}
    # the reference's DynamicCaches went through the same lengths
    ref = s.reference(2.0, 0.1, k)
    assert ref.tokens == tokens
    assert ref.full_lengths == [L] + [a[0] for _, a in steps]
    assert ref.cd_lengths == [short] + [a[1] for _, a in steps]


# ------------------------------------------------------------------ planted outliers


def _plant(hf_model, high, low, lam, scale_s=None, seed=0):
    """Make [CLS]'s q.k at the selection layer a known function of a per-patch score s_j.

    Patch embeddings are zeroed, so a patch token is its position embedding s_j a + b (a, b orthonormal,
    zero-mean); the layers before the selection layer are made the identity; LayerNorms are plain. After
    the LayerNorms the token's component along a is t_j = sqrt(D) s_j / sqrt(s_j^2 + 1), increasing in s_j.
    The selection layer's q_proj is a bias only (q = u for every token), k_proj reads t_j: k_j = w t_j, with
    u_h . w_h = lam[h] per head. Full width: q.k_j = sum(lam) t_j; per head h: lam[h] t_j.
    """
    g = torch.Generator().manual_seed(seed)
    vt = hf_model.model.vision_tower
    vm = getattr(vt, "vision_model", vt)
    vc = hf_model.config.vision_config
    D, H, N = vc.hidden_size, vc.num_attention_heads, (vc.image_size // vc.patch_size) ** 2
    hd = D // H
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    a = a - a.mean()
    a = a / a.norm()
    b = b - b.mean()
    b = b - (b @ a) * a
    b = b / b.norm()
    s = torch.empty(N).uniform_(-1, 1, generator=g)
    for j, v in zip(high, (10.0, 5.0, 3.0)):
        s[j] = v
    for j, v in zip(low, (-10.0, -5.0, -3.0)):
        s[j] = v
    layer_idx = vc.num_hidden_layers + 1 + hf_model.config.vision_feature_layer - 1 \
        if hf_model.config.vision_feature_layer < 0 else hf_model.config.vision_feature_layer - 1
    with torch.no_grad():
        vm.embeddings.patch_embedding.weight.zero_()
        vm.embeddings.class_embedding.zero_()
        pos = vm.embeddings.position_embedding.weight
        pos[0] = b
        pos[1:] = s[:, None] * a + b
        vm.pre_layrnorm.weight.fill_(1)
        vm.pre_layrnorm.bias.zero_()
        for layer in vm.encoder.layers[:layer_idx]:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        sel = vm.encoder.layers[layer_idx]
        sel.layer_norm1.weight.fill_(1)
        sel.layer_norm1.bias.zero_()
        u = torch.randn(D, generator=g)
        w = torch.empty(D)
        for h in range(H):
            uh = u[h * hd:(h + 1) * hd]
            w[h * hd:(h + 1) * hd] = lam[h] * uh / (uh @ uh)
        sel.self_attn.q_proj.weight.zero_()
        sel.self_attn.q_proj.bias.copy_(u)
        sel.self_attn.k_proj.weight.copy_(torch.outer(w, a))
        sel.self_attn.k_proj.bias.zero_()
    return s


@pytest.fixture(scope="module")
def planted(hf_checkpoints, tmp_path_factory):
    import weights_convert
    src = hf_checkpoints["mha"]
    hf = tiny.hf_model(src)
    high, low = [13, 2, 7], [5, 14, 0]
    lam = [12.0, -3.0, -3.0, -3.0]  # sum +3: full width prefers high s; 3 of 4 heads prefer low s
    assert hf.config.vision_config.num_attention_heads == len(lam)
    _plant(hf, high, low, lam)
    root = tmp_path_factory.mktemp("planted")
    hf_dir, ckpt = str(root / "hf"), str(root / "converted")
    hf.save_pretrained(hf_dir)
    for f in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(src, f), os.path.join(hf_dir, f))
    weights_convert.convert(hf_dir, ckpt)
    return Setup(hf_dir, ckpt, image_seed=5), high, low


def test_planted_outliers_full_width(planted):
    s, high, low = planted
    for k in (1, 2, 3):
        assert s.ref.select(s.pixels, k) == high[:k]
        cfg_out, tokens = s.mini(2.0, 0.1, k, max_new_tokens=2)
        assert cfg_out == high[:k]
    # independent of the image: the patch embedding is zero
    other = preprocess(random_image(123), s.model.cfg.preprocessor)
    layer = damro.selection_layer(s.model)
    cap = Capture(vit_qk_layers=(layer,))
    with torch.inference_mode():
        s.model.encode_image(other, cap)
    assert select_outliers(damro.cls_attention(cap, layer, "full"), 3).tolist() == high


def test_planted_outliers_per_head(planted):
    """The same weights, per-head mean: three of four heads attend to the low-s patches, so the per-head
    option must pick those (lowest s first) while the default full width picks the high ones."""
    s, high, low = planted
    assert s.ref.select(s.pixels, 3, per_head=True) == low
    outliers, _ = s.mini(2.0, 0.1, 3, mode="heads", max_new_tokens=2)
    assert outliers == low
    outliers, _ = s.mini(2.0, 0.1, 3, mode="full", max_new_tokens=2)
    assert outliers == high


def test_planted_generation_matches_reference(planted):
    s, high, low = planted
    for batched in (True, False):
        ref = s.reference(2.0, 0.1, 3)
        assert s.mini(2.0, 0.1, 3, batched=batched) == (ref.outliers, ref.tokens)
        assert ref.outliers == high


# ------------------------------------------------------------------ the rule on hand-made logits


def _rule(l, l_cd, alpha, beta):  # the formula of damro-method.md, written out again
    cutoff = torch.log(torch.tensor(beta)) + l.max(-1, keepdim=True).values
    d = (1 + alpha) * l - alpha * l_cd
    d[l < cutoff] = -float("inf")
    return d


def test_damro_scores_cutoff_keeps_exactly_the_plausible_tokens():
    p = torch.tensor([0.40, 0.25, 0.15, 0.08, 0.05, 0.035, 0.025, 0.01])
    l = torch.log(p) + 3.0  # any shift: the cutoff is relative to the max
    l_cd = torch.tensor([5.0, -1.0, 0.5, 2.0, -3.0, 0.0, 1.0, 4.0])
    for beta, kept in [(1.0, {0}), (0.5, {0, 1}), (0.3, {0, 1, 2}), (0.1, {0, 1, 2, 3, 4}),
                       (0.05, {0, 1, 2, 3, 4, 5, 6}), (0.01, set(range(8)))]:
        for alpha in (0.0, 0.5, 2.0, 3.0):
            l_in, cd_in = l.clone(), l_cd.clone()
            d = damro_scores(l_in, cd_in, alpha, beta)
            assert torch.equal(l_in, l) and torch.equal(cd_in, l_cd)  # inputs untouched
            assert d.dtype == torch.float32 and d.shape == l.shape
            finite = set(torch.isfinite(d).nonzero()[:, 0].tolist())
            assert finite == kept, (beta, alpha, finite)
            assert finite == {i for i in range(8) if p[i] >= beta * p.max() - 1e-7}
            expect = (1 + alpha) * l - alpha * l_cd
            assert torch.equal(d[list(kept)], expect[list(kept)])
            assert torch.equal(d, _rule(l, l_cd, alpha, beta))
    # the argmax of l is never removed, even when the contrast pushes it down hardest
    assert torch.isfinite(damro_scores(l, l_cd, 3.0, 1.0)[0])
    assert damro_scores(l, l_cd, 3.0, 0.1).argmax() != 0  # the contrast does re-rank the kept tokens


def test_damro_scores_boundary_and_batch():
    beta = 0.1
    edge = torch.log(torch.tensor(beta))  # exactly at the cutoff: kept (the released code removes l < cutoff)
    l = torch.stack([torch.tensor(0.0), edge, torch.nextafter(edge, torch.tensor(-10.0)), torch.tensor(-50.0)])
    d = damro_scores(l, torch.zeros(4), 2.0, beta)
    assert torch.isfinite(d).tolist() == [True, True, False, False]
    g = torch.Generator().manual_seed(0)
    L, C = torch.randn(3, 50, generator=g) * 4, torch.randn(3, 50, generator=g) * 4
    for beta in (0.1, 0.5, 1.0):
        d = damro_scores(L, C, 2.0, beta)
        assert torch.equal(d, _rule(L, C, 2.0, beta))
        assert torch.isfinite(d.gather(1, L.argmax(1, keepdim=True))).all()
        for row in range(3):  # rows are independent
            assert torch.equal(d[row], damro_scores(L[row], C[row], 2.0, beta))


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_config_check(name, setups):
    s = setups(name)
    n = s.num_patches
    bad = [dict(topk=0), dict(topk=-1), dict(topk=n + 1), dict(beta=0.0), dict(beta=-0.1), dict(beta=1.01),
           dict(alpha=-0.1), dict(alpha=-2.0)]
    for kw in bad:
        with pytest.raises(MinidamroError):
            DamroConfig(**kw).check(n)
        with pytest.raises(MinidamroError):  # generate refuses before decoding anything
            damro.generate(s.model, s.ids, s.pixels, DamroConfig(**kw), Sampler(), 2)
    for kw in [dict(topk=1), dict(topk=n), dict(beta=1.0), dict(beta=1e-6), dict(alpha=0.0), dict()]:
        DamroConfig(**kw).check(n)
    # "gqa" keeps [CLS] as an image feature: there are n + 1 image tokens but still only n patches to pick
    assert s.model.cfg.num_image_tokens == n + (name == "gqa")
