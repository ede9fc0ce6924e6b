"""InstructBLIP against transformers' InstructBlipForConditionalGeneration (float32, eager attention).

On each tiny configuration (MHA / GQA decoder, 5 / 7 queries, two ViT and Q-Former shapes), minidamro's
inputs must be the processor's (pixels bit for bit, LLM ids, Q-Former ids), every stage must match within the
rounding bound of tests/tolerance.py (ViT hidden states, post-LayerNorm image tokens, Q-Former query outputs and
cross-attention, projected features, logits), greedy tokens must equal generate()'s and seeded sampling must
follow the sampling contract on HF's logits.
"""
import random

import pytest
import torch
from PIL import Image

import tiny_blip
import tolerance
from minidamro import contrastive, vcd
from minidamro.capture import Capture
from minidamro.generation import Sampler, generate, new_cache, prefill
from minidamro.image import preprocess
from minidamro.llava import load_model
from minidamro.tokenizer import instruction_ids, load_tokenizer, model_prompt_ids

NAMES = list(tiny_blip.CONFIGS)
PROMPTS = ["Is there a dog in the image? Please answer this question with one word.",  # the DAMRO scripts' POPE
           "Generate a short caption of this image.",                                 # their CHAIR prompt
           "Write a short description for the image.", "What colour is the café's 2nd chair, naïvely?"]


def noise_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, (w, h), random.Random(seed).randbytes(bands * w * h))


IMAGES = {"rgb": noise_image(53, 71, 7), "gray": noise_image(40, 33, 2, "L"), "rgba": noise_image(30, 30, 3, "RGBA"),
          "tiny": noise_image(3, 5, 4), "wide": noise_image(300, 17, 5),
          "rgb24": noise_image(53, 71, 24)}  # its top 11 [CLS] scores are clear of near-ties on both tiny models


class Case:
    def __init__(self, hf_dir, model_dir):
        self.hf_dir = hf_dir
        self.hf = tiny_blip.hf_model(hf_dir)
        self.hf64 = tiny_blip.hf_model(hf_dir, dtype=torch.float64)
        self.processor = tiny_blip.hf_processor(hf_dir)
        self.model = load_model(model_dir)
        self.model_dir = model_dir
        self.tok = load_tokenizer(model_dir, self.model.cfg)

    def inputs(self, image, prompt):
        """Our pixels, LLM ids and Q-Former ids, and the processor's."""
        cfg = self.model.cfg
        ours = (preprocess(image, cfg.preprocessor), torch.tensor(model_prompt_ids(self.tok, cfg, prompt)),
                instruction_ids(self.tok, cfg, prompt))
        return ours, self.processor(images=image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def cases():
    return {}


@pytest.fixture(params=NAMES)
def case(request, cases, blip_hf_checkpoints, blip_checkpoints) -> Case:
    if request.param not in cases:
        cases[request.param] = Case(blip_hf_checkpoints[request.param], blip_checkpoints[request.param])
    return cases[request.param]


def assert_close(got, expected, exact, what):
    assert got.dtype == expected.dtype == torch.float32 and exact.dtype == torch.float64, what
    tolerance.assert_close(got, expected, exact, what)


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("image", list(IMAGES))
def test_inputs_are_the_processors(case, image):
    """BLIP preprocessing bit for bit (BlipImageProcessorPil: squashed to S x S bicubic, no crop); the LLM ids as
    the processor builds them (query slots, then BOS "</s>" = 2, then the raw prompt); the Q-Former ids."""
    for prompt in PROMPTS:
        (pixels, ids, instruction), expected = case.inputs(IMAGES[image], prompt)
        assert torch.equal(pixels, expected.pixel_values)
        assert ids.tolist() == expected.input_ids[0].tolist()
        assert instruction.tolist() == expected.qformer_input_ids[0].tolist()
    n = case.model.cfg.num_query_tokens
    assert ids[:n + 1].tolist() == [tiny_blip.IMAGE_TOKEN] * n + [tiny_blip.BOS]


# ------------------------------------------------------------------------------------------------ stages


def hf_stages(hf, pixels, ids, instruction):
    with torch.no_grad():
        feats = hf.get_image_features(pixels.to(hf.dtype), instruction[None], output_hidden_states=True,
                                      output_attentions=True, return_dict=True)
        logits = hf(input_ids=ids[None], pixel_values=pixels.to(hf.dtype), qformer_input_ids=instruction[None]).logits
    return feats, logits[0]


def test_stages_match_transformers(case):
    """ViT hidden states (every layer), the post-LayerNorm image tokens, the Q-Former's query rows and its
    cross-attention to the image, the projected features, the logits of every prompt position."""
    (pixels, ids, instruction), _ = case.inputs(IMAGES["rgb"], PROMPTS[0])
    m, cfg = case.model, case.model.cfg
    exp, logits = hf_stages(case.hf, pixels, ids, instruction)
    exact, logits64 = hf_stages(case.hf64, pixels, ids, instruction)

    vit_layers = tuple(range(cfg.vision.num_hidden_layers))  # every layer eager, the reference's arithmetic
    cross = tuple(range(0, cfg.qformer.num_hidden_layers, cfg.qformer.cross_attention_frequency))
    capture, hidden = Capture(vit_layers=vit_layers, qformer_layers=cross), []
    tokens = m.encode_image(pixels, capture, hidden)
    vision, vision64 = exp.vision_outputs, exact.vision_outputs
    assert len(hidden) == len(vision.hidden_states) == cfg.vision.num_hidden_layers + 1
    for i, h in enumerate(hidden):
        assert_close(h, vision.hidden_states[i], vision64.hidden_states[i], f"ViT hidden state {i}")
    for i in vit_layers:
        assert_close(capture.vit_attn[i], vision.attentions[i], vision64.attentions[i], f"ViT attention {i}")
    assert_close(tokens, vision.last_hidden_state, vision64.last_hidden_state, "post-LayerNorm image tokens")

    q = cfg.num_query_tokens
    queries = m.qformer(instruction[None], m.query_tokens, tokens, capture)
    assert_close(queries, exp.qformer_outputs.last_hidden_state[:, :q],
                 exact.qformer_outputs.last_hidden_state[:, :q], "Q-Former query outputs")
    assert sorted(capture.qformer_cross_attn) == list(cross)
    for j, i in enumerate(cross):  # HF records the cross-attention layers only, in order
        assert_close(capture.qformer_cross_attn[i], exp.qformer_outputs.cross_attentions[j],
                     exact.qformer_outputs.cross_attentions[j], f"Q-Former cross-attention {i}")
    features = m.image_features(pixels, instruction=instruction)
    assert_close(features, exp.pooler_output[0], exact.pooler_output[0], "projected query features")

    cache = new_cache(m, len(ids))
    h = m.language_model(m.embed(ids, features), [cache])
    assert_close(m.logits(h[0]), logits, logits64, "logits")


def test_fast_path_features_and_logits(case):
    """Without capture every attention takes SDPA; its reference is HF's SDPA model."""
    from transformers import InstructBlipForConditionalGeneration
    (pixels, ids, instruction), _ = case.inputs(IMAGES["wide"], PROMPTS[1])
    sdpa = InstructBlipForConditionalGeneration.from_pretrained(case.hf_dir, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    _, logits = hf_stages(sdpa, pixels, ids, instruction)
    _, logits64 = hf_stages(case.hf64, pixels, ids, instruction)
    m = case.model
    cache = new_cache(m, len(ids))
    got = prefill(m, m.embed(ids, m.image_features(pixels, instruction=instruction)), cache)
    assert_close(got, logits[-1], logits64[-1], "last-position logits, fast path")


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("image,prompt", [("rgb", 2), ("gray", 0), ("wide", 3)])
def test_greedy_tokens_equal_generate(case, image, prompt):
    """Greedy new tokens equal HF generate(do_sample=False) (which returns the prompt first), EOS included."""
    n = 20
    (pixels, ids, instruction), inputs = case.inputs(IMAGES[image], PROMPTS[prompt])
    with torch.no_grad():
        out = case.hf.generate(**inputs, do_sample=False, max_new_tokens=n, output_scores=True,
                               return_dict_in_generate=True)
    _, logits = hf_stages(case.hf, pixels, ids, instruction)
    _, logits64 = hf_stages(case.hf64, pixels, ids, instruction)
    tolerance.assert_clear_argmax(torch.cat(out.scores), tolerance.bound(logits, logits64).max().item(),
                                  "HF's greedy logits")
    expected = out.sequences[0, len(ids):].tolist()
    got = list(generate(case.model, ids, pixels, Sampler(), n, instruction=instruction))
    assert got == expected and (len(got) == n or got[-1] == 2)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_seeded_sampling_follows_the_contract(case, temperature, top_p):
    """One generator seeded once, one multinomial per token of the float32 softmax of HF's logits / T (top-p as
    transformers' warper)."""
    from transformers.generation.logits_process import TopPLogitsWarper
    n, seed = 16, 99
    (pixels, ids, instruction), inputs = case.inputs(IMAGES["rgb"], PROMPTS[2])
    g, expected = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        out = case.hf(**inputs)
        logits, cache = out.logits, out.language_model_outputs.cache
        for _ in range(n):
            scores = logits[0, -1].float() / temperature
            if top_p < 1:
                scores = TopPLogitsWarper(top_p)(None, scores[None])[0]
            t = torch.multinomial(torch.softmax(scores, -1, dtype=torch.float32), 1, generator=g)
            expected.append(int(t))
            if expected[-1] == 2:
                break
            out = case.hf.language_model(input_ids=t[None], cache=cache)
            logits, cache = out.logits, out.cache
    got = list(generate(case.model, ids, pixels, Sampler(temperature, top_p, seed=seed), n, instruction=instruction))
    assert got == expected


def test_vcd_noises_the_image_through_vit_and_qformer(case):
    """VCD's second stream: the noised pixels (one draw from the generator) through the ViT and the Q-Former under
    the same instruction: HF's features of those pixels; a seed fixes the tokens."""
    (pixels, ids, instruction), _ = case.inputs(IMAGES["rgb"], PROMPTS[0])
    cfg = vcd.VcdConfig()
    p = vcd.prepare(case.model, pixels, cfg, torch.Generator().manual_seed(5), instruction=instruction)
    noised = vcd.noised_pixels(pixels, cfg.noise_step, torch.Generator().manual_seed(5))
    with torch.no_grad():
        exp = case.hf.get_image_features(noised, instruction[None]).pooler_output[0]
        exact = case.hf64.get_image_features(noised.double(), instruction[None]).pooler_output[0]
    assert_close(p.features[1], exp, exact, "VCD's noised-stream features")
    runs = [list(contrastive.generate(case.model, ids, pixels, vcd.METHOD, None, Sampler(1.0, seed=s), 10,
                                      instruction=instruction)[1]) for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]


def test_image_features_need_the_instruction(case):
    (pixels, _, _), _ = case.inputs(IMAGES["rgb"], PROMPTS[0])
    with pytest.raises(ValueError, match="instruction"):
        case.model.image_features(pixels)
