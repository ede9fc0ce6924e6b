"""The toy trainer's data: the conversations each stage learns from, encoded as LLaVA sees them.

Every stage's batch is built here from scenes of the world (world.py): token ids with the image's 64 slots,
targets on the answer tokens only, and for stage 2 the scene written in those slots (scene_words, summed
into one embedding per patch by scene_slots). train.py puts them through the model.
"""
import random

import torch
import torch.nn.functional as F

from ..image import preprocess
from ..llava import Llava, LlavaConfig
from ..tokenizer import LLAVA_V1_SYSTEM, Tokenizer, build_prompt
from . import world

# Stages 2-5's data, per scene (image_turns): existence questions (in exactly the form generate and the lab ask
# them), a caption, or colour / count / position questions; TrainConfig.questions of them in stage 2, one in
# stages 3-5. A caption is never followed by questions, since it would answer them. Stages 2 and 3 draw
# the kinds in the shares `text_mix` (stage 3's frozen LLM answers what stage 2 taught it), stages 4 and 5 in
# `mix`. Stage 5 also asks in the benchmarks' forms (world.FORMS: POPE's suffix, MME's yes/no questions) and
# puts the llava_v1 system text before the conversation on a share of its batches (`system_share`).
MIX_KINDS = ("existence", "caption", "attribute")


def encode_conversation(tok: Tokenizer, cfg: LlavaConfig, turns, system: str | None = None):
    """ids (the <image> id expanded to one per image token) and targets: the next token at answer positions,
    -100 elsewhere. The first turn is exactly the prompt generate and eval build (build_prompt: TEMPLATE, after
    the system text if given); later turns follow llava-hf's chat template, "...</s>USER: {q} ASSISTANT: {a}</s>"."""
    ids, tgt = [], []
    for n, (q, a) in enumerate(turns):
        user = tok.encode(build_prompt(q, system)) if n == 0 else tok.sp_no_prefix.encode(f"USER: {q} ASSISTANT:")
        answer = tok.sp_no_prefix.encode(" " + a) + [tok.eos_id]
        ids += user + answer
        tgt += [-100] * len(user) + answer
    at = ids.index(cfg.image_token_index)  # <image> -> one id per image token (no loss on them)
    n = cfg.num_image_tokens
    ids[at:at + 1], tgt[at:at + 1] = [cfg.image_token_index] * n, [-100] * n
    # Predict token t + 1 at position t: shift the targets left.
    return ids, tgt[1:] + [-100]


def patch_labels(scene: world.Scene, grid: int, patch: int) -> torch.Tensor:
    """(grid * grid,) the kind index + 1 covering most of each patch (>= 15% of its pixels), 0 = background.
    Every object covers at least one patch this way (the smallest, 22 px, leaves >= 15% of some patch)."""
    label = torch.zeros(world.SIZE, world.SIZE, dtype=torch.long)
    for o in scene.objects:
        m = world.shape_mask(o.kind, o.side)
        inside = torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(o.side, o.side) > 0
        label[o.y:o.y + o.side, o.x:o.x + o.side][inside] = world.KINDS.index(o.kind) + 1
    counts = F.one_hot(label, len(world.KINDS) + 1).view(grid, patch, grid, patch, -1).sum((1, 3))  # (g, g, K+1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    return torch.where(counts.amax(-1) >= 0.15 * patch * patch, best, 0).flatten()


def scene_words(tok: Tokenizer, cfg: LlavaConfig, scene: world.Scene) -> torch.Tensor:
    """(64, 3) ids: for each patch, in the ViT's order, the words of the object covering it (" large",
    " red", " star": size, colour, kind; one sentencepiece piece each), or <image> three times on background.
    scene_slots turns them into stage 2's stand-in for the image."""
    pieces = {w: tok.sp_no_prefix.encode(" " + w) for w in (*world.SIZES, *world.COLOURS, *world.KINDS)}
    if any(len(p) != 1 for p in pieces.values()):
        raise ValueError("the tokenizer splits a size, colour or kind word: stage 2 needs one piece per word")
    grid = cfg.vision.image_size // cfg.vision.patch_size
    words = {0: [cfg.image_token_index] * 3} | {
        world.KINDS.index(o.kind) + 1: [pieces[w][0] for w in (o.size, o.colour, o.kind)] for o in scene.objects}
    return torch.tensor([words[label] for label in patch_labels(scene, grid, cfg.vision.patch_size).tolist()])


def scene_slots(model: Llava, words: torch.Tensor) -> torch.Tensor:
    """(B, 64, 3) scene_words -> (B, 64, D): stage 2's stand-in for the image tokens. A patch's slot is the sum
    of its three words' embeddings (size + colour + kind), a background patch's the embedding of <image>.
    What the LLM learns to read here (which kinds, their colours and sizes, where) sits where the image tokens
    will put it, so stage 3 only has to make each patch's image token look like its slot."""
    e = model.language_model.embed_tokens(words)                                   # (B, 64, 3, D)
    background = (words[..., :1] == model.cfg.image_token_index)                   # (B, 64, 1)
    return torch.where(background, e[..., 0, :], e.sum(-2))


def image_turns(rng: random.Random, scene: world.Scene, mix: dict, n: int = 1,
                forms: tuple = ("toy",)) -> list[tuple[str, str]]:
    """One training conversation about an image, of the kind `mix` draws (shares of MIX_KINDS): n existence
    questions (each in one of `forms`), a caption, or n colour / count / position questions (with "mme" among
    the forms, half of them MME's yes/no questions about a count, a position or a colour)."""
    r = rng.random()
    if r < mix.get("existence", 0):
        return world.existence_questions(rng, scene, n, forms=forms)
    if r < mix.get("existence", 0) + mix.get("caption", 0):
        return [(rng.choice(world.CAPTION_PROMPTS), world.caption(scene))]
    if "mme" in forms:
        return [world.mme_qa(rng.choice(world.MME_TASKS[1:]), scene, rng.random() < 0.5, rng)
                if rng.random() < 0.5 else world.attribute_qa(rng, scene) for _ in range(n)]
    return [world.attribute_qa(rng, scene) for _ in range(n)]


QUESTION_KIND = {world.existence_question(k, f): i for i, k in enumerate(world.KINDS) for f in world.FORMS}


def asked_kinds(turns) -> list[int]:
    """Per turn, the index of the kind an existence question asks about (in any form), else -100."""
    return [QUESTION_KIND.get(q, -100) for q, _ in turns]


def pad_rows(cfg, rows):
    """Right-pad (ids, targets) rows into two (n, T) tensors."""
    T = max(len(r[0]) for r in rows)
    pad = cfg.special_tokens["<pad>"]
    ids = torch.tensor([r[0] + [pad] * (T - len(r[0])) for r in rows])
    targets = torch.tensor([r[1] + [-100] * (T - len(r[1])) for r in rows])
    return ids, targets


def text_batch(tok, cfg, rng: random.Random, n: int, questions: int, mix: dict):
    """Stage 2: n scenes as text only -> ids (n, T) and targets (n, T) of conversations drawn as image_turns
    draws them (`questions` per existence or attribute conversation), the scenes' words (n, 64, 3) for
    scene_slots, and the probes' targets for each answer in order: the asked kind (-100 where the answer is
    not to an existence question) and the kinds present (Q, kinds)."""
    rows, words, asked, present = [], [], [], []
    for _ in range(n):
        scene = world.sample_scene(rng)
        turns = image_turns(rng, scene, mix, questions)
        rows.append(encode_conversation(tok, cfg, turns))
        words.append(scene_words(tok, cfg, scene))
        asked += asked_kinds(turns)
        present += [[float(k in scene.kinds) for k in world.KINDS]] * len(turns)
    return (*pad_rows(cfg, rows), torch.stack(words), torch.tensor(asked), torch.tensor(present))


def image_batch(tok, cfg, rng: random.Random, n: int, mix: dict, forms: tuple = ("toy",), system_share: float = 0.0):
    """Stages 3-5: n scenes -> pixels (n, 3, S, S), ids (n, T), targets (n, T), the scenes, and each row's
    asked kind (asked_kinds; one turn per row). With probability `system_share` the whole batch starts with
    the llava_v1 system text (per batch, not per row: its ~100 tokens would otherwise pad every row of the
    batch to its length)."""
    system = LLAVA_V1_SYSTEM if system_share and rng.random() < system_share else None
    scenes = [world.sample_scene(rng) for _ in range(n)]
    pixels = torch.cat([preprocess(world.render(s), cfg.preprocessor) for s in scenes])
    turns = [image_turns(rng, s, mix, forms=forms) for s in scenes]
    rows = [encode_conversation(tok, cfg, t, system) for t in turns]
    return (pixels, *pad_rows(cfg, rows), scenes, torch.tensor([k for t in turns for k in asked_kinds(t)]))


def answer_starts(targets):
    """(B, T) bool: the positions that predict each answer's first token (the ":" of "ASSISTANT:")."""
    previous = F.pad(targets[:, :-1], (1, 0), value=-100)
    return (targets != -100) & (previous == -100)
