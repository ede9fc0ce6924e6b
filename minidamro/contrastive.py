"""The contrastive-decoding core shared by DAMRO, VCD and plain decoding, written once.

A method only decides what each stream sees: `prepare` turns the pixels into one (n_i, D) block of
projected image features per stream (stream 0 is the full stream, the model as it is). The core then

1. builds each stream's prompt: the same ids with the run of image ids made n_i long (`stream_ids`), so
   positions stay contiguous over a shorter or equal sequence;
2. prefills every stream into its own KV cache (`prefill_streams`);
3. decodes (`decode`): per token, the method's rule turns the streams' logits into one set of scores (for
   DAMRO and VCD Eq. 5-6 of the DAMRO paper; plain decoding has one stream and no rule), the sampler chooses
   one token, and that token is appended to every stream: one forward for all rows (one read of the
   weights), or, with batched=False, one forward per stream as the released DAMRO and VCD code runs them.

Per-image work can be reused across prompts (the evaluation harness does): prepare once, prefill each
stream's prefix (stream_ids up to the end of the image run), then for each question rewind the caches
(`rewind`), prefill the rest of its ids and `decode`.
"""
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import MinidamroError
from .generation import Sampler, decode_step, new_cache, prefill
from .llama import KVCache
from .llava import Llava


@dataclass
class Prepared:
    features: list[torch.Tensor]  # per stream, the (n_i, D) image embeddings it sees; stream 0 = the full stream
    info: dict = field(default_factory=dict)  # what the method chose, for output / JSON (DAMRO: its outliers)


@dataclass(frozen=True)
class Method:
    """A decoding method: its settings, how it builds the streams, and the rule that combines their logits."""
    name: str
    config: type              # dataclass of the settings; its field defaults are the method's defaults
    check: Callable           # (model, cfg) -> None, raises MinidamroError on a bad setting
    prepare: Callable         # (model, pixels (tiles, 3, S, S), cfg, generator, image_size=None, instruction=None)
    #                           -> Prepared; instruction: InstructBLIP's Q-Former ids (its features read the prompt)
    rule: Callable | None     # (cfg, logits: rows of (V,) float32, one per stream) -> scores (V,); None: one stream
    random: bool = False      # prepare draws from the generator (VCD's noise): it differs from seed to seed
    defaults: Callable | None = None  # (model_type) -> {setting: value} where a model's default is not the config's

    def default_config(self, model_type: str):
        """The method's settings with every default, those the model type has of its own included."""
        return self.config(**(self.defaults(model_type) if self.defaults else {}))


@dataclass
class PlainConfig:
    """Plain decoding has no settings of its own (temperature and top-p belong to the sampler)."""


def image_features(model: Llava, pixels, image_size=None, instruction=None) -> torch.Tensor:
    """pixels (1, 3, S, S) -> the projected image features (num_image_tokens, D) on the model's device.
    LLaVA-NeXT: pixels are [base] + tiles (1 + n, 3, S, S) of an image of (height, width) `image_size`,
    and the features are packed (anyres.py). InstructBLIP: the Q-Former reads the image under `instruction`, the
    prompt's Q-Former ids (T,), and the features are its 32 projected query outputs."""
    return model.image_features(pixels.to(model.lm_head.weight.device), image_size, instruction=instruction)


PLAIN = Method("plain", PlainConfig, check=lambda model, cfg: None,
               prepare=lambda model, pixels, cfg, generator=None, image_size=None, instruction=None:
               Prepared([image_features(model, pixels, image_size, instruction)]),
               rule=None)


def check_contrast(alpha: float, beta: float):
    """The settings of the rule of Eq. 5-6 every contrastive method shares: alpha >= 0 finite, beta in (0, 1]."""
    if not 0 < beta <= 1:
        raise MinidamroError(f"--beta must be in (0, 1], got {beta}")
    if not 0 <= alpha < float("inf"):
        raise MinidamroError(f"--alpha must be a finite number >= 0, got {alpha}")


def stream_ids(ids, image_token: int, n: int):
    """The prompt ids (L,) with their one run of image ids made n long: (L - run + n,)."""
    where = (ids == image_token).nonzero()[:, 0]
    start, end = int(where[0]), int(where[-1]) + 1
    return torch.cat([ids[:start], ids.new_full((n,), image_token), ids[end:]])


def new_caches(model: Llava, ids, prepared: Prepared, max_new_tokens: int) -> list[KVCache]:
    """One KV cache per stream, each long enough for its prompt and max_new_tokens more."""
    run = int((ids == model.cfg.image_token_index).sum())
    return [new_cache(model, len(ids) - run + len(f) + max_new_tokens) for f in prepared.features]


def prefill_streams(model: Llava, ids, prepared: Prepared, caches: list[KVCache]) -> list[torch.Tensor]:
    """Prefill each stream's prompt into its own cache, one after the other; each stream's last logits (V,)."""
    image = model.cfg.image_token_index
    return [prefill(model, model.embed(stream_ids(ids, image, len(f)), f), cache)
            for f, cache in zip(prepared.features, caches)]


def rewind(caches: list[KVCache], lengths: list[int]):
    """Forget everything after the first lengths[i] positions of cache i (e.g. back to a shared prefix)."""
    for cache, n in zip(caches, lengths):
        if not 0 <= n <= cache.length:
            raise ValueError(f"cannot rewind a cache of {cache.length} positions to {n}")
        cache.length = n


@torch.inference_mode()
def decode(model: Llava, logits, caches: list[KVCache], rule: Callable | None, sampler: Sampler,
           max_new_tokens: int, batched: bool = True) -> Iterator[int]:
    """Yield token ids: scores = rule(logits) (logits[0] with no rule), choose, stop at EOS (inclusive) or
    after max_new_tokens, else append the token to every stream and read their next logits.

    logits: the streams' current next-token logits, one (V,) row each (from prefill_streams). `batched`
    runs all streams in one forward per token; False runs one forward per stream, in stream order."""
    for i in range(max_new_tokens):
        scores = logits[0] if rule is None else rule(logits)
        token = sampler.choose(scores)
        t = int(token)  # the one host sync per token
        yield t
        if t == model.cfg.text.eos_token_id or i == max_new_tokens - 1:
            return
        if batched or len(caches) == 1:
            logits = decode_step(model, token.expand(len(caches)), caches)  # (N, V)
        else:
            logits = [decode_step(model, token, [cache])[0] for cache in caches]


@torch.inference_mode()
def generate(model: Llava, ids, pixels, method: Method, cfg, sampler: Sampler, max_new_tokens: int,
             batched: bool = True, image_size=None, instruction=None) -> tuple[dict, Iterator[int]]:
    """Decode with `method` under settings `cfg` (None: the method's defaults). ids: (L,) prompt ids with the
    image ids expanded; pixels (1, 3, S, S), or LLaVA-NeXT's tiles of an image of (height, width) `image_size`.
    InstructBLIP: `instruction` is the prompt's Q-Former ids (T,). Returns (what the method chose, iterator over
    the token ids).

    The method's prepare runs here, before the first token: VCD draws its noise from sampler.generator
    first, then every token's draw follows from the same generator."""
    cfg = method.default_config(model.cfg.model_type) if cfg is None else cfg
    method.check(model, cfg)
    prepared = method.prepare(model, pixels, cfg, sampler.generator, image_size=image_size, instruction=instruction)
    caches = new_caches(model, ids, prepared, max_new_tokens)
    logits = prefill_streams(model, ids, prepared, caches)
    rule = None if method.rule is None else (lambda rows: method.rule(cfg, rows))
    return prepared.info, decode(model, logits, caches, rule, sampler, max_new_tokens, batched)
