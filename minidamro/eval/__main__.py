"""python -m minidamro.eval {pope,chair,mme,score}: the paper's benchmarks, scored as the released scripts score.

    python -m minidamro.eval pope --questions random popular adversarial --images val2014/ --out runs/pope-plain
    python -m minidamro.eval chair --images val2014/ --image-list chair_images.jsonl --ground-truth annotations/ --out runs/chair
    python -m minidamro.eval mme --data MME_Benchmark_release_version/ --out runs/mme
    python -m minidamro.eval score runs/pope-plain          # or: score pope --questions Q.jsonl --answers A.jsonl
    python -m minidamro.eval pope ... --seeds 42,43,44 --out runs/pope-damro   # one run per seed: mean ± std
    python -m minidamro.eval score runs/pope-plain runs/pope-damro --markdown  # the methods side by side

Model, decoding and method options are generate's. Re-running a command resumes it; --shard K/N (or
torchrun's RANK / WORLD_SIZE) answers every N-th image from K; `score RUN_DIR` merges the shards.
"""
import argparse
import json
import os
import sys


from .. import MinidamroError, methods
from .. import generate as gen
from ..llava import read_config
from . import chair, data, mme, table
from .engine import Engine
from .run import (Progress, answers_name, check_settings, parse_seeds, read_answers, shard_spec,
                  write_json_atomic)
from .score import released_chair, released_pope, score_run, score_seeds, seed_dirs


def add_run_arguments(p: argparse.ArgumentParser):
    gen.add_arguments(p, prompt=None, max_new_tokens=1024)  # the papers' max_new_tokens
    # The DAMRO scripts' seed, and their conversation template: llava_v1 for LLaVA, none for InstructBLIP (run()).
    p.set_defaults(system=None, seed=42)
    p.add_argument("--prompt-template", default=None,
                   help="the prompt, {question} standing for the question (default: the DAMRO scripts' wording; "
                        "docs/evaluation.md)")
    p.add_argument("--out", required=True, help="run directory (answers, settings, metrics)")
    p.add_argument("--seeds", default=None, help="several runs, one per seed, into OUT/seed-S: seeds separated by "
                                                 "commas (42,43,44), or a count N (--seed ... --seed + N - 1)")
    p.add_argument("--no-reuse", action="store_true",
                   help="run the vision tower and the image prefix once per question, as generate does")
    p.add_argument("--batch-questions", action="store_true",
                   help="decode the questions of one image together, one row each (an experiment: see docs/evaluation.md)")
    p.add_argument("--shard", default=None, help="K/N: answer every N-th image from K (default: torchrun's "
                                                 "RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--skip-bad", action="store_true", help="leave out (and list) questions whose line or image "
                                                           "is bad, instead of stopping")
    p.add_argument("--json", action="store_true", help="print the metrics as a JSON object on the last line")


def parse_args(argv=None):
    p = gen.Parser(prog="python -m minidamro.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=gen.Parser)
    pp = sub.add_parser("pope", help="POPE: yes/no object questions")
    pp.add_argument("--questions", nargs="+", required=True,
                    help="POPE question files (JSON lines), or random / popular / adversarial for the COCO files "
                         "shipped with minidamro")
    pp.add_argument("--images", required=True, help="directory of the images the questions name (COCO val2014)")
    add_run_arguments(pp)
    pc = sub.add_parser("chair", help="CHAIR: object hallucination in captions")
    pc.add_argument("--images", required=True)
    pc.add_argument("--image-list", required=True, help="JSON lines {image, image_id}, or one file name per line")
    pc.add_argument("--ground-truth", required=True, help="COCO annotation directory or OBJECTS.json")
    pc.add_argument("--synonyms", default=None, help="the object vocabulary, a line of comma-separated forms per "
                                                     "object (default: CHAIR's COCO synonym list)")
    add_run_arguments(pc)
    pm = sub.add_parser("mme", help="MME yes/no questions")
    pm.add_argument("--data", required=True, help="MME release directory (one folder per task)")
    pm.add_argument("--tasks", default=",".join(mme.HALLUCINATION),
                    help="comma-separated tasks, or 'all' for every task folder present (default: %(default)s)")
    add_run_arguments(pm)
    ps = sub.add_parser("score", help="score existing answers: RUN_DIR [RUN_DIR ...], or pope / chair / mme files")
    ps.add_argument("target", nargs="+", help="run directories (several: one table, the methods side by side; "
                                              "an --seeds run: mean ± std), or pope, chair or mme")
    ps.add_argument("--markdown", action="store_true", help="the table as Markdown")
    ps.add_argument("--rule", choices=("damro", "pope"), default="damro",
                    help="POPE table: the DAMRO / VCD scripts' rule (the papers' numbers) or the official one")
    ps.add_argument("--allow-differences", action="store_true",
                    help="tabulate runs whose settings differ in more than the method")
    ps.add_argument("--questions", nargs="+", help="pope: question files")
    ps.add_argument("--answers", nargs="+", help="pope: answers files, one per question file")
    ps.add_argument("--captions", help="chair: .json list or .jsonl of {image_id, caption}")
    ps.add_argument("--ground-truth", help="chair: COCO annotation directory or OBJECTS.json")
    ps.add_argument("--synonyms", help="chair: the object vocabulary (default: CHAIR's COCO synonym list)")
    ps.add_argument("--results", help="mme: directory of task.txt files")
    ps.add_argument("--out", help="where metrics.json goes (default: beside the answers)")
    ps.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def load_items(a) -> tuple[list, list]:
    problems = []
    if a.command == "pope":
        items = data.pope_items(a.questions, a.images, problems, a.prompt_template)
    elif a.command == "chair":
        items = data.chair_items(a.image_list, a.images, problems, a.prompt_template)
    else:
        present = sorted(d for d in os.listdir(a.data) if os.path.isdir(os.path.join(a.data, d))) \
            if os.path.isdir(a.data) else []
        tasks = [t for t in mme.TASKS if t in present] + [t for t in present if t not in mme.TASKS] \
            if a.tasks == "all" else a.tasks.split(",")
        items = data.mme_items(a.data, tasks, problems, a.prompt_template)
    return items, problems


def settings_of(a, model_cfg_path: str, n_questions: int, seed: int) -> dict:
    """Everything an answer depends on (not the device, the shard or --skip-bad)."""
    s = {"task": a.command, "model": os.path.abspath(a.model), "method": a.method, "temperature": a.temperature,
         "top_p": a.top_p, "seed": seed, "max_new_tokens": a.max_new_tokens, "dtype": a.dtype,
         "pad_square": a.pad_square, "system": gen.system_text(a), "prompt_template": a.prompt_template,
         "reuse": not a.no_reuse,
         "batch_questions": a.batch_questions, "questions": n_questions}
    s |= methods.settings(gen.method_config(a, a.method))  # the method's own (its defaults where not given)
    if a.command == "pope":
        s |= {"question_files": [os.path.abspath(data.pope_file(q)) for q in a.questions],
              "images": os.path.abspath(a.images)}
    elif a.command == "chair":
        s |= {"image_list": os.path.abspath(a.image_list), "images": os.path.abspath(a.images),
              "ground_truth": os.path.abspath(a.ground_truth),
              "synonyms": a.synonyms and os.path.abspath(a.synonyms)}
    else:
        s |= {"data": os.path.abspath(a.data), "tasks": a.tasks}
    quantization = read_config(model_cfg_path).text.quantization
    if quantization:  # only when set: runs made before int8 existed resume unchanged
        s["quantization"] = quantization
    return s


def run(a) -> dict:
    a.prompt = ""  # the prompts come from the benchmark; generate's checks read this
    if a.prompt_template is None:
        a.prompt_template = data.TEMPLATES[a.command]
    data.check_template(a.command, a.prompt_template)
    gen.check_options(a)
    seeds = parse_seeds(a.seeds, a.seed)
    if a.batch_questions and a.no_reuse:
        raise MinidamroError("--batch-questions decodes rows that share the image prefix: it needs reuse (drop --no-reuse)")
    k, n = shard_spec(a.shard)
    if a.device.startswith("cuda") and ":" not in a.device and "LOCAL_RANK" in os.environ:
        a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # torchrun: one device per process
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise MinidamroError(f"model directory {a.model} has no config.json")
    instructblip = read_config(a.model).model_type == "instructblip"
    if a.system is None:  # the release's: LLaVA's scripts use the llava_v1 template, InstructBLIP's the raw prompt
        a.system = None if instructblip else "llava_v1"
    if instructblip:  # its Q-Former reads the question: no per-image prefix to share between questions
        if a.batch_questions:
            raise MinidamroError("--batch-questions shares the image prefix between questions; InstructBLIP's image "
                                 "features depend on the question")
        a.no_reuse = True
    if a.command in ("pope", "chair") and not os.path.isdir(a.images):
        raise MinidamroError(f"--images {a.images} is not a directory")
    if a.command == "chair":  # what scoring needs, checked now rather than after hours of captions
        if not os.path.exists(a.ground_truth):
            raise MinidamroError(f"ground truth {a.ground_truth} does not exist")
        chair.Chair(a.synonyms)  # nltk and its data, and the vocabulary
    if seeds and os.path.exists(os.path.join(a.out, "run.json")):
        raise MinidamroError(f"{a.out} holds a run of one seed; --seeds writes OUT/seed-S directories: use another --out")
    if seeds is None and seed_dirs(a.out):
        raise MinidamroError(f"{a.out} holds runs of several seeds (seed-S directories): resume them with --seeds, "
                             "or use another --out")
    outs = {a.seed: a.out} if seeds is None else {s: os.path.join(a.out, f"seed-{s}") for s in seeds}
    items, problems = load_items(a)
    mine = data.shard(items, k, n)
    paths = {s: os.path.join(out, answers_name(k, n)) for s, out in outs.items()}
    todo = {}
    for s, path in paths.items():
        done = {o["id"] for o in read_answers(path) if "skipped" not in o}
        todo[s] = [it for it in mine if it.id not in done]
    pending = list({it.id: it for s in outs for it in todo[s]}.values())
    bad = data.check_images(pending, problems)  # every image opened before the model loads
    if problems and not a.skip_bad:
        more = f" (and {len(problems) - 1} more; --skip-bad leaves them out)" if len(problems) > 1 else \
            " (--skip-bad leaves it out)"
        raise MinidamroError(problems[0] + more)
    # After the checks: a typo leaves no run.json. A run made before --prompt-template and --synonyms existed
    # used their defaults: it resumes with them.
    absent = {"prompt_template": data.TEMPLATES[a.command], "synonyms": None}
    if seeds:  # the seeds already in OUT must have been run with these settings too, or OUT could never be scored
        for s, path in seed_dirs(a.out):
            if s not in outs:
                check_settings(path, settings_of(a, a.model, len(items), s), absent)
    for s, out in outs.items():
        check_settings(out, settings_of(a, a.model, len(items), s), absent)
        read_answers(paths[s], repair=True)  # cut a torn last line before appending
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)

    from ..anyres import model_pixels
    from ..image import load_image
    from ..llava import load_model
    from ..tokenizer import load_tokenizer
    model = load_model(a.model, a.device, a.dtype)
    cfg = model.cfg
    tok = load_tokenizer(a.model, cfg)
    method, mcfg = methods.get(a.method), gen.method_config(a, a.method)
    method.check(model, mcfg)
    engine = Engine(model, tok, method, mcfg, gen.system_text(a), a.max_new_tokens, a.temperature, a.top_p, a.seed,
                    reuse=not a.no_reuse, batch_questions=a.batch_questions)
    settings = {"method": a.method, **methods.settings(mcfg), "temperature": a.temperature, "top_p": a.top_p,
                "max_new_tokens": a.max_new_tokens, "reuse": not a.no_reuse, "batch_questions": a.batch_questions}
    label = f"{a.command}" + (f" shard {k}/{n}" if n > 1 else "") + (f", {len(seeds)} seeds" if seeds else "")
    progress = Progress(len(mine) * len(outs), sum(len(mine) - len(t) for t in todo.values()), label)
    index = {it.id: i for i, it in enumerate(items)}
    files = {s: open(path, "a", encoding="utf-8") for s, path in paths.items()}
    try:
        def write(s, obj):
            files[s].write(json.dumps(obj, ensure_ascii=False) + "\n")
            files[s].flush()  # a killed run loses at most the line being written
        for s in outs:
            for it in todo[s]:
                if it.id in bad:
                    write(s, {"id": it.id, "image": it.image, "skipped": "bad image or question", **it.meta})
        for image in data.images_in_order(mine):  # the order of a whole run, so a resumed file is the same file
            groups = {s: [it for it in todo[s] if it.image == image and it.id not in bad] for s in outs}
            if not any(groups.values()):
                continue
            pixels, size = model_pixels(load_image(image), cfg, a.pad_square)  # (1, 3, S, S); NeXT: tiles, size
            same_image = False
            for s, group in groups.items():  # the seeds in turn; the image's prefix is kept where it can be
                if not group:
                    continue
                by_id = {it.id: it for it in group}
                prompts = [(it.id, it.prompt) for it in group]
                for item_id, seed, token_ids, info in engine.answer_image(pixels, prompts, os.path.basename(image),
                                                                          size, s, same_image):
                    it = by_id[item_id]
                    write(s, {"id": it.id, "image": it.image, "prompt": it.prompt, "answer": tok.decode(token_ids),
                              "token_ids": token_ids, **settings, "seed": seed, **info, "index": index[it.id],
                              **it.meta})
                    progress.step()
                same_image = True
    finally:
        for f in files.values():
            f.close()
    progress.step(final=True)
    try:
        return score_run(a.out) if seeds is None else score_seeds(a.out)
    except MinidamroError as e:
        if n > 1:
            print(f"shard {k}/{n} done; `python -m minidamro.eval score {a.out}` once every shard has finished "
                  f"({e})", file=sys.stderr)
            return {}
        raise


def score(a) -> dict:
    if a.target[0] not in ("pope", "chair", "mme") and (len(a.target) > 1 or a.markdown or seed_dirs(a.target[0])):
        for t in a.target:
            if not os.path.isdir(t):
                raise MinidamroError(f"score: {t} is not a run directory")
        text, as_json = table.table(a.target, a.rule, a.markdown, a.allow_differences)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            write_json_atomic(os.path.join(a.out, "table.json"), as_json, indent=1)
        return {"table": as_json, "text": text}
    if len(a.target) > 1:
        raise MinidamroError("score pope / chair / mme takes its files as options, not more targets")
    t = a.target[0]
    if t == "pope":
        if not a.questions or not a.answers:
            raise MinidamroError("score pope needs --questions and --answers")
        metrics, where = released_pope(a.questions, a.answers), os.path.dirname(os.path.abspath(a.answers[0]))
    elif t == "chair":
        if not a.captions or not a.ground_truth:
            raise MinidamroError("score chair needs --captions and --ground-truth")
        metrics = released_chair(a.captions, a.ground_truth, a.synonyms)
        where = os.path.dirname(os.path.abspath(a.captions))
    elif t == "mme":
        if not a.results:
            raise MinidamroError("score mme needs --results")
        metrics, where = mme.score_results_dir(a.results), a.results
    elif os.path.isdir(t):
        metrics = score_run(t)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            write_json_atomic(os.path.join(a.out, "metrics.json"), metrics, indent=1)
        return metrics
    else:
        raise MinidamroError(f"score: {t} is not pope, chair, mme or a run directory")
    where = a.out or where
    os.makedirs(where, exist_ok=True)
    write_json_atomic(os.path.join(where, "metrics.json"), metrics, indent=1)
    return metrics


def main(argv=None):
    a = parse_args(argv)
    metrics = gen.guarded(score if a.command == "score" else run, a)
    if metrics and "text" in metrics:  # a table
        print(json.dumps(metrics["table"], ensure_ascii=False) if a.json else metrics["text"])
        return
    if metrics and "mean" in metrics and not a.json:  # an --seeds run: its table of one row
        print(gen.guarded(lambda: table.table([a.out])[0]))
    elif metrics and not a.json:
        print(table.summary(metrics))
    if a.json:
        print(json.dumps(metrics, ensure_ascii=False))


if __name__ == "__main__":
    main()
