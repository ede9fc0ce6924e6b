"""Answering many questions about one image, with the per-image work done once.

Per image: the vision tower, the projector, the method's preparation (DAMRO's outlier selection) and, for
every stream of the method, the KV cache of the prompt up to the end of the image tokens. Per question:
each cache is rewound to that prefix, the question's own ids are prefilled after it, and the streams are
decoded as `generate` decodes them. `reuse=False` is the per-question path, exactly `generate`'s.

Prefilling a prefix and then the rest equals one prefill of the whole prompt up to float rounding (a matrix
product over fewer rows may round differently), so an answer can differ from the per-question path where
two tokens are nearly tied; the benchmark counts how often.
"""
import hashlib

import torch

from .. import damro, generation
from ..capture import Capture
from ..generation import decode_loop, decode_step, new_cache, prefill
from ..tokenizer import build_prompt, prompt_ids


def question_seed(seed: int, item_id: str) -> int:
    """Each question's sampler seed, from the run's seed and the question's id only: the same answer whatever
    the order, the shard or an interruption (the released scripts seed once per run instead)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{item_id}".encode()).digest()[:8], "big") >> 1


class Method:
    """A decoding method as the harness needs it: per-stream image features from one image, and the rule
    turning the streams' logits into scores. Stream 0 sees the whole image."""

    def __init__(self, name: str, dcfg: damro.DamroConfig | None, batched: bool = True):
        self.name, self.dcfg, self.batched = name, dcfg, batched

    @torch.inference_mode()
    def prepare(self, model, pixels):
        """-> (list of (n_i, D) features per stream, info for the answers file)."""
        if self.name == "plain":
            return [model.encode_image(pixels)[0]], {}
        # The first half of damro.generate: one ViT pass gives the features and the [CLS] attention (Eq. 3-4).
        layer = damro.selection_layer(model)
        full = self.dcfg.outlier_attention == "full"
        want = Capture(vit_qk_layers=(layer,)) if full else Capture(vit_layers=(layer,))
        features = model.encode_image(pixels, want)[0]
        outliers = damro.select_outliers(damro.cls_attention(want, layer, self.dcfg.outlier_attention), self.dcfg.topk)
        cls_kept = model.cfg.vision_feature_select_strategy == "full"  # then patch j is feature j + 1
        return [features, features[outliers + cls_kept]], {"outliers": outliers.tolist()}

    def rule(self, logits):
        return logits[0] if self.name == "plain" else damro.damro_scores(logits[0], logits[1], self.dcfg.alpha,
                                                                         self.dcfg.beta)

    def generate(self, model, ids, pixels, sampler, max_new):
        """The per-question path: exactly what `python -m minidamro.generate` runs."""
        if self.name == "plain":
            return {}, generation.generate(model, ids, pixels, sampler, max_new)
        outliers, tokens = damro.generate(model, ids, pixels, self.dcfg, sampler, max_new, batched=self.batched)
        return {"outliers": outliers}, tokens


def stream_ids(ids, image_token: int, n: int):
    return ids if int((ids == image_token).sum()) == n else damro.contrastive_ids(ids, image_token, n)


class Engine:
    def __init__(self, model, tok, method: Method, system, max_new_tokens: int, temperature, top_p, seed,
                 reuse: bool = True, batch_questions: bool = False):
        self.model, self.tok, self.method, self.system = model, tok, method, system
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.reuse, self.batch_questions = reuse, batch_questions
        self.device = model.lm_head.weight.device
        self.caches = None  # allocated once per run, at the longest size asked for so far

    def ids(self, prompt: str):
        cfg = self.model.cfg
        ids = prompt_ids(self.tok, build_prompt(prompt, self.system), cfg.image_token_index, cfg.num_image_tokens)
        return torch.tensor(ids, device=self.device)

    def room(self, n_ids: int) -> int:
        return min(self.max_new_tokens, self.model.cfg.text.max_position_embeddings - n_ids)

    def sampler(self, item_id: str):
        seed = question_seed(self.seed, item_id)
        return seed, generation.Sampler(self.temperature, self.top_p, seed, self.device)

    def answer_image(self, pixels, prompts: list[tuple[str, str]]):
        """prompts: [(item id, prompt)] about one image -> yields (item id, seed, token ids, info) in order."""
        if not self.reuse:
            for item_id, prompt in prompts:
                ids = self.ids(prompt)
                seed, sampler = self.sampler(item_id)
                info, tokens = self.method.generate(self.model, ids, pixels, sampler, self.room(len(ids)))
                yield item_id, seed, list(tokens), info
            return
        if self.batch_questions:
            yield from self._answer_image_batched(pixels, prompts)
        else:
            yield from self._answer_image_reused(pixels, prompts)

    def _prefix(self, pixels, prompts):
        """Per image: the method's features, the prompts' ids, where the shared prefix ends, each stream's prefix."""
        image_token = self.model.cfg.image_token_index
        features, info = self.method.prepare(self.model, pixels.to(self.device))
        all_ids = [self.ids(p) for _, p in prompts]
        end = int((all_ids[0] == image_token).nonzero()[-1]) + 1  # the prefix: up to the end of the image run
        prefix = all_ids[0][:end]
        for ids in all_ids:  # the template puts every question after the image, so the prefix is shared
            assert torch.equal(ids[:end], prefix), "questions do not share the prompt up to the image"
        prefixes = [stream_ids(prefix, image_token, f.shape[0]) for f in features]
        return features, info, all_ids, end, prefixes

    @torch.inference_mode()
    def _answer_image_reused(self, pixels, prompts):
        model = self.model
        features, info, all_ids, end, prefixes = self._prefix(pixels, prompts)
        longest = max(len(ids) for ids in all_ids) - end + self.max_new_tokens
        if self.caches is None or any(c.max_len < len(p) + longest for c, p in zip(self.caches, prefixes)):
            self.caches = [new_cache(model, len(p) + longest) for p in prefixes]
        for cache, p, f in zip(self.caches, prefixes, features):
            cache.length = 0
            prefill(model, model.embed(p, f), cache)
        lengths = [c.length for c in self.caches]
        for (item_id, _), ids in zip(prompts, all_ids):
            seed, sampler = self.sampler(item_id)
            rest = model.language_model.embed_tokens(ids[end:])[None]  # (1, T, D): the question's own ids
            logits = []
            for cache, n in zip(self.caches, lengths):
                cache.length = n  # rewind: the question's positions are overwritten in place
                logits.append(prefill(model, rest, cache))
            caches, rule = self.caches, self.method.rule

            def step(token):
                return rule(list(decode_step(model, token.expand(len(caches)), caches)))

            tokens = list(decode_loop(model, rule(logits), step, sampler, self.room(len(ids))))
            yield item_id, seed, tokens, info

    @torch.inference_mode()
    def _answer_image_batched(self, pixels, prompts):
        """The questions of one image decoded together: one row per (question, stream), each row with its own
        cache holding a copy of its stream's prefix; one forward per step for every unfinished row.
        An experiment (--batch-questions): see the README for whether it pays on a CPU."""
        model, eos = self.model, self.model.cfg.text.eos_token_id
        features, info, all_ids, end, prefixes = self._prefix(pixels, prompts)
        S = len(features)
        longest = max(len(ids) for ids in all_ids) - end + self.max_new_tokens
        shared = [new_cache(model, len(p)) for p in prefixes]
        for cache, p, f in zip(shared, prefixes, features):
            prefill(model, model.embed(p, f), cache)
        rows, samplers, seeds, out, logits, room = [], [], [], [], [], []
        for (item_id, _), ids in zip(prompts, all_ids):
            seed, sampler = self.sampler(item_id)
            seeds.append(seed)
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
                t = samplers[q].choose(self.method.rule(logits[q]))
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
            yield item_id, seed, tokens, info
