"""The questions of each benchmark as one list of items, read and checked before any model work.

An item is one question about one image: a unique `id` (the answers file's key), the image path, the
prompt given to the model, and what scoring needs (`meta`). Every problem (a malformed line, a missing or
unreadable image) is collected with its file and line, so a run stops before loading the model, or, with
--skip-bad, leaves those questions out and lists them.
"""
import gzip
import json
import os
import re
from dataclasses import dataclass, field

from .. import MinidamroError
from ..image import load_image
from . import mme

DATA = os.path.join(os.path.dirname(__file__), "data")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_SUFFIX = " Please answer this question with one word."  # the DAMRO / VCD POPE prompt
CHAIR_PROMPT = "Generate a short caption of this image."
# What each benchmark sends by default (--prompt-template), {question} standing for the question's text:
# POPE: the DAMRO and VCD scripts' `qs + " Please answer this question with one word."`; CHAIR: DAMRO's caption
# prompt (no question); MME: the question as the release words it (it ends "Please answer yes or no.").
TEMPLATES = {"pope": "{question}" + POPE_SUFFIX, "chair": CHAIR_PROMPT, "mme": "{question}"}


def check_template(task: str, template: str):
    """POPE's and MME's templates must place the question; CHAIR has none to place; the image is the chat
    template's (a second <image> would make a second image run)."""
    if not template.strip():
        raise MinidamroError("--prompt-template is empty")
    if "<image>" in template:
        raise MinidamroError("--prompt-template must not contain <image>: the chat template puts the image first")
    if task == "chair" and "{question}" in template:
        raise MinidamroError("--prompt-template: CHAIR asks no question, so its prompt has no {question}")
    if task != "chair" and "{question}" not in template:
        raise MinidamroError(f"--prompt-template for {task} must contain {{question}}, where the question goes")


def fill(template: str, question: str) -> str:
    """The prompt: the template with each {question} replaced (a plain replace: other braces stay as written)."""
    return template.replace("{question}", question)


@dataclass
class Item:
    id: str
    image: str | None      # path; None when the question names no findable image
    prompt: str
    source: str            # "file:line", for messages
    meta: dict = field(default_factory=dict)


def open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def pope_file(name: str) -> str:
    """A path, or random / popular / adversarial for the COCO files shipped with minidamro."""
    if name in POPE_SPLITS:
        return os.path.join(DATA, f"coco_pope_{name}.jsonl.gz")
    return name


def file_stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".json"):
        base = base[:-len(ext)] if base.endswith(ext) else base
    return base


def read_jsonl(path: str, required: dict, problems: list) -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line; lines without the `required` keys (name -> type) or that
    are not JSON objects go to `problems`."""
    try:
        f = open_text(path)
    except OSError as e:
        raise MinidamroError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    with f:
        try:
            lines = list(f)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise MinidamroError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            problems.append(f"{path}:{n}: not a JSON line")
            continue
        bad = [k for k, t in required.items() if not isinstance(obj, dict) or not isinstance(obj.get(k), t)
               or isinstance(obj.get(k), bool)]
        if bad:
            problems.append(f"{path}:{n}: missing or mistyped {', '.join(bad)}")
            continue
        out.append((n, obj))
    return out


def pope_items(files: list[str], images: str, problems: list, template: str = TEMPLATES["pope"]) -> list[Item]:
    items, stems = [], set()
    for name in files:
        path = pope_file(name)
        stem = file_stem(path)
        if stem in stems:
            raise MinidamroError(f"two question files are named {stem}: the answers could not tell them apart")
        stems.add(stem)
        seen = set()
        for n, q in read_jsonl(path, {"question_id": (int, str), "image": str, "text": str, "label": str}, problems):
            if q["question_id"] in seen:
                problems.append(f"{path}:{n}: question_id {q['question_id']} repeated")
                continue
            seen.add(q["question_id"])
            items.append(Item(f"{stem}/{q['question_id']}", os.path.join(images, q["image"]), fill(template, q["text"]),
                              f"{path}:{n}", {"file": stem, "question_id": q["question_id"], "label": q["label"],
                                              "text": q["text"]}))
    return items


def coco_image_id(name: str):
    m = re.search(r"(\d+)\.\w+$", os.path.basename(name))
    return int(m.group(1)) if m else None


def chair_items(image_list: str, images: str, problems: list, template: str = TEMPLATES["chair"]) -> list[Item]:
    """image_list: JSON lines {image, image_id} (DAMRO's data/chair file), or one file name per line (the
    image id is then the number at the end of a COCO file name)."""
    items, seen = [], set()
    try:
        with open_text(image_list) as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        raise MinidamroError(f"cannot read {image_list}: {e}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                name, image_id = obj["image"], obj.get("image_id", coco_image_id(obj["image"]))
            except (ValueError, KeyError, TypeError):
                problems.append(f"{image_list}:{n}: not a JSON object with an 'image'")
                continue
        else:
            name, image_id = line, coco_image_id(line)
        if image_id is None:
            problems.append(f"{image_list}:{n}: no image_id, and none in the file name {name}")
            continue
        if image_id in seen:
            problems.append(f"{image_list}:{n}: image_id {image_id} repeated")
            continue
        seen.add(image_id)
        items.append(Item(f"chair/{image_id}", os.path.join(images, name), template, f"{image_list}:{n}",
                          {"image_id": image_id, "image_name": name}))
    return items


def mme_items(data: str, tasks: list[str], problems: list, template: str = TEMPLATES["mme"]) -> list[Item]:
    if not os.path.isdir(data):
        raise MinidamroError(f"MME directory {data} does not exist")
    items = []
    for task in tasks:
        if not os.path.isdir(os.path.join(data, task)):
            raise MinidamroError(f"MME task {task} not found in {data}")
        try:
            questions = mme.read_task(data, task)
        except (OSError, UnicodeDecodeError) as e:
            raise MinidamroError(f"cannot read MME task {task}: {e}") from None
        for i, q in enumerate(questions):
            if q["label"] is None:
                problems.append(f"{q['source']}: not 'question<TAB>answer'")
                continue
            items.append(Item(f"{task}/{i:04d}", q["image"], fill(template, q["question"]), q["source"],
                              {"task": task, "image_name": q["image_name"], "question": q["question"],
                               "label": q["label"]}))
    return items


def check_images(items: list[Item], problems: list) -> set[str]:
    """Open every image once (a missing or unreadable file is a problem naming the first question that
    asks about it). Returns the ids of the items that cannot be answered."""
    bad, status = set(), {}
    for it in items:
        if it.image not in status:
            try:
                if it.image is None:
                    raise MinidamroError("no image file for this question")
                load_image(it.image)
                status[it.image] = None
            except MinidamroError as e:
                status[it.image] = str(e)
                problems.append(f"{it.source} (id {it.id}): {e}")
        if status[it.image] is not None:
            bad.add(it.id)
    return bad


def images_in_order(items: list[Item]) -> list[str]:
    return list(dict.fromkeys(it.image for it in items))


def shard(items: list[Item], k: int, n: int) -> list[Item]:
    """Every n-th image from k (in order of first appearance), with all questions about it."""
    mine = set(images_in_order(items)[k::n])
    return [it for it in items if it.image in mine]
