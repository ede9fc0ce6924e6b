"""Train a tiny LLaVA-1.5 from scratch on the toy world: the real model's classes, only smaller.

How LLaVA is put together, in the order the data flows (see minidamro/llava.py for each part):

    image (112 px) -> CLIPVisionTower (ViT, patch 14: [CLS] + 64 patch tokens, read at layer -2)
                   -> drop [CLS] -> projector (2-layer MLP) -> 64 "image tokens" in the LLM's width
    text  "USER: <image>\\nIs there a star in the image? ASSISTANT: Yes</s>USER: ..." -> sentencepiece ids
                   -> the 64 <image> ids are replaced by the 64 image tokens -> LlamaModel -> lm_head

LLaVA's own recipe pre-trains the projector on captions, then fine-tunes everything on conversations. Here
all of it trains at once from random weights, on multi-turn conversations about each scene (a caption,
existence questions in POPE's form, colour / count / position questions), with the loss on the answer
tokens only (the user's turns and the image are context, as in LLaVA's instruction tuning).

Everything is seeded: the same seed and settings give the same weights (on the same machine and torch
build; float summation order can differ elsewhere).
"""
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..image import preprocess
from ..llama import apply_rope, rope_cos_sin
from ..llava import Llava, LlavaConfig, check_state_dict
from ..llama import TextConfig
from ..tokenizer import TEMPLATE, Tokenizer
from ..vision import VisionConfig
from . import world

SP_PIECES = 512  # sentencepiece vocabulary: 259 byte-fallback and control pieces, the rest the world's words


@dataclass
class TrainConfig:
    steps: int = 300
    batch: int = 48           # scenes per step
    lr: float = 2e-3          # AdamW peak learning rate, after a linear warm-up
    warmup: int = 60
    weight_decay: float = 0.05
    seed: int = 0             # seeds the weights and the scene stream
    vit: tuple = (4, 128, 4)  # ViT layers, width, heads (LLaVA's: 24, 1024, 16)
    llm: tuple = (4, 192, 6)  # LLaMA layers, width, heads (Vicuna-7B: 32, 4096, 32)
    threads: int = 2
    turns: str = "single"     # "multi": a conversation per scene; "single": one question per scene
    existence: float = 0.45   # "single": the share of existence questions (the rest captions : attributes = 40 : 15)
    vit_steps: int = 1500     # stage 1: the ViT alone, as CLIP is trained before LLaVA (0: skip)
    vit_batch: int = 64
    vit_lr: float = 3e-3
    freeze_vit: bool = True   # stage 2 trains the projector and the LLM, the ViT frozen (LLaVA-1.5's recipe)
    init: str = ""            # continue from this checkpoint (its weights and tokenizer) instead of from scratch


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


# --------------------------------------------------------------------------------------------- the data

def encode_conversation(tok: Tokenizer, cfg: LlavaConfig, turns) -> tuple[list[int], list[int]]:
    """ids (image expanded) and targets: the next token at answer positions, -100 elsewhere.

    The first turn is exactly the prompt generate builds (TEMPLATE); later turns follow llava-hf's chat
    template, "...</s>USER: {q} ASSISTANT: {a}</s>"."""
    ids, tgt = [], []
    for n, (q, a) in enumerate(turns):
        user = tok.encode(TEMPLATE.format(prompt=q)) if n == 0 else tok.sp_no_prefix.encode(f"USER: {q} ASSISTANT:")
        answer = tok.sp_no_prefix.encode(" " + a) + [tok.eos_id]
        ids += user + answer
        tgt += [-100] * len(user) + answer
    expanded, targets = [], []
    for i, t in zip(ids, tgt):  # <image> -> one id per image token (no loss on them)
        k = cfg.num_image_tokens if i == cfg.image_token_index else 1
        expanded += [i] * k
        targets += [-100] * (k - 1) + [t]
    # Predict token t + 1 at position t: shift the targets left.
    return expanded, targets[1:] + [-100]


def batch(tok, cfg, rng: random.Random, n: int, turns: str = "multi", existence: float = 0.45):
    """n scenes of the training world -> pixels (n, 3, S, S), ids (n, T), targets (n, T) (right-padded)."""
    pixels, rows = [], []
    for _ in range(n):
        scene = world.sample_scene(rng)
        pixels.append(preprocess(world.render(scene), cfg.preprocessor))
        talk = world.conversation(rng, scene) if turns == "multi" else world.single_turn(rng, scene, existence=existence)
        rows.append(encode_conversation(tok, cfg, talk))
    T = max(len(r[0]) for r in rows)
    pad = cfg.special_tokens["<pad>"]
    ids = torch.tensor([r[0] + [pad] * (T - len(r[0])) for r in rows])
    targets = torch.tensor([r[1] + [-100] * (T - len(r[1])) for r in rows])
    return torch.cat(pixels), ids, targets


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


def forward(model: Llava, pixels, ids):
    """Teacher-forced logits (B, T, V) for a batch: the same computation as generation's prefill, batched,
    without a KV cache (training sees whole sequences; right padding needs no mask under causal attention)."""
    features = model.encode_image(pixels)                             # (B, 64, D)
    lm = model.language_model
    x = lm.embed_tokens(ids)                                          # (B, T, D)
    slots = (ids == model.cfg.image_token_index)[..., None]
    x = x.masked_scatter(slots, features.to(x.dtype))                 # image tokens in place of <image> ids
    B, T, _ = x.shape
    cos, sin = rope_cos_sin(torch.arange(T), lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
    for layer in lm.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (proj(h).view(B, T, -1, a.hd).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True,
                                           enable_gqa=a.n_kv != a.n_heads)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.logits(lm.norm(x))


def loss_fn(model, pixels, ids, targets):
    logits = forward(model, pixels, ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


# ---------------------------------------------------------------------------- stage 1: the vision tower

def patch_labels(scene: world.Scene, grid: int, patch: int) -> torch.Tensor:
    """(grid * grid,) the kind index + 1 covering most of each patch (>= 15% of its pixels), 0 = background."""
    label = torch.zeros(world.SIZE, world.SIZE, dtype=torch.long)
    for o in scene.objects:
        m = world.shape_mask(o.kind, o.side)
        inside = torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(o.side, o.side) > 0
        label[o.y:o.y + o.side, o.x:o.x + o.side][inside] = world.KINDS.index(o.kind) + 1
    counts = F.one_hot(label, len(world.KINDS) + 1).view(grid, patch, grid, patch, -1).sum((1, 3))  # (g, g, K+1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    return torch.where(counts.amax(-1) >= 0.15 * patch * patch, best, 0).flatten()


def pretrain_vit(model: Llava, tc: TrainConfig, rng: random.Random, log, every: int = 25):
    """Stage 1, the toy's stand-in for CLIP's pre-training: the ViT learns to see the world's objects from
    direct labels, at the hidden state LLaVA reads: its [CLS] token predicts which kinds are in the image
    (multi-label, as CLIP's [CLS] embedding summarises an image), each patch token which kind covers it.
    The two linear heads are thrown away afterwards, as CLIP's projection is by LLaVA."""
    vt, v = model.vision_tower, model.cfg.vision
    grid, K = world.SIZE // v.patch_size, len(world.KINDS)
    heads = nn.ModuleDict({"cls": nn.Linear(v.hidden_size, K), "patch": nn.Linear(v.hidden_size, K + 1)})
    norm = nn.LayerNorm(v.hidden_size)  # CLIP's post_layernorm plays this part before its projection
    params = list(vt.parameters()) + list(heads.parameters()) + list(norm.parameters())
    opt = torch.optim.AdamW(params, lr=tc.vit_lr, betas=(0.9, 0.98), weight_decay=tc.weight_decay)
    window, start = [], time.time()
    for step in range(tc.vit_steps):
        scenes = [world.sample_scene(rng) for _ in range(tc.vit_batch)]
        pixels = torch.cat([preprocess(world.render(s), model.cfg.preprocessor) for s in scenes])
        present = torch.tensor([[float(k in s.kinds) for k in world.KINDS] for s in scenes])
        patches = torch.stack([patch_labels(s, grid, v.patch_size) for s in scenes])
        h = norm(vt(pixels))                                                 # (B, 1 + N, D)
        loss = (F.binary_cross_entropy_with_logits(heads["cls"](h[:, 0]), present)
                + F.cross_entropy(heads["patch"](h[:, 1:]).flatten(0, 1), patches.flatten()))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, replace(tc, steps=tc.vit_steps, lr=tc.vit_lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == tc.vit_steps:
            print(f"vit step {step + 1:4d}/{tc.vit_steps}  loss {sum(window) / len(window):.4f}  "
                  f"{time.time() - start:6.0f} s", file=log, flush=True)
            window = []


# ------------------------------------------------------------------------------------------ the loop

def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(tc: TrainConfig, workdir: str, log=sys.stderr, every: int = 25, save_every: int = 0, save_to: str = ""):
    """Train; returns (model, tokenizer, losses). `workdir` receives the tokenizer files."""
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    if tc.init:  # a second session of training: same tokenizer, same architecture, its weights as the start
        from ..llava import load_model
        tok_file = os.path.join(workdir, "tokenizer.model")
        shutil.copyfile(os.path.join(tc.init, "tokenizer.model"), tok_file)
        model = load_model(tc.init, dtype="float32")
        cfg = model.cfg
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # own the memory
        model.requires_grad_(True)
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
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(tc.seed + 1)  # the scene stream (the evaluation uses other seeds; --init: pass a new seed)
    if tc.vit_steps:
        print(f"stage 1: the ViT, {tc.vit_steps} steps of {tc.vit_batch} scenes", file=log, flush=True)
        pretrain_vit(model, tc, rng, log)
    if tc.freeze_vit:
        model.vision_tower.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    print(f"training {n_params / 1e6:.2f}M parameters, {tc.steps} steps of {tc.batch} scenes", file=log, flush=True)
    losses, start, window = [], time.time(), []
    model.train()
    for step in range(tc.steps):
        pixels, ids, targets = batch(tok, cfg, rng, tc.batch, tc.turns, tc.existence)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss = loss_fn(model, pixels, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == tc.steps:
            elapsed = time.time() - start
            print(f"step {step + 1:5d}/{tc.steps}  loss {sum(window) / len(window):.4f}  lr {lr_at(step, tc):.2e}  "
                  f"{elapsed:6.0f} s  (eta {elapsed / (step + 1) * (tc.steps - step - 1):.0f} s)", file=log, flush=True)
            window = []
        if save_every and (step + 1) % save_every == 0 and step + 1 < tc.steps:
            save_checkpoint(model, tok_file, f"{save_to}-step{step + 1}")
    return model.eval().requires_grad_(False), tok, tok_file, losses


# ------------------------------------------------------------------------------------- the checkpoint

def save_checkpoint(model: Llava, tok_file: str, out: str, dtype=torch.float32, extra: dict | None = None):
    """Write a normal minidamro checkpoint (config.json, model.safetensors, tokenizer.model) into `out`,
    through a temporary directory renamed into place (never half-written)."""
    from safetensors.torch import save_file
    cfg = model.cfg
    cfg.torch_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    check_state_dict(model.state_dict(), state, "internal")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for secrets; a checkpoint is shared like any directory
        save_file(state, os.path.join(tmp, "model.safetensors"))
        shutil.copyfile(tok_file, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_dict() | ({"toy": extra} if extra else {}), f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
