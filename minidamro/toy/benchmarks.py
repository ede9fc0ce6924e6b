"""The benchmarks' input files for scenes of the toy world, so `python -m minidamro.eval` runs on them as on COCO.

    python -m minidamro.toy render --out toybench --seed 4242 --count 120 --benchmarks

writes the lab's image pool (splits.lab_scenes: even indices natural scenes, odd ones probe scenes, named
toy-SEED-IIII.png as the lab names them) and, beside the images and truth.jsonl:

    pope/toy_pope_{random,popular,adversarial}.jsonl   POPE question files: {question_id, image, text, label}
    chair/images.jsonl                                 CHAIR's image list: {image, image_id}
    chair/objects.json                                 its ground truth: {image_id: [kinds]}
    chair/synonyms.txt                                 the world's vocabulary: "star, stars" (CHAIR's format)
    mme/{existence,count,position,color}/              MME's layout: each image with NAME.txt, two lines
                                                       "question<TAB>Yes" and "question<TAB>No"

The POPE questions are the lab's (splits.pope_questions), so `eval pope` on the files and `toy eval` with the
same seed and count ask the same questions about the same images.
"""
import json
import os
import random
import shutil

from . import splits, world

POPE_STEM = "toy_pope_{split}"


def write_text(path: str, text: str):
    """Write to a temporary name, then rename: never a half-written file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def synonyms() -> str:
    """CHAIR's synonym-list format for the toy world: a kind and its plural (the lemmatizer usually makes the
    plural singular; listed too for where its tagger does not)."""
    return "".join(f"{k}, {world.PLURALS[k]}\n" for k in world.KINDS)


def mme_pairs(scene: world.Scene, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Per MME task, one question whose answer is yes and one whose answer is no, in MME's order (yes first)."""
    return {task: [world.mme_qa(task, scene, answer, rng) for answer in (True, False)] for task in world.MME_TASKS}


def write(out: str, seed: int, scenes: list[world.Scene], names: list[str]):
    """The benchmark files for `scenes` (already rendered into `out` as `names`)."""
    for sub in ("pope", "chair", *(os.path.join("mme", t) for t in world.MME_TASKS)):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for split in splits.SPLITS:
        rows = [{k: q[k] for k in ("question_id", "image", "text", "label")}
                for q in splits.pope_questions(split, scenes, seed, names)]
        write_text(os.path.join(out, "pope", POPE_STEM.format(split=split) + ".jsonl"), jsonl(rows))
    write_text(os.path.join(out, "chair", "images.jsonl"),
               jsonl({"image": name, "image_id": i} for i, name in enumerate(names)))
    write_text(os.path.join(out, "chair", "objects.json"),
               json.dumps({str(i): sorted(s.kinds) for i, s in enumerate(scenes)}) + "\n")
    write_text(os.path.join(out, "chair", "synonyms.txt"), synonyms())
    rng = random.Random(f"{seed}-mme")
    for scene, name in zip(scenes, names):
        stem = os.path.splitext(name)[0]
        for task, pairs in mme_pairs(scene, rng).items():
            folder = os.path.join(out, "mme", task)
            shutil.copyfile(os.path.join(out, name), os.path.join(folder, name))
            write_text(os.path.join(folder, stem + ".txt"), "".join(f"{q}\t{a}\n" for q, a in pairs))
