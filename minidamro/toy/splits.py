"""POPE-style evaluation sets on the toy world, built the way POPE builds them on COCO.

Each image gets k = min(3, objects) questions whose answer is yes (kinds in the image) and k whose answer
is no, alternating yes, no as POPE's files do. The three splits differ only in how the absent kinds are
chosen:

- random:      uniformly among the absent kinds;
- popular:     the absent kinds most frequent in the world (the planted partners rank high);
- adversarial: the absent kinds that co-occur most often with the kinds present; for a scene with a star
               and no moon, the moon comes first.

Frequencies and co-occurrences are those of the training distribution, estimated once from a fixed
sample of scenes (as POPE counts them over COCO's annotations).

The image pool mixes natural scenes with "probe" scenes (an anchor without its partner), half each, so
that the adversarial split and the planted-partner rate have enough cases; a natural scene lacks the
partner of its anchor only 10% of the time.
"""
import random
from collections import Counter
from functools import lru_cache

from . import world

SPLITS = ("random", "popular", "adversarial")


@lru_cache(maxsize=1)
def statistics(n: int = 20000, seed: int = 12345) -> tuple[dict, dict]:
    """(frequency: kind -> scenes containing it, cooccur: (a, b) -> scenes containing both), over n scenes."""
    rng = random.Random(seed)
    freq, co = Counter(), Counter()
    for _ in range(n):
        kinds = set(world.sample_kinds(rng))
        freq.update(kinds)
        co.update((a, b) for a in kinds for b in kinds if a != b)
    return dict(freq), dict(co)


def lab_scenes(seed: int, n: int) -> list[world.Scene]:
    """n scenes of a fresh seed: even indices natural scenes, odd indices probe scenes."""
    rng = random.Random(seed)
    return [world.sample_scene(rng, probe=i % 2 == 1) for i in range(n)]


def absent_kinds(split: str, scene: world.Scene, k: int, rng: random.Random) -> list[str]:
    """The k absent kinds a split asks about (ties broken by the catalogue order)."""
    absent = [kind for kind in world.KINDS if kind not in scene.kinds]
    if split == "random":
        return rng.sample(absent, k)
    freq, co = statistics()
    if split == "popular":
        return sorted(absent, key=lambda a: -freq.get(a, 0))[:k]
    if split == "adversarial":
        return sorted(absent, key=lambda a: -sum(co.get((p, a), 0) for p in scene.kinds))[:k]
    raise ValueError(f"unknown split {split}")


def pope_questions(split: str, scenes: list[world.Scene], seed: int, names: list[str]) -> list[dict]:
    """POPE-format records {question_id, image, text, label} for a split; `names` are the images' file names."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for scene, name in zip(scenes, names):
        present = [o.kind for o in scene.objects]
        k = min(3, len(present))
        yes = rng.sample(present, k)
        no = absent_kinds(split, scene, k, rng)
        for y, n in zip(yes, no):
            for kind, label in ((y, "yes"), (n, "no")):
                out.append({"question_id": len(out) + 1, "image": name, "text": world.existence_question(kind),
                            "label": label, "kind": kind})
    return out
