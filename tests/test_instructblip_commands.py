"""generate, --compare, analyze, eval and the converter on tiny InstructBLIP checkpoints, as on LLaVA."""
import json
import os
import shutil

import pytest
import torch

import tiny_blip
import tolerance
import weights_convert
from minidamro import MinidamroError, contrastive, methods
from minidamro.analyze import main as analyze_main
from minidamro.eval.__main__ import main as eval_main
from minidamro.generate import main as generate_main
from minidamro.generation import Sampler
from minidamro.image import load_image, preprocess
from minidamro.llava import load_model
from minidamro.tokenizer import instruction_ids, load_tokenizer, model_prompt_ids
from test_eval_run import pope_args, pope_set  # noqa: F401 (pope_set: a fixture)
from test_instructblip import IMAGES

PROMPT = "Is there a dog in the image? Please answer this question with one word."


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip_img") / "noise.png"
    IMAGES["rgb"].save(path)
    return str(path)


def run_json(capsys, main, argv):
    main(argv + ["--json"])
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_generate_compare_runs_every_method_through_the_core(blip_checkpoints, image, capsys):
    ckpt = blip_checkpoints["blip_gqa"]
    got = run_json(capsys, generate_main, [image, "--model", ckpt, "--prompt", PROMPT, "--compare", "--seed", "3",
                                           "--max-new-tokens", "8", "--topk", "4"])
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt, model.cfg)
    ids = torch.tensor(model_prompt_ids(tok, model.cfg, PROMPT))
    instruction = instruction_ids(tok, model.cfg, PROMPT)
    pixels = preprocess(load_image(image), model.cfg.preprocessor)
    for name in methods.METHODS:
        assert got[name]["method"] == name
        cfg = methods.make_config(methods.get(name), "instructblip", topk=4)
        info, tokens = contrastive.generate(model, ids, pixels, methods.get(name), cfg, Sampler(seed=3), 8,
                                            instruction=instruction)
        assert got[name]["token_ids"] == list(tokens)
        assert got[name].get("outliers") == info.get("outliers")
    assert got["damro"]["outlier_attention"] == "heads" and got["damro"]["gather"] == "release"
    assert len(got["damro"]["outliers"]) == 4


@pytest.mark.parametrize("argv,message", [
    (["--pad-square"], "--pad-square is LLaVA-1.5's"),
    (["--method", "damro", "--topk", "99"], "--topk must be between 1 and the 16 image patches"),
])
def test_impossible_options_are_one_line(blip_checkpoints, image, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate_main([image, "--model", blip_checkpoints["blip_mha"], "--prompt", PROMPT] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and message in err


def test_analyze_carries_the_decoder_attention_through_the_qformer(blip_hf_checkpoints, blip_checkpoints, image,
                                                                    tmp_path, capsys):
    """A token's map over the image tokens is its decoder attention over the query slots (mean over layers and
    heads) times the Q-Former's cross-attention (mean over its cross-attention layers and heads): checked for the
    first token against the same product of transformers' attentions, within the rounding bound."""
    ckpt = blip_checkpoints["blip_mha"]
    analyze_main([image, "--model", ckpt, "--prompt", PROMPT, "--method", "damro", "--topk", "4", "--seed", "1",
                  "--max-new-tokens", "5", "--out", str(tmp_path / "a")])
    a = json.load(open(tmp_path / "a" / "analysis.json"))
    g = run_json(capsys, generate_main, [image, "--model", ckpt, "--prompt", PROMPT, "--method", "damro", "--topk",
                                         "4", "--seed", "1", "--max-new-tokens", "5"])
    assert [t["id"] for t in a["tokens"]] == g["token_ids"] and a["outliers"] == g["outliers"]
    assert a["settings"]["outlier_attention"] == "heads" and a["patch_offset"] == 1
    assert all(os.path.getsize(tmp_path / "a" / f) > 0 for f in ("vit_attention.png", "decoder_attention.png"))

    model = load_model(ckpt)
    tok = load_tokenizer(ckpt, model.cfg)
    ids = torch.tensor(model_prompt_ids(tok, model.cfg, PROMPT))[None]
    instruction = instruction_ids(tok, model.cfg, PROMPT)[None]
    pixels = preprocess(load_image(image), model.cfg.preprocessor)
    q = model.cfg.num_query_tokens

    def expected(dtype):
        hf = tiny_blip.hf_model(blip_hf_checkpoints["blip_mha"], dtype=dtype)
        with torch.no_grad():  # (the full forward does not pass output_attentions on to the Q-Former)
            out = hf(input_ids=ids, pixel_values=pixels.to(dtype), qformer_input_ids=instruction,
                     output_attentions=True)
            image = hf.get_image_features(pixels.to(dtype), instruction, output_attentions=True, return_dict=True)
        slots = torch.stack([layer[0, :, -1, :q] for layer in out.language_model_outputs.attentions]).mean((0, 1))
        reads = torch.stack([c[0] for c in image.qformer_outputs.cross_attentions]).mean((0, 1))  # (Q, 1 + N)
        return slots @ reads
    got = torch.tensor(a["tokens"][0]["attention"], dtype=torch.float32)
    tolerance.assert_close(got, expected(torch.float32), expected(torch.float64), "first token's image map")


def test_eval_pope_answers_per_question_as_generate(blip_checkpoints, pope_set, tmp_path, capsys):  # noqa: F811
    ckpt = blip_checkpoints["blip_gqa"]
    eval_main(pope_args(ckpt, pope_set, tmp_path / "r", "--method", "damro", "--topk", "4"))
    capsys.readouterr()
    run = json.load(open(tmp_path / "r" / "run.json"))
    assert run["reuse"] is False and run["outlier_attention"] == "heads" and run["gather"] == "release"
    rows = [json.loads(line) for line in open(tmp_path / "r" / "answers.jsonl")]
    assert len(rows) == 24
    r = rows[5]
    g = run_json(capsys, generate_main, [r["image"], "--model", ckpt, "--prompt", r["prompt"], "--method", "damro",
                                         "--topk", "4", "--seed", str(r["seed"]), "--max-new-tokens", "6"])
    assert g["token_ids"] == r["token_ids"] and g["outliers"] == r["outliers"]
    with pytest.raises(SystemExit):
        eval_main(pope_args(ckpt, pope_set, tmp_path / "b", "--batch-questions"))
    assert "InstructBLIP's image features depend on the question" in capsys.readouterr().err


def test_llava_keeps_its_defaults_and_refuses_gather(checkpoints, image, capsys):
    """On LLaVA, DAMRO still selects by the full-width product and records no gather (its runs' settings are
    those of runs made before InstructBLIP); --gather is refused in one line."""
    argv = [image, "--model", checkpoints["mha"], "--method", "damro", "--topk", "3", "--max-new-tokens", "3"]
    got = run_json(capsys, generate_main, argv)
    assert got["outlier_attention"] == "full" and "gather" not in got
    with pytest.raises(SystemExit):
        generate_main(argv + ["--gather", "patches"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gather is InstructBLIP's" in err


# ---------------------------------------------------------------------------------------------- converter


def test_converter_copies_both_tokenizers_and_converts_to_bfloat16(blip_hf_checkpoints, tmp_path):
    src = blip_hf_checkpoints["blip_mha"]
    weights_convert.convert(src, str(tmp_path / "bf16"), dtype="bfloat16")
    assert open(tmp_path / "bf16" / "qformer_vocab.txt").read() == \
        open(os.path.join(src, "qformer_tokenizer", "vocab.txt")).read()
    model = load_model(str(tmp_path / "bf16"))
    assert model.cfg.prompt_bos_id == tiny_blip.BOS and model.cfg.image_token_index == tiny_blip.IMAGE_TOKEN
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    weights_convert.convert(str(tmp_path / "bf16"), str(tmp_path / "again"), dtype="float32")  # a minidamro one
    assert os.path.isfile(tmp_path / "again" / "qformer_vocab.txt")


def edited_copy(src, dst, edit_config=None, drop=None):
    shutil.copytree(src, dst)
    if edit_config:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        edit_config(cfg)
        json.dump(cfg, open(path, "w"))
    if drop:
        shutil.rmtree(os.path.join(dst, drop)) if os.path.isdir(os.path.join(dst, drop)) else os.remove(
            os.path.join(dst, drop))
    return dst


@pytest.mark.parametrize("edit,drop,message", [
    (lambda c: c["text_config"].update(model_type="t5"), None, "InstructBLIP with a 't5' language model"),
    (None, "qformer_tokenizer", "has no qformer_tokenizer/vocab.txt"),
    (lambda c: c["qformer_config"].update(hidden_act="relu"), None, "unsupported qformer hidden_act 'relu'"),
    (lambda c: c.update(num_query_tokens=6), None, "do not match its config.json"),
])
def test_converter_refuses_other_variants_in_one_line(blip_hf_checkpoints, tmp_path, edit, drop, message):
    src = edited_copy(blip_hf_checkpoints["blip_mha"], str(tmp_path / "src"), edit, drop)
    with pytest.raises(MinidamroError, match=message.replace("(", r"\(").replace(")", r"\)")):
        weights_convert.convert(src, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_release_bos_comes_from_the_tokenizer_files(blip_hf_checkpoints, tmp_path):
    """The hub's text_config says bos 1; the tokenizer's "</s>" (2) is what the processor puts before the prompt.
    Without a bos_token in the files, LlamaTokenizer's default "<s>" (1) is used, as transformers would."""
    def no_bos(path):
        cfg = json.load(open(path))
        del cfg["bos_token"]
        json.dump(cfg, open(path, "w"))
    src = edited_copy(blip_hf_checkpoints["blip_mha"], str(tmp_path / "src"))
    no_bos(os.path.join(src, "tokenizer_config.json"))
    weights_convert.convert(src, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["prompt_bos_id"] == 1
    # add_bos_token false: the processor puts no BOS, and neither does minidamro
    path = os.path.join(src, "tokenizer_config.json")
    json.dump(json.load(open(path)) | {"add_bos_token": False}, open(path, "w"))
    weights_convert.convert(src, str(tmp_path / "nobos"))
    cfg = load_model(str(tmp_path / "nobos")).cfg
    ids = model_prompt_ids(load_tokenizer(str(tmp_path / "nobos"), cfg), cfg, PROMPT)
    expected = tiny_blip.llama_tokenizer(src, check=False)(PROMPT)["input_ids"]
    assert cfg.prompt_bos_id is None and ids == [cfg.image_token_index] * cfg.num_query_tokens + expected


def test_a_checkpoint_without_preprocessor_settings_gets_blips(blip_hf_checkpoints, tmp_path, capsys):
    src = edited_copy(blip_hf_checkpoints["blip_mha"], str(tmp_path / "src"), drop="preprocessor_config.json")
    weights_convert.convert(src, str(tmp_path / "out"))
    assert "using BLIP's image preprocessing at 28 x 28" in capsys.readouterr().out
    p = json.load(open(tmp_path / "out" / "config.json"))["preprocessor"]
    assert p["size"] == {"height": 28, "width": 28} and p["do_center_crop"] is False
