"""WordPiece (the Q-Former's instruction tokenizer) gives exactly the ids of transformers' BertTokenizer
(do_lower_case=True) on the same vocab.txt, both as built from the file and as AutoTokenizer loads a directory."""
import json
import random

import pytest

from minidamro import MinidamroError
from minidamro.wordpiece import WordPiece

transformers = pytest.importorskip("transformers")

# Specials in a non-standard order (bert-base-uncased has [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103),
# so an implementation with hard-coded ids fails.
TINY = ["the", "is", "a", "[SEP]", "image", "##s", ".", "?", "[MASK]", "dog", "in", "there", "[CLS]", "cafe",
        "naive", "东", "京", "我", "-", "[PAD]", "##ing", "photo", "[UNK]", "!", "$", "5", "##0", "x", "(", ")", "«",
        "»", "…"]

WORDS = """is there a dog cat person car in the image ? please answer this question with one word . generate short
caption of write description for photo taken place worship yes or no cafe naive unicode wait what b c x tokyo quote
dash new line tab control char and number 12 2024 mixed case hello world it s fine isn t how many are on table red
blue left right above below picture describe detail what ' unknown 1 0 5 00 3 . 14 words here let go""".split()
SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly", "##ness", "##tion", "##'", "##0", "##4"]
CJK = "我爱北京東京日本中文"
CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}


def _large_vocab():
    """Specials, every printable ASCII character, single-letter and single-digit continuations, a word list, a few
    suffixes, CJK and Unicode punctuation: most of TEXTS gets real pieces, not [UNK]."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokens = (["[UNK]", "[MASK]", "[SEP]", "[PAD]", "[CLS]"] + chars + pieces + WORDS + SUFFIXES + list(CJK)
              + list("«»—…“”"))
    return list(dict.fromkeys(tokens))  # each token once, in first-seen order


TEXTS = [
    "Is there a dog in the image? Please answer this question with one word.",
    "Generate a short caption of this image.",
    "Write a short description for the image.",
    "Is this photo taken in a place of worship? Please answer yes or no.",
    "Describe this image in detail.",
    "How many cats are on the table?",
    "Café naïve Ünïcödé",
    "CAFÉ NAÏVE ÜNÏCÖDÉ façade résumé İstanbul ΟΔΟΣ straße",
    "wait...what?!", "a-b_c", "$5.00", "(x)", "3.14, -42, 2024-11-27", "it's fine, isn't it?",
    "我爱北京 tokyo東京", "日本中文abc中",
    "x\U0002B825x x\U0002B925x",  # just outside / inside the CJK blocks (the old Python BertTokenizer split both)
    "«quote» — dash… “curly”",
    "control \x00 \x07 \x1f chars\x0bglued\x0cglued\x85too", "nul\x00inside", "bad\ufffdchar",
    "zero\u200bwidth joiner\u200d bom\ufeff", "private \ue000 use", "unassigned\u0378 kept",
    "nbsp\xa0and\u3000ideographic\u2028line\u2029para",
    "tab\tsepar ated\nnew line\r\nwindows\rold mac",
    "unknown zyzzyva qwertyuiop", "blue" * 25, "blue" * 25 + "s", "a" * 100, "a" * 101, "x" + "!" * 120,
    "", " ", "\t\n\r ", "\x00",
    "[SEP]", "[CLS] Is there a dog? [SEP] yes", "a[SEP]b", "[sep] and [Sep]", "[MASK]ed [UNK] [PAD]", "[[SEP]]",
    "emoji 🙂😀 🥹 👩‍👩‍👧 family", "Numbers 0123456789 12 2024", "MiXeD CaSe HeLLo WoRLD", "hello   world ",
    "x##s ## #",
]


def _write(tmp_path, name, tokens):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return folder


def _references(folder):
    # Positional on purpose: in transformers v5 BertTokenizer(vocab_file=...) ignores the file and builds a
    # five-token vocab; the first positional argument (`vocab`) takes the path.
    return [transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True),
            transformers.AutoTokenizer.from_pretrained(str(folder))]


@pytest.mark.parametrize("tokens", [TINY, _large_vocab()], ids=["tiny", "large"])
def test_same_ids_as_transformers(tmp_path, tokens):
    folder = _write(tmp_path, "vocab", tokens)
    ours = WordPiece(str(folder / "vocab.txt"))
    specials = ("[CLS]", "[SEP]", "[UNK]", "[PAD]")
    assert (ours.cls_id, ours.sep_id, ours.unk_id, ours.pad_id) == tuple(tokens.index(t) for t in specials)
    for reference in _references(folder):
        for text in TEXTS:
            assert ours.tokenize(text) == reference.tokenize(text), repr(text)
            assert ours.encode(text) == reference(text)["input_ids"], repr(text)


def test_large_vocab_gives_real_pieces(tmp_path):
    """The comparison above means something: with the large vocab the prompts have no [UNK] at all."""
    ours = WordPiece(str(_write(tmp_path, "vocab", _large_vocab()) / "vocab.txt"))
    for text in TEXTS[:6] + ["Café naïve", "wait...what?!", "我爱北京 tokyo東京", "blue" * 25]:
        assert "[UNK]" not in ours.tokenize(text), text
    assert ours.tokenize("Café naïve Ünïcödé") == ["cafe", "naive", "unicode"]
    assert ours.tokenize("blues blue🙂") == ["blue", "##s", "[UNK]"]  # no "##🙂": the whole word is unknown
    assert ours.tokenize("a" * 100) == ["a"] + ["##a"] * 99 and ours.tokenize("a" * 101) == ["[UNK]"]


def test_random_texts(tmp_path):
    """Random strings from a pool of the characters and strings that each step of the pipeline treats specially."""
    pool = (list("abcdefxyz ABCÉ éüïö\t\n\r\x00\x01\x0b\x1f\x85\u2028\xa0\u3000\u200b\ufeff\ufffd.,!?-_$()«»—…'\"#")
            + list("我爱北京東京İΣσßﬁ²́🙂\ue000")
            + ["[SEP]", "[CLS]", "[sep]", "[MASK]", "##", "the", "is", "dog", "ing"])
    folder = _write(tmp_path, "vocab", TINY + list("abcdefxyzσßé²") + ["##" + c for c in "abcdefxyz"] + ["fi"])
    ours, reference = WordPiece(str(folder / "vocab.txt")), _references(folder)[0]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 20)))
        assert ours.encode(text) == reference(text)["input_ids"], repr(text)


def test_vocab_lines_read_as_transformers_does(tmp_path):
    """Trailing whitespace and "\\r\\n" trimmed, a lone "\\r" kept, blank lines take ids, a repeated token keeps its
    last id. (All five specials present: transformers appends a missing one at id len(vocab), which can collide.)"""
    folder = tmp_path / "odd"
    folder.mkdir()
    lines = ["[PAD]", "hello  ", "", "[CLS]\r", "dup", "[SEP]\t", "x\ry", "dup", " lead", "[UNK]", "world\xa0", "b\x1c",
             "##s", "[MASK]", ""]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    (folder / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    ours = WordPiece(str(folder / "vocab.txt"))
    reference = _references(folder)[0]
    assert ours.vocab == reference.get_vocab()
    for text in ["hello worlds dup", "[CLS] dup lead", "x\ry", "b"]:
        assert ours.encode(text) == reference(text)["input_ids"]


def test_errors(tmp_path):
    with pytest.raises(MinidamroError, match="cannot read"):
        WordPiece(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"[CLS]\n\xff\xfe\n")
    with pytest.raises(MinidamroError, match="cannot read"):
        WordPiece(str(tmp_path / "bad.txt"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\nhello\n", encoding="utf-8")
    with pytest.raises(MinidamroError, match=r"lacks \[SEP\], \[UNK\]"):
        WordPiece(str(tmp_path / "vocab.txt"))
