"""Metrics from answers: a run directory of minidamro's, or the files the released scripts write."""
import json
import os

from .. import MinidamroError
from . import chair, data, mme, pope
from .run import merged_answers, write_json_atomic

ANSWER_KEYS = ("answer", "output", "text")  # minidamro, DAMRO, VCD / official POPE


def answer_text(obj: dict, where: str) -> str:
    for k in ANSWER_KEYS:
        if isinstance(obj.get(k), str):
            return obj[k]
    raise MinidamroError(f"{where}: no answer text (looked for {', '.join(ANSWER_KEYS)})")


def pope_metrics(items: list[data.Item], answers: dict) -> dict:
    """items: POPE questions; answers: item id -> answer text (all present). Per file stem, both rules."""
    out = {}
    for stem in dict.fromkeys(it.meta["file"] for it in items):
        mine = [it for it in items if it.meta["file"] == stem]
        out[stem] = pope.score([it.meta["label"] for it in mine], [answers[it.id] for it in mine],
                               [it.meta["question_id"] for it in mine])
    return out


def released_pope(question_files: list[str], answer_files: list[str]) -> dict:
    """Answers keyed by question_id (one answers file per question file, in the same order)."""
    if len(answer_files) != len(question_files):
        raise MinidamroError(f"{len(question_files)} question files but {len(answer_files)} answers files: "
                             "give one --answers per --questions, in the same order")
    problems = []
    items = data.pope_items(question_files, "", problems)
    if problems:
        raise MinidamroError(f"{len(problems)} bad question lines, first: {problems[0]}")
    answers = {}
    for qfile, afile in zip(question_files, answer_files):
        stem = data.file_stem(data.pope_file(qfile))
        for n, obj in data.read_jsonl(afile, {}, problems):
            if "question_id" not in obj or obj.get("file", stem) != stem:  # minidamro's file: this split's lines
                continue
            answers[f"{stem}/{obj['question_id']}"] = answer_text(obj, f"{afile}:{n}")
        if problems:
            raise MinidamroError(problems[0])
    missing = [it.id for it in items if it.id not in answers]
    if missing:
        raise MinidamroError(f"{len(missing)} questions have no answer, first: {missing[0]}")
    return pope_metrics(items, answers)


def chair_metrics(captions: list[tuple], ground_truth: str, synonyms: str | None = None) -> dict:
    c = chair.Chair(synonyms)
    gt = c.ground_truth(ground_truth, [chair.image_key(i) for i, _ in captions])
    result = c.score(captions, gt)
    return {**result["overall_metrics"], **result}


def released_chair(captions_file: str, ground_truth: str, synonyms: str | None = None) -> dict:
    """A .json list or .jsonl of {image_id, caption} (minidamro's answers file works too: `answer`)."""
    try:
        with open(captions_file, encoding="utf-8") as f:
            text = f.read()
        objs = json.loads(text) if captions_file.endswith(".json") else [json.loads(s) for s in text.splitlines()
                                                                         if s.strip()]
        captions = [(o["image_id"], o["caption"] if "caption" in o else o["answer"]) for o in objs
                    if "skipped" not in o]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MinidamroError(f"cannot read captions {captions_file}: {type(e).__name__} {e}") from None
    return chair_metrics(captions, ground_truth, synonyms)


def write_mme_results(answers: list[dict], results: str):
    """The eval tool's layout: results/task.txt, lines image\\tquestion\\tgt\\tanswer (newlines -> spaces)."""
    os.makedirs(results, exist_ok=True)
    for task in dict.fromkeys(a["task"] for a in answers):
        path = os.path.join(results, task + ".txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for a in sorted((a for a in answers if a["task"] == task), key=lambda a: a["id"]):
                f.write(f"{a['image_name']}\t{a['question']}\t{a['label']}\t{a['answer'].replace(chr(10), ' ')}\n")
        os.replace(tmp, path)


def score_run(out: str) -> dict:
    """Merge every shard's answers in RUN_DIR and score them; refuse an incomplete run."""
    try:
        with open(os.path.join(out, "run.json")) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise MinidamroError(f"{out} is not a run directory (run.json: {e})") from None
    # Settings that runs made by older versions did not record, with the value they then had.
    settings = {"prompt_template": data.TEMPLATES.get(settings.get("task"), ""), "synonyms": None} | settings
    every = merged_answers(out)
    answered = [a for a in every if "skipped" not in a]
    skipped = sorted(a["id"] for a in every if "skipped" in a)
    if len(every) < settings["questions"]:
        raise MinidamroError(f"{out}: {len(every)} of {settings['questions']} questions answered; run the same "
                             "command again (every shard) to finish, then score")
    task = settings["task"]
    if task == "pope":
        order = {a["id"]: i for i, a in enumerate(sorted(answered, key=lambda a: (a["file"], a["question_id"])))}
        items = [data.Item(a["id"], a["image"], "", "", a) for a in sorted(answered, key=lambda a: order[a["id"]])]
        metrics = pope_metrics(items, {a["id"]: a["answer"] for a in answered})
    elif task == "chair":
        answered.sort(key=lambda a: a["index"])
        metrics = chair_metrics([(a["image_id"], a["answer"]) for a in answered], settings["ground_truth"],
                                settings.get("synonyms"))
    else:
        results = os.path.join(out, "mme_results")
        write_mme_results(answered, results)
        metrics = mme.score_results_dir(results)
    metrics = {**metrics, "answers": len(answered), "skipped": skipped, "settings": settings}
    write_json_atomic(os.path.join(out, "metrics.json"), metrics, indent=1)
    return metrics


# ------------------------------------------------------------------------------ several seeds: mean ± std

def seed_dirs(parent: str) -> list[tuple[int, str]]:
    """The seed-S run directories of an `eval --seeds` run, by seed."""
    if not os.path.isdir(parent):
        return []
    found = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith("seed-") and name[5:].isdigit() and os.path.isfile(os.path.join(path, "run.json")):
            found.append((int(name[5:]), path))
    return sorted(found)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tree_stats(runs: list[dict]) -> tuple[dict, dict]:
    """(mean, std) of every number at the same place in each run's metrics (nested dicts, and lists of numbers
    element by element; other lists, text and the settings left out). std is the sample standard deviation
    (n - 1), None for a single run; a value that is None in any run (a zero denominator) is None."""
    mean, std = {}, {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if key in ("settings", "sentences", "neither_ids") or isinstance(first, str):
            continue  # (question ids are not numbers to average)
        if isinstance(first, list):
            if all(isinstance(v, list) and len(v) == len(first) and all(map(is_number, v)) for v in values):
                m, sd = tree_stats([dict(enumerate(v)) for v in values])
                mean[key], std[key] = list(m.values()), list(sd.values())
            continue
        if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
            mean[key], std[key] = tree_stats(values)
        elif all(is_number(v) for v in values):
            m = sum(values) / len(values)
            mean[key] = m
            std[key] = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        elif is_number(first) or first is None:
            mean[key] = std[key] = None
    return mean, std


def score_seeds(parent: str) -> dict:
    """Score each seed's run of PARENT/seed-S and report each metric as mean ± std over the seeds, with the
    per-seed metrics. The seeds' runs must agree in every setting but the seed."""
    runs = seed_dirs(parent)
    if not runs:
        raise MinidamroError(f"{parent} holds no seed-S run directories")
    per_seed = {seed: score_run(path) for seed, path in runs}
    base = {k: v for k, v in per_seed[runs[0][0]]["settings"].items() if k != "seed"}
    for seed, m in per_seed.items():
        other = {k: v for k, v in m["settings"].items() if k != "seed"}
        diff = next((k for k in list(base) + list(other) if base.get(k) != other.get(k)), None)
        if diff is not None:
            raise MinidamroError(f"{parent}: seed-{seed} was run with {diff} = {json.dumps(other.get(diff))}, "
                                 f"seed-{runs[0][0]} with {json.dumps(base.get(diff))}")
    mean, std = tree_stats(list(per_seed.values()))
    out = {"seeds": [s for s, _ in runs], "mean": mean, "std": std,
           "per_seed": {str(s): {k: v for k, v in m.items() if k not in ("settings", "sentences")}
                        for s, m in per_seed.items()},
           "settings": base | {"seeds": [s for s, _ in runs]}}
    write_json_atomic(os.path.join(parent, "metrics.json"), out, indent=1)
    return out
