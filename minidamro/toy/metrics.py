"""The toy lab's caption metrics, with the definitions of docs/evaluation.md (CHAIR as the released chair.py).

POPE-style questions are scored by the evaluation harness itself (`minidamro.eval.pope.score_damro`, the
DAMRO / VCD `eval_pope.py` rule). Captions get CHAIR with the toy world's vocabulary instead of COCO's
synonym list: every kind name, singular or plural, is an object word (no synonyms, no lemmatiser needed).
"""
import re

from ..eval.pope import ratio
from . import world

PHRASE = re.compile(r"\b(" + "|".join(world.SIZES) + r") (" + "|".join(world.COLOURS) + r") (\w+)")


def toy_chair_metrics(captions: list[str], truths: list[set[str]]) -> dict:
    """CHAIR on the toy world. Every mention counts, repeats included: CHAIRi = hallucinated mentions / all
    mentions; CHAIRs = captions with >= 1 hallucinated mention / captions; Recall = distinct true kinds
    mentioned / true kinds, summed over captions."""
    mentions = hallucinated = bad_captions = found = total = 0
    for text, truth in zip(captions, truths, strict=True):
        kinds = world.mentioned_kinds(text)
        wrong = [k for k in kinds if k not in truth]
        mentions, hallucinated = mentions + len(kinds), hallucinated + len(wrong)
        bad_captions += bool(wrong)
        found, total = found + len(set(kinds) & truth), total + len(truth)
    return {"CHAIRs": ratio(bad_captions, len(captions)), "CHAIRi": ratio(hallucinated, mentions),
            "Recall": ratio(found, total), "captions": len(captions), "mentions": mentions}


def partner_rate(captions: list[str], scenes: list[world.Scene]) -> dict:
    """Over the scenes with an anchor whose planted partner is absent: the share whose caption names that
    partner (the rate at which the learned co-occurrence prior is hallucinated)."""
    cases = named = 0
    for text, scene in zip(captions, scenes, strict=True):
        said = set(world.mentioned_kinds(text))
        for anchor, partner in world.PAIRS.items():
            if anchor in scene.kinds and partner not in scene.kinds:
                cases += 1
                named += partner in said
    return {"partner_rate": ratio(named, cases), "partner_cases": cases}


def caption_attributes(captions: list[str], scenes: list[world.Scene]) -> dict:
    """What CHAIR does not see: exact = captions equal to the world's own caption of the scene; repeats =
    captions that name a kind more than once; colour, size = of the "SIZE COLOUR KIND" phrases that name a
    kind in the scene, those whose colour (size) is that object's."""
    exact = repeats = phrases = colour = size = 0
    for text, scene in zip(captions, scenes, strict=True):
        exact += text.strip() == world.caption(scene)
        kinds = world.mentioned_kinds(text)
        repeats += len(set(kinds)) < len(kinds)
        for s, c, word in PHRASE.findall(text.lower()):
            kind = world.WORD_TO_KIND.get(word)
            if kind in scene.kinds:
                o = scene.get(kind)
                phrases, colour, size = phrases + 1, colour + (c == o.colour), size + (s == o.size)
    return {"exact": ratio(exact, len(captions)), "repeats": ratio(repeats, len(captions)),
            "colour": ratio(colour, phrases), "size": ratio(size, phrases), "phrases": phrases}
