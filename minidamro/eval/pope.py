"""POPE scoring under the two answer-parsing rules in use (see docs/evaluation.md).

- `damro`: the DAMRO / VCD `eval_pope.py` rule, which gives the papers' numbers. Lower-case and strip both;
  a gt "yes" question is a TP iff "yes" is a *substring* of the answer (else FN), a gt "no" question a TN iff
  "no" is a substring (else FP); any other label counts in the denominator only.
- `pope`: the official RUCAIBox `evaluate.py` rule. Keep the text before the first ".", delete commas, split
  on " "; the answer is "no" iff one of the tokens is exactly "No", "no" or "not", else "yes" (no lower-casing,
  no strip). A label is negative iff it is exactly "no".

A ratio whose denominator is zero is None (null in JSON): the reference scripts divide by zero there.
"""


def ratio(a, b):
    return a / b if b else None


def f1(p, r):
    return None if p is None or r is None or p + r == 0 else 2 * p * r / (p + r)


def metrics(tp, fp, tn, fn, n, yes):
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"accuracy": ratio(tp + tn, n), "precision": p, "recall": r, "f1": f1(p, r), "yes_ratio": ratio(yes, n),
            "TP": tp, "FP": fp, "TN": tn, "FN": fn, "questions": n}


def score_damro(labels: list[str], answers: list[str]) -> dict:
    tp = fp = tn = fn = 0
    for label, answer in zip(labels, answers, strict=True):
        gt, ans = label.lower().strip(), answer.lower().strip()
        if gt == "yes":
            tp, fn = (tp + 1, fn) if "yes" in ans else (tp, fn + 1)
        elif gt == "no":
            tn, fp = (tn + 1, fp) if "no" in ans else (tn, fp + 1)
    n = len(labels)  # unknown labels stay in the denominators of accuracy and yes_ratio, as in eval_pope.py
    return metrics(tp, fp, tn, fn, n, tp + fp)


def pope_says_no(answer: str) -> bool:
    """The official rule: first sentence, commas deleted, exact tokens 'No' / 'no' / 'not'."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "No" in words or "no" in words or "not" in words


def score_pope(labels: list[str], answers: list[str]) -> dict:
    tp = fp = tn = fn = 0
    for label, answer in zip(labels, answers, strict=True):
        positive, said_yes = label != "no", not pope_says_no(answer)
        if positive:
            tp, fn = (tp + 1, fn) if said_yes else (tp, fn + 1)
        else:
            fp, tn = (fp + 1, tn) if said_yes else (fp, tn + 1)
    return metrics(tp, fp, tn, fn, tp + fp + tn + fn, tp + fp)


def read_damro(answer: str) -> str:
    """What an answer says, under the damro rule's substring reading: "yes", "no", "both" (it contains both:
    the rule calls it right whatever the label) or "neither" (the rule calls it wrong whatever the label: a
    false "no" to a yes-question, a false "yes" to a no-question)."""
    a = answer.lower().strip()
    return {(True, False): "yes", (False, True): "no", (True, True): "both", (False, False): "neither"}[
        ("yes" in a, "no" in a)]


def read_pope(answer: str) -> str:
    """Under the official rule: "no", "yes" (a Yes / yes token in the first sentence), or "neither" (no such
    token either way, which the rule reads as yes)."""
    if pope_says_no(answer):
        return "no"
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "yes" if "Yes" in words or "yes" in words else "neither"


def accounting(reads: list[str], ids: list | None, kinds=("yes", "no", "both", "neither")) -> dict:
    """Every answer accounted for: how many the rule reads as each of `kinds`, the share read as a plain yes,
    and which ones are neither (with `ids`)."""
    counts = {k: reads.count(k) for k in kinds}
    out = {"read": counts, "said_yes_ratio": ratio(counts["yes"], len(reads)), "neither": counts["neither"]}
    if ids is not None:
        out["neither_ids"] = [i for i, r in zip(ids, reads, strict=True) if r == "neither"]
    return out


def score(labels: list[str], answers: list[str], ids: list | None = None) -> dict:
    """Both rules: {"damro": {...}, "pope": {...}}, fractions in [0, 1] plus the four counts (exactly the
    released scripts' numbers), and beside them each rule's accounting of the answers (read, said_yes_ratio:
    answers read as yes / all answers, neither and, with `ids`, which questions those are)."""
    return {"damro": score_damro(labels, answers) | accounting([read_damro(a) for a in answers], ids),
            "pope": score_pope(labels, answers) | accounting([read_pope(a) for a in answers], ids,
                                                             ("yes", "no", "neither"))}
