"""Per-image reuse against the per-question path, on a POPE-format set of images x questions.

    python -m minidamro.bench.reuse --model DIR [--images 10] [--questions 18] [--max-new-tokens 4] [--method damro]

Loads the model once and, image by image, answers the image's questions three ways in turn (interleaved, so
a shared machine's load falls on all three alike): `--no-reuse` (generate's path: vision tower and the whole
prompt per question), reuse (vision tower, method preparation and each stream's image prefix once per image)
and reuse with the questions decoded as one batch. Each timing includes reading and preprocessing the image.
Prints seconds, questions/second, the ratios, and how many answers differ from the per-question path.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from .. import methods
from ..anyres import model_pixels
from ..image import image_from_hwc, load_image
from ..llava import load_model
from ..tokenizer import LLAVA_V1_SYSTEM, Tokenizer
from ..eval.data import POPE_SUFFIX
from ..eval.engine import Engine

OBJECTS = ["dog", "cat", "car", "person", "chair", "bottle", "cup", "bus", "tree", "bird", "horse", "sink",
           "clock", "bench", "kite", "train", "boat", "pizza", "truck", "vase"]


def make_images(d: str, n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        w, h = 480 + 16 * i, 360 + 8 * i  # COCO-like sizes; smooth gradients plus noise
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        noise = torch.randint(0, 60, (h, w), generator=g)
        rgb = torch.stack([(x * (i + 1)) % 256, (y * 3 + i * 40) % 256, (x + y + noise) % 256], -1).to(torch.uint8)
        paths.append(os.path.join(d, f"COCO_val2014_{i:012d}.jpg"))
        image_from_hwc(rgb).save(paths[-1], quality=90)
    return paths


def main():
    p = argparse.ArgumentParser(prog="python -m minidamro.bench.reuse", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--questions", type=int, default=18, help="per image (POPE: 6 per split x 3 splits)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="random weights never stop at EOS; LLaVA's "
                   "one-word POPE answers take 2-3 tokens with EOS")
    p.add_argument("--method", choices=tuple(methods.METHODS), default="plain", help="with its default settings")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="no-reuse,reuse,batch")
    p.add_argument("--out")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model)
    if model.cfg.model_type == "instructblip":
        sys.exit("error: InstructBLIP has no per-image reuse to measure: its image features depend on the question")
    tok = Tokenizer(os.path.join(a.model, "tokenizer.model"), model.cfg.special_tokens)
    method = methods.get(a.method)
    mcfg = method.config()
    method.check(model, mcfg)
    engines = {"no-reuse": dict(reuse=False), "reuse": dict(reuse=True), "batch": dict(reuse=True, batch_questions=True)}
    modes = a.modes.split(",")
    engines = {m: Engine(model, tok, method, mcfg, LLAVA_V1_SYSTEM, a.max_new_tokens, 0.0, 1.0, 42, **engines[m])
               for m in modes}
    times = {m: 0.0 for m in modes}
    answers = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as d:
        paths = make_images(d, a.images)
        for i, path in enumerate(paths):
            prompts = [(f"{i}/{j}", f"Is there a {OBJECTS[(i + j) % len(OBJECTS)]} in the image?{POPE_SUFFIX}")
                       for j in range(a.questions)]
            for m in modes:
                t = time.perf_counter()
                pixels, size = model_pixels(load_image(path), model.cfg)
                answers[m] += [tokens for _, _, tokens, _ in engines[m].answer_image(pixels, prompts,
                                                                                     os.path.basename(path), size)]
                times[m] += time.perf_counter() - t
            print(f"image {i + 1}/{len(paths)}: " + ", ".join(f"{m} {times[m]:.1f} s" for m in modes), file=sys.stderr)
    n = a.images * a.questions
    base = modes[0]
    res = {"model": a.model, "method": a.method, "images": a.images, "questions": n, "max_new_tokens": a.max_new_tokens,
           "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
           "seconds": times, "questions_per_s": {m: n / times[m] for m in modes},
           "ratio_to_" + base: {m: times[m] / times[base] for m in modes},
           "answers_differing_from_" + base: {m: sum(x != y for x, y in zip(answers[m], answers[base])) for m in modes}}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
