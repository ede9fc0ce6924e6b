"""MME scoring as the MME eval tool's calculation.py (evaluation.md, section 3), and reading an MME release.

A task file has one line per question, `image\\tquestion\\tgt\\tanswer`, an image's two questions adjacent.
acc = right answers / answers; acc+ = images with both answers right / images; score = 100 acc + 100 acc+.
"""
import os
import sys

from .. import MinidamroError

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
TASKS = PERCEPTION + COGNITION
HALLUCINATION = ["existence", "count", "position", "color"]  # the subsets the DAMRO paper reports


def parse_answer(answer: str) -> str:
    """The 4-character rule: exactly yes/no, else "yes" anywhere in answer[:4], else "no" there, else other.
    (calculation.py sees the line's trailing newline too; it changes no outcome of this rule.)"""
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_task(lines: list[str], where: str = "") -> dict:
    """lines of one task file (newlines stripped) -> acc, acc_plus, score and the confusion counts.

    A line that does not split into exactly 4 fields is reported and skipped, as DAMRO's copy does (the
    official one crashes): it leaves its image's pair, so that image cannot count for acc+."""
    if len(lines) % 2:
        raise MinidamroError(f"{where}: {len(lines)} lines; calculation.py needs each image's two questions in pairs")
    right = both = other = 0
    counts = {"TP": 0, "FN": 0, "TN": 0, "FP": 0}
    answered = skipped = 0
    for pair_start in range(0, len(lines), 2):
        pair_right = 0
        for j in (pair_start, pair_start + 1):
            fields = lines[j].split("\t")
            if len(fields) != 4:
                print(f"warning: {where}:{j + 1}: {len(fields)} tab-separated fields, not 4; skipped", file=sys.stderr)
                skipped += 1
                continue
            gt, pred = fields[2].lower(), parse_answer(fields[3].lower())
            if gt not in ("yes", "no"):
                raise MinidamroError(f"{where}:{j + 1}: ground truth {fields[2]!r} is not yes or no")
            answered += 1
            pair_right += gt == pred
            other += pred == "other"
            if pred != "other":
                counts[{("yes", "yes"): "TP", ("yes", "no"): "FN", ("no", "no"): "TN", ("no", "yes"): "FP"}[gt, pred]] += 1
        right += pair_right
        both += pair_right == 2
    images = len(lines) // 2
    acc = right / answered if answered else None
    acc_plus = both / images if images else None
    tp, fp, fn = counts["TP"], counts["FP"], counts["FN"]
    return {"acc": acc, "acc_plus": acc_plus,
            "score": None if acc is None or acc_plus is None else 100 * acc + 100 * acc_plus,
            # sklearn's precision / recall over the yes/no answers (zero_division gives 0; none at all: None)
            "precision": (tp / (tp + fp) if tp + fp else 0.0) if answered > other else None,
            "recall": (tp / (tp + fn) if tp + fn else 0.0) if answered > other else None,
            **counts, "other": other, "questions": answered, "images": images, "skipped_lines": skipped}


def total(per_task: dict) -> dict:
    scores = {t: m["score"] for t, m in per_task.items() if m["score"] is not None}
    out = {"total": sum(scores.values())}
    for name, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
        if any(t in scores for t in tasks):
            out[name] = sum(scores[t] for t in tasks if t in scores)
    return out


def score_results_dir(results: str) -> dict:
    """A directory of `task.txt` files (the eval tool's Your_Results layout) -> {"tasks": {...}, "total": ...}."""
    if not os.path.isdir(results):
        raise MinidamroError(f"MME results directory {results} does not exist")
    names = sorted(f[:-4] for f in os.listdir(results) if f.endswith(".txt"))
    if not names:
        raise MinidamroError(f"{results} holds no task .txt files")
    per_task = {}
    for name in sorted(names, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t)):
        path = os.path.join(results, name + ".txt")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise MinidamroError(f"cannot read {path}: {e}") from None
        per_task[name] = score_task(lines, path)
    return {"tasks": per_task, **total(per_task)}


def read_task(data: str, task: str) -> list[dict]:
    """The questions of one task of an MME release, in the release's order (an image's two questions adjacent).

    Layouts: `task/NAME.jpg|png` beside `task/NAME.txt`, or `task/images/` + `task/questions_answers_YN/`.
    Each txt holds lines `question\\tYes|No`."""
    root = os.path.join(data, task)
    if os.path.isdir(os.path.join(root, "questions_answers_YN")):
        qdir, idir = os.path.join(root, "questions_answers_YN"), os.path.join(root, "images")
    else:
        qdir = idir = root
    images = {os.path.splitext(f)[0]: f for f in os.listdir(idir) if not f.endswith(".txt")}
    out = []
    for qf in sorted(f for f in os.listdir(qdir) if f.endswith(".txt")):
        stem = qf[:-4]
        path = os.path.join(qdir, qf)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                out.append({"task": task, "source": f"{path}:{n}", "image_name": images.get(stem, stem),
                            "image": os.path.join(idir, images[stem]) if stem in images else None,
                            "question": fields[0], "label": fields[1].strip() if len(fields) == 2 else None})
    return out
