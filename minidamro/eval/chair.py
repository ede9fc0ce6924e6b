"""CHAIR (Rohrbach et al., EMNLP 2018) exactly as the DAMRO / OPERA scripts compute it (evaluation.md, section 2).

Those scripts are Maxlinn's NLTK port of LisaAnne Hendricks' `utils/chair.py`: lower-case, `word_tokenize`,
`pos_tag`, `WordNetLemmatizer` with the tag's part of speech, greedy two-word merging, the toilet-seat rule,
then every word in the synonym list counts as a mention of its COCO category (its "node word").

nltk is needed only here and is imported lazily: a missing package or data is one line saying how to get it.
"""
import json
import os
import re
from collections import defaultdict

from .. import MinidamroError

SYNONYMS = os.path.join(os.path.dirname(__file__), "data", "chair_synonyms.txt")
NLTK_HELP = ("CHAIR needs nltk and its data: `pip install nltk` and `python -m nltk.downloader punkt_tab "
             "averaged_perceptron_tagger_eng wordnet` (or NLTK_DATA=DIR pointing at an offline copy)")

# The reference's hard-coded pairs (merged greedily, left to right, over the lemmas). A pair maps to itself
# unless given otherwise; a merged pair that is not in the synonym list then counts nothing ("motor bike").
DOUBLE_WORDS = ["motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                "stove top oven", "home plate", "train track"]
ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]


def double_word_dict() -> dict[str, str]:
    d = {w: w for w in DOUBLE_WORDS}
    for a in ANIMALS:
        d[f"baby {a}"] = d[f"adult {a}"] = a
    for v in ("jet", "train"):
        d[f"passenger {v}"] = v
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"  # the lemmatizer turns "glass" into "glas"
    return d


def load_nltk():
    try:
        import nltk
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer
        nltk.pos_tag(nltk.word_tokenize("a test."))  # fails here, not mid-run, when the data is missing
        lemmatizer = WordNetLemmatizer()
        lemmatizer.lemmatize("dogs")
    except ImportError:
        raise MinidamroError(f"nltk is not installed. {NLTK_HELP}") from None
    except LookupError as e:
        found = re.search(r"Resource\s+(?:\x1b\[\d+m)?'?([\w.-]+)", str(e))  # nltk colours (<= 3.9) or quotes it
        missing = found.group(1) if found else "?"
        raise MinidamroError(f"nltk data '{missing}' not found. {NLTK_HELP}") from None
    return nltk, wordnet, lemmatizer


class Chair:
    def __init__(self, synonyms: str | None = None):
        """synonyms: the vocabulary, one line per object, its forms separated by ", ", the first form the
        object's node word (default: the reference's COCO list)."""
        self.nltk, wordnet, self.lemmatizer = load_nltk()
        # tag[0] J, V, N, R -> WordNet's a, v, n, r; anything else is lemmatized as a noun.
        self.pos = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
        self.noun = wordnet.NOUN
        try:
            with open(synonyms or SYNONYMS, encoding="utf-8") as f:
                # Kept verbatim, quirks included: a double space in the file leaves forms with a leading space
                # (" motor bike", " cheesecake") that no caption word can ever equal.
                synonyms = [line.strip().split(", ") for line in f.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise MinidamroError(f"cannot read the CHAIR synonym list {synonyms}: {e}") from None
        self.node = {}  # every form -> its COCO category (the first form of its line)
        for forms in synonyms:
            for s in forms:
                self.node[s] = forms[0]
        self.double = double_word_dict()

    def caption_to_words(self, caption: str):
        """-> (object words, their node words, their indexes in the merged words, the merged words)."""
        tokens = self.nltk.word_tokenize(caption.lower())
        words = [self.lemmatizer.lemmatize(w, self.pos.get(tag[:1], self.noun)) for w, tag in self.nltk.pos_tag(tokens)]
        merged, idxs, i = [], [], 0
        while i < len(words):
            idxs.append(i)
            pair = " ".join(words[i:i + 2])
            if pair in self.double:
                merged.append(self.double[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        kept = merged
        if "toilet" in kept and "seat" in kept:  # "the seat of the toilet" is not a chair
            kept = [w for w in kept if w != "seat"]
        # As the reference: idxs are looked up by position in the list *after* dropping seats, so they are
        # misaligned after a dropped seat (only the hallucination_idxs field shows it).
        obj_idxs = [idxs[j] for j, w in enumerate(kept) if w in self.node]
        objects = [w for w in kept if w in self.node]
        return objects, [self.node[w] for w in objects], obj_idxs, merged

    # ---- ground truth ----

    def ground_truth_from_coco(self, coco_dir: str, image_ids=None) -> dict[int, set[str]]:
        """image_id -> set of node words: every instance annotation's category, plus every object the same
        pipeline finds in the image's human captions, over train2014 + val2014 (the reference's construction).
        `image_ids` restricts the (slow, NLTK) caption pass to the images that will be scored: same result."""
        def load(kind):
            found = [os.path.join(coco_dir, f"{kind}_{split}2014.json") for split in ("train", "val")]
            found = [p for p in found if os.path.exists(p)]
            if not found:
                raise MinidamroError(f"{coco_dir} has no {kind}_train2014.json or {kind}_val2014.json")
            out = {"annotations": [], "categories": []}
            for p in found:
                try:
                    with open(p) as f:
                        d = json.load(f)
                    out["annotations"] += d["annotations"]
                    out["categories"] += d.get("categories", [])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise MinidamroError(f"cannot read COCO annotations {p}: {e}") from None
            return out
        if not os.path.isdir(coco_dir):
            raise MinidamroError(f"ground truth {coco_dir} is neither a COCO annotation directory nor a JSON file")
        instances, captions = load("instances"), load("captions")
        names = {c["id"]: c["name"] for c in instances["categories"]}
        want = None if image_ids is None else set(image_ids)
        gt = defaultdict(set)
        try:
            for a in instances["annotations"]:
                if want is None or a["image_id"] in want:
                    gt[a["image_id"]].add(self.node[names[a["category_id"]]])
            for a in captions["annotations"]:
                if want is None or a["image_id"] in want:
                    gt[a["image_id"]].update(self.caption_to_words(a["caption"])[1])
        except (KeyError, TypeError) as e:
            raise MinidamroError(f"malformed COCO annotations in {coco_dir}: missing {e}") from None
        return dict(gt)

    def ground_truth(self, path: str, image_ids=None) -> dict[int, set[str]]:
        """From a COCO annotation directory, or an OBJECTS.json {image_id: [node words]} (as stored in a
        reference CHAIR cache, as the DAMRO release stores it)."""
        if os.path.isdir(path):
            return self.ground_truth_from_coco(path, image_ids)
        try:
            with open(path) as f:
                d = json.load(f)
            return {image_key(k): set(v) for k, v in d.items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise MinidamroError(f"cannot read ground-truth objects {path}: {e}") from None

    # ---- metrics ----

    def score(self, captions: list[tuple], gt: dict) -> dict:
        """captions: [(image_id, caption)] -> {"sentences": [...], "overall_metrics": {...}} as the reference's
        --save_path JSON (OPERA's, with Len). An image without ground truth has the empty set (every mention
        is hallucinated). Ratios with a zero denominator are None (the reference divides by zero)."""
        sentences = []
        n_hal_caps = n_hal_words = n_words = n_tokens = n_recall = n_gt = 0
        for image_id, caption in captions:
            objects, nodes, idxs, merged = self.caption_to_words(caption)
            truth = gt.get(image_key(image_id), set())
            hallucinated = [[w, n] for w, n in zip(objects, nodes) if n not in truth]
            recalled = {n for n in nodes if n in truth}
            n_words += len(nodes)
            n_hal_words += len(hallucinated)
            n_hal_caps += bool(hallucinated)
            n_tokens += len(merged)
            n_recall += len(recalled)
            n_gt += len(truth)
            sentences.append({
                "image_id": image_id, "caption": caption, "mscoco_hallucinated_words": hallucinated,
                "mscoco_gt_words": sorted(truth),  # the reference lists a set (arbitrary order); sorted here
                "mscoco_generated_words": nodes,
                "hallucination_idxs": [i for i, w, n in zip(idxs, objects, nodes) if n not in truth],
                "words": merged,
                "metrics": {"CHAIRs": int(bool(hallucinated)),
                            "CHAIRi": len(hallucinated) / len(objects) if objects else 0.0,
                            "Recall": len(recalled) / len(truth) if truth else 0.0}})
        n = len(captions)
        div = lambda a, b: a / b if b else None  # noqa: E731
        overall = {"CHAIRs": div(n_hal_caps, n), "CHAIRi": div(n_hal_words, n_words), "Recall": div(n_recall, n_gt),
                   "Len": div(0.01 * n_tokens, n)}
        return {"sentences": sentences, "overall_metrics": overall}


def image_key(k):
    """COCO image ids are ints; JSON object keys are strings."""
    try:
        return int(k)
    except (TypeError, ValueError):
        return k
