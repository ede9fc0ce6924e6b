"""What `python -m minidamro.eval` prints: one run's summary, and runs side by side in the papers' layout.

`score RUN_DIR [RUN_DIR ...]` prints the runs as one table.

Each RUN_DIR is one run, or the parent of an `--seeds` run (its cells are then mean ± std over the seeds). A
row is a run, named by its method and the method's settings, read from its stored settings. The runs must
agree in every other setting (the model, the questions, the prompt, the decoding, the seeds), or the
comparison would not be of the methods alone: a difference is refused, naming it, unless allowed.

    POPE   per question file (split), then their average: accuracy, precision, recall, F1, yes-ratio (the
           released rule's numbers, % ), and the answers the rule reads as yes / as neither yes nor no
    CHAIR  CHAIRs, CHAIRi, recall (%), and the mean caption length
    MME    each task's score, and their total
"""
import json
from dataclasses import fields

from .. import MinidamroError, methods
from .data import file_stem
from .score import score_run, score_seeds, seed_dirs

METHOD_KEYS = {"method"} | {f.name for m in methods.METHODS.values() for f in fields(m.config)}
POPE_COLUMNS = (("accuracy", "Acc"), ("precision", "Prec"), ("recall", "Rec"), ("f1", "F1"), ("yes_ratio", "Yes"),
                ("said_yes_ratio", "said yes"), ("neither", "neither"))


def load(target: str) -> dict:
    """A run directory or an --seeds parent -> {"target", "settings", "mean", "std" (None for one run), "per_seed"}."""
    if seed_dirs(target):
        m = score_seeds(target)
        return {"target": target, "settings": m["settings"], "mean": m["mean"], "std": m["std"],
                "per_seed": list(m["per_seed"].values())}
    m = score_run(target)
    return {"target": target, "settings": m["settings"], "mean": m, "std": None, "per_seed": [m]}


def decoding(settings: dict) -> str:
    return "greedy" if not settings.get("temperature") else \
        f"temperature {settings['temperature']}, top-p {settings['top_p']}"


def label(settings: dict) -> str:
    """The method and its own settings: "damro alpha=2 beta=0.1 topk=10 outlier_attention=full"."""
    cfg = methods.get(settings["method"]).config
    value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return " ".join([settings["method"]] + [f"{f.name}={value(settings[f.name])}" for f in fields(cfg)
                                             if f.name in settings])


def first_difference(runs: list[dict]) -> str | None:
    base = runs[0]["settings"]
    for r in runs[1:]:
        s = r["settings"]
        for key in list(base) + [k for k in s if k not in base]:
            if key not in METHOD_KEYS and base.get(key) != s.get(key):
                return (f"{runs[0]['target']} has {key} = {base.get(key)!r}, {r['target']} has {key} = "
                        f"{s.get(key)!r}")
    return None


def get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def cell(run: dict, path: tuple, scale: float, digits: int):
    """(mean, std) at `path`, scaled (100 for %)."""
    m, s = get(run["mean"], path), get(run["std"], path) if run["std"] is not None else None
    return (None if m is None else m * scale, None if s is None else s * scale, digits)


def pope_table(runs: list[dict], rule: str) -> tuple[list[str], list[tuple[str, list]]]:
    stems = [k for k, v in runs[0]["mean"].items() if isinstance(v, dict) and rule in v]
    order = [file_stem(q) for q in runs[0]["settings"].get("question_files", [])]  # the command's order
    stems.sort(key=lambda k: order.index(k) if k in order else len(order))
    columns = ["split", "method"] + [name for _, name in POPE_COLUMNS]
    rows = []
    for stem in stems + (["average"] if len(stems) > 1 else []):
        for r in runs:
            values = []
            for key, _ in POPE_COLUMNS:
                scale, digits = (1, 0 if r["std"] is None else 1) if key == "neither" else (100, 2)
                if stem != "average":
                    values.append(cell(r, (stem, rule, key), scale, digits))
                    continue
                # The mean over the splits (LLaVA's POPE figure is F1's), per seed, then over the seeds.
                per_seed = [[get(m, (s, rule, key)) for s in stems] for m in r["per_seed"]]
                if any(v is None for p in per_seed for v in p):
                    values.append((None, None, digits))
                    continue
                averages = [scale * sum(p) / len(p) for p in per_seed]
                mean = sum(averages) / len(averages)
                std = (sum((a - mean) ** 2 for a in averages) / (len(averages) - 1)) ** 0.5 if len(averages) > 1 \
                    else None
                values.append((mean, std, digits))
            rows.append(([stem, label(r["settings"])], values))
    return columns, rows


def chair_table(runs):
    columns = ["method", "CHAIRs", "CHAIRi", "Recall", "Len"]
    return columns, [([label(r["settings"])], [cell(r, (k,), 100, 2) for k in ("CHAIRs", "CHAIRi", "Recall")] +
                      [cell(r, ("Len",), 1, 2)]) for r in runs]


def mme_table(runs):
    tasks = list(runs[0]["mean"]["tasks"])
    columns = ["method"] + tasks + ["total"]
    return columns, [([label(r["settings"])], [cell(r, ("tasks", t, "score"), 1, 2) for t in tasks] +
                      [cell(r, ("total",), 1, 2)]) for r in runs]


def fmt(v) -> str:
    mean, std, digits = v
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def render(columns: list[str], rows, markdown: bool) -> str:
    cells = [labels + [fmt(v) for v in values] for labels, values in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    width = [max(len(x) for x in [col] + [c[i] for c in cells]) for i, col in enumerate(columns)]
    n_labels = len(rows[0][0]) if rows else 1
    line = lambda c: "  ".join(x.ljust(w) if i < n_labels else x.rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(c, width)))
    return "\n".join([line(columns), "  ".join("-" * w for w in width)] + [line(c) for c in cells])


def table(targets: list[str], rule: str = "damro", markdown: bool = False, allow_differences: bool = False):
    """-> (text, JSON-able dict) for the runs in `targets`."""
    runs = [load(t) for t in targets]
    tasks = {r["settings"]["task"] for r in runs}
    if len(tasks) > 1:
        raise MinidamroError(f"the runs are of different benchmarks ({', '.join(sorted(tasks))}): one table per task")
    diff = first_difference(runs)
    if diff and not allow_differences:
        raise MinidamroError(f"the runs differ in more than the method: {diff} (--allow-differences to compare "
                             "them anyway)")
    task = tasks.pop()
    columns, rows = pope_table(runs, rule) if task == "pope" else chair_table(runs) if task == "chair" else \
        mme_table(runs)
    s = runs[0]["settings"]
    seeds = f"mean ± sample std over seeds {s['seeds']}" if "seeds" in s else f"seed {s.get('seed')}"
    head = (f"{task}: {len(runs)} runs; {decoding(s)}; {seeds}" + (f"; rule {rule} (% except 'neither': answers)"
                                                                 if task == "pope" else "") +
            (f"; differing: {diff}" if diff else ""))
    text = head + "\n" + render(columns, rows, markdown)
    as_json = {"task": task, "rule": rule if task == "pope" else None, "columns": columns, "note": head,
               "rows": [{"labels": labels, "values": [v[0] for v in values],
                         "std": [v[1] for v in values]} for labels, values in rows],
               "runs": [r["target"] for r in runs]}
    return text, as_json


def describe(s: dict) -> list[str]:
    """A run's settings in two lines: what was run, and the exact prompt it was asked in."""
    seed = f", seed {s['seed']}" if s.get("temperature") else ""
    return [f"{s['task']}: {label(s)}; {decoding(s)}{seed}; {s['questions']} questions",
            f"prompt {json.dumps(s['prompt_template'])} after system text {json.dumps(s['system'])}"]


def summary(m: dict) -> str:
    """One run's metrics (or a released file's) as a few lines of text: its settings, then the numbers."""
    if not m:
        return ""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = describe(m["settings"]) if isinstance(m.get("settings"), dict) else []
    if "overall_metrics" in m:
        lines.append("  ".join(f"{k} {pct(m[k]) if k != 'Len' else ('n/a' if m[k] is None else f'{m[k]:.2f}')}"
                               for k in ("CHAIRs", "CHAIRi", "Recall", "Len")))
    elif "tasks" in m:
        for t, v in m["tasks"].items():
            points = "n/a" if v["score"] is None else f"{v['score']:.2f}"
            lines.append(f"{t:24s} acc {pct(v['acc'])}  acc+ {pct(v['acc_plus'])}  score {points}")
        lines.append(f"{'total':24s} {m['total']:.2f}")
    else:
        for stem, rules in m.items():
            if isinstance(rules, dict) and "damro" in rules:
                for rule, v in rules.items():
                    lines.append(f"{stem} [{rule}]: accuracy {pct(v['accuracy'])}  precision {pct(v['precision'])}  "
                                 f"recall {pct(v['recall'])}  f1 {pct(v['f1'])}  yes {pct(v['yes_ratio'])}")
    return "\n".join(lines)
