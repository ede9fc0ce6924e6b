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

from .. import analyze, contrastive, damro, generation, methods
from ..generate import encode_prompt
from ..image import preprocess
from ..eval.pope import score_damro
from . import splits, world
from .metrics import caption_attributes, partner_rate, toy_chair_metrics

METHODS = tuple(methods.METHODS)  # every decoding method the project has (plain, damro, vcd, ...)
CAPTION_PROMPT = world.CAPTION_PROMPTS[0]  # "Generate a short caption of this image." (DAMRO's CHAIR prompt)


def answer(model, tok, method: str, mcfg, prompt: str, pixels, max_new_tokens: int) -> str:
    """The greedy answer of one decoding method (settings mcfg); a method that draws noise (VCD) draws it
    from the sampler's generator, seeded 0 for every question."""
    ids, max_new = encode_prompt(model, tok, prompt, None, max_new_tokens)
    tokens = contrastive.generate(model, ids, pixels, methods.get(method), mcfg, generation.Sampler(), max_new)[1]
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


def run(model, tok, seed: int, images: int, captions: int, names=METHODS, dcfg=None, log=sys.stderr) -> dict:
    """dcfg: DAMRO's settings (also the ViT outlier figure's for analyze); other methods keep their defaults."""
    dcfg = dcfg or damro.DamroConfig()
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
            answers = [answer(model, tok, method, mcfg, q["text"], pixels[index[q["image"]]], 4) for q in qs]
            out[split] = score_damro([q["label"] for q in qs], answers)
            if split == "adversarial":  # the no-questions about an absent planted partner of a present anchor
                said = [a for q, a in zip(qs, answers) if q["label"] == "no" and any(
                    world.PAIRS.get(k) == q["kind"] for k in scenes[index[q["image"]]].kinds)]
                out[split]["partner_yes_ratio"] = mean(["yes" in a.lower() for a in said])
                out[split]["partner_questions"] = len(said)
        texts, words = [], {"hallucinated": [], "correct": []}
        for i in range(captions):
            a = analyze.analyze(model, tok, rendered[i], CAPTION_PROMPT, method, dcfg, max_new_tokens=48,
                                cfg=None if method == "damro" else mcfg)
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
    result["settings"] = {"seed": seed, "images": images, "captions": captions, "alpha": dcfg.alpha,
                          "beta": dcfg.beta, "topk": dcfg.topk, "decoding": "greedy", "prompt": CAPTION_PROMPT,
                          "methods": {m: asdict(dcfg if m == "damro" else methods.get(m).config()) for m in names},
                          "questions": {s: len(q) for s, q in questions.items()}}
    return result


def fmt(v, pct=True):
    return "   -  " if v is None else (f"{100 * v:6.1f}" if pct else f"{v:6.3f}")


def table(result: dict) -> str:
    methods = [m for m in result if m != "settings"]
    lines = ["POPE-style splits (%)", f"{'method':8} {'split':12} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} "
             f"{'yes':>6}"]
    for m in methods:
        for split in splits.SPLITS:
            r = result[m][split]
            lines.append(f"{m:8} {split:12} {fmt(r['accuracy'])} {fmt(r['precision'])} {fmt(r['recall'])} "
                         f"{fmt(r['f1'])} {fmt(r['yes_ratio'])}")
    lines += ["", "captions (%) and the paper's diagnostics on the object words (hallucinated / correct)",
              f"{'method':8} {'CHAIRs':>6} {'CHAIRi':>6} {'recall':>6} {'partner':>7} {'p-yes':>6} "
              f"{'H3 hal':>6} {'H3 ok':>6} {'F hal':>6} {'F ok':>6}"]
    for m in methods:
        c, d = result[m]["captions"], result[m]["diagnostics"]
        h3 = [d[k]["H"][2] if d[k]["H"] else None for k in ("hallucinated", "correct")]
        lines.append(f"{m:8} {fmt(c['CHAIRs'])} {fmt(c['CHAIRi'])} {fmt(c['Recall'])} {fmt(c['partner_rate']):>7} "
                     f"{fmt(result[m]['adversarial']['partner_yes_ratio'])} {fmt(h3[0], False)} {fmt(h3[1], False)} "
                     f"{fmt(d['hallucinated']['F'], False)} {fmt(d['correct']['F'], False)}")
    lines += ["", "captions beyond CHAIR (%): equal to the truth, naming a kind twice, colour / size of a named object "
              "right", f"{'method':8} {'exact':>6} {'repeat':>6} {'colour':>6} {'size':>6}"]
    for m in methods:
        c = result[m]["captions"]
        lines.append(f"{m:8} {fmt(c['exact'])} {fmt(c['repeats'])} {fmt(c['colour'])} {fmt(c['size'])}")
    s = result["settings"]
    lines += ["", f"seed {s['seed']}, {s['images']} images ({s['questions']['random']} questions per split), "
              f"{s['captions']} captions; greedy; " + "; ".join(
                  f"{m} " + " ".join(f"{k} {v}" for k, v in c.items()) for m, c in s["methods"].items() if c),
              "partner: captions naming the absent planted partner of an anchor; p-yes: 'yes' to the adversarial "
              "questions about such a partner; words: " + ", ".join(
                  f"{m} {result[m]['diagnostics']['hallucinated']['words']} hal / "
                  f"{result[m]['diagnostics']['correct']['words']} ok" for m in methods)]
    return "\n".join(lines)
