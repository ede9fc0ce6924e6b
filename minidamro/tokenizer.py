"""Tokenizer and prompt: sentencepiece, tokenizing exactly like transformers' LlamaTokenizer(legacy=False).

transformers splits the text at special tokens (`<image>`, `<s>`, ...) and gives the word-start marker
"▁" only to a piece at the very start of the text, and only if that piece does not already begin with a
space: after a special token no "▁" is inserted. Plain sentencepiece always prepends one
(`add_dummy_prefix`), so we keep a second processor with that switch off for the other pieces.
"""
import re

from sentencepiece import SentencePieceProcessor

from . import MinidamroError

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # llava-hf's chat template for one image and one turn
# The llava_v1 system text that the DAMRO scripts prepend (pass it with --system to reproduce them).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# A ModelProto that sets normalizer_spec (field 3) { add_dummy_prefix (field 3) = false }. Protobuf merges
# a message field that occurs twice, so appending these 4 bytes to a model switches the prefix off.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def build_prompt(prompt: str, system: str | None = None) -> str:
    text = TEMPLATE.format(prompt=prompt)
    return f"{system} {text}" if system else text


class Tokenizer:
    def __init__(self, model_file: str, special_tokens: dict[str, int] | None = None):
        try:
            with open(model_file, "rb") as f:
                proto = f.read()
            self.sp = SentencePieceProcessor(model_proto=proto)
            self.sp_no_prefix = SentencePieceProcessor(model_proto=proto + _NO_DUMMY_PREFIX)
        except (OSError, RuntimeError) as e:
            raise MinidamroError(f"cannot load tokenizer {model_file}: {e}") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.special = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id) if i >= 0}
        self.special |= special_tokens or {}
        # Longest first, so that a special token that is a prefix of another never wins.
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.bos_id] if bos else []
        offset = 0
        for chunk in self._split.split(text):
            if chunk in self.special:
                ids.append(self.special[chunk])
            elif chunk:
                prefix = offset == 0 and not chunk.startswith((" ", "▁"))
                ids += (self.sp if prefix else self.sp_no_prefix).encode(chunk)
            offset += len(chunk)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, skipping special and control tokens and ids the tokenizer does not know (llava-hf
        pads its vocabulary to 32064 rows, so a model can emit ids that have no piece)."""
        n = self.sp.get_piece_size()
        text = self.sp_no_prefix.decode([i for i in ids if 0 <= i < n and not (self.sp.is_control(i) or self.sp.is_unknown(i))])
        return text[1:] if text.startswith(" ") else text  # one leading space is the word-start marker


def prompt_ids(tok: Tokenizer, text: str, image_token: int, num_image_tokens: int) -> list[int]:
    """Token ids of `text` with each `<image>` expanded to one id per image feature."""
    ids = tok.encode(text)
    return [t for i in ids for t in ([i] * num_image_tokens if i == image_token else [i])]
