"""weights_convert.py: the three key layouts, single-file and sharded, dtypes, one-line errors, atomic output;
and minidamro.llava.load_model's strictness on a converted directory."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
import tolerance
import weights_convert
from minidamro import MinidamroError
from minidamro.image import LLAVA_PREPROCESSOR
from minidamro.llama import KVCache
from minidamro.llava import load_model, read_config

NAME = "gqa"  # GQA, positive feature layer 2 of 4: layers 2, 3 and post_layernorm exist but are not built
AUX = ["tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"]
LAYOUTS = ["hub", "hub-sharded", "v5", "v5-sharded", "inmem", "inmem-sharded"]


def minidamro_name(key: str) -> str:  # transformers v5 save_pretrained name -> minidamro's
    return key.replace("language_model.model.", "language_model.").replace("language_model.lm_head.", "lm_head.")


def save_sharded(tensors: dict, d: str, n: int = 3):
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, os.path.join(d, shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def edit_json(path: str, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def v4_config(c: dict):  # as transformers v4 wrote it: rope_theta, torch_dtype (and image_token_id: also accepted)
    c["text_config"]["rope_theta"] = c["text_config"].pop("rope_parameters")["rope_theta"]
    c["torch_dtype"], c["image_token_id"] = c.pop("dtype"), c.pop("image_token_index")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_model):
    """layout -> a checkpoint directory holding the same random model; "ref" -> its tensors (v5 names)."""
    root = tmp_path_factory.mktemp("layouts")
    base = tiny.build_hf_checkpoint(NAME, str(root / "v5"), tokenizer_model, seed=7)
    model = tiny.hf_model(base)
    out = {"v5": base, "ref": load_file(os.path.join(base, "model.safetensors")), "hf_model": model,
           "hf_model64": tiny.hf_model(base, dtype=torch.float64)}  # the exact values, for the float bound
    for layout, kwargs in [("v5-sharded", dict(max_shard_size="20KB")),
                           ("inmem", dict(save_original_format=False)),
                           ("inmem-sharded", dict(save_original_format=False, max_shard_size="20KB"))]:
        out[layout] = str(root / layout)
        model.save_pretrained(out[layout], **kwargs)
    # The hub layout (transformers v4): vision_model. inside the tower, a v4 config, saved buffers.
    hub = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in out["ref"].items()}
    hub["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    hub["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    for layout in ("hub", "hub-sharded"):
        d = out[layout] = str(root / layout)
        os.makedirs(d)
        shutil.copy(os.path.join(base, "config.json"), d)
        edit_json(os.path.join(d, "config.json"), v4_config)
        if layout == "hub":
            save_file(hub, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        else:
            save_sharded(hub, d)
    for layout in LAYOUTS:
        for f in AUX:
            if not os.path.exists(os.path.join(out[layout], f)):
                shutil.copy(os.path.join(base, f), out[layout])
    assert len([f for f in os.listdir(out["v5-sharded"]) if f.endswith(".safetensors")]) > 2
    assert any(k.startswith("model.vision_tower.") for k in load_file(os.path.join(out["inmem"], "model.safetensors")))
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted_layouts")
    out = {}
    for layout in LAYOUTS:
        out[layout] = str(root / layout)
        weights_convert.convert(sources[layout], out[layout])
    return out


@torch.inference_mode()
def minidamro_logits(model, ids, pixels):
    x = model.embed(ids, model.encode_image(pixels)[0])
    return model.logits(model.language_model(x, [KVCache(model.cfg.text, len(ids))])[0])


# --- the three layouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_converts_to_the_source_tensors(layout, sources, converted):
    state = load_model(converted[layout]).state_dict()
    ref = {minidamro_name(k): v for k, v in sources["ref"].items()}
    assert set(ref) - set(state) == {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"} | {
        k for k in ref if k.startswith(("vision_tower.encoder.layers.2.", "vision_tower.encoder.layers.3."))}
    assert set(state) <= set(ref)
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k
    assert read_config(converted[layout]) == read_config(converted["v5"])  # v4 and v5 config.json styles alike
    assert open(os.path.join(converted[layout], "tokenizer.model"), "rb").read() == \
        open(os.path.join(sources[layout], "tokenizer.model"), "rb").read()


def test_all_layouts_give_identical_logits(sources, converted):
    cfg = read_config(converted["v5"])
    assert cfg.num_image_tokens == 26 and cfg.text.rope_theta == 500000.0 and cfg.text.num_key_value_heads == 2
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 30, 30)
    ids = torch.tensor([1, 5, 9] + [tiny.IMAGE_TOKEN] * cfg.num_image_tokens + [17, 3, 250, 401])
    logits = [minidamro_logits(load_model(converted[layout]), ids, pixels) for layout in LAYOUTS]
    for layout, x in zip(LAYOUTS, logits):
        assert torch.equal(x, logits[0]), layout
    with torch.inference_mode():
        hf = sources["hf_model"](input_ids=ids[None], pixel_values=pixels).logits[0]
        exact = sources["hf_model64"](input_ids=ids[None], pixel_values=pixels).logits[0]
    tolerance.assert_close(logits[0], hf, exact, "logits of the converted checkpoint")  # the rule of test_parity.py


@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_fixture_checkpoints_match_their_sources(name, hf_checkpoints, checkpoints):
    ref = {minidamro_name(k): v for k, v in load_file(os.path.join(hf_checkpoints[name], "model.safetensors")).items()}
    for k, v in load_model(checkpoints[name]).state_dict().items():
        assert torch.equal(v, ref[k]), k
    cfg = read_config(checkpoints[name])
    assert cfg.special_tokens == {"<image>": tiny.IMAGE_TOKEN, "<pad>": tiny.PAD_TOKEN}
    assert cfg.preprocessor == {k: v for k, v in tiny.preprocessor_config(name).items() if k != "image_processor_type"}
    assert cfg.torch_dtype == "float32"


# --- dtypes and the file format ---------------------------------------------------------------------------

def header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("dtype,code", [("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32")])
def test_dtype_changes_the_stored_dtype(dtype, code, sources, tmp_path):
    out = str(tmp_path / "out")
    weights_convert.main([sources["v5-sharded"], out, "--dtype", dtype])
    path = os.path.join(out, "model.safetensors")
    n, h = header(path)
    assert n % 8 == 0 and h.pop("__metadata__") == {"format": "pt"}
    assert {v["dtype"] for v in h.values()} == {code}
    assert read_config(out).torch_dtype == dtype
    ref = {minidamro_name(k): v for k, v in sources["ref"].items()}
    with safe_open(path, framework="pt") as f:  # the format is right: safetensors itself reads it
        assert set(f.keys()) == set(h)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), ref[k].to(getattr(torch, dtype))), k
    assert load_model(out).lm_head.weight.dtype == getattr(torch, dtype)


def test_default_dtype_is_the_sources(sources, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(sources["v5"], src)
    half = {k: v.half() for k, v in sources["ref"].items()}
    save_file(half, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    weights_convert.convert(src, str(tmp_path / "out"))
    _, h = header(str(tmp_path / "out" / "model.safetensors"))
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"F16"}
    assert torch.equal(load_model(str(tmp_path / "out")).lm_head.weight, half["language_model.lm_head.weight"])


def test_tied_embeddings_without_lm_head(sources, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(sources["v5"], src)
    ref = dict(sources["ref"])
    del ref["language_model.lm_head.weight"]
    save_file(ref, os.path.join(src, "model.safetensors"))
    edit_json(os.path.join(src, "config.json"), lambda c: c.update(tie_word_embeddings=True))
    weights_convert.convert(src, str(tmp_path / "out"))
    model = load_model(str(tmp_path / "out"))
    assert torch.equal(model.lm_head.weight, ref["language_model.model.embed_tokens.weight"])


# --- config, preprocessing and tokens ---------------------------------------------------------------------

LLAVA_HF_7B = {  # llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): most text fields omitted
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


@pytest.mark.parametrize("case", ["llava-hf-7b", "no-vision-config", "empty-sub-configs", "sparse", "tiny-v5"])
def test_config_defaults_are_transformers(case, sources):
    """Our defaults for omitted fields must be exactly what transformers fills in."""
    from transformers import LlavaConfig as HFLlavaConfig
    d = {"llava-hf-7b": LLAVA_HF_7B,
         "no-vision-config": {"model_type": "llava", "image_token_id": 7},  # ViT-L/14-336
         "empty-sub-configs": {"model_type": "llava", "vision_config": {}, "text_config": {}, "image_token_index": 5},
         "sparse": {"model_type": "llava", "vision_config": {"patch_size": 16},
                    "text_config": {"num_attention_heads": 8, "num_key_value_heads": None, "head_dim": None,
                                    "vocab_size": 32064,
                                    "rope_scaling": None, "rope_theta": 20000.0}},
         "tiny-v5": json.load(open(os.path.join(sources["v5"], "config.json")))}[case]
    cfg = weights_convert.build_config(json.loads(json.dumps(d)), "config.json")
    hf = HFLlavaConfig.from_dict(json.loads(json.dumps(d)))
    for name, value in vars(cfg.vision).items():
        assert value == getattr(hf.vision_config, name), name
    for name, value in vars(cfg.text).items():
        if name == "quantization":  # minidamro's own (weights_convert.py --quantize): none unless asked
            assert value == "", name
            continue
        want = hf.text_config.rope_parameters["rope_theta"] if name == "rope_theta" else getattr(hf.text_config, name)
        assert value == want, name
    assert (cfg.image_token_index, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == \
        (hf.image_token_index, hf.vision_feature_layer, hf.vision_feature_select_strategy)
    if case == "llava-hf-7b":
        assert (cfg.text.head_dim, cfg.text.num_key_value_heads, cfg.num_image_tokens) == (128, 32, 576)


def test_preprocessor_sources(sources, tmp_path, capsys):
    src = str(tmp_path / "src")
    shutil.copytree(sources["v5"], src)
    p = json.load(open(os.path.join(src, "preprocessor_config.json")))
    os.rename(os.path.join(src, "preprocessor_config.json"), os.path.join(src, "x.json"))
    with open(os.path.join(src, "processor_config.json"), "w") as f:  # what transformers v5 writes
        json.dump({"image_processor": p, "patch_size": 6}, f)
    weights_convert.convert(src, str(tmp_path / "out"))
    assert read_config(str(tmp_path / "out")).preprocessor == {k: p[k] for k in LLAVA_PREPROCESSOR}
    # Neither file: llava-hf's settings, with a note. They are 336 px: right for the 7B model, not this one.
    os.remove(os.path.join(src, "processor_config.json"))
    cfg = weights_convert.build_config(LLAVA_HF_7B, "config.json")
    assert weights_convert.read_preprocessor(src, cfg) == LLAVA_PREPROCESSOR
    assert "note:" in capsys.readouterr().out
    with pytest.raises(MinidamroError, match="preprocessed to .*336.* takes 30x30"):
        weights_convert.convert(src, str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")


def test_special_tokens_sources(sources, tmp_path):
    cfg = weights_convert.build_config(json.load(open(os.path.join(sources["v5"], "config.json"))), "config.json")
    d = str(tmp_path)
    assert weights_convert.read_special_tokens(d, cfg, tiny.SP_VOCAB) == {"<image>": tiny.IMAGE_TOKEN}
    with open(os.path.join(d, "added_tokens.json"), "w") as f:
        json.dump({"<pad>": tiny.PAD_TOKEN, "<image>": tiny.IMAGE_TOKEN}, f)
    assert weights_convert.read_special_tokens(d, cfg, tiny.SP_VOCAB) == {"<image>": 400, "<pad>": 401}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:  # ids inside the sentencepiece vocabulary: left out
        json.dump({"added_tokens": [{"id": 1, "content": "<s>"}, {"id": 402, "content": "<extra>"}]}, f)
    assert weights_convert.read_special_tokens(d, cfg, tiny.SP_VOCAB) == {"<image>": 400, "<pad>": 401, "<extra>": 402}


# --- one-line errors, nothing left behind -----------------------------------------------------------------

def drop_key(src, key):
    path = os.path.join(src, "model.safetensors")
    w = load_file(path)
    del w[key]
    save_file(w, path)


def bad_weights(src):  # one missing, one unexpected, one mis-shaped: all named in the one line
    path = os.path.join(src, "model.safetensors")
    w = load_file(path)
    del w["language_model.model.norm.weight"]
    w["language_model.model.extra.weight"] = torch.zeros(2)
    w["multi_modal_projector.linear_1.bias"] = torch.zeros(3)
    save_file(w, path)


def shard(src, i):
    return os.path.join(src, sorted(f for f in os.listdir(src) if f.startswith("model-"))[i])


def truncate(path, n=None):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100 if n is None else n)


ERRORS = {  # case -> (how to break a copy of the v5 (or v5-sharded) checkpoint, what the error says)
    "no-src": (lambda s: shutil.rmtree(s), "does not exist"),
    "no-config": (lambda s: os.remove(os.path.join(s, "config.json")), "config.json"),
    "bad-json": (lambda s: open(os.path.join(s, "config.json"), "w").write("{"), "cannot read"),
    "mistral": (lambda s: edit_json(os.path.join(s, "config.json"), lambda c: c.update(model_type="mistral")),
                "model_type 'mistral' is not supported"),
    # a LLaVA-1.5 checkpoint declared NeXT: the default pinpoints (336 px) do not tile 30 px, [CLS] is kept
    "llava-next": (lambda s: edit_json(os.path.join(s, "config.json"), lambda c: c.update(model_type="llava_next")),
                   "unsupported image_grid_pinpoints [[336, 672]"),
    "next-no-newline": (lambda s: edit_json(os.path.join(s, "config.json"), lambda c: c.update(
        model_type="llava_next", image_grid_pinpoints=[[30, 60]], vision_feature_select_strategy="default")),
        "missing: image_newline"),
    "feature-layers": (lambda s: edit_json(os.path.join(s, "config.json"),
                                           lambda c: c.update(vision_feature_layer=[-2, -5])), "vision_feature_layer"),
    "rope-scaling": (lambda s: edit_json(os.path.join(s, "config.json"), lambda c: c["text_config"].update(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})), "rope_type 'linear'"),
    "text-act": (lambda s: edit_json(os.path.join(s, "config.json"),
                                     lambda c: c["text_config"].update(hidden_act="gelu")), "hidden_act 'gelu'"),
    "crop-size": (lambda s: edit_json(os.path.join(s, "preprocessor_config.json"),
                                      lambda c: c.update(crop_size={"height": 336, "width": 336})), "30x30"),
    "no-tokenizer": (lambda s: os.remove(os.path.join(s, "tokenizer.model")), "sentencepiece tokenizer.model"),
    "bad-tokenizer": (lambda s: open(os.path.join(s, "tokenizer.model"), "wb").write(b"junk"), "tokenizer"),
    "no-weights": (lambda s: os.remove(os.path.join(s, "model.safetensors")), "no model.safetensors"),
    "truncated": (lambda s: truncate(os.path.join(s, "model.safetensors")), "cannot read weights"),
    "bad-header": (lambda s: truncate(os.path.join(s, "model.safetensors"), 50), "cannot read weights"),
    "missing-key": (lambda s: drop_key(s, "language_model.model.layers.1.mlp.up_proj.weight"),
                    "missing: language_model.layers.1.mlp.up_proj.weight"),
    "bad-weights": (bad_weights, "missing: language_model.norm.weight; unexpected: language_model.extra.weight; "
                                 "mis-shaped: multi_modal_projector.linear_1.bias (3,) != (64,)"),
    "missing-shard": (lambda s: os.remove(shard(s, 1)),
                      "names shard model-00002-of-"),
    "corrupt-shard": (lambda s: truncate(shard(s, 0)),
                      "cannot read weights"),
}


def assert_clean(out):
    parent, name = os.path.split(out)
    assert not os.path.lexists(out)
    assert [f for f in os.listdir(parent) if f.startswith(name)] == []


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line(case, sources, tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(sources["v5-sharded" if "shard" in case else "v5"], src)
    breaks, says = ERRORS[case]
    breaks(src)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        weights_convert.main([src, out])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert_clean(out)


def test_error_while_writing_leaves_nothing(sources, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")

    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(weights_convert.shutil, "copyfile", fail)  # after model.safetensors is written
    with pytest.raises(SystemExit):
        weights_convert.main([sources["v5"], out])
    assert capsys.readouterr().err == f"error: cannot write {out}: [Errno 28] No space left on device\n"
    assert_clean(out)
    monkeypatch.setattr(weights_convert.shutil, "copyfile", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        weights_convert.convert(sources["v5"], out)
    assert_clean(out)


def test_existing_output_needs_force(sources, converted, tmp_path, capsys):
    out = str(tmp_path / "out")
    weights_convert.main([sources["v5"], out])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        weights_convert.main([sources["v5"], out, "--dtype", "bfloat16"])
    assert capsys.readouterr().err.count("\n") == 1
    assert read_config(out).torch_dtype == "float32" and os.listdir(tmp_path) == ["out"]
    weights_convert.main([sources["v5"], out, "--force", "--dtype", "bfloat16"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert os.listdir(tmp_path) == ["out"] and read_config(out).torch_dtype == "bfloat16"
    assert "converted" in capsys.readouterr().out
    with pytest.raises(MinidamroError, match="must not contain"):
        weights_convert.convert(sources["v5"], sources["v5"], force=True)
    with pytest.raises(MinidamroError, match="unknown dtype"):
        weights_convert.convert(sources["v5"], str(tmp_path / "x"), dtype="float64")


@pytest.mark.parametrize("kind", ["directory", "file", "link"])
def test_force_never_replaces_what_is_not_a_checkpoint(sources, tmp_path, capsys, kind):
    """--force replaces an earlier conversion, never a user's other files (a parent folder, an image...)."""
    out = tmp_path / "out"
    if kind == "directory":
        out.mkdir()
        (out / "other_model").mkdir()
        (out / "other_model" / "w.bin").write_text("mine")
    elif kind == "file":
        out.write_text("mine")
    else:
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit):
        weights_convert.main([sources["v5"], str(out), "--force"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a minidamro checkpoint" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_force_replaces_an_empty_directory(sources, tmp_path):
    (tmp_path / "out").mkdir()
    weights_convert.main([sources["v5"], str(tmp_path / "out"), "--force"])
    assert read_config(str(tmp_path / "out")).torch_dtype == "float32"


@pytest.mark.parametrize("edit", [
    lambda c: c.update(text_config="x"),
    lambda c: c["text_config"].update(hidden_size="64"),
    lambda c: c.update(image_token_index="400"),
    lambda c: c["vision_config"].update(patch_size=0),
])
def test_malformed_config_is_one_line(sources, tmp_path, capsys, edit):
    src = tmp_path / "src"
    shutil.copytree(sources["v5"], src)
    cfg = json.load(open(src / "config.json"))
    edit(cfg)
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(SystemExit):
        weights_convert.main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and not (tmp_path / "out").exists()


# --- load_model is strict on a tampered converted directory -----------------------------------------------

@pytest.mark.parametrize("tamper,named", [
    (lambda w: w.update({"extra.weight": torch.zeros(1)}), "unexpected: extra.weight"),
    (lambda w: w.pop("language_model.norm.weight"), "missing: language_model.norm.weight"),
    (lambda w: w.update({"multi_modal_projector.linear_2.bias": torch.zeros(63)}),
     "mis-shaped: multi_modal_projector.linear_2.bias (63,) != (64,)"),
])
def test_load_model_is_strict(tamper, named, converted, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(converted["v5"], d)
    w = load_file(os.path.join(d, "model.safetensors"))
    tamper(w)
    save_file(w, os.path.join(d, "model.safetensors"))
    with pytest.raises(MinidamroError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_model(d)
