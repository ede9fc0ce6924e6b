"""Tokenizer and prompt: sentencepiece, tokenizing exactly like transformers' LlamaTokenizer(legacy=False).

transformers splits the text at special tokens (`<image>`, `<s>`, ...) and gives the word-start marker
"▁" only to a piece at the very start of the text, and only if that piece does not already begin with a
space: after a special token no "▁" is inserted. Plain sentencepiece always prepends one
(`add_dummy_prefix`), so we keep a second processor with that switch off for the other pieces.
"""
import os
import re

import torch
from sentencepiece import SentencePieceProcessor

from . import MinidamroError
from .wordpiece import WordPiece

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # llava-hf's chat template for one image and one turn
# The template follows the checkpoint: llava-hf's llava-v1.6-vicuna-7b-hf renders one turn exactly as
# LLaVA-1.5 does. (The v1.6 mistral variant's "[INST] <image>\n{prompt} [/INST]" and its other vocabulary
# are not supported: the converter accepts only a LLaMA decoder with a sentencepiece tokenizer.model.)
# InstructBLIP takes the raw prompt, no chat template (transformers' processor and the DAMRO scripts alike).
TEMPLATES = {"llava": TEMPLATE, "llava_next": TEMPLATE, "instructblip": "{prompt}"}
# The llava_v1 system text that the DAMRO scripts prepend (pass it with --system to reproduce them).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

QFORMER_VOCAB = "qformer_vocab.txt"  # InstructBLIP's Q-Former WordPiece vocabulary in a converted checkpoint

# A ModelProto that sets normalizer_spec (field 3) { add_dummy_prefix (field 3) = false }. Protobuf merges
# a message field that occurs twice, so appending these 4 bytes to a model switches the prefix off.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def build_prompt(prompt: str, system: str | None = None, model_type: str = "llava") -> str:
    text = TEMPLATES[model_type].format(prompt=prompt)
    return f"{system} {text}" if system else text


class Tokenizer:
    qformer: WordPiece | None = None  # InstructBLIP: the Q-Former's instruction tokenizer (load_tokenizer)

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

    def skipped(self, i: int) -> bool:
        """Ids decode() leaves out: special and control tokens, <unk>, ids without a piece."""
        return not 0 <= i < self.sp.get_piece_size() or self.sp.is_control(i) or self.sp.is_unknown(i)

    def closes_byte_run(self, i: int) -> bool:
        """A piece with text of its own: after it, no byte-fallback run ("<0xAB>" pieces) is still open, so
        the text before it can no longer change."""
        return not (self.skipped(i) or self.sp.is_byte(i))

    def decode(self, ids: list[int], strip_space: bool = True) -> str:
        """Text of `ids` as transformers decodes it (skip_special_tokens=True). Special and control tokens
        and ids without a piece are skipped (llava-hf pads its vocabulary to 32064 rows, so a model can emit
        them). A run of byte-fallback pieces becomes its UTF-8 text, or one U+FFFD per byte if the run is
        not valid UTF-8 (where sentencepiece's own decode would keep the valid bytes). So ids split after a
        piece that closes_byte_run decode as decode(head) + decode(tail, strip_space=not decode(head))."""
        out, run = [], bytearray()
        for i in ids + [None]:  # None flushes the last byte run
            if i is not None and self.skipped(i):
                continue
            if i is not None and self.sp.is_byte(i):
                run.append(int(self.sp.id_to_piece(i)[1:-1], 16))  # piece "<0xAB>"
                continue
            if run:
                try:
                    out.append(run.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run.clear()
            if i is not None:
                out.append(self.sp.id_to_piece(i).replace("\u2581", " "))
        text = "".join(out)
        # One leading space is the word-start marker of the first word (not stripped from a continuation).
        return text[1:] if strip_space and text.startswith(" ") else text


def prompt_ids(tok: Tokenizer, text: str, image_token: int, num_image_tokens: int) -> list[int]:
    """Token ids of `text` with each `<image>` expanded to one id per image feature."""
    ids = tok.encode(text)
    return [t for i in ids for t in ([i] * num_image_tokens if i == image_token else [i])]


def load_tokenizer(model_dir: str, cfg) -> Tokenizer:
    """The converted checkpoint's tokenizer; for InstructBLIP with its Q-Former WordPiece as `.qformer`."""
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.model"), cfg.special_tokens)
    if cfg.model_type == "instructblip":
        tok.qformer = WordPiece(os.path.join(model_dir, QFORMER_VOCAB))
    return tok


def model_prompt_ids(tok: Tokenizer, cfg, prompt: str, system: str | None = None, image_size=None) -> list[int]:
    """The LLM's ids for a user prompt, as the model's processor builds them, image ids expanded. LLaVA: the chat
    template with `<image>` expanded (to a count that depends on the image's (height, width) on NeXT).
    InstructBLIP: the 32 query slots first, then its BOS ("</s>", id 2, in the release), then the raw text."""
    text = build_prompt(prompt, system, cfg.model_type)
    if cfg.model_type == "instructblip":
        bos = [] if cfg.prompt_bos_id is None else [cfg.prompt_bos_id]  # None: the tokenizer adds no BOS
        return [cfg.image_token_index] * cfg.num_query_tokens + bos + tok.encode(text, bos=False)
    return prompt_ids(tok, text, cfg.image_token_index, cfg.image_tokens(image_size))


def instruction_ids(tok: Tokenizer, cfg, prompt: str, system: str | None = None) -> torch.Tensor | None:
    """InstructBLIP's Q-Former ids for a user prompt: [CLS] + WordPiece of the same text the LLM gets + [SEP]
    (transformers' processor gives both tokenizers the one text). None for LLaVA, whose image ignores the prompt."""
    if cfg.model_type != "instructblip":
        return None
    ids = tok.qformer.encode(build_prompt(prompt, system, cfg.model_type))
    if len(ids) > cfg.qformer.max_position_embeddings:
        raise MinidamroError(f"the prompt takes {len(ids)} Q-Former tokens; its position embeddings hold "
                             f"{cfg.qformer.max_position_embeddings}")
    return torch.tensor(ids)
