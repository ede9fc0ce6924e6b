"""The attention analysis (python -m minidamro.analyze): every number of analysis.json recomputed from
transformers' eager attentions, H_i / F on planted cases with known values, the tokens equal to the decoders',
the figures, and one-line errors.

    PYTHONPATH=. python tests/test_analyze.py docs/   # regenerate the example figures of docs/methods.md (make_examples)
"""
import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny
import tolerance
from minidamro import MinidamroError, damro, generation
from minidamro.analyze import analyze, main, outlier_share, overlap, split_words, write
from minidamro.image import preprocess
from minidamro.llava import load_model, read_safetensors
from minidamro.tokenizer import Tokenizer, build_prompt, prompt_ids

PROMPT = "What can you see in this image?"
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "example.png")


@pytest.fixture(scope="module")
def image():
    return Image.open(EXAMPLE).convert("RGB")


def load(ckpt):
    model = load_model(ckpt)
    return model, Tokenizer(os.path.join(ckpt, "tokenizer.model"), model.cfg.special_tokens)


# --- H_i and F, by hand ------------------------------------------------------------------------------------

def ranked(row, i):  # the test's own top-i: plain Python, ties to the lower index
    return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:i])


def test_overlap_and_share_on_hand_made_rows():
    vit = [0.0, 0.5, 0.1, 0.3, 0.05, 0.05]  # ranking 1, 3, 2, then a tie 4 = 5 (4 first)
    dec = [0.4, 0.1, 0.0, 0.2, 0.2, 0.1]    # ranking 0, 3, 4 (tie, 3 first), 1, 5, 2
    # S_v: {1}, {1,3}, {1,3,2}, {1,3,2,4}, ...; S_l: {0}, {0,3}, {0,3,4}, {0,3,4,1}, {0,3,4,1,5}, ...
    assert [overlap(vit, dec, i) for i in range(1, 7)] == [0, 1 / 2, 1 / 3, 3 / 4, 4 / 5, 1]
    # Python floats (double): a sum of 3 and one of 6 terms, one division: within 10 double roundings
    eps = 2.0 ** -53
    assert outlier_share(vit, dec) == pytest.approx((0.1 + 0.2 + 0.0) / 1.0, rel=10 * eps, abs=0)
    assert outlier_share(dec, dec, 1) == pytest.approx(0.4, rel=10 * eps, abs=0)
    assert overlap(torch.tensor(vit), torch.tensor(vit), 4) == 1.0


def test_words_merge_pieces(checkpoints):
    _, tok = load(checkpoints["mha"])
    ids = tok.encode("A cat sits on a red sofa, next to\na window.", bos=False) + [tok.eos_id]
    words = split_words(tok, ids)
    assert [w["text"] for w in words] == ["A", "cat", "sits", "on", "a", "red", "sofa", ",", "next", "to", "\\n",
                                          "a", "window", ".", "</s>"]
    assert [n for w in words for n in w["tokens"]] == list(range(len(ids)))  # every piece, once, in order


# --- every number against transformers ---------------------------------------------------------------------

def hf_reference(hf_dir, tokenizer_model, image, tokens, mode="full", dtype=torch.float32):
    """ViT [CLS] row (patches), decoder rows over the image tokens, from LlavaForConditionalGeneration (eager);
    in float64, the exact values the float bounds measure rounding against (tests/tolerance.py)."""
    from transformers import CLIPImageProcessorPil
    model, tok = tiny.hf_model(hf_dir, dtype), tiny.hf_tokenizer(tokenizer_model)
    cfg = model.config
    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    pre.pop("image_processor_type")
    pixels = CLIPImageProcessorPil(**pre)(image, return_tensors="pt").pixel_values
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    cls_kept = cfg.vision_feature_select_strategy == "full"
    ids = [t for i in tok(f"USER: <image>\n{PROMPT} ASSISTANT:").input_ids
           for t in ([i] * (n_img + cls_kept) if i == tiny.IMAGE_TOKEN else [i])]
    layer = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1  # output of this layer
    vit_layer = model.model.vision_tower.encoder.layers[layer].self_attn
    got = {}
    hooks = [vit_layer.q_proj.register_forward_hook(lambda m, i, o: got.setdefault("q", o)),
             vit_layer.k_proj.register_forward_hook(lambda m, i, o: got.setdefault("k", o))]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids + tokens[:-1]]), pixel_values=pixels, output_attentions=True)
        vit_attn = model.model.vision_tower(pixels, output_attentions=True).attentions[layer]
    for h in hooks:
        h.remove()
    if mode == "full":  # one full-width dot product, no head split (the released DAMRO code)
        q, k = got["q"][0, 0], got["k"][0]
        cls = torch.softmax(k @ q / k.shape[-1] ** 0.5, -1)
    else:
        cls = vit_attn[0, :, 0].mean(0)
    attn = torch.stack(out.attentions)[:, 0].mean((0, 1))  # (T, T): mean over layers and heads
    image_pos = [p for p, i in enumerate(ids) if i == tiny.IMAGE_TOKEN]
    rows = attn[len(ids) - 1:, image_pos]  # the row that chose token t is at position L - 1 + t
    return ids, cls[1:], rows, int(cls_kept)


@pytest.mark.parametrize("name, method, mode", [("mha", "plain", "full"), ("gqa", "damro", "full"),
                                                ("last", "plain", "heads")])
def test_analysis_matches_transformers(name, method, mode, checkpoints, hf_checkpoints, tokenizer_model, image,
                                       tmp_path):
    model, tok = load(checkpoints[name])
    a = analyze(model, tok, image, PROMPT, method, damro.DamroConfig(topk=5, outlier_attention=mode),
                max_new_tokens=10, model_dir=checkpoints[name])
    write(a, str(tmp_path))
    js = json.loads((tmp_path / "analysis.json").read_text())
    tokens = [t["id"] for t in js["tokens"]]
    ids, vit, rows, offset = hf_reference(hf_checkpoints[name], tokenizer_model, image, tokens, mode)
    _, vit64, rows64, _ = hf_reference(hf_checkpoints[name], tokenizer_model, image, tokens, mode, torch.float64)
    assert ids == prompt_ids(tok, build_prompt(PROMPT), model.cfg.image_token_index, model.cfg.num_image_tokens)
    assert js["patch_offset"] == offset and js["grid"] ** 2 == len(vit)
    tolerance.assert_close(torch.tensor(js["vit_attention"]), vit, vit64, "analysis: ViT [CLS] attention")
    # the outliers (top 5) and H_i (top i <= 10) rank the ViT row: no near-tie among its 10 greatest
    tolerance.assert_clear_ranking(vit, tolerance.bound(vit, vit64).max().item(), "analysis: ViT [CLS] attention", k=10)
    assert js["outliers"] == vit.topk(5).indices.tolist()
    assert len(tokens) == len(rows) == 10 and js["answer"] == tok.decode(tokens)
    top3 = list(ranked(vit.tolist(), 3))
    for t, row, row64 in zip(js["tokens"], rows, rows64):
        tolerance.assert_close(torch.tensor(t["attention"]), row, row64, "analysis: decoder attention row")
        # H_i ranks each row's patches up to i = 10 and compares with the ViT ranking: no near-tie there
        tolerance.assert_clear_ranking(row[offset:], tolerance.bound(row, row64).max().item(),
                                       "analysis: decoder attention row", k=10)
        patches = row[offset:].tolist()  # with [CLS] kept, image token 0 is [CLS]: H and F are over the patches
        assert t["H"] == [len(ranked(vit.tolist(), i) & ranked(patches, i)) / i for i in range(1, 11)]
        # F = a / b (a: the row's attention on the ViT's top 3 patches, b: on all patches), in float64 from the
        # float32 row as analyze does: the row's elementwise bound t propagates to |dF| <= sum_top3 t / b +
        # a sum t / b^2 (first order; the float64 roundings are 1e-16).
        p, t_p = row[offset:].double(), tolerance.bound(row, row64)[offset:]
        a, b = p[top3].sum(), p.sum()
        bound_F = (t_p[top3].sum() / b + a * t_p.sum() / b ** 2).item()
        assert abs(t["F"] - (a / b).item()) <= bound_F, f"analysis: F {t['F']} vs {(a / b).item()}, bound {bound_F:.3g}"
        names = {tiny.IMAGE_TOKEN: "<image>", tiny.PAD_TOKEN: "<pad>"}  # and no piece at all for ids 402..
        piece = tok.sp.id_to_piece(t["id"]) if t["id"] < tiny.SP_VOCAB else names.get(t["id"], f"<id {t['id']}>")
        assert t["piece"] == piece


@pytest.mark.parametrize("method, temperature", [("plain", 0.0), ("plain", 1.0), ("damro", 0.0), ("damro", 1.0)])
def test_tokens_are_the_decoders(method, temperature, checkpoints, image):
    model, tok = load(checkpoints["gqa"])
    dcfg = damro.DamroConfig(alpha=1.0, topk=4)
    a = analyze(model, tok, image, PROMPT, method, dcfg, temperature=temperature, seed=7, max_new_tokens=8)
    ids = torch.tensor(prompt_ids(tok, build_prompt(PROMPT), model.cfg.image_token_index, model.cfg.num_image_tokens))
    pixels = preprocess(image, model.cfg.preprocessor)
    sampler = generation.Sampler(temperature, 1.0, 7)
    if method == "plain":
        expected = list(generation.generate(model, ids, pixels, sampler, 8))
    else:
        outliers, gen = damro.generate(model, ids, pixels, dcfg, sampler, 8)
        expected = list(gen)
        assert a.outliers == outliers
    assert [t.id for t in a.tokens] == expected


# --- a planted model: the ViT attends to known patches, the decoder attends uniformly ------------------------

ORDER = [5, 0, 9, 14, 3, 10, 1, 12, 7, 2, 15, 6, 11, 4, 13, 8]  # the planted ranking of the 16 patches


def plant(src: str, dst: str) -> str:
    """The "mha" checkpoint with: ViT token k embedded as the one-hot e_k, layer 0 the identity, and the
    selection layer's [CLS] query (a q_proj bias) scoring patch j by its rank in ORDER against identity keys;
    every LLM q_proj zero, so each decoder position attends uniformly to the positions before it."""
    shutil.copytree(src, dst)
    w = {k: v.clone() for k, v in read_safetensors(os.path.join(src, "model.safetensors")).items()}
    vt, d = "vision_tower.", 32
    w[vt + "embeddings.patch_embedding.weight"].zero_()
    w[vt + "embeddings.class_embedding"].zero_()
    w[vt + "embeddings.position_embedding.weight"] = torch.eye(17, d)
    for k in ("pre_layrnorm", "encoder.layers.1.layer_norm1"):
        w[vt + k + ".weight"].fill_(1)
        w[vt + k + ".bias"].zero_()
    for k in ("self_attn.out_proj", "mlp.fc2"):  # layer 0 adds nothing to the residual stream
        w[vt + f"encoder.layers.0.{k}.weight"].zero_()
        w[vt + f"encoder.layers.0.{k}.bias"].zero_()
    sel = vt + "encoder.layers.1.self_attn."
    w[sel + "q_proj.weight"].zero_()
    w[sel + "q_proj.bias"] = torch.zeros(d).index_put_((torch.tensor(ORDER) + 1,), torch.arange(16.0, 0, -1))
    w[sel + "k_proj.weight"], w[sel + "k_proj.bias"] = torch.eye(d), torch.zeros(d)
    for layer in range(2):
        w[f"language_model.layers.{layer}.self_attn.q_proj.weight"].zero_()
    save_file(w, os.path.join(dst, "model.safetensors"))
    return dst


def test_planted_attention_gives_known_h_and_f(checkpoints, image, tmp_path):
    model, tok = load(plant(checkpoints["mha"], str(tmp_path / "planted")))
    a = analyze(model, tok, image, PROMPT, "plain", damro.DamroConfig(topk=10), max_new_tokens=4)
    assert sorted(range(16), key=lambda j: -a.vit_attention[j]) == ORDER
    assert a.outliers == ORDER[:10]
    L = len(prompt_ids(tok, build_prompt(PROMPT), model.cfg.image_token_index, model.cfg.num_image_tokens))
    # uniform decoder attention: all 16 image tokens tie, so S_l(i) = {0, ..., i - 1} (ties to the lower index)
    expected_h = [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5, 3 / 6, 4 / 7, 4 / 8, 5 / 9, 7 / 10]
    # Float bounds from the rounding of these computations (u = 2^-24): each probability is exp(0) = 1 over an
    # integer sum, one rounding; the mean of 2 layers x 4 heads of equal values adds at most 7 (the division by
    # 8 is exact), so rel 9u. F = (sum of 3 equal values) / (sum of 16): at most 2 + 15 + 1 roundings, rel 18u.
    u = tolerance.unit_roundoff(torch.float32)
    for t, token in enumerate(a.tokens):
        assert token.attention == pytest.approx([1 / (L + t)] * 16, rel=9 * u, abs=0)
        assert token.H == expected_h
        assert token.F == pytest.approx(3 / 16, rel=18 * u, abs=0)


# --- files and the command line ----------------------------------------------------------------------------

def run(capsys, *argv):
    """main's exit status and stderr, as a shell would see them: sys.exit("error: ...") prints its message
    on stderr and exits 1; argparse writes the message itself and exits 2."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    _, err = capsys.readouterr()
    code = e.value.code
    return (1, err + code + "\n") if isinstance(code, str) else (code, err)


def test_command_writes_four_files(checkpoints, capsys, tmp_path):
    out = tmp_path / "a" / "b"
    main([EXAMPLE, "--model", checkpoints["mha"], "--out", str(out), "--max-new-tokens", "8", "--seed", "3",
          "--method", "damro", "--topk", "3", "--temperature", "1"])
    text, err = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["analysis.json", "decoder_attention.png", "vit_attention.png",
                                      "vit_outliers.png"]  # no .tmp
    js = json.loads((out / "analysis.json").read_text())
    assert text.strip() == js["answer"].strip() and "wrote" in err
    assert js["settings"]["method"] == "damro"
    assert js["settings"]["seed"] == 3 and js["model"] == checkpoints["mha"] and len(js["outliers"]) == 3
    with Image.open(out / "vit_attention.png") as im:
        assert im.format == "PNG" and im.height == 92 + 448 + 16 and im.width > 2 * 448  # 4 x 4 patches of 112 px
    with Image.open(out / "decoder_attention.png") as im:
        rows = -(-len(js["words"]) // 6)
        assert im.format == "PNG" and im.height == 76 + rows * (180 + 46 + 16)  # 4 x 4 patches of 45 px


@pytest.mark.parametrize("case, message", [
    ("no model", "no model"), ("missing model", "does not exist"), ("bad image", "cannot read image"),
    ("topk 0", "--topk"), ("no tokens", "--max-new-tokens"), ("bad method", "invalid choice"),
    ("out is a file", "cannot write")])
def test_errors_are_one_line(case, message, checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MINIDAMRO_MODEL", raising=False)
    monkeypatch.setattr("minidamro.toy.MODEL_DIR", str(tmp_path / "no-toy-model"))  # as if none were shipped
    image, out, model = EXAMPLE, str(tmp_path / "out"), ["--model", checkpoints["mha"]]
    if case == "bad image":
        image = str(tmp_path / "x.png")
        open(image, "w").write("not an image")
    if case == "out is a file":
        open(out, "w").write("")
    extra = {"no model": [], "missing model": ["--model", str(tmp_path / "nowhere")], "topk 0": model + ["--topk", "0"],
             "no tokens": model + ["--max-new-tokens", "0"], "bad method": model + ["--method", "other"]}
    code, err = run(capsys, image, "--out", out, *extra.get(case, model))
    assert code != 0 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(out) or case == "out is a file"


def test_api_rejects_bad_settings(checkpoints, image):
    model, tok = load(checkpoints["mha"])
    for kwargs in (dict(method="other"), dict(dcfg=damro.DamroConfig(topk=17)), dict(max_new_tokens=0)):
        with pytest.raises(MinidamroError, match="method|topk|max-new-tokens"):
            analyze(model, tok, image, PROMPT, **kwargs)


# --- the example figures of docs/methods.md --------------------------------------------------------------------------

def make_examples(docs: str):
    """docs/vit_attention.png and docs/decoder_attention.png: `python -m minidamro.analyze docs/example.png` on a
    tiny RANDOM checkpoint with LLaVA-1.5's image geometry (336 px, 14 px patches: 24 x 24 = 576 image tokens),
    so the figures show the layout of a real run but no semantics."""
    import tempfile
    import weights_convert
    tiny.CONFIGS["example"] = dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, rms_norm_eps=1e-5),
        vision_feature_layer=-2, vision_feature_select_strategy="default", size=336)
    with tempfile.TemporaryDirectory() as tmp:
        hf, model, out = (os.path.join(tmp, d) for d in ("hf", "tiny-random-llava-336", "out"))
        tiny.build_hf_checkpoint("example", hf, tiny.train_tokenizer(os.path.join(tmp, "tok")), seed=0)
        weights_convert.convert(hf, model)
        with open(os.path.join(model, "config.json")) as f:  # tiny's 512 positions < 576 image tokens
            cfg = json.load(f)
        cfg["text"]["max_position_embeddings"] = 1024  # RoPE has no table: only the limit changes
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(cfg, f)
        main([EXAMPLE, "--model", model, "--out", out, "--seed", "0", "--temperature", "1",
              "--max-new-tokens", "16"])
        for name in ("vit_attention.png", "decoder_attention.png"):
            shutil.copy(os.path.join(out, name), os.path.join(docs, name))


if __name__ == "__main__":
    make_examples(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(EXAMPLE))
