"""BERT WordPiece tokenizer: the one InstructBLIP uses for the instruction it shows its Q-Former.

InstructBLIP feeds the instruction to the Q-Former as well as to the language model, tokenized with
bert-base-uncased's WordPiece vocabulary (vocab.txt, one token per line, the line number is the id). sentencepiece
cannot read that file (it is not a sentencepiece model, and WordPiece is not one of its algorithms), so this module
reproduces transformers' BertTokenizer with the standard library alone. In transformers v5 that class is the
`tokenizers` pipeline BertNormalizer -> BertPreTokenizer -> WordPiece, and that pipeline is what is copied here,
quirks included, with the same ids:

1. special tokens ([CLS], [SEP], [UNK], [PAD], [MASK], where the vocab has them) written in the raw text stay whole;
2. clean the rest: drop NUL, U+FFFD and control/format characters, turn whitespace into spaces;
3. put spaces around CJK ideographs, so each one is a word;
4. strip accents (NFD, then drop nonspacing marks), then lower-case;
5. split on whitespace, and make every punctuation character a word of its own;
6. WordPiece each word: greedy longest match first, "##" marks a continuation; a word of over 100 characters, or one
   that cannot be covered completely, becomes [UNK];
7. encode() wraps the ids in [CLS] ... [SEP] and never truncates (nor does InstructBlipProcessor by default).

Known gap: `tokenizers` classifies characters with older Unicode tables than Python's unicodedata, so a few hundred
code points of rare scripts (marks and punctuation added in Unicode 10 and later) can tokenize differently.
"""
import re
import unicodedata

from minidamro import MinidamroError

# Rust's char::is_whitespace (the Unicode White_Space property), which `tokenizers` uses to trim vocab lines and to
# split text. str.isspace() is not the same set: it also counts U+001C..U+001F.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
# The CJK blocks as `tokenizers` lists them. Its gap at U+2B820..U+2B91F is deliberate here: the old pure-Python
# BertTokenizer split those characters too, the tokenizers-backed one (what transformers v5 gives) does not.
CJK = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B81F),
       (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F))
SPECIALS = ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]")
MAX_WORD_CHARS = 100


def _is_punctuation(c: str) -> bool:
    # All ASCII non-alphanumerics count, even those Unicode calls symbols ($, +, <, ^, `, |, ~).
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(c)[0] == "P"


def _normalize(text: str) -> str:
    out = []
    for c in text:
        cp = ord(c)
        # Removal comes first, so \x0b, \x0c and \x85 (controls that are also whitespace) vanish instead of splitting
        # words. Unassigned code points (Cn) are kept, as `tokenizers` does.
        if cp == 0 or cp == 0xFFFD or (c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")):
            continue
        if c in WHITESPACE:
            out.append(" ")
        elif any(lo <= cp <= hi for lo, hi in CJK):
            out.append(f" {c} ")
        else:
            out.append(c)
    text = "".join(c for c in unicodedata.normalize("NFD", "".join(out)) if unicodedata.category(c) != "Mn")
    # Character by character, like Rust's char::to_lowercase: str.lower() would write a final capital sigma as 'ς'.
    return "".join(c.lower() for c in text)


def _words(text: str) -> list[str]:
    words, current = [], ""
    for c in text:
        if c in WHITESPACE or _is_punctuation(c):
            words += [current] if current else []
            words += [] if c in WHITESPACE else [c]
            current = ""
        else:
            current += c
    return words + [current] if current else words


class WordPiece:
    def __init__(self, vocab_file: str):
        # Read as `tokenizers` reads vocab.txt: split on "\n" only (a lone "\r" stays inside its line), trim trailing
        # whitespace, a blank line is the token "" and still takes an id, and a repeated token keeps its last id.
        try:
            with open(vocab_file, encoding="utf-8", newline="") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise MinidamroError(f"cannot read the WordPiece vocabulary {vocab_file}: {e}") from None
        if lines[-1] == "":
            lines.pop()
        self.vocab = {line.rstrip(WHITESPACE): i for i, line in enumerate(lines)}
        missing = [t for t in SPECIALS[:3] if t not in self.vocab]
        if missing:
            raise MinidamroError(f"the WordPiece vocabulary {vocab_file} lacks {', '.join(missing)}")
        self.cls_id, self.sep_id, self.unk_id = (self.vocab[t] for t in SPECIALS[:3])
        self.pad_id = self.vocab.get("[PAD]")
        # transformers registers these as special tokens, matched case-sensitively in the raw text before any
        # normalization, so "a[SEP]b" gives a, [SEP], b while "[sep]" is just punctuation and letters.
        self._specials = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS if t in self.vocab) + ")")

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]  # one uncovered stretch makes the whole word unknown, not just that stretch
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The wordpieces of text, without [CLS] and [SEP] around them."""
        tokens = []
        for i, part in enumerate(self._specials.split(text)):
            if i % 2:  # re.split puts the captured special tokens at the odd indices
                tokens.append(part)
            else:
                tokens += [piece for word in _words(_normalize(part)) for piece in self._wordpiece(word)]
        return tokens

    def encode(self, text: str) -> list[int]:
        """[CLS] + the ids of text + [SEP], as BertTokenizer(vocab_file)(text)["input_ids"]."""
        return [self.cls_id] + [self.vocab[t] for t in self.tokenize(text)] + [self.sep_id]
