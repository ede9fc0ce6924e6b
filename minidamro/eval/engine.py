"""Answering many questions about one image, with the per-image work done once.

Per image: the vision tower, the projector, the method's preparation (DAMRO's outlier selection, VCD's
noised image) and, for every stream of the method, the KV cache of the prompt up to the end of the image
tokens. Per question: each cache is rewound to that prefix, the question's own ids are prefilled after it,
and the streams are decoded by the contrastive core as `generate` decodes them. `reuse=False` is the
per-question path, exactly `generate`'s (`contrastive.generate`).

Several seeds (eval --seeds) answer each image in turn: where the method's preparation draws nothing from the
generator (plain, DAMRO), the image's prefix caches are kept from one seed to the next and only the questions
are decoded again; VCD's noised image is each seed's own, so its prefix is built again.

Prefilling a prefix and then the rest equals one prefill of the whole prompt up to float rounding (a matrix
product over fewer rows may round differently), so an answer can differ from the per-question path where
two tokens are nearly tied; the benchmark counts how often. VCD differs more: with reuse its noised image is
drawn once per image (from a generator seeded by the run's seed and the image), where the per-question path
draws it per question from the question's sampler, as `generate` does.

InstructBLIP's image features depend on the question (its Q-Former reads the prompt), so nothing is shared
between its questions: it always takes the per-question path (eval records reuse false for it).
"""
import hashlib

import torch

from .. import MinidamroError, contrastive
from ..contrastive import Method
from ..generation import Sampler, decode_step, new_cache, prefill
from ..tokenizer import instruction_ids, model_prompt_ids


def derived_seed(seed: int, key: str) -> int:
    """A seed from the run's seed and a question id (or an image): the same answer whatever the order, the
    shard or an interruption (the released scripts seed once per run instead)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") >> 1




class Engine:
    def __init__(self, model, tok, method: Method, cfg, system, max_new_tokens: int, temperature, top_p, seed,
                 reuse: bool = True, batch_questions: bool = False):
        self.model, self.tok, self.method, self.cfg, self.system = model, tok, method, cfg, system
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.reuse, self.batch_questions = reuse, batch_questions
        if model.cfg.model_type == "instructblip" and (reuse or batch_questions):
            raise MinidamroError("InstructBLIP's image features depend on the question: nothing of an image can be "
                                 "shared between its questions (reuse=False, no batch_questions)")
        self.device = model.lm_head.weight.device
        self.rule = None if method.rule is None else (lambda rows: method.rule(cfg, rows))
        self.caches = None  # allocated once per run, at the longest size asked for so far
        self.prefix_of = None  # seed or None: whose prefix the caches hold, with (prepared, lengths)

    def ids(self, prompt: str, image_size=None):
        # LLaVA-NeXT: an image-token count that depends on the image size; InstructBLIP: its own layout
        return torch.tensor(model_prompt_ids(self.tok, self.model.cfg, prompt, self.system, image_size),
                            device=self.device)

    def room(self, n_ids: int) -> int:
        return min(self.max_new_tokens, self.model.cfg.text.max_position_embeddings - n_ids)

    def sampler(self, item_id: str, run_seed: int):
        seed = derived_seed(run_seed, item_id)
        return seed, Sampler(self.temperature, self.top_p, seed, self.device)

    def answer_image(self, pixels, prompts: list[tuple[str, str]], image_key: str = "", image_size=None,
                     seed: int | None = None, same_image: bool = False):
        """prompts: [(item id, prompt)] about one image -> yields (item id, seed, token ids, info) in order.
        pixels, image_size: as anyres.model_pixels gives them (LLaVA-NeXT: tiles and the image's size).
        seed: the run's seed for these answers (default: the engine's). same_image: the previous call's image
        (another seed's questions about it), whose prefix can be kept."""
        seed = self.seed if seed is None else seed
        if not self.reuse:
            for item_id, prompt in prompts:
                ids = self.ids(prompt, image_size)
                seed_q, sampler = self.sampler(item_id, seed)
                info, tokens = contrastive.generate(
                    self.model, ids, pixels, self.method, self.cfg, sampler, self.room(len(ids)), image_size=image_size,
                    instruction=instruction_ids(self.tok, self.model.cfg, prompt, self.system))
                yield item_id, seed_q, list(tokens), info
        elif self.batch_questions:
            yield from self._answer_image_batched(pixels, prompts, image_key, image_size, seed)
        else:
            if not same_image:
                self.prefix_of = None
            yield from self._answer_image_reused(pixels, prompts, image_key, image_size, seed)

    def _ids(self, prompts, image_size):
        """The prompts' ids, and where their shared prefix ends (the end of the image run)."""
        all_ids = [self.ids(p, image_size) for _, p in prompts]
        return all_ids, int((all_ids[0] == self.model.cfg.image_token_index).nonzero()[-1]) + 1

    def _prefix(self, pixels, prompts, image_key, image_size, seed):
        """Per image: the method's preparation, the prompts' ids, where the shared prefix ends, each stream's prefix."""
        image_token = self.model.cfg.image_token_index
        generator = torch.Generator(self.device).manual_seed(derived_seed(seed, "image/" + image_key))
        prepared = self.method.prepare(self.model, pixels.to(self.device), self.cfg, generator, image_size=image_size)
        all_ids, end = self._ids(prompts, image_size)
        prefix = all_ids[0][:end]
        for ids in all_ids:  # the template puts every question after the image, so the prefix is shared
            assert torch.equal(ids[:end], prefix), "questions do not share the prompt up to the image"
        prefixes = [contrastive.stream_ids(prefix, image_token, len(f)) for f in prepared.features]
        return prepared, all_ids, end, prefixes

    @torch.inference_mode()
    def _answer_image_reused(self, pixels, prompts, image_key, image_size, seed):
        model = self.model
        key = seed if self.method.random else None
        if self.prefix_of is not None and self.prefix_of[0] == key:  # another seed, same image: keep the prefix
            prepared, lengths = self.prefix_of[1]
            all_ids, end = self._ids(prompts, image_size)
            longest = max(len(ids) for ids in all_ids) - end + self.max_new_tokens
            fits = all(c.max_len >= n + longest for c, n in zip(self.caches, lengths))
        else:
            fits = False
        if not fits:
            prepared, all_ids, end, prefixes = self._prefix(pixels, prompts, image_key, image_size, seed)
            longest = max(len(ids) for ids in all_ids) - end + self.max_new_tokens
            if self.caches is None or any(c.max_len < len(p) + longest for c, p in zip(self.caches, prefixes)):
                self.caches = [new_cache(model, len(p) + longest) for p in prefixes]
            for cache, p, f in zip(self.caches, prefixes, prepared.features):
                cache.length = 0
                prefill(model, model.embed(p, f), cache)
            lengths = [c.length for c in self.caches]
            self.prefix_of = (key, (prepared, lengths))
        for (item_id, _), ids in zip(prompts, all_ids):
            seed_q, sampler = self.sampler(item_id, seed)
            contrastive.rewind(self.caches, lengths)  # the question's positions are overwritten in place
            rest = model.language_model.embed_tokens(ids[end:])[None]  # (1, T, D): the question's own ids
            logits = [prefill(model, rest, cache) for cache in self.caches]
            tokens = list(contrastive.decode(model, logits, self.caches, self.rule, sampler, self.room(len(ids))))
            yield item_id, seed_q, tokens, prepared.info

    @torch.inference_mode()
    def _answer_image_batched(self, pixels, prompts, image_key, image_size, seed):
        """The questions of one image decoded together: one row per (question, stream), each row with its own
        cache holding a copy of its stream's prefix; one forward per step for every unfinished row.
        An experiment (--batch-questions): see docs/evaluation.md for whether it pays on a CPU."""
        model, eos = self.model, self.model.cfg.text.eos_token_id
        prepared, all_ids, end, prefixes = self._prefix(pixels, prompts, image_key, image_size, seed)
        S = len(prepared.features)
        longest = max(len(ids) for ids in all_ids) - end + self.max_new_tokens
        shared = [new_cache(model, len(p)) for p in prefixes]
        for cache, p, f in zip(shared, prefixes, prepared.features):
            prefill(model, model.embed(p, f), cache)
        rows, samplers, seeds, out, logits, room = [], [], [], [], [], []
        for (item_id, _), ids in zip(prompts, all_ids):
            seed_q, sampler = self.sampler(item_id, seed)
            seeds.append(seed_q)
            samplers.append(sampler)
            room.append(self.room(len(ids)))
            rest = model.language_model.embed_tokens(ids[end:])[None]
            first = []
            for src in shared:
                c = new_cache(model, src.length + longest)
                c.k[:, :, :src.length], c.v[:, :, :src.length] = src.k, src.v
                c.length = src.length
                first.append(prefill(model, rest, c))
                rows.append(c)
            logits.append(first)
            out.append([])
        active = list(range(len(prompts)))
        while active:
            tokens = []
            for q in active:
                t = samplers[q].choose(logits[q][0] if self.rule is None else self.rule(logits[q]))
                out[q].append(int(t))
                tokens.append(t)
            keep = [i for i, q in enumerate(active) if out[q][-1] != eos and len(out[q]) < room[q]]
            active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
            if not active:
                break
            caches = [rows[q * S + s] for q in active for s in range(S)]
            step = decode_step(model, torch.cat(tokens).repeat_interleave(S), caches)
            for i, q in enumerate(active):
                logits[q] = list(step[i * S:(i + 1) * S])
        for (item_id, _), seed, tokens in zip(prompts, seeds, out):
            yield item_id, seed, tokens, prepared.info
