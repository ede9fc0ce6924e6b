"""InstructBLIP glue (Vicuna-7B in the release DAMRO evaluates): query tokens, Q-Former, language projection.

    pixels -> EVA ViT (eva.py) -> 257 image tokens -> Q-Former (qformer.py), with 32 learned queries and the
    instruction's WordPiece ids -> the 32 query rows -> language_projection -> the 32 `<image>` slots that open
    the LLM prompt -> the LLaMA decoder (llama.py), KV cache and contrastive core unchanged.

The model offers the interface the generation core uses on LLaVA (`cfg.text`, `cfg.image_token_index`,
`language_model`, `lm_head`, `embed`, `logits`, `image_features`), so plain decoding, DAMRO and VCD run
through the same code. One thing differs: the image features depend on the prompt, so they take the
instruction's Q-Former ids (`instruction`).

The prompt, as transformers' InstructBlipProcessor builds it: 32 `<image>` ids, then BOS, then the raw prompt
(no chat template). The BOS slot holds the tokenizer's bos_token, which the release set to "</s>" (id 2, as
LAVIS trained it), not the <s> (1) that text_config names; the converter reads it from the tokenizer files.
"""
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

from .capture import Capture
from .eva import EvaConfig, InstructBlipVisionModel
from .kernels import linear
from .llama import LlamaModel, TextConfig, linear_layer
from .llava import FORMAT_VERSION, Llava
from .qformer import InstructBlipQFormerModel, QFormerConfig



@dataclass
class InstructBlipConfig:
    vision: EvaConfig
    qformer: QFormerConfig
    text: TextConfig
    num_query_tokens: int = 32
    image_token_index: int = 32001   # the tokenizer's "<image>" (an added token)
    prompt_bos_id: int | None = 2    # what the processor puts between the image slots and the prompt: "</s>"
    preprocessor: dict = field(default_factory=dict)    # BLIP's: 224 x 224 bicubic, no crop (image.py)
    special_tokens: dict = field(default_factory=dict)  # added tokens beyond the sentencepiece vocabulary
    torch_dtype: str = "float32"
    model_type: str = "instructblip"

    def image_tokens(self, image_size=None) -> int:
        """Image ids in the prompt: one per query, whatever the image."""
        return self.num_query_tokens

    @classmethod
    def from_dict(cls, d: dict) -> "InstructBlipConfig":
        def pick(dc, sub: dict):  # ignore keys a newer converter may add
            return dc(**{f.name: sub[f.name] for f in fields(dc) if f.name in sub})
        return pick(cls, d | {"vision": pick(EvaConfig, d["vision"]), "qformer": pick(QFormerConfig, d["qformer"]),
                              "text": pick(TextConfig, d["text"])})

    def to_dict(self) -> dict:
        return {"minidamro_format": FORMAT_VERSION} | asdict(self)


class InstructBlip(nn.Module):
    def __init__(self, cfg: InstructBlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InstructBlipVisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.qformer = InstructBlipQFormerModel(cfg.qformer)
        self.language_projection = linear.Linear(cfg.qformer.hidden_size, cfg.text.hidden_size)
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = linear_layer(cfg.text)(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def encode_image(self, pixels, capture: Capture | None = None, hidden_states: list | None = None):
        """pixels (B, 3, S, S) -> the image tokens the Q-Former reads, (B, 1 + N, D_vit), [CLS] at row 0."""
        return self.vision_model(pixels, capture, hidden_states)

    def query_features(self, image_tokens, instruction, capture: Capture | None = None):
        """Image tokens (B, S, D_vit) (all 1 + N, or DAMRO's k) and the instruction's Q-Former ids (T,) -> the
        projected query outputs (B, num_query_tokens, D_text) that fill the prompt's image slots."""
        if instruction is None:
            raise ValueError("InstructBLIP's image features need the instruction's Q-Former ids")
        B = image_tokens.shape[0]
        ids = instruction.to(image_tokens.device)[None].expand(B, -1)
        queries = self.qformer(ids, self.query_tokens.expand(B, -1, -1), image_tokens, capture)
        return self.language_projection(queries)

    def image_features(self, pixels, image_size=None, capture: Capture | None = None, instruction=None):
        """pixels (1, 3, S, S) -> the (num_query_tokens, D_text) embeddings of the prompt's image ids, read under
        `instruction` (the Q-Former ids of the prompt). image_size: unused (LLaVA-NeXT's)."""
        return self.query_features(self.encode_image(pixels, capture), instruction, capture)[0]

    def image_rows(self, name: str) -> int | None:
        """Rows a linear layer sees per image (llava.pack_linears); None for the decoder's (decode steps)."""
        if name.startswith("vision_model.") or ".crossattention.attention.key" in name \
                or ".crossattention.attention.value" in name:  # the image tokens (DAMRO's second stream: k)
            return self.cfg.vision.num_patches + 1
        if name.startswith(("qformer.", "language_projection.")):
            return self.cfg.num_query_tokens  # the queries (and a few instruction rows)
        return None

    # The merge of the image features into the prompt and the float32 logits are LLaVA's, written once there.
    embed, logits = Llava.embed, Llava.logits
