"""Metrics equal to the released scripts' on fixtures covering each parsing branch of evaluation.md.

The expected numbers come from re-implementations, written here from the scripts' behaviour line by line
(DAMRO/VCD eval_pope.py, RUCAIBox evaluate.py, OPERA/DAMRO chair.py, MME calculation.py), independent of
minidamro.eval, and a few are checked by hand.
"""
import json
import os
import subprocess
import sys

import pytest

from minidamro.eval import mme, pope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Data a fresh clone lacks, found through the environment (.ci/run sets both where CI has a copy): NLTK's corpora
# (NLTK_DATA, as nltk itself reads it) and the DAMRO release's CHAIR cache (MINIDAMRO_EVAL_DATA).
EVAL_DATA = os.environ.get("MINIDAMRO_EVAL_DATA", "")


# ---------------- POPE ----------------

def ref_eval_pope(labels, answers):  # DAMRO / VCD eval_pope.py
    true_pos = true_neg = false_pos = false_neg = unknown = 0
    total_questions = len(labels)
    yes_answers = 0
    for gt, ans in zip(labels, answers):
        gt, ans = gt.lower().strip(), ans.lower().strip()
        if gt == "yes":
            if "yes" in ans:
                true_pos += 1
                yes_answers += 1
            else:
                false_neg += 1
        elif gt == "no":
            if "no" in ans:
                true_neg += 1
            else:
                yes_answers += 1
                false_pos += 1
        else:
            unknown += 1
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    f1 = 2 * precision * recall / (precision + recall)
    accuracy = (true_pos + true_neg) / total_questions
    return dict(accuracy=accuracy, precision=precision, recall=recall, f1=f1, yes_ratio=yes_answers / total_questions)


def ref_evaluate_py(labels, answers):  # RUCAIBox POPE evaluate.py
    preds = []
    for text in answers:
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    label_list = [0 if x == "no" else 1 for x in labels]
    TP = TN = FP = FN = 0
    for p, l in zip(preds, label_list):
        if p == 1 and l == 1:
            TP += 1
        elif p == 1 and l == 0:
            FP += 1
        elif p == 0 and l == 0:
            TN += 1
        else:
            FN += 1
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    return dict(accuracy=(TP + TN) / (TP + TN + FP + FN), precision=precision, recall=recall,
                f1=2 * precision * recall / (precision + recall), yes_ratio=preds.count(1) / len(preds))


# Every branch of both rules: substring hits ("no doubt", "cannot", "know", "snow"), case, whitespace,
# newline, first-sentence cut, commas, "not", empty and unparseable answers, a label that is neither.
POPE_CASES = [
    ("yes", "Yes"), ("yes", " YES "), ("yes", "yes."), ("yes", "Yes, no doubt"), ("yes", "No"),
    ("yes", "There isn't a dog"), ("yes", "I cannot tell"), ("yes", ""), ("yes", "Yes. No."), ("yes", "no\n"),
    ("yes", "Eyes"), ("yes", "Yes, there is not"),
    ("no", "No"), ("no", "no."), ("no", "NO"), ("no", "Nope"), ("no", "isn't"), ("no", "I do not know"),
    ("no", "snow"), ("no", "yes"), ("no", "No, there is no dog."), ("no", "Not at all"), ("no", "no\n"),
    ("no", ""), ("no", "The answer is no, of course"), ("No", "no"), (" yes", "yes"), ("maybe", "yes"),
]


def test_pope_both_rules_equal_the_released_scripts():
    labels, answers = zip(*POPE_CASES)
    got = pope.score(list(labels), list(answers))
    for rule, ref in (("damro", ref_eval_pope), ("pope", ref_evaluate_py)):
        want = ref(labels, answers)
        for k, v in want.items():
            assert got[rule][k] == pytest.approx(v, rel=0, abs=0), (rule, k)  # same operations: exactly equal


def test_pope_rules_by_hand():
    # substring rule: "Yes, no doubt" is a TP for gt yes; "snow" / "cannot" count as "no" for gt no
    assert pope.score_damro(["yes", "no", "no", "yes"], ["Yes, no doubt", "snow", "I cannot", "There isn't"]) \
        | {} == {**pope.metrics(1, 0, 2, 1, 4, 1)}
    # official rule: only an exact token No / no / not in the first sentence says no
    assert [pope.pope_says_no(s) for s in ["NO", "Nope", "isn't", "no\n", "", "Yes. No.", "no, it is", "not"]] == \
        [False, False, False, False, False, False, True, True]
    m = pope.score_damro(["yes", "maybe"], ["yes", "yes"])  # an unknown label stays in the denominators
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5 and m["precision"] == 1.0


def test_every_answer_is_accounted_for_beside_the_released_numbers():
    """Each rule's reading of each answer, the share read as yes and the questions answered neither yes nor no;
    the released numbers stay exactly the scripts' (same dict, keys added only)."""
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    answers = ["yes", "No", "maybe", "Yes, no doubt", "It is absent", "There is a dog."]
    got = pope.score(labels, answers, ids=[11, 12, 13, 14, 15, 16])
    assert got["damro"]["read"] == {"yes": 1, "no": 1, "both": 1, "neither": 3}
    assert got["damro"]["neither"] == 3 and got["damro"]["neither_ids"] == [13, 15, 16]
    assert got["damro"]["said_yes_ratio"] == 1 / 6
    # the official rule: "Yes, no doubt" has the token "no"; an answer without yes / no tokens is read as yes
    assert got["pope"]["read"] == {"yes": 1, "no": 2, "neither": 3} and got["pope"]["neither_ids"] == [13, 15, 16]
    assert got["pope"]["said_yes_ratio"] == 1 / 6 and got["pope"]["yes_ratio"] == 4 / 6
    assert {k: got["damro"][k] for k in pope.score_damro(labels, answers)} == pope.score_damro(labels, answers)
    assert {k: got["pope"][k] for k in pope.score_pope(labels, answers)} == pope.score_pope(labels, answers)
    # the released damro yes-ratio counts the "neither" answer to a no-question as a yes; said_yes_ratio does not
    assert got["damro"]["yes_ratio"] == 2 / 6


def test_score_pope_reads_each_released_format(tmp_path, capsys):
    from minidamro.eval.__main__ import main
    q = tmp_path / "q.jsonl"
    labels, answers = zip(*POPE_CASES[:20])
    q.write_text("".join(json.dumps({"question_id": i + 1, "image": f"x{i // 6}.jpg", "text": "Is there a dog?",
                                     "label": lab}) + "\n" for i, lab in enumerate(labels)))
    want = {"damro": ref_eval_pope(labels, answers), "pope": ref_evaluate_py(labels, answers)}
    for key in ("output", "text", "answer"):  # DAMRO, VCD, official POPE
        a = tmp_path / f"answers_{key}.jsonl"
        rows = [{"question_id": i + 1, key: ans, "prompt": "p"} for i, ans in enumerate(answers)]
        a.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # keyed by id, not line order
        main(["score", "pope", "--questions", str(q), "--answers", str(a), "--json", "--out", str(tmp_path / key)])
        got = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert got == json.loads((tmp_path / key / "metrics.json").read_text())
        for rule in want:
            assert {k: got["q"][rule][k] for k in want[rule]} == want[rule]


def test_score_pope_missing_answer_is_one_line(tmp_path, capsys):
    from minidamro.eval.__main__ import main
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "t", "label": "yes"}) + "\n" +
                 json.dumps({"question_id": 2, "image": "x.jpg", "text": "t", "label": "no"}) + "\n")
    a.write_text(json.dumps({"question_id": 1, "output": "yes"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["score", "pope", "--questions", str(q), "--answers", str(a)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "1 questions have no answer, first: q/2" in err


# ---------------- MME ----------------

def ref_mme(lines):  # calculation.py, DAMRO's copy (malformed lines printed and skipped)
    def parse(pred):
        if pred in ["yes", "no"]:
            return pred
        prefix = pred[:4]
        return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"
    chunks = [lines[i:i + 2] for i in range(0, len(lines), 2)]
    gts, preds, acc_plus = [], [], 0
    for chunk in chunks:
        correct = 0
        for item in chunk:
            try:
                img, q, gt, pred = item.split("\t")
            except ValueError:
                continue
            gt, pred = gt.lower(), parse(pred.lower())
            gts.append(gt)
            preds.append(pred)
            correct += gt == pred
        acc_plus += correct == 2
    acc = sum(g == p for g, p in zip(gts, preds)) / len(gts)
    return acc, acc_plus / len(chunks), 100 * acc + 100 * acc_plus / len(chunks)


MME_ANSWERS = ["Yes", "no", "No.", "  yes", "not sure", "nope", "yes, no", "I think yes", "maybe", "Yes\n",
               "nO", "", "Noo", "ye s", "no yes", "yesno"]


def test_mme_equals_calculation_py_with_the_four_character_rule():
    lines = [f"img{i // 2}.jpg\tIs it? Please answer yes or no.\t{'Yes' if i % 3 else 'No'}\t{a}"
             for i, a in enumerate(MME_ANSWERS)]
    lines[5] = "img2.jpg\tonly three\tNo"  # a malformed line: skipped, its image cannot count for acc+
    got = mme.score_task(lines, "t.txt")
    acc, acc_plus, score = ref_mme(lines)
    assert (got["acc"], got["acc_plus"], got["score"]) == (acc, acc_plus, score)
    assert got["skipped_lines"] == 1 and got["images"] == 8
    # by hand: "  yes" -> other (spaces fill the 4 characters), "not sure" -> no, "I think yes" -> other
    assert [mme.parse_answer(s) for s in ["  yes", "not sure", "i think yes", "yesno", "nope"]] == \
        ["other", "no", "other", "yes", "no"]


def test_score_mme_results_dir_sums_the_tasks(tmp_path, capsys):
    from minidamro.eval.__main__ import main
    (tmp_path / "existence.txt").write_text("a.jpg\tq1\tYes\tYes\na.jpg\tq2\tNo\tNo\nb.jpg\tq1\tYes\tNo\nb.jpg\tq2\tNo\tno\n")
    (tmp_path / "count.txt").write_text("a.jpg\tq1\tYes\tyes\na.jpg\tq2\tNo\tyes\n")
    main(["score", "mme", "--results", str(tmp_path), "--json"])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["tasks"]["existence"]["acc"] == 0.75 and got["tasks"]["existence"]["acc_plus"] == 0.5
    assert got["tasks"]["existence"]["score"] == 125.0 and got["tasks"]["count"]["score"] == 50.0
    assert got["total"] == 175.0 and list(got["tasks"]) == ["existence", "count"]


def test_mme_odd_line_count_is_an_error(tmp_path, capsys):
    from minidamro.eval.__main__ import main
    (tmp_path / "color.txt").write_text("a.jpg\tq1\tYes\tYes\n")
    with pytest.raises(SystemExit):
        main(["score", "mme", "--results", str(tmp_path)])
    assert "pairs" in capsys.readouterr().err


# ---------------- CHAIR ----------------

nltk = pytest.importorskip("nltk")


def nltk_ready():
    try:
        nltk.pos_tag(nltk.word_tokenize("a dog."))
        from nltk.stem import WordNetLemmatizer
        WordNetLemmatizer().lemmatize("dogs")
        return True
    except LookupError:
        return False


needs_nltk_data = pytest.mark.skipif(not nltk_ready(), reason="NLTK data not found: `python -m nltk.downloader "
                                     "punkt_tab averaged_perceptron_tagger_eng wordnet`, or set NLTK_DATA")


class RefChair:
    """The reference CHAIR, re-written from chair.py's behaviour (its synonym list, as minidamro ships it)."""

    def __init__(self, synonyms_path):
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer
        self.wordnet, self.wnl = wordnet, WordNetLemmatizer()
        synonyms = [s.strip().split(", ") for s in open(synonyms_path).read().splitlines()]
        self.mscoco_objects, self.inverse_synonym_dict = [], {}
        for synonym in synonyms:
            self.mscoco_objects.extend(synonym)
            for s in synonym:
                self.inverse_synonym_dict[s] = synonym[0]
        coco_double_words = ['motor bike', 'motor cycle', 'air plane', 'traffic light', 'street light',
                             'traffic signal', 'stop light', 'fire hydrant', 'stop sign', 'parking meter', 'suit case',
                             'sports ball', 'baseball bat', 'baseball glove', 'tennis racket', 'wine glass', 'hot dog',
                             'cell phone', 'mobile phone', 'teddy bear', 'hair drier', 'potted plant', 'bow tie',
                             'laptop computer', 'stove top oven', 'hot dog', 'teddy bear', 'home plate', 'train track']
        animal_words = ['bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe',
                        'animal', 'cub']
        self.double_word_dict = {w: w for w in coco_double_words}
        for a in animal_words:
            self.double_word_dict['baby %s' % a] = a
            self.double_word_dict['adult %s' % a] = a
        for v in ['jet', 'train']:
            self.double_word_dict['passenger %s' % v] = v
        self.double_word_dict['bow tie'] = 'tie'
        self.double_word_dict['toilet seat'] = 'toilet'
        self.double_word_dict['wine glas'] = 'wine glass'

    def pos(self, tag):
        w = self.wordnet
        return w.ADJ if tag.startswith('J') else w.VERB if tag.startswith('V') else w.NOUN if tag.startswith('N') \
            else w.ADV if tag.startswith('R') else None

    def caption_to_words(self, caption):
        words = nltk.word_tokenize(caption.lower())
        words = [self.wnl.lemmatize(w, pos=self.pos(t) or self.wordnet.NOUN) for w, t in nltk.pos_tag(words)]
        i, double_words, idxs = 0, [], []
        while i < len(words):
            idxs.append(i)
            double_word = ' '.join(words[i:i + 2])
            if double_word in self.double_word_dict:
                double_words.append(self.double_word_dict[double_word])
                i += 2
            else:
                double_words.append(words[i])
                i += 1
        words = double_words
        if ('toilet' in words) & ('seat' in words):
            words = [word for word in words if word != 'seat']
        idxs = [idxs[idx] for idx, word in enumerate(words) if word in set(self.mscoco_objects)]
        words = [word for word in words if word in set(self.mscoco_objects)]
        node_words = [self.inverse_synonym_dict[w] for w in words]
        return words, node_words, idxs, double_words

    def gt_from_coco(self, coco):  # instances' categories U objects of the human captions, train + val
        imid_to_objects = {}
        names = {}
        for split in ("train", "val"):
            inst = json.load(open(os.path.join(coco, f"instances_{split}2014.json")))
            names.update({c['id']: c['name'] for c in inst['categories']})
            for ann in inst['annotations']:
                imid_to_objects.setdefault(ann['image_id'], []).append(
                    self.inverse_synonym_dict[names[ann['category_id']]])
        imid_to_objects = {k: set(v) for k, v in imid_to_objects.items()}
        for split in ("train", "val"):
            for ann in json.load(open(os.path.join(coco, f"captions_{split}2014.json")))['annotations']:
                imid_to_objects.setdefault(ann['image_id'], set()).update(self.caption_to_words(ann['caption'])[1])
        return imid_to_objects

    def compute(self, caps, imid_to_objects):
        num_caps = num_hal_caps = hal_words = coco_words = len_words = n_recall = n_gt = 0
        sentences = []
        for imid, cap in caps:
            words, node_words, idxs, raw_words = self.caption_to_words(cap)
            gt = imid_to_objects.get(imid, set())
            hal, hal_idx, recall = [], [], set()
            coco_words += len(node_words)
            for word, node_word, idx in zip(words, node_words, idxs):
                if node_word not in gt:
                    hal_words += 1
                    hal.append([word, node_word])
                    hal_idx.append(idx)
                else:
                    recall.add(node_word)
            num_caps += 1
            len_words += len(raw_words)
            num_hal_caps += bool(hal)
            n_gt += len(gt)
            n_recall += len(recall)
            sentences.append({"image_id": imid, "caption": cap, "mscoco_hallucinated_words": hal,
                              "mscoco_gt_words": sorted(gt), "mscoco_generated_words": node_words,
                              "hallucination_idxs": hal_idx, "words": raw_words,
                              "metrics": {"CHAIRs": int(bool(hal)), "CHAIRi": len(hal) / len(words) if words else 0.,
                                          "Recall": len(recall) / len(gt) if gt else 0.}})
        return {"sentences": sentences, "overall_metrics": {
            "CHAIRs": num_hal_caps / num_caps, "CHAIRi": hal_words / coco_words, "Recall": n_recall / n_gt,
            "Len": 0.01 * len_words / num_caps}}


# Two-word rules, POS-dependent lemmas, the toilet-seat rule, repeats, an image without ground truth.
CAPTIONS = [
    (1, "A man riding a motor bike next to a baby elephant and a passenger train on the train tracks."),
    (2, "Two hot dogs and wine glasses on a dining table beside a teddy bear wearing a bow tie."),
    (3, "A toilet with the seat up next to a sink; a cat sits on the toilet seat."),
    (4, "People skiing and a man skateboarding; a boy is biking past parking meters and a parking meter."),
    (5, "A dog and a dog and another dog chase a frisbee near a fire hydrant and a stop sign."),
    (6, "Adult giraffes eat leaves while a cell phone lies on a suit case near the potted plant."),
    (7, "An empty room with a chair and a seat."),
    (999, "A plane flies over a boat while people go boating."),
]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """A small COCO-format annotation set: two splits, instances and captions, images with and without."""
    d = tmp_path_factory.mktemp("coco")
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "dining table"},
            {"id": 4, "name": "toilet"}, {"id": 5, "name": "dog"}, {"id": 6, "name": "giraffe"},
            {"id": 7, "name": "motorcycle"}, {"id": 8, "name": "parking meter"}]
    inst = {"train": [(1, 1), (1, 7), (2, 3), (4, 1), (4, 2)], "val": [(3, 4), (5, 5), (6, 6), (4, 8)]}
    caps = {"train": [(1, "A man on a motorcycle near a train."), (2, "Hot dogs on a table with wine glasses."),
                      (7, "A chair in an empty room.")],
            "val": [(3, "A bathroom with a toilet and a sink."), (5, "Dogs playing with a frisbee."),
                    (6, "Giraffes near a tree."), (4, "Skiers on a snowy hill.")]}
    for split in ("train", "val"):
        (d / f"instances_{split}2014.json").write_text(json.dumps({"categories": cats, "annotations": [
            {"image_id": i, "category_id": c, "id": n} for n, (i, c) in enumerate(inst[split])]}))
        (d / f"captions_{split}2014.json").write_text(json.dumps({"annotations": [
            {"image_id": i, "caption": c, "id": n} for n, (i, c) in enumerate(caps[split])]}))
    return str(d)


@needs_nltk_data
def test_chair_equals_the_reference_on_coco_ground_truth(coco_dir):
    from minidamro.eval import chair
    ref = RefChair(chair.SYNONYMS)
    c = chair.Chair()
    want_gt = ref.gt_from_coco(coco_dir)
    assert c.ground_truth(coco_dir) == want_gt
    assert c.ground_truth(coco_dir, [1, 4]) == {k: want_gt[k] for k in (1, 4)}  # restricted: same sets
    got, want = c.score(CAPTIONS, want_gt), ref.compute(CAPTIONS, want_gt)
    assert got == want


@needs_nltk_data
def test_chair_rules_by_hand():
    from minidamro.eval import chair
    c = chair.Chair()
    words = lambda s: c.caption_to_words(s)[1]  # noqa: E731
    assert words("a motor bike") == []                        # merged pair not in the synonym list: nothing
    assert words("a baby elephant") == ["elephant"]
    assert words("wine glasses") == ["wine glass"]             # lemma "glas", then the pair rule
    assert words("a toilet seat and a chair") == ["toilet", "chair"]
    assert words("the seat of the toilet") == ["toilet"]       # toilet-seat rule drops every seat
    assert words("a seat") == ["chair"]
    assert words("people skiing") == ["person", "skis"]        # VBG lemmatized as a verb: ski -> skis
    assert c.caption_to_words("parking meters")[3] == ["park", "meter"]  # tagged VBG NNS: park, meter: missed
    assert words("a parking meter") == ["parking meter"]
    assert words("a dining table") == ["dining table"]         # "table" alone is a synonym of dining table
    assert words("a boy is biking") == ["person", "bicycle"]
    assert words("people go boating") == ["person", "boat"]
    assert words("a passenger train on the train tracks") == ["train"]  # "train track" counts nothing
    assert words("a dog and a dog") == ["dog", "dog"]          # every mention counts


@needs_nltk_data
def test_score_chair_with_objects_json(tmp_path, capsys):
    """Ground truth as the DAMRO cache stores it (its OBJECTS.json), minidamro's and the released format."""
    from minidamro.eval import chair
    from minidamro.eval.__main__ import main
    objects = os.path.join(EVAL_DATA, "chair_gt_objects_from_damro_pkl.json")
    if not os.path.exists(objects):
        pytest.skip("the DAMRO release's CHAIR ground truth (its OBJECTS pickle of COCO val2014 objects, saved as "
                    "chair_gt_objects_from_damro_pkl.json) not found: set MINIDAMRO_EVAL_DATA to its directory")
    gt = {int(k): set(v) for k, v in json.load(open(objects)).items()}
    ids = sorted(gt)[:3]
    caps = [(ids[0], "An elephant and a dog near a car."), (ids[1], "A train, a truck and a bed."), (ids[2], "A bat.")]
    want = RefChair(chair.SYNONYMS).compute(caps, gt)
    f = tmp_path / "caps.json"
    f.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in caps]))
    main(["score", "chair", "--captions", str(f), "--ground-truth", objects, "--json"])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["overall_metrics"] == want["overall_metrics"] and got["sentences"] == json.loads(json.dumps(want["sentences"]))
    assert {k: got[k] for k in ("CHAIRs", "CHAIRi", "Recall", "Len")} == want["overall_metrics"]


def test_chair_without_nltk_data_is_one_line_with_the_commands(tmp_path):
    """In a fresh process (nltk caches what it loaded) that finds no NLTK data; the command line prints any
    MinidamroError as one `error:` line (tested with the other commands)."""
    code = ("import nltk; nltk.data.path[:] = []\n"
            "from minidamro import MinidamroError\nfrom minidamro.eval import chair\n"
            "try:\n    chair.Chair()\nexcept MinidamroError as e:\n    print(e)\n")
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("\n") == 1, r.stderr
    assert r.stdout.startswith("nltk data 'punkt_tab' not found") and "nltk.downloader punkt_tab" in r.stdout
