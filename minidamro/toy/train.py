"""Train a tiny LLaVA-1.5 from scratch on the toy world: the real model's classes, only smaller.

How LLaVA is put together, in the order the data flows (see minidamro/llava.py for each part):

    image (112 px) -> CLIPVisionTower (ViT, patch 14: [CLS] + 64 patch tokens, read at layer -2)
                   -> drop [CLS] -> projector (2-layer MLP) -> 64 "image tokens" in the LLM's width
    text  "USER: <image>\\nIs there a star in the image? ASSISTANT: Yes</s>USER: ..." -> sentencepiece ids
                   -> the 64 <image> ids are replaced by the 64 image tokens -> LlamaModel -> lm_head

LLaVA is built from parts trained apart: a CLIP ViT, a language model (Vicuna), then a projector aligned
between them with both frozen, then the projector and the LLM fine-tuned together on instructions. The toy
follows the same order; stages 2-5 learn from the answer tokens (averaged per conversation), stage 2 with two
probes added and stage 3 with a regression added:

    1. vit:   the ViT alone learns to see the world's objects (a stand-in for CLIP's pre-training)
    2. text:  the LLM alone learns the world's language and to read a scene: the scene written as words in the
              image's 64 slots (each patch's slot the sum of the embeddings of " large", " red", " star", the
              object covering it; <image> where only background), then existence questions, a caption, or
              colour / count / position questions about it (`text_mix`)
    3. align: the projector alone, ViT and LLM frozen, learns to put image tokens where those slots were
    4. joint: the projector and the LLM together on image questions (`mix`: existence questions, captions,
              colour / count / position questions) at a lower rate; the ViT stays frozen, as in LLaVA-1.5
    5. formats: stage 4 again at a lower rate, the questions also in the forms the benchmarks ask them (POPE's
              "... Please answer this question with one word.", MME's "... Please answer yes or no."), half
              the batches after the llava_v1 system text, so that `minidamro.eval`'s defaults work on the
              toy model (LLaVA-1.5 learns its answer formats in instruction tuning likewise)

Why this order and not everything at once: answering "Is there a star?" from an image takes two hops (carry
"star" to the answer position, then find it among the image tokens), and neither hop alone lowers a balanced
yes/no loss. Trained from random weights on images, the LLM stayed at chance for over a thousand steps. On text
it learns the lookup (with two probes that give each hop its own signal: text_loss), and laid out like the image
tokens, what it reads (kinds, colours, sizes) is what the projector must then produce (align_loss). The
toy document (docs/toy.md) has the measurements behind each choice. Each stage's batches are built in data.py.

Why one module of ~450 lines: it is the whole recipe (the model's sizes, the losses, the five stages, saving) in
the order a reader follows it; the data it trains on is apart in data.py.

Everything is seeded: the same seed and settings give the same weights on the same machine and torch build
(float summation order, and so the weights, can differ elsewhere).
"""
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import write_safetensors
from ..image import preprocess
from ..llama import apply_rope, rope_cos_sin
from ..llava import Llava, LlavaConfig, check_state_dict
from ..llama import TextConfig
from ..tokenizer import LLAVA_V1_SYSTEM, Tokenizer
from ..vision import VisionConfig
from . import splits, world
from .data import (MIX_KINDS, answer_starts, encode_conversation, image_batch, pad_rows, patch_labels,
                   scene_slots, scene_words, text_batch)

SP_PIECES = 512  # sentencepiece vocabulary: 259 byte-fallback and control pieces, the rest the world's words
STAGES = ("vit", "text", "align", "joint", "formats")


@dataclass
class TrainConfig:
    batch: int = 64           # scenes per step, every stage
    lr: float = 3e-3          # AdamW peak rate of stages 1-3, after a linear warm-up, then cosine decay
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 0             # seeds the weights and the scene stream
    vit: tuple = (4, 128, 4)  # ViT layers, width, heads (LLaVA's: 24, 1024, 16)
    llm: tuple = (4, 192, 6)  # LLaMA layers, width, heads (Vicuna-7B: 32, 4096, 32)
    threads: int = 2
    precision: str = "bf16"   # matmuls under bfloat16 autocast (weights, AdamW float32), ~1.4x faster than "fp32"
    vit_steps: int = 3000     # stage 1 (0 skips a stage)
    vit_objective: str = "cls+patch"  # stage 1's labels: "cls+patch" (both heads), "cls" or "global" (image-level)
    vit_lr: float = 0.0       # stage 1's peak rate (0: lr)
    vit_weight_decay: float = -1.0  # stage 1's weight decay (< 0: weight_decay)
    text_steps: int = 1000    # stage 2
    questions: int = 6        # stage 2: questions per existence or attribute conversation
    text_mix: tuple = (0.5, 0.4, 0.1)  # stages 2 and 3's shares of existence questions, captions, attributes
    align_steps: int = 400    # stage 3
    steps: int = 800          # stage 4
    joint_lr: float = 1e-3    # stage 4's peak rate: at 3e-3 the LLM's lookup collapsed to chance in 75 steps
    mix: tuple = (0.7, 0.2, 0.1)  # stages 4 and 5's shares of existence questions, captions, attribute questions
    format_steps: int = 400   # stage 5: stage 4 again, asking also in the benchmarks' forms (world.FORMS)
    format_lr: float = 1e-3   # stage 5's peak rate (stage 4's)
    system_share: float = 0.5  # stage 5: the share of batches that start with the llava_v1 system text
    init: str = ""            # start from this checkpoint (its weights and tokenizer) instead of from scratch

    def stage_steps(self) -> dict:
        return dict(zip(STAGES, (self.vit_steps, self.text_steps, self.align_steps, self.steps, self.format_steps)))


PROBE_WEIGHT = 0.5  # stage 2: the probes' losses against the answers' (text_loss)


def model_config(tc: TrainConfig, sp_size: int) -> LlavaConfig:
    """The architecture of LLaVA-1.5 at toy scale: CLIP ViT with [CLS], quick_gelu, layer -2 features with
    [CLS] dropped; the GELU projector; a LLaMA with RMSNorm, RoPE, SwiGLU. <image> and <pad> come right after
    the sentencepiece pieces (as llava-hf's 32000, 32001), and the rows are padded to a multiple of 64."""
    (vl, vw, vh), (tl, tw, th) = tc.vit, tc.llm
    image, pad = sp_size, sp_size + 1
    return LlavaConfig(
        vision=VisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                            image_size=world.SIZE, patch_size=14),
        text=TextConfig(hidden_size=tw, intermediate_size=8 * tw // 3 // 32 * 32, num_hidden_layers=tl,
                        num_attention_heads=th, num_key_value_heads=th, head_dim=tw // th,
                        vocab_size=-(-(sp_size + 2) // 64) * 64, max_position_embeddings=512),
        image_token_index=image,
        preprocessor={"do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": world.SIZE},
                      "resample": 3, "do_center_crop": True,
                      "crop_size": {"height": world.SIZE, "width": world.SIZE}, "do_rescale": True,
                      "rescale_factor": 1 / 255, "do_normalize": True,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]},
        special_tokens={"<image>": image, "<pad>": pad})


def train_tokenizer(prefix: str, seed: int) -> str:
    """A LLaMA-style BPE sentencepiece model (byte fallback, <unk> 0, <s> 1, </s> 2) on the world's own text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        scene = world.sample_scene(rng)
        for q, a in world.conversation(rng, scene):
            lines.append(f"USER: {q} ASSISTANT: {a}")
    with open(prefix + ".txt", "w") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=prefix + ".txt", model_prefix=prefix, vocab_size=SP_PIECES, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2)
    return prefix + ".model"


# ------------------------------------------------------------------------------------------- the model

def init_weights(model: Llava, seed: int):
    """GPT-2-style initialisation: N(0, 0.02) everywhere, the residual output projections scaled down by
    sqrt(2 * layers), biases 0, norms 1."""
    g = torch.Generator().manual_seed(seed)
    n_vit, n_llm = model.cfg.vision.num_hidden_layers, model.cfg.text.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                std = 0.02
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    std /= math.sqrt(2 * n_vit)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * n_llm)
                p.copy_(torch.randn(p.shape, generator=g) * std)


def forward(model: Llava, image, ids, probe_layer: int | None = None):
    """Teacher-forced logits (B, T, V) for a batch: the same computation as generation's prefill, batched,
    without a KV cache (training sees whole sequences; right padding needs no mask under causal attention).
    image: the image tokens (B, 64, D), model.encode_image(pixels), or None for a text-only batch (stage 2).
    probe_layer=n: also return the hidden states after layer n."""
    lm = model.language_model
    x = lm.embed_tokens(ids)                                          # (B, T, D)
    if image is not None:
        slots = (ids == model.cfg.image_token_index)[..., None]
        x = x.masked_scatter(slots, image.to(x.dtype))                # image tokens in place of <image> ids
    B, T, _ = x.shape
    cos, sin = rope_cos_sin(torch.arange(T), lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
    hidden = None
    for n, layer in enumerate(lm.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (proj(h).view(B, T, -1, a.hd).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True,
                                           enable_gqa=a.n_kv != a.n_heads)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = x if n + 1 == probe_layer else hidden
    logits = model.logits(lm.norm(x))
    return logits if probe_layer is None else (logits, hidden)


def answer_loss(logits, targets):
    """Cross-entropy on the answer tokens, averaged per conversation, then over the batch: a caption's twenty
    tokens weigh as much as a "Yes</s>". (Averaged per token, the captions of a mixed batch outweighed the
    existence answers and the model stopped reading the image: docs/toy.md.)"""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    answer = (targets != -100).float()
    return ((per_token * answer).sum(1) / answer.sum(1)).mean()


def loss_fn(model, pixels, ids, targets):
    return answer_loss(forward(model, None if pixels is None else model.encode_image(pixels), ids), targets)


def existence_accuracy(model, tok, seed: int = 555, n_scenes: int = 60, words: bool = False, form: str = "toy",
                       system: str | None = None) -> float:
    """The share of 200 POPE-style random-split questions (lab scenes of `seed`) whose greedy first answer
    token is right; words=True asks with the scene's slots (scene_slots) in the image's place (stage 2);
    form and system: how the question is asked (world.existence_question's forms; a system text before it)."""
    scenes = splits.lab_scenes(seed, n_scenes)
    qs = splits.pope_questions("random", scenes, seed, [str(i) for i in range(n_scenes)])[:200]
    cfg = model.cfg
    rows = [encode_conversation(tok, cfg, [(world.existence_question(q["kind"], form),
                                            "Yes" if q["label"] == "yes" else "No")], system) for q in qs]
    ids, targets = pad_rows(cfg, rows)
    of = [scenes[int(q["image"])] for q in qs]  # each question's scene
    with torch.no_grad():
        image = (scene_slots(model, torch.stack([scene_words(tok, cfg, s) for s in of])) if words else
                 model.encode_image(torch.cat([preprocess(world.render(s), cfg.preprocessor) for s in of])))
        logits = forward(model, image, ids)
    first = answer_starts(targets)  # one answer per row: where its first token is predicted
    return int((logits[first].argmax(-1) == targets[first]).sum()) / len(qs)


# ---------------------------------------------------------------------------------------- the stages

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def optimise(name: str, params, steps: int, loss_of, tc: TrainConfig, log, lr: float, every: int = 25,
             weight_decay: float | None = None) -> list[float]:
    """One stage: AdamW over `params` for `steps` steps at peak rate `lr`, loss_of(step) giving each batch's
    loss; returns the per-step losses. Weight decay on matrices only (not on norms, biases or embeddings)."""
    params = [(n, p) for n, p in params if p.requires_grad]
    matrices = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
    others = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
    wd = tc.weight_decay if weight_decay is None else weight_decay
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": wd},
                             {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()
    losses, window, start = [], [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, tc.warmup)
        with autocast:
            loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(matrices + others, 1.0)
        opt.step()
        losses.append(loss.item())
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            print(f"{name:5s} step {step + 1:5d}/{steps}  loss {sum(window) / len(window):.4f}  "
                  f"lr {lr_at(step, steps, lr, tc.warmup):.2e}  {elapsed:6.0f} s  "
                  f"(eta {elapsed / (step + 1) * (steps - step - 1):.0f} s)", file=log, flush=True)
            window = []
    return losses


def pretrain_vit(model: Llava, tc: TrainConfig, rng: random.Random, log) -> list[float]:
    """Stage 1, the toy's stand-in for CLIP's pre-training: the ViT learns to see the world's objects from
    direct labels, at the hidden state LLaVA reads: its [CLS] token predicts which kinds are in the image
    (multi-label, as CLIP's [CLS] embedding summarises an image), each patch token which kind covers it.
    The two linear heads are thrown away afterwards, as CLIP's projection is by LLaVA.

    vit_objective "cls" drops the per-patch labels and asks [CLS] for more instead (the kinds present and
    each present kind's colour): an image-level objective only, as CLIP's, which the literature names as a
    driver of high-norm outlier tokens (docs/toy.md, "Outlier tokens"). "global" asks the same of every patch
    token too, so that global content must reach every token (the job registers do in large ViTs)."""
    vt, v = model.vision_tower, model.cfg.vision
    grid, K = world.SIZE // v.patch_size, len(world.KINDS)
    heads = nn.ModuleDict({"cls": nn.Linear(v.hidden_size, K), "patch": nn.Linear(v.hidden_size, K + 1),
                           "norm": nn.LayerNorm(v.hidden_size)})  # CLIP's post_layernorm plays this part

    def loss_of(step):
        scenes = [world.sample_scene(rng) for _ in range(tc.batch)]
        pixels = torch.cat([preprocess(world.render(s), model.cfg.preprocessor) for s in scenes])
        present = torch.tensor([[float(k in s.kinds) for k in world.KINDS] for s in scenes])
        patches = torch.stack([patch_labels(s, grid, v.patch_size) for s in scenes])
        h = heads["norm"](vt(pixels))                                         # (B, 1 + N, D)
        if tc.vit_objective in ("cls", "global"):
            coloured = torch.tensor([[float(any(o.kind == k and o.colour == c for o in s.objects))
                                      for k in world.KINDS for c in world.COLOURS] for s in scenes])
            target = torch.cat([present, coloured], 1)                        # (B, K + K * colours)
            loss = F.binary_cross_entropy_with_logits(heads["global"](h[:, 0]).float(), target)
            if tc.vit_objective == "global":  # every patch token too must know the whole image's content
                loss = loss + F.binary_cross_entropy_with_logits(
                    heads["global"](h[:, 1:]).float(), target[:, None].expand(-1, h.shape[1] - 1, -1))
            return loss
        return (F.binary_cross_entropy_with_logits(heads["cls"](h[:, 0]).float(), present)
                + F.cross_entropy(heads["patch"](h[:, 1:]).float().flatten(0, 1), patches.flatten()))
    if tc.vit_objective in ("cls", "global"):
        heads = nn.ModuleDict({"global": nn.Linear(v.hidden_size, K + K * len(world.COLOURS)),
                               "norm": heads["norm"]})
    elif tc.vit_objective != "cls+patch":
        raise ValueError(f"unknown vit_objective {tc.vit_objective}")
    params = list(vt.named_parameters()) + list(heads.named_parameters())
    return optimise("vit", params, tc.vit_steps, loss_of, tc, log, tc.vit_lr or tc.lr,
                    weight_decay=None if tc.vit_weight_decay < 0 else tc.vit_weight_decay)


def text_loss(model, probes, ids, targets, words, asked, present):
    """Stage 2's loss: the answers', plus two linear probes at each answer's position halfway up the LLM, one
    reading the asked kind there (answers to existence questions only), one the kinds among the words.

    Why the probes: answering takes two hops (carry the asked kind from the question to the answer position,
    then find it among the words), and neither hop alone lowers a balanced yes/no loss, so an LLM trained on the
    answers alone sits at chance for hundreds of steps and leaves it at a step that is down to luck (from 250
    to past 600 in the runs of docs/toy.md). Each probe's loss falls as soon as its hop starts to form, which gives
    both hops a signal from the first step; the answers then follow within ~150 steps. The probes are thrown
    away after the stage, like stage 1's heads."""
    logits, hidden = forward(model, scene_slots(model, words), ids,
                             probe_layer=max(1, len(model.language_model.layers) // 2))
    h = hidden[answer_starts(targets)]  # (Q, D): the answers in order, row by row, as asked / present are
    existence = asked != -100           # the asked-kind probe reads only at answers to existence questions
    probe = (F.cross_entropy(probes["asked"](h[existence]).float(), asked[existence]) if existence.any() else 0
             ) + F.binary_cross_entropy_with_logits(probes["present"](h).float(), present)
    return answer_loss(logits, targets) + PROBE_WEIGHT * probe


def format_loss(model, probe, pixels, ids, targets, scenes, asked):
    """Stage 5's loss: the answers', plus stage 2's asked-kind probe at the existence answers. Without it the
    questions in the benchmarks' forms stayed at chance (0.51 after 300 steps at 3e-4, docs/toy.md): with a
    suffix after the question, the kind sits at another distance from the answer, and carrying it there is
    the hop that a balanced yes/no loss alone does not teach (text_loss)."""
    logits, hidden = forward(model, model.encode_image(pixels), ids,
                             probe_layer=max(1, len(model.language_model.layers) // 2))
    h = hidden[answer_starts(targets)]
    existence = asked != -100
    probe_loss = F.cross_entropy(probe(h[existence]).float(), asked[existence]) if existence.any() else 0
    return answer_loss(logits, targets) + PROBE_WEIGHT * probe_loss


def align_loss(model, tok, pixels, ids, targets, scenes):
    """Stage 3's loss: the answers', through the frozen LLM (LLaVA's own alignment objective), plus each image
    token's squared distance to its patch's slot in stage 2 (scene_slots: the sum of the size, colour and kind
    words' embeddings), relative to the slots' mean square. With the answers alone the projector found no way
    in: 0.52-0.63 after 400-1000 steps (docs/toy.md); the regression points it at what the LLM already
    reads. The answers are stage 2's mix (`text_mix`), one conversation per image."""
    image = model.encode_image(pixels)                                             # (B, 64, D)
    words = scene_slots(model, torch.stack([scene_words(tok, model.cfg, s) for s in scenes])).float()
    regression = (image.float() - words).pow(2).mean() / words.pow(2).mean()
    return answer_loss(forward(model, image, ids), targets) + regression


def train(tc: TrainConfig, workdir: str, log=sys.stderr, after_stage=None):
    """Train; returns (model, tokenizer, tokenizer file, {stage: per-step losses}). `workdir` receives the
    tokenizer files; after_stage(stage, model, tokenizer file), if given, runs after each stage."""
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    if tc.init:  # start from a checkpoint: same tokenizer, same architecture, its weights
        from ..llava import load_model
        tok_file = os.path.join(workdir, "tokenizer.model")
        shutil.copyfile(os.path.join(tc.init, "tokenizer.model"), tok_file)
        model = load_model(tc.init, dtype="float32")
        cfg = model.cfg
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # own the memory
        for m in model.modules():  # a packed inference copy of a weight would not follow the training
            if getattr(m, "packed", None) is not None:
                m.packed = None
    else:
        tok_file = train_tokenizer(os.path.join(workdir, "tokenizer"), tc.seed)
        sp_size = spm.SentencePieceProcessor(model_file=tok_file).get_piece_size()
        cfg = model_config(tc, sp_size)
        model = Llava(cfg)
        init_weights(model, tc.seed)
    tok = Tokenizer(tok_file, cfg.special_tokens)
    rng = random.Random(tc.seed + 1)  # the scene stream (the lab and the tests use other seeds)
    llm = list(model.language_model.named_parameters()) + list(model.lm_head.named_parameters())
    projector = list(model.multi_modal_projector.named_parameters())
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; stages (steps x {tc.batch} "
          f"scenes): " + ", ".join(f"{stage} {n}" for stage, n in tc.stage_steps().items()), file=log, flush=True)
    model.train()
    losses = {}
    for stage, steps in tc.stage_steps().items():
        if not steps:
            continue
        model.requires_grad_(False)  # each stage trains only its own parts
        if stage == "vit":
            model.vision_tower.requires_grad_(True)
            losses[stage] = pretrain_vit(model, tc, rng, log)
        else:
            if stage == "text":
                probes = nn.ModuleDict({name: nn.Linear(cfg.text.hidden_size, len(world.KINDS))
                                        for name in ("asked", "present")})
                params, lr = llm + list(probes.named_parameters()), tc.lr
                text_mix = dict(zip(MIX_KINDS, tc.text_mix))
                loss_of = lambda step: text_loss(model, probes, *text_batch(tok, cfg, rng, tc.batch, tc.questions,
                                                                            text_mix))
            elif stage == "align":
                params, lr = projector, tc.lr
                align_mix = dict(zip(MIX_KINDS, tc.text_mix))
                loss_of = lambda step: align_loss(model, tok, *image_batch(tok, cfg, rng, tc.batch, align_mix)[:4])
            elif stage == "joint":
                mix = dict(zip(MIX_KINDS, tc.mix))
                params, lr = projector + llm, tc.joint_lr
                loss_of = lambda step: loss_fn(model, *image_batch(tok, cfg, rng, tc.batch, mix)[:3])
            else:  # formats: as LLaVA-1.5 learns its answer formats in instruction tuning
                mix = dict(zip(MIX_KINDS, tc.mix))
                probe = nn.Linear(cfg.text.hidden_size, len(world.KINDS))
                params, lr = projector + llm + list(probe.named_parameters()), tc.format_lr
                loss_of = lambda step: format_loss(model, probe, *image_batch(tok, cfg, rng, tc.batch, mix,
                                                                              world.FORMS, tc.system_share))
            for _, p in params:
                p.requires_grad_(True)
            losses[stage] = optimise(stage, params, steps, loss_of, tc, log, lr)
            accuracy = existence_accuracy(model, tok, words=stage == "text")
            print(f"{stage:5s} done: existence accuracy {accuracy:.3f} on 200 held-out questions"
                  f"{' (scene words in place of the image)' if stage == 'text' else ''}", file=log, flush=True)
            if stage == "formats":
                accuracy = existence_accuracy(model, tok, form="pope", system=LLAVA_V1_SYSTEM)
                print(f"{stage:5s} done: {accuracy:.3f} asked as minidamro.eval pope asks (POPE's suffix, the "
                      "llava_v1 system text)", file=log, flush=True)
        if after_stage:
            after_stage(stage, model, tok_file)
    return model.eval().requires_grad_(False), tok, tok_file, losses


# ------------------------------------------------------------------------------------- the checkpoint

def save_checkpoint(model: Llava, tok_file: str, out: str, dtype=torch.float32, extra: dict | None = None):
    """Write a normal minidamro checkpoint (config.json, model.safetensors, tokenizer.model) into `out`,
    through a temporary directory renamed into place (never half-written)."""
    cfg = model.cfg
    cfg.torch_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    check_state_dict(model.state_dict(), state, "internal")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for secrets; a checkpoint is shared like any directory
        write_safetensors(os.path.join(tmp, "model.safetensors"), {k: v.shape for k, v in state.items()}, dtype,
                          state.__getitem__)
        shutil.copyfile(tok_file, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_dict() | ({"toy": extra} if extra else {}), f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
