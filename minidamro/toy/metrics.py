"""The toy lab's metrics, with the definitions of ../shared/docs/evaluation.md.

TOY STAND-INS: the evaluation harness (minidamro/eval/, not yet on main when this was written) computes
POPE with the DAMRO / VCD `eval_pope.py` rule and CHAIR with COCO's synonym list. These functions compute
the same definitions with the same metric names; `toy_pope_metrics` is the harness's `score_damro` rule, and
`toy_chair_metrics` is CHAIR with the toy world's vocabulary (every kind name, singular or plural, is an
object word; no synonyms, no lemmatiser needed). Switch POPE to the harness's function once it lands.
"""
from . import world


def ratio(a, b):
    return a / b if b else None


def toy_pope_metrics(labels: list[str], answers: list[str]) -> dict:
    """DAMRO's eval_pope.py: gt yes -> TP iff "yes" is a substring of the lower-cased answer (else FN); gt no
    -> TN iff "no" is a substring (else FP). accuracy = (TP + TN) / n, precision = TP / (TP + FP),
    recall = TP / (TP + FN), yes_ratio = (TP + FP) / n. A zero denominator gives None."""
    tp = fp = tn = fn = 0
    for label, answer in zip(labels, answers, strict=True):
        gt, ans = label.lower().strip(), answer.lower().strip()
        if gt == "yes":
            tp, fn = (tp + 1, fn) if "yes" in ans else (tp, fn + 1)
        elif gt == "no":
            tn, fp = (tn + 1, fp) if "no" in ans else (tn, fp + 1)
    n = len(labels)
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = None if p is None or r is None or p + r == 0 else 2 * p * r / (p + r)
    return {"accuracy": ratio(tp + tn, n), "precision": p, "recall": r, "f1": f1, "yes_ratio": ratio(tp + fp, n),
            "TP": tp, "FP": fp, "TN": tn, "FN": fn, "questions": n}


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
