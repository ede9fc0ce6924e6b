"""Stage-by-stage parity with transformers' LlavaForConditionalGeneration (float32, eager attention).

On each tiny configuration (MHA / GQA, feature layer -2 / 2 / -1, [CLS] dropped / kept), minidamro loaded
from its converted checkpoint must reproduce Hugging Face's ViT hidden states, image features, merged
embeddings, logits, attention probabilities (ViT and LLM, prefill and decode), q/k projections and greedy
generations; KV-cached decoding must equal recomputation; seeded sampling must follow its contract.
"""
import copy
import random

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor
from transformers.generation.logits_process import TopPLogitsWarper

import minidamro.llama
import minidamro.vision
import tiny
import tolerance
from minidamro import MinidamroError
from minidamro.capture import Capture
from minidamro.generation import Sampler, decode_step, generate, prefill
from minidamro.image import preprocess
from minidamro.llama import KVCache
from minidamro.llava import load_model
from minidamro.tokenizer import build_prompt

NAMES = list(tiny.CONFIGS)
PROMPT = build_prompt("What is shown in this picture? Describe it in detail.")


def assert_close(got, expected, exact, what):
    """got and expected in float32, within the rounding bound of tests/tolerance.py; exact: the same
    computation in float64."""
    assert got.dtype == expected.dtype == torch.float32 and exact.dtype == torch.float64, what
    tolerance.assert_close(got, expected, exact, what)


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(3 * w * h))


class Case:
    """One configuration: the HF reference, minidamro loaded the way users load it, one prompt and image,
    and HF's outputs for them (computed once)."""

    def __init__(self, name, hf_dir, model_dir, hf_tok):
        self.name, self.hf_dir = name, hf_dir
        self.hf = tiny.hf_model(hf_dir)
        self.model = load_model(model_dir)
        self.model_dir = model_dir
        cfg = tiny.CONFIGS[name]
        self.processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(**tiny.preprocessor_config(name)), tokenizer=hf_tok,
            patch_size=cfg["vision"]["patch_size"], num_additional_image_tokens=1,
            vision_feature_select_strategy=cfg["vision_feature_select_strategy"])
        self.image = noise_image(53, 71, seed=len(name))
        self.inputs = self.processor(images=self.image, text=PROMPT, return_tensors="pt")
        self.ids = self.inputs.input_ids[0]  # (L,)
        self.pixels = preprocess(self.image, self.model.cfg.preprocessor)
        assert torch.equal(self.pixels, self.inputs.pixel_values)  # test_image.py covers this in depth

        # HF's full forward over the prompt, with every hidden state and attention, and the embeddings it
        # hands to the language model (the merge happens inside LlavaModel.forward).
        # The same in float64 (same weights, same inputs): the exact values the float tolerances measure the
        # float32 rounding error against (tests/tolerance.py).
        self.hf64 = tiny.hf_model(hf_dir, dtype=torch.float64)
        self.out, self.hf_embeds = self.hf_forward(self.hf)
        self.out64, self.hf_embeds64 = self.hf_forward(self.hf64)
        # The fast path's reference is HF's fast path: SDPA sums in another order than eager attention, and the
        # two differ by a float32 ulp or so, which is not a property of either implementation.
        hf_sdpa = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
        with torch.no_grad():
            self.sdpa_logits = hf_sdpa(input_ids=self.ids[None], pixel_values=self.pixels).logits

    def hf_forward(self, hf):
        seen = {}

        def grab(module, args, kwargs):
            seen["embeds"] = kwargs["inputs_embeds"].clone()
        hook = hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            out = hf(input_ids=self.ids[None], pixel_values=self.pixels, output_attentions=True,
                     output_hidden_states=True)
        hook.remove()
        return out, seen["embeds"]


@pytest.fixture(scope="module")
def hf_tok(tokenizer_model):
    return tiny.hf_tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def cases():
    return {}  # name -> Case, built on first use


@pytest.fixture(params=NAMES)
def case(request, cases, hf_checkpoints, checkpoints, hf_tok) -> Case:
    return get_case(request.param, cases, hf_checkpoints, checkpoints, hf_tok)


def get_case(name, cases, hf_checkpoints, checkpoints, hf_tok) -> Case:
    if name not in cases:
        cases[name] = Case(name, hf_checkpoints[name], checkpoints[name], hf_tok)
    return cases[name]


# ----------------------------------------------------------------------------------------------- vision


def test_loaded_model_is_float32_with_the_checkpoint_config(case):
    cfg, hcfg = case.model.cfg, case.hf.config
    assert all(p.dtype == torch.float32 for p in case.model.parameters())
    assert cfg.vision_feature_layer == hcfg.vision_feature_layer
    assert cfg.vision_feature_select_strategy == hcfg.vision_feature_select_strategy
    assert cfg.image_token_index == hcfg.image_token_id
    assert cfg.num_image_tokens == int((case.ids == cfg.image_token_index).sum())  # as LlavaProcessor expands


def test_vit_hidden_states(case):
    """hidden_states[0] is the pre_layrnorm output, [i] the output of layer i - 1, up to the feature layer.

    Every ViT layer captures here, so every layer takes the hand-written attention: the same arithmetic as
    the eager reference. (The fast SDPA path sums in another order; its ViT output is checked through the
    projected features and the logits below.)"""
    layers = tuple(range(len(case.model.vision_tower.encoder.layers)))
    hidden = []
    case.model.encode_image(case.pixels, Capture(vit_layers=layers), hidden_states=hidden)
    expected, exact = case.out.image_outputs.hidden_states, case.out64.image_outputs.hidden_states
    n = case.model.cfg.feature_hidden_index
    assert n == case.hf.config.vision_feature_layer % len(expected) and len(layers) == n
    assert len(hidden) == n + 1
    for i, h in enumerate(hidden):
        assert_close(h, expected[i], exact[i], f"ViT hidden state {i}")
    # The fast path appends the same number of hidden states, ending with the same feature layer.
    fast = []
    case.model.encode_image(case.pixels, hidden_states=fast)
    assert len(fast) == n + 1 and torch.equal(fast[0], hidden[0])


def test_image_features(case):
    got = case.model.encode_image(case.pixels)
    with torch.no_grad():
        expected = case.hf.get_image_features(pixel_values=case.pixels).pooler_output
        exact = case.hf64.get_image_features(pixel_values=case.pixels).pooler_output
    assert got.shape == (1, case.model.cfg.num_image_tokens, case.model.cfg.text.hidden_size)
    assert_close(got[0], expected[0], exact[0], "projected image features")


def test_merged_embeddings(case):
    features = case.model.encode_image(case.pixels)[0]
    embeds = case.model.embed(case.ids, features)
    assert_close(embeds, case.hf_embeds, case.hf_embeds64, "merged input embeddings")
    # The image positions really hold the features, in order (not, e.g., the <image> embedding).
    slots = case.ids == case.model.cfg.image_token_index
    assert torch.equal(embeds[0, slots], features)


def test_merge_rejects_wrong_number_of_features(case):
    model, ids = case.model, case.ids
    features = model.encode_image(case.pixels)[0]
    image_id = model.cfg.image_token_index
    one_more = torch.cat([ids[:3], torch.tensor([image_id]), ids[3:]])
    one_less = ids[torch.arange(len(ids)) != int((ids == image_id).nonzero()[0])]
    no_image = ids[ids != image_id]
    for bad_ids in (one_more, one_less, no_image):
        with pytest.raises(MinidamroError):
            model.embed(bad_ids, features)
    with pytest.raises(MinidamroError):
        model.embed(ids, features[1:])
    # A prompt with k image ids takes k features (DAMRO's contrastive stream).
    k = 3
    short = torch.cat([ids[:1], torch.full((k,), image_id), ids[-4:]])
    assert model.embed(short, features[:k]).shape == (1, len(short), model.cfg.text.hidden_size)


def hf_vit_qk(hf, pixels, layers):
    """(kind, layer) -> the output of HF's q_proj / k_proj in that ViT layer, (B, T, D), from forward hooks."""
    hf_layers = hf.model.vision_tower.encoder.layers
    assert 0 < len(layers) <= len(hf_layers)
    qk = {}
    projections = [(kind, i, getattr(hf_layers[i].self_attn, f"{kind}_proj")) for i in layers for kind in "qk"]
    hooks = [proj.register_forward_hook(lambda mod, args, out, key=(kind, i): qk.__setitem__(key, out))
             for kind, i, proj in projections]
    try:
        with torch.no_grad():
            hf.model.vision_tower(pixels)
    finally:
        for h in hooks:
            h.remove()
    return qk


def test_vit_attention_and_qk_capture(case):
    model = case.model
    layers = tuple(range(len(model.vision_tower.encoder.layers)))
    qk, qk64 = hf_vit_qk(case.hf, case.pixels, layers), hf_vit_qk(case.hf64, case.pixels, layers)
    cap = Capture(vit_layers=layers, vit_qk_layers=layers)
    features = model.encode_image(case.pixels, cap)
    assert sorted(cap.vit_attn) == sorted(cap.vit_q) == sorted(cap.vit_k) == list(layers)
    for i in layers:
        assert_close(cap.vit_attn[i], case.out.image_outputs.attentions[i], case.out64.image_outputs.attentions[i],
                     f"ViT attention probabilities, layer {i}")
        assert_close(cap.vit_q[i], qk["q", i], qk64["q", i], f"ViT q_proj output, layer {i}")
        assert_close(cap.vit_k[i], qk["k", i], qk64["k", i], f"ViT k_proj output, layer {i}")
    assert not cap.llm_attn
    # Capturing does not change the result.
    # (the fast path's ViT sums its attention in another order: the bound of the image features stage)
    with torch.no_grad():
        exact = case.hf64.get_image_features(pixel_values=case.pixels).pooler_output
    assert_close(model.encode_image(case.pixels)[0], features[0], exact[0], "image features with and without capture")
    # Asking for some layers stores those only.
    some = Capture(vit_layers=layers[-1:], vit_qk_layers=layers[:1])
    model.encode_image(case.pixels, some)
    assert list(some.vit_attn) == [layers[-1]] and list(some.vit_q) == list(some.vit_k) == [0]


# ------------------------------------------------------------------------------------------ language model


def prompt_embeds(case):
    return case.model.embed(case.ids, case.model.encode_image(case.pixels)[0])


@pytest.mark.parametrize("path", ["eager-capture", "sdpa", "sdpa-empty-capture"])
def test_full_sequence_logits(case, path, monkeypatch):
    """Logits over the whole prompt equal HF eager's on the hand-written (capturing) path, and HF SDPA's on
    the fast path (whose prefill attention is SDPA or the blocked eager form, as measured: within the bound
    either way)."""
    model, L = case.model, len(case.ids)
    if path == "eager-capture":
        capture = Capture(llm_layers=tuple(range(model.cfg.text.num_hidden_layers)))
    else:
        capture = None if path == "sdpa" else Capture()

        def no_eager(*args, **kwargs):
            raise AssertionError("a forward that captures nothing computed attention probabilities by hand")
        monkeypatch.setattr(minidamro.vision, "eager_attention", no_eager)
        monkeypatch.setattr(minidamro.llama, "eager_attention", no_eager)
    features = model.encode_image(case.pixels, capture)[0]
    cache = KVCache(model.cfg.text, L + 1)
    h = model.language_model(model.embed(case.ids, features), [cache], capture)
    assert cache.length == L
    expected = case.out.logits if path == "eager-capture" else case.sdpa_logits
    # float64 eager is the exact value for both paths (the exact sum does not depend on its order)
    assert_close(model.logits(h), expected, case.out64.logits, f"full-sequence logits ({path})")
    if path != "eager-capture":  # a decode step takes the fast path too
        decode_step(model, model.logits(h[0, -1]).argmax()[None], [cache], capture)
    if path == "sdpa-empty-capture":
        assert capture == Capture(), "a Capture that asks for nothing must store nothing"


def test_llm_attention_capture_prefill_and_decode(case):
    model, hf, L = case.model, case.hf, len(case.ids)
    n_layers = model.cfg.text.num_hidden_layers
    H = model.cfg.text.num_attention_heads
    cache = KVCache(model.cfg.text, L + 2)
    cap = Capture(llm_layers=tuple(range(n_layers)))
    logits = prefill(model, prompt_embeds(case), cache, cap)
    assert_close(logits, case.out.logits[0, -1], case.out64.logits[0, -1], "prefill logits of the last position")
    for i in range(n_layers):
        assert len(cap.llm_attn[i]) == 1
        assert cap.llm_attn[i][0].shape == (H, L, L)
        assert_close(cap.llm_attn[i][0], case.out.attentions[i][0], case.out64.attentions[i][0],
                     f"LLM attention, prefill, layer {i}")

    # One decode step on the cache, capturing only the last layer.
    token = logits.argmax()[None]  # (1,)
    last = n_layers - 1
    step_cap = Capture(llm_layers=(last,))
    step_logits = decode_step(model, token, [cache], step_cap)
    with torch.no_grad():
        hf_step = hf(input_ids=token[None], cache=copy.deepcopy(case.out.cache), output_attentions=True)
        hf_step64 = case.hf64(input_ids=token[None], cache=copy.deepcopy(case.out64.cache), output_attentions=True)
    assert_close(step_logits, hf_step.logits[:, -1], hf_step64.logits[:, -1], "decode-step logits")
    assert list(step_cap.llm_attn) == [last] and len(step_cap.llm_attn[last]) == 1
    assert step_cap.llm_attn[last][0].shape == (H, 1, L + 1)
    assert_close(step_cap.llm_attn[last][0], hf_step.attentions[last][0], hf_step64.attentions[last][0],
                 "LLM attention, decode step")
    assert cache.length == L + 1


def test_cached_decoding_equals_recomputation(case):
    """Each decode step on the KV cache gives the logits of a from-scratch forward over the whole sequence."""
    model, L, steps = case.model, len(case.ids), 10
    embeds = prompt_embeds(case)
    # the exact values: minidamro's own forward in float64 (the same weights, inputs and steps)
    model64 = copy.deepcopy(model).to(torch.float64)
    embeds64 = model64.embed(case.ids, model64.encode_image(case.pixels.double())[0])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.text.vocab_size, (steps,), generator=g)  # any id, padded rows included
    cache = KVCache(model.cfg.text, L + steps)
    logits = prefill(model, embeds, cache)
    for s in range(steps + 1):
        if s > 0:
            logits = decode_step(model, tokens[s - 1:s], [cache])[0]
        seq = torch.cat([embeds, model.language_model.embed_tokens(tokens[:s])[None]], dim=1)  # (1, L + s, D)
        full = model.logits(model.language_model(seq, [KVCache(model.cfg.text, L + s)])[0, -1])
        seq64 = torch.cat([embeds64, model64.language_model.embed_tokens(tokens[:s])[None]], dim=1)
        cache64 = KVCache(model.cfg.text, L + s, dtype=torch.float64)
        exact = model64.lm_head(model64.language_model(seq64, [cache64])[0, -1])
        assert_close(logits, full, exact, f"cached vs recomputed logits after {s} decode steps")
    assert cache.length == L + steps


# --------------------------------------------------------------------------------------------- generation


def test_greedy_generation_matches_hf(case):
    """Greedy tokens equal HF generate(do_sample=False), up to and including an EOS (id 2) if one comes."""
    n, lengths = 24, []
    # Equal tokens follow from the float bound only if no step has a near-tie: the fixture must have margins
    # (tiny.py scales the weights for that), and every step of HF's run is checked for one.
    tol = tolerance.bound(case.out.logits, case.out64.logits).max().item()
    other = noise_image(61, 45, seed=7)
    for image, text in ((case.image, PROMPT), (other, build_prompt("The quick brown fox 0123456789 café 東京"))):
        inputs = case.processor(images=image, text=text, return_tensors="pt")
        ids = inputs.input_ids[0]
        with torch.no_grad():
            out = case.hf.generate(**inputs, do_sample=False, max_new_tokens=n, output_scores=True,
                                   return_dict_in_generate=True)
        tolerance.assert_clear_argmax(torch.cat(out.scores), tol, "HF's greedy logits")
        expected = out.sequences[0, len(ids):].tolist()
        got = list(generate(case.model, ids, preprocess(image, case.model.cfg.preprocessor), Sampler(), n))
        assert got == expected
        assert len(got) == n or got[-1] == 2
        lengths.append(len(got))
    assert max(lengths) >= 20  # really 20+ compared tokens


def test_generation_stops_at_eos_like_hf(case):
    """Make a token that greedy decoding produces the EOS id: both stop right after it, EOS included."""
    greedy = list(generate(case.model, case.ids, case.pixels, Sampler(), 24))
    k = max(i for i, t in enumerate(greedy) if t not in greedy[:i])  # the latest first occurrence of a token
    eos = greedy[k]
    model = load_model(case.model_dir)
    model.cfg.text.eos_token_id = eos
    got = list(generate(model, case.ids, case.pixels, Sampler(), 24))
    with torch.no_grad():
        out = case.hf.generate(**case.inputs, do_sample=False, max_new_tokens=24, eos_token_id=eos)
    assert got == out[0, len(case.ids):].tolist()
    assert got == greedy[:k + 1]


def reference_sampling(case, temperature, top_p, seed, n):
    """The sampling contract, on HF's logits: one torch.Generator seeded once, one multinomial per token on the
    float32 softmax of scores / T after transformers' top-p filter. Also returns how many tokens were kept."""
    g = torch.Generator().manual_seed(seed)
    warp = TopPLogitsWarper(top_p)
    tokens, kept = [], []
    with torch.no_grad():
        out = case.hf(**case.inputs)
        for _ in range(n):
            scores = out.logits[0, -1].float() / temperature
            if top_p < 1.0:
                scores = warp(None, scores[None])[0]
            kept.append(int(torch.isfinite(scores).sum()))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            t = torch.multinomial(probs, 1, generator=g)
            tokens.append(int(t))
            if tokens[-1] == 2:
                break
            out = case.hf(input_ids=t[None], cache=out.cache)
    return tokens, kept


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_seeded_sampling_is_reproducible_and_follows_the_contract(case, temperature, top_p):
    n, seed = 20, 1234

    def run(s):
        return list(generate(case.model, case.ids, case.pixels, Sampler(temperature, top_p, seed=s), n))
    first = run(seed)
    assert run(seed) == first
    expected, kept = reference_sampling(case, temperature, top_p, seed, n)
    assert first == expected
    V = case.model.cfg.text.vocab_size
    if top_p < 1.0:  # the filter really removed tokens (so a wrong filter would show)
        assert min(kept) < V
    assert run(seed + 1) != first


# ------------------------------------------------------------------------------------- the bounds' power


def mutant_logits(case, mutate):
    """Full-sequence logits (fast path) of a copy of the model with one realistic mistake."""
    model = copy.deepcopy(case.model)
    mutate(model)
    cache = KVCache(model.cfg.text, len(case.ids))
    with torch.no_grad():
        return model.logits(model.language_model(model.embed(case.ids, model.encode_image(case.pixels)[0]), [cache]))


def swap_llm_layers(m):
    m.language_model.layers[0], m.language_model.layers[1] = m.language_model.layers[1], m.language_model.layers[0]


def set_rms_eps(m, eps):
    for mod in m.language_model.modules():
        if isinstance(mod, minidamro.llama.LlamaRMSNorm):
            mod.eps = eps


def vit(m, i):
    return m.vision_tower.encoder.layers[i]


MISTAKES = {
    "a lost bias (ViT out_proj, last layer)": lambda m: vit(m, -1).self_attn.out_proj.bias.zero_(),
    "RoPE base 10000 instead of the config's": lambda m: setattr(m.cfg.text, "rope_theta", 10000.0),
    "RMSNorm eps x10": lambda m: set_rms_eps(m, m.cfg.text.rms_norm_eps * 10),
    "exact GELU in the ViT instead of quick_gelu": lambda m: [setattr(layer.mlp, "act", torch.nn.functional.gelu)
                                                            for layer in m.vision_tower.encoder.layers],
    "two LLM layers swapped": swap_llm_layers,
    "one weight row off by 2^-10 relative (ViT fc1, layer 0)": lambda m: vit(m, 0).mlp.fc1.weight[0].mul_(1 + 2 ** -10),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_bounds_catch_small_real_mistakes(mistake, cases, hf_checkpoints, checkpoints, hf_tok):
    """The rounding bound of tests/tolerance.py is tight enough to fail on real mistakes, including small ones
    (an eps off by 10, one weight row off by 2^-10), while the unmutated model passes it (the tests above).
    On "gqa", the configuration with RoPE theta != 10000 and rms eps 1e-6."""
    case = get_case("gqa", cases, hf_checkpoints, checkpoints, hf_tok)
    logits = mutant_logits(case, MISTAKES[mistake])
    with pytest.raises(AssertionError, match="exceeds the rounding bound"):
        assert_close(logits, case.sdpa_logits, case.out64.logits, f"logits with {mistake}")
