"""The command line: streaming text, --json, --compare, and one-line errors for bad input."""
import json
import os

import pytest
import torch
from PIL import Image

from minidamro import contrastive, damro, generation
from minidamro.generate import main
from minidamro.image import preprocess
from minidamro.llava import load_model
from minidamro.tokenizer import Tokenizer, build_prompt, prompt_ids


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    g = torch.Generator().manual_seed(1)
    Image.frombytes("RGB", (45, 31), bytes(torch.randint(0, 256, (45 * 31 * 3,), generator=g).tolist())).save(path)
    return str(path)


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def ok(capsys, *argv):
    main(list(argv))
    out, err = capsys.readouterr()
    return out, err


def expected_tokens(ckpt, image, prompt, method="plain", seed=0, temperature=0.0, n=12, **dcfg):
    model = load_model(ckpt)
    tok = Tokenizer(os.path.join(ckpt, "tokenizer.model"), model.cfg.special_tokens)
    ids = torch.tensor(prompt_ids(tok, build_prompt(prompt), model.cfg.image_token_index, model.cfg.num_image_tokens))
    pixels = preprocess(Image.open(image), model.cfg.preprocessor)
    sampler = generation.Sampler(temperature, 1.0, seed)
    if method == "plain":
        return None, list(generation.generate(model, ids, pixels, sampler, n)), tok
    outliers, tokens = damro.generate(model, ids, pixels, damro.DamroConfig(**dcfg), sampler, n)
    return outliers, list(tokens), tok


def test_plain_json_matches_the_api_and_streams_the_text(capsys, checkpoints, image):
    out, err = ok(capsys, image, "--model", checkpoints["mha"], "--prompt", "What is this?",
                  "--max-new-tokens", "12", "--json")
    *text_lines, last = out.splitlines()
    obj = json.loads(last)
    _, tokens, tok = expected_tokens(checkpoints["mha"], image, "What is this?")
    assert obj["token_ids"] == tokens and obj["method"] == "plain"
    assert obj["text"] == tok.decode(tokens)
    assert "\n".join(text_lines) == obj["text"]  # the streamed text is the answer
    assert err == ""


def test_damro_json_carries_the_outliers(capsys, checkpoints, image):
    out, _ = ok(capsys, image, "--model", checkpoints["gqa"], "--method", "damro", "--alpha", "1.5", "--beta", "0.2",
                "--topk", "4", "--temperature", "1", "--seed", "7", "--max-new-tokens", "12", "--json",
                "--prompt", "What is in this image?")
    obj = json.loads(out.splitlines()[-1])
    outliers, tokens, _ = expected_tokens(checkpoints["gqa"], image, "What is in this image?", "damro", seed=7,
                                          temperature=1.0, alpha=1.5, beta=0.2, topk=4)
    assert obj["outliers"] == outliers and len(outliers) == 4
    assert obj["token_ids"] == tokens and obj["seed"] == 7


@pytest.mark.parametrize("flag, batched", [([], True), (["--two-forwards"], False)])
def test_two_forwards_selects_the_unbatched_path(capsys, checkpoints, image, monkeypatch, flag, batched):
    seen = []
    real = contrastive.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["batched"])
        return real(*args, **kwargs)
    monkeypatch.setattr(contrastive, "generate", spy)
    ok(capsys, image, "--model", checkpoints["last"], "--method", "damro", "--topk", "2", "--max-new-tokens", "4", *flag)
    assert seen == [batched]


def test_compare_prints_both_answers_with_one_seed(capsys, checkpoints, image):
    out, _ = ok(capsys, image, "--model", checkpoints["mha"], "--compare", "--json", "--topk", "3",
                "--max-new-tokens", "8", "--prompt", "What is in this image?")
    obj = json.loads(out.splitlines()[-1])
    assert out.startswith("[plain]\n") and "\n[damro (alpha 2.0, beta 0.1, outliers " in out
    _, plain, _ = expected_tokens(checkpoints["mha"], image, "What is in this image?", n=8)
    outliers, d, _ = expected_tokens(checkpoints["mha"], image, "What is in this image?", "damro", n=8, topk=3)
    assert obj["plain"]["token_ids"] == plain and obj["damro"]["token_ids"] == d
    assert obj["damro"]["outliers"] == outliers


def test_model_from_environment(capsys, checkpoints, image, monkeypatch):
    monkeypatch.setenv("MINIDAMRO_MODEL", checkpoints["last"])
    out, _ = ok(capsys, image, "--max-new-tokens", "3", "--json")
    assert len(json.loads(out.splitlines()[-1])["token_ids"]) <= 3


@pytest.mark.parametrize("args, message", [
    (["--topk", "0", "--method", "damro"], "--topk must be between 1 and the 16 image patches"),
    (["--topk", "17", "--method", "damro"], "--topk must be between 1 and the 16 image patches"),
    (["--beta", "0", "--method", "damro"], "--beta must be in (0, 1]"),
    (["--beta", "1.5", "--compare"], "--beta must be in (0, 1]"),
    (["--alpha", "-1", "--method", "damro"], "--alpha must be a finite number >= 0"),
    (["--alpha", "nan", "--method", "damro"], "--alpha must be a finite number >= 0"),
    (["--alpha", "inf", "--compare"], "--alpha must be a finite number >= 0"),
    (["--beta", "nan", "--method", "damro"], "--beta must be in (0, 1]"),
    (["--temperature", "1e-40"], "--temperature must be 0 (greedy) or a finite number >= 1e-6"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite number >= 1e-6"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--prompt", "Compare <image> to this"], "the prompt must not contain <image>"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or a finite number >= 1e-6"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--prompt", "word " * 600], "the model's context holds 512"),
    (["--method", "beam"], "invalid choice"),
])
def test_bad_options_give_one_line(capsys, checkpoints, image, args, message):
    code, out, err = run(capsys, image, "--model", checkpoints["mha"], *args)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_bad_inputs_give_one_line(capsys, checkpoints, image, tmp_path, monkeypatch):
    monkeypatch.delenv("MINIDAMRO_MODEL", raising=False)
    monkeypatch.setattr("minidamro.toy.MODEL_DIR", str(tmp_path / "no-toy-model"))  # as if none were shipped
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(os.urandom(300))
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(checkpoints["mha"], "config.json")).read())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cases = [
        ([image], "no model: pass --model DIR or set MINIDAMRO_MODEL"),
        ([image, "--model", str(tmp_path / "nowhere")], "does not exist"),
        ([str(tmp_path / "missing.jpg"), "--model", checkpoints["mha"]], "cannot read image"),
        ([str(corrupt), "--model", checkpoints["mha"]], "cannot read image"),
        ([image, "--model", str(broken)], "cannot read weights"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code != 0, argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_streaming_never_prints_what_the_final_text_takes_back(checkpoints):
    """A valid byte run can turn invalid when the next byte arrives (then transformers writes one U+FFFD per
    byte): the stream waits for a run's end, so what it printed is always the final text."""
    import io
    from minidamro.generate import stream
    tok = Tokenizer(os.path.join(checkpoints["mha"], "tokenizer.model"), {})
    byte = {b: tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0xC5, 0x41)}
    word = tok.encode("The", bos=False)
    for ids in ([*word, byte[0x0A], byte[0xC5], *word], [*word, byte[0xC5], byte[0x41]], [byte[0x0A]]):
        out = io.StringIO()
        stream(iter(ids), tok, out)
        assert out.getvalue() == tok.decode(ids) + "\n", ids


def test_streamed_text_is_the_decoded_text_for_any_ids(checkpoints):
    """Incremental decoding (each id once) prints exactly decode(all ids): over random ids that mix words,
    byte pieces, control ids (<s>, </s>) and ids without a piece, such as a run that starts with them."""
    import io
    import random
    from minidamro.generate import stream
    tok = Tokenizer(os.path.join(checkpoints["mha"], "tokenizer.model"), {})
    rnd = random.Random(0)
    bytes_ = [i for i in range(tok.sp.get_piece_size()) if tok.sp.is_byte(i)]
    for _ in range(300):
        ids = [rnd.choice([rnd.randrange(448), rnd.choice(bytes_), rnd.choice([1, 2, 420]), rnd.randrange(3, 400)])
               for _ in range(rnd.randrange(1, 12))]
        out = io.StringIO()
        stream(iter(ids), tok, out)
        assert out.getvalue() == tok.decode(ids) + "\n", ids


def test_stdout_that_cannot_encode_the_answer(monkeypatch):
    """A terminal whose encoding lacks a character gets a replacement, not a UnicodeEncodeError."""
    import io
    import sys
    from minidamro.generate import guarded
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    guarded(lambda: print("café 東京"))
    sys.stdout.flush()
    assert raw.getvalue() == b"caf? ??\n"
