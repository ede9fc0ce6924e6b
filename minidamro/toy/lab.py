"""The hallucination lab: POPE-style splits and a caption test on a fresh seed of the toy world, per method.

For each decoding method: the three splits (accuracy, precision, recall, F1, yes-ratio), the captions
(CHAIRs, CHAIRi, recall, the rate at which the planted partner is named when it is absent, and what CHAIR does
not see: exact captions, repeated objects, right colours and sizes), and the
DAMRO paper's diagnostics for the object words of the captions, hallucinated vs not: the mean H_i (Eq. 1,
the overlap of the ViT's and the decoder's top-i patches) and F (Eq. 2, the decoder's image attention
share on the ViT's top-3 patches). Decoding is greedy, as in the README's and docs/toy.md's examples.
"""
import sys
from dataclasses import asdict
import time

from .. import analyze, contrastive, damro, generation, methods, outliers
from ..generate import encode_prompt
from ..image import preprocess
from ..eval.pope import score_damro
from . import splits, world
from .data import patch_labels
from .metrics import caption_attributes, partner_rate, toy_chair_metrics

METHODS = tuple(methods.METHODS)  # every decoding method the project has (plain, damro, vcd, ...)
CAPTION_PROMPT = world.CAPTION_PROMPTS[0]  # "Generate a short caption of this image." (DAMRO's CHAIR prompt)


def answer(model, tok, method: str, mcfg, prompt: str, pixels, max_new_tokens: int, temperature: float = 0.0,
           seed: int = 0) -> str:
    """The answer of one decoding method (settings mcfg), greedy unless a temperature is given; the sampler's
    generator, from which a method that draws noise (VCD) draws it too, is seeded `seed` for every question."""
    ids, max_new = encode_prompt(model, tok, prompt, None, max_new_tokens)
    sampler = generation.Sampler(temperature, 1.0, seed)
    tokens = contrastive.generate(model, ids, pixels, methods.get(method), mcfg, sampler, max_new)[1]
    return tok.decode(list(tokens))


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def diagnostics(a: analyze.Analysis, truth: set[str], sink: dict):
    """Collect H_1..H_10 and F of each object word of a caption into sink["hallucinated" | "correct"]."""
    for w in a.words:
        kind = world.WORD_TO_KIND.get(w["text"].lower().strip(".,"))
        if kind is not None:
            t = a.tokens[w["tokens"][0]]  # a word's numbers are its first piece's, as analyze draws them
            sink["correct" if kind in truth else "hallucinated"].append((t.H, t.F))


def summarise(words: list) -> dict:
    if not words:
        return {"words": 0, "H": None, "F": None}
    n_h = len(words[0][0])
    return {"words": len(words), "H": [mean([h[i] for h, _ in words]) for i in range(n_h)],
            "F": mean([f for _, f in words])}


def vit_outliers(model, scenes: list, k: int, mode: str = "full", pixels: list | None = None) -> list[dict]:
    """outliers.diagnose on each scene (its preprocessed `pixels` if already made), with the world's patch
    labels (background or object) for the top-k patches."""
    grid, patch = model.cfg.vision.image_size // model.cfg.vision.patch_size, model.cfg.vision.patch_size
    pixels = pixels or [preprocess(world.render(s), model.cfg.preprocessor) for s in scenes]
    return [outliers.diagnose(model, px, k, mode, patch_labels(s, grid, patch)) for s, px in zip(scenes, pixels)]


def run_seeds(model, tok, seed: int, images: int, captions: int, names, dcfg, decode_seeds: list[int],
              temperature: float = 0.0, log=None) -> dict:
    """The lab once per decoding seed -> {"per_seed", "mean", "std"} (mean and sample std of every number, as
    `eval score` reports several seeds); mean also carries the settings and the ViT's outliers (the same for
    every decoding seed)."""
    from ..eval.score import tree_stats
    per = {s: run(model, tok, seed, images, captions, names, dcfg, log, temperature, s) for s in decode_seeds}
    first = per[decode_seeds[0]]
    mean, std = tree_stats(list(per.values()))
    mean["settings"] = {k: v for k, v in first["settings"].items() if k != "decode_seed"} | {
        "decode_seeds": decode_seeds}
    mean["outliers"] = first["outliers"]
    return {"per_seed": {str(s): r for s, r in per.items()}, "mean": mean, "std": std}


def run(model, tok, seed: int, images: int, captions: int, names=METHODS, dcfg=None, log=None,
        temperature: float = 0.0, decode_seed: int = 0) -> dict:
    """dcfg: DAMRO's settings (also the ViT outlier figure's for analyze); other methods keep their defaults.
    seed: the world's (the scenes and questions); decode_seed: the sampler's (and VCD's noise)."""
    dcfg, log = dcfg or damro.DamroConfig(), log or sys.stderr  # sys.stderr now, not at import (tests swap it)
    cfg = model.cfg
    scenes = splits.lab_scenes(seed, images)
    files = [f"toy-{seed}-{i:04d}.png" for i in range(images)]
    rendered = [world.render(s) for s in scenes]
    pixels = [preprocess(im, cfg.preprocessor) for im in rendered]
    questions = {split: splits.pope_questions(split, scenes, seed, files) for split in splits.SPLITS}
    index = {name: i for i, name in enumerate(files)}
    result = {}
    for method in names:
        mcfg = dcfg if method == "damro" else methods.get(method).config()
        start, out = time.time(), {}
        for split, qs in questions.items():
            answers = [answer(model, tok, method, mcfg, q["text"], pixels[index[q["image"]]], 4, temperature,
                              decode_seed) for q in qs]
            out[split] = score_damro([q["label"] for q in qs], answers)
            if split == "adversarial":  # the no-questions about an absent planted partner of a present anchor
                said = [a for q, a in zip(qs, answers) if q["label"] == "no" and any(
                    world.PAIRS.get(k) == q["kind"] for k in scenes[index[q["image"]]].kinds)]
                out[split]["partner_yes_ratio"] = mean(["yes" in a.lower() for a in said])
                out[split]["partner_questions"] = len(said)
        texts, words = [], {"hallucinated": [], "correct": []}
        for i in range(captions):
            a = analyze.analyze(model, tok, rendered[i], CAPTION_PROMPT, method, dcfg, max_new_tokens=48,
                                cfg=None if method == "damro" else mcfg, temperature=temperature, seed=decode_seed)
            texts.append(a.answer)
            diagnostics(a, scenes[i].kinds, words)
        out["captions"] = toy_chair_metrics(texts, [s.kinds for s in scenes[:captions]])
        out["captions"] |= partner_rate(texts, scenes[:captions])
        out["captions"] |= caption_attributes(texts, scenes[:captions])
        out["diagnostics"] = {k: summarise(v) for k, v in words.items()}
        out["examples"] = [{"image": files[i], "truth": world.caption(scenes[i]), "caption": texts[i]}
                           for i in range(min(4, captions))]
        result[method] = out
        print(f"{method}: {time.time() - start:.0f} s", file=log, flush=True)
    result["outliers"] = outliers.summary(vit_outliers(model, scenes, dcfg.topk, dcfg.outlier_attention, pixels))
    result["settings"] = {"seed": seed, "images": images, "captions": captions, "alpha": dcfg.alpha,
                          "beta": dcfg.beta, "topk": dcfg.topk,
                          "decoding": "greedy" if not temperature else f"temperature {temperature}",
                          "decode_seed": decode_seed, "prompt": CAPTION_PROMPT,
                          "methods": {m: asdict(dcfg if m == "damro" else methods.get(m).config()) for m in names},
                          "questions": {s: len(q) for s, q in questions.items()}}
    return result


def fmt(v, pct=True, sd=None, width=6):
    """A cell: a share in % (pct) or a number, with ± its standard deviation over seeds when given."""
    if v is None:
        return "-".center(width)
    scale, digits = (100, 1) if pct else (1, 3)
    text = f"{scale * v:.{digits}f}" + ("" if sd is None else f"±{scale * sd:.{digits}f}")
    return text.rjust(width)


def table(result: dict, std: dict | None = None) -> str:
    """The lab's tables; with `std` (the same tree of standard deviations over seeds) every cell is mean ± std."""
    methods = [m for m in result if m not in ("settings", "outliers")]
    w = 6 if std is None else 11

    def c(path, pct=True):
        v, sd = result, std
        for key in path:  # dict keys, and list indices
            v = v.get(key) if isinstance(v, dict) else v[key] if isinstance(v, list) and key < len(v) else None
            sd = sd.get(key) if isinstance(sd, dict) else sd[key] if isinstance(sd, list) and key < len(sd) else None
        return fmt(v, pct, sd, w)
    head = lambda names: " ".join(f"{n:>{w}}" for n in names)  # noqa: E731
    lines = ["POPE-style splits (%)", f"{'method':8} {'split':12} " + head(("acc", "prec", "recall", "F1", "yes"))]
    for m in methods:
        for split in splits.SPLITS:
            lines.append(f"{m:8} {split:12} " + " ".join(c((m, split, k)) for k in
                                                         ("accuracy", "precision", "recall", "f1", "yes_ratio")))
    lines += ["", "captions (%) and the paper's diagnostics on the object words (hallucinated / correct)",
              f"{'method':8} " + head(("CHAIRs", "CHAIRi", "recall", "partner", "p-yes", "H3 hal", "H3 ok", "F hal",
                                       "F ok"))]
    for m in methods:
        h3 = [c((m, "diagnostics", k, "H", 2), False) for k in ("hallucinated", "correct")]
        lines.append(f"{m:8} " + " ".join([c((m, "captions", k)) for k in ("CHAIRs", "CHAIRi", "Recall", "partner_rate")]
                                          + [c((m, "adversarial", "partner_yes_ratio"))] + h3 +
                                          [c((m, "diagnostics", k, "F"), False) for k in ("hallucinated", "correct")]))
    lines += ["", "captions beyond CHAIR (%): equal to the truth, naming a kind twice, colour / size of a named object "
              "right", f"{'method':8} " + head(("exact", "repeat", "colour", "size"))]
    for m in methods:
        lines.append(f"{m:8} " + " ".join(c((m, "captions", k)) for k in ("exact", "repeats", "colour", "size")))
    if "outliers" in result:
        lines += ["", "the ViT's outlier tokens (docs/toy.md), medians over the images", outliers.table(
            {"this model": result["outliers"]})]
    s = result["settings"]
    seeds = (f"mean ± sample std over decoding seeds {s['decode_seeds']}" if "decode_seeds" in s else
             f"decoding seed {s.get('decode_seed', 0)}")
    lines += ["", f"seed {s['seed']}, {s['images']} images ({s['questions']['random']} questions per split), "
              f"{s['captions']} captions; {s['decoding']}, {seeds}; " + "; ".join(
                  f"{m} " + " ".join(f"{k} {v}" for k, v in cfg.items()) for m, cfg in s["methods"].items() if cfg),
              "partner: captions naming the absent planted partner of an anchor; p-yes: 'yes' to the adversarial "
              "questions about such a partner; words: " + ", ".join(
                  f"{m} {result[m]['diagnostics']['hallucinated'].get('words', 0):g} hal / "
                  f"{result[m]['diagnostics']['correct'].get('words', 0):g} ok" for m in methods)]
    return "\n".join(lines)
