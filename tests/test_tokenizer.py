"""Tokenization: minidamro's Tokenizer gives exactly the ids of transformers' LlamaTokenizer(legacy=False) with
llava-hf's added tokens, prompt_ids expands `<image>` as LlavaProcessor does, and decode() matches HF's
decode(skip_special_tokens=True) and never fails on ids a model can emit."""
import random

import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaProcessor

import tiny
from minidamro.tokenizer import LLAVA_V1_SYSTEM, TEMPLATE, Tokenizer, build_prompt, prompt_ids

SPECIAL = {"<image>": tiny.IMAGE_TOKEN, "<pad>": tiny.PAD_TOKEN}

TEXTS = [
    "",
    " ",
    "   ",
    "hello",
    " hello",
    "hello ",
    "  leading and trailing  ",
    "multiple   spaces    inside",
    "tabs\tinside\t\tand\tat the end\t",
    "\tleading tab",
    "\nleading newline",
    "line one\nline two\n\nline four\n",
    "\r\nwindows line end",
    "digits 0123456789 and 3.14159, -42, 1e-5, 2024-11-27",
    "Ünïcödé café naïve façade résumé",
    "東京 北京 日本語のテキスト 中文",
    "emoji 🙂😀🎉 and 👩‍👩‍👧 family",
    "Ω≈ç√∫ µ ± ∞ € £",
    "“curly quotes” — em dash – en dash … ellipsis",
    "Hello , world . It 's fine , isn 't it ?",
    "▁already a word marker",
    "a ▁b▁c",
    "control \x00 \x07 chars",
    "<image>",
    "<image>What is this?",
    "What is this?<image>",
    "start <image> middle",
    "<image>\nDescribe the image.",
    "<image> <image>",
    "<image><image>",
    "a<image>b<image>c",
    " <image>",
    "<image> ",
    "x<image>y",
    "</s>",
    "text then </s> then more",
    "no space</s>after",
    "<s>",
    "<s>starts with bos",
    "x <s> y",
    "<unk> unknown",
    "<pad>padded",
    "<imag not special",
    "<image not special either",
    "image> nor this",
    "<<image>>",
    "USER:<image>\nQ ASSISTANT:",
    build_prompt("What is in the image?"),
    build_prompt("Describe this photo in detail.", LLAVA_V1_SYSTEM),
    build_prompt(""),
    build_prompt("", LLAVA_V1_SYSTEM),
    build_prompt("  spaced   question  \n with a newline "),
    build_prompt("东京有什么? 🙂"),
]


TEXT_IDS = [f"{i}:{t[:24]!r}" for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return Tokenizer(tokenizer_model, SPECIAL)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_model):
    return tiny.hf_tokenizer(tokenizer_model)


def test_build_prompt():
    assert TEMPLATE == "USER: <image>\n{prompt} ASSISTANT:"
    assert build_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert build_prompt("Hi?", LLAVA_V1_SYSTEM) == LLAVA_V1_SYSTEM + " USER: <image>\nHi? ASSISTANT:"
    assert LLAVA_V1_SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. "
                               "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_encode_matches_hf(tok, hf_tok, text):
    expected = hf_tok(text).input_ids
    assert tok.encode(text) == expected
    assert tok.encode(text, bos=False) == expected[1:]


def test_encode_matches_hf_on_random_text(tok, hf_tok):
    """Random strings over an alphabet rich in the tricky parts: spaces, newlines, specials, multi-byte chars."""
    rnd = random.Random(0)
    atoms = [" ", "  ", "\n", "\t", "a", "b", "Z", "the", "cat", "7", "42", ".", ",", "?", "é", "東", "🙂",
             "<image>", "</s>", "<s>", "<pad>", "▁", "USER:", "ASSISTANT:"]
    for _ in range(300):
        text = "".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 12)))
        assert tok.encode(text) == hf_tok(text).input_ids, repr(text)


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("a<image>b</s><s><pad>", bos=False)
    assert ids.count(tiny.IMAGE_TOKEN) == 1 and ids.count(tiny.PAD_TOKEN) == 1
    assert 2 in ids and 1 in ids
    assert tok.encode("") == [1]


def llava_processor(name, hf_tok):
    cfg = tiny.CONFIGS[name]
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**tiny.preprocessor_config(name)), tokenizer=hf_tok,
                          patch_size=cfg["vision"]["patch_size"],
                          vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
                          num_additional_image_tokens=1)


def num_image_tokens(name):
    v = tiny.CONFIGS[name]["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2 + (tiny.CONFIGS[name]["vision_feature_select_strategy"] == "full")


@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_prompt_ids_match_llava_processor(tok, hf_tok, name):
    processor = llava_processor(name, hf_tok)
    n = num_image_tokens(name)
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    texts = [build_prompt("What is in the image?"), build_prompt("Describe it.", LLAVA_V1_SYSTEM), build_prompt(""),
             "<image>", "<image>no space", "text first <image>", "two <image> images <image>!"]
    for text in texts:
        images = [image] * text.count("<image>")
        expected = processor(images=images, text=text, return_tensors="pt").input_ids[0].tolist()
        got = prompt_ids(tok, text, tiny.IMAGE_TOKEN, n)
        assert got == expected, repr(text)
        # Exactly n image ids per <image>, in one block where the <image> was.
        plain = tok.encode(text)
        assert got.count(tiny.IMAGE_TOKEN) == n * plain.count(tiny.IMAGE_TOKEN)
        first = plain.index(tiny.IMAGE_TOKEN)
        assert got[:first] == plain[:first] and got[first:first + n] == [tiny.IMAGE_TOKEN] * n
        assert got[first + n:first + n + 1] == plain[first + 1:first + 2]


def test_prompt_ids_layout(tok):
    """Each `<image>` id becomes n image ids in place; the text after it gets no word-start marker "▁"."""
    n = 5
    for text in (build_prompt("Hi"), "<image>Hi there", "a <image> b <image>"):
        plain = tok.encode(text)
        expected = [t for i in plain for t in ([i] * n if i == tiny.IMAGE_TOKEN else [i])]
        assert prompt_ids(tok, text, tiny.IMAGE_TOKEN, n) == expected
    ids = tok.encode("<image>Hi there")
    assert ids[:2] == [1, tiny.IMAGE_TOKEN] and not tok.sp.id_to_piece(ids[2]).startswith("▁")
    assert tok.sp.id_to_piece(tok.encode("Hi there")[1]).startswith("▁")  # at the very start it gets one


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_decode_matches_hf(tok, hf_tok, text):
    ids = hf_tok(text).input_ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids[1:]) == hf_tok.decode(ids[1:], skip_special_tokens=True)


def test_decode_skips_special_and_unknown_ids(tok, hf_tok):
    """llava-hf's vocabulary has rows beyond the tokenizer (32002..32063 there, 402..447 here): a model can emit
    them, and decoding must skip them like HF does, not fail. So are <unk>, <s>, </s>, <image>, <pad>."""
    sp_size = tok.sp.get_piece_size()
    assert sp_size == tiny.SP_VOCAB
    beyond = list(range(tiny.PAD_TOKEN + 1, tiny.VOCAB))  # 402..447
    special = [0, 1, 2, tiny.IMAGE_TOKEN, tiny.PAD_TOKEN]
    word = hf_tok("a cat sat", add_special_tokens=False).input_ids
    for ids in [beyond, special, special + beyond, word + beyond + word, beyond[:3] + word + special + word + [2]]:
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids
    assert tok.decode(beyond + special) == ""
    assert tok.decode(word + [447] + word) == "a cat sat a cat sat"


def test_decode_never_raises_on_any_model_id(tok):
    rnd = random.Random(0)
    for _ in range(200):
        ids = [rnd.randrange(tiny.VOCAB) for _ in range(rnd.randint(0, 30))]
        assert isinstance(tok.decode(ids), str)
    assert isinstance(tok.decode(list(range(tiny.VOCAB))), str)
    assert tok.decode([]) == ""


def test_decode_matches_hf_on_any_model_ids(tok, hf_tok):
    """Generated ids need not form valid UTF-8: a random model (and rarely a real one) emits lone byte-fallback
    pieces such as <0xC5>. HF's decoder turns a run of byte pieces that is not valid UTF-8 into one U+FFFD per
    byte; minidamro's decode must print what HF prints."""
    assert tok.decode([3 + 0xC3, 3 + 0xA9]) == hf_tok.decode([3 + 0xC3, 3 + 0xA9]) == "é"  # a valid byte run
    ids = [3 + 0x61, 3 + 0xC5]  # <0x61> <0xC5>: "a" then half a character
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    rnd = random.Random(1)
    for _ in range(200):
        ids = [rnd.randrange(tiny.VOCAB) for _ in range(rnd.randint(0, 30))]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids
