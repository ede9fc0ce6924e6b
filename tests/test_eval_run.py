"""The evaluation run: answers file, resume after a kill, shards, per-image reuse, input checks (tiny model)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from minidamro.eval.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# NLTK's corpora, which a fresh clone lacks, are found through NLTK_DATA as nltk itself reads it (.ci/run sets it
# where CI has a copy); without them the CHAIR test skips.


@pytest.fixture(scope="module")
def pope_set(tmp_path_factory):
    """4 images x 3 questions in POPE's format, plus a second split over the same images."""
    d = tmp_path_factory.mktemp("pope")
    (d / "img").mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        w, h = 30 + 7 * i, 28 + 3 * i
        Image.frombytes("RGB", (w, h), bytes(torch.randint(0, 256, (w * h * 3,), generator=g).tolist())).save(
            d / "img" / f"COCO_val2014_{i:012d}.png")
    for split, objs in (("random", ("dog", "cat", "car")), ("popular", ("person", "sofa", "tree"))):
        with open(d / f"coco_pope_{split}.jsonl", "w") as f:
            for n in range(12):
                f.write(json.dumps({"question_id": n + 1, "image": f"COCO_val2014_{n // 3:012d}.png",
                                    "text": f"Is there a {objs[n % 3]} in the image?",
                                    "label": "yes" if n % 2 else "no"}) + "\n")
    return d


def pope_args(ckpt, d, out, *extra):
    return ["pope", "--model", ckpt, "--questions", str(d / "coco_pope_random.jsonl"), str(d / "coco_pope_popular.jsonl"),
            "--images", str(d / "img"), "--out", str(out), "--max-new-tokens", "6", *extra]


def run_ok(capsys, argv):
    main(argv)
    out, err = capsys.readouterr()
    return out, err


def answers(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def reference_run(checkpoints, pope_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    main(pope_args(checkpoints["mha"], pope_set, out, "--json"))
    return out


def test_answers_file_is_self_describing_and_metrics_written(reference_run):
    rows = answers(reference_run / "answers.jsonl")
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    r = rows[0]
    for key in ("id", "image", "prompt", "answer", "token_ids", "method", "seed", "temperature", "label", "question_id"):
        assert key in r
    assert r["prompt"].endswith("in the image? Please answer this question with one word.")
    assert [r["id"] for r in rows[:6]] == ["coco_pope_random/1", "coco_pope_random/2", "coco_pope_random/3",
                                           "coco_pope_popular/1", "coco_pope_popular/2", "coco_pope_popular/3"]
    m = json.load(open(reference_run / "metrics.json"))
    assert set(m["coco_pope_random"]) == {"damro", "pope"} and m["answers"] == 24
    assert 0 <= m["coco_pope_random"]["pope"]["accuracy"] <= 1


def test_resume_after_a_torn_last_line_gives_the_same_file_and_metrics(checkpoints, pope_set, reference_run, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    os.remove(out / "metrics.json")
    data = open(reference_run / "answers.jsonl", "rb").read()
    cut = [i for i, b in enumerate(data) if b == ord("\n")][6] + 40  # 7 complete lines and a torn 8th
    open(out / "answers.jsonl", "wb").write(data[:cut])
    _, err = run_ok(capsys, pope_args(checkpoints["mha"], pope_set, out))
    assert "dropped a torn last line" in err
    assert open(out / "answers.jsonl", "rb").read() == data
    assert json.load(open(out / "metrics.json")) == json.load(open(reference_run / "metrics.json"))


def test_resume_after_the_process_is_killed(checkpoints, pope_set, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    argv = pope_args(checkpoints["mha"], pope_set, out)
    p = subprocess.Popen([sys.executable, "-m", "minidamro.eval", *argv], cwd=ROOT, stderr=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, start_new_session=True)
    path, deadline = out / "answers.jsonl", time.monotonic() + 60
    while time.monotonic() < deadline and not (path.exists() and path.read_bytes().count(b"\n") >= 3):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    partial = path.read_bytes().count(b"\n")
    assert 3 <= partial  # then whatever was written: the rest must come from the resumed run
    run_ok(capsys, argv)
    assert path.read_bytes() == (reference_run / "answers.jsonl").read_bytes()
    assert json.load(open(out / "metrics.json")) == json.load(open(reference_run / "metrics.json"))


def test_shards_merged_equal_one_run(checkpoints, pope_set, reference_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _, err = run_ok(capsys, pope_args(checkpoints["mha"], pope_set, out, "--shard", "1/2"))
    assert "once every shard has finished" in err and not (out / "metrics.json").exists()
    with pytest.raises(SystemExit):
        main(["score", str(out)])
    assert "12 of 24 questions answered" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # torchrun's variables select the shard too
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, out))
    shard0, shard1 = answers(out / "answers.0-of-2.jsonl"), answers(out / "answers.1-of-2.jsonl")
    assert {r["image"] for r in shard0} == {str(pope_set / "img" / f"COCO_val2014_{i:012d}.png") for i in (0, 2)}
    ref = {r["id"]: r for r in answers(reference_run / "answers.jsonl")}
    assert {r["id"]: r for r in shard0 + shard1} == ref
    assert json.load(open(out / "metrics.json")) == json.load(open(reference_run / "metrics.json"))
    out2, _ = run_ok(capsys, ["score", str(out), "--json"])
    assert json.loads(out2.splitlines()[-1]) == json.load(open(reference_run / "metrics.json"))


@pytest.mark.parametrize("name, method", [("mha", ["--method", "plain", "--temperature", "1"]),
                                          ("gqa", ["--method", "damro", "--topk", "3", "--alpha", "1"])])
def test_reuse_gives_the_per_question_answers(checkpoints, pope_set, tmp_path, capsys, name, method):
    """The tiny models have no near-ties, so the prefix-then-rest prefill rounds to the same tokens."""
    reused, single = tmp_path / f"{name}-reuse", tmp_path / f"{name}-single"
    run_ok(capsys, pope_args(checkpoints[name], pope_set, reused, *method))
    run_ok(capsys, pope_args(checkpoints[name], pope_set, single, "--no-reuse", *method))
    run_ok(capsys, pope_args(checkpoints[name], pope_set, tmp_path / f"{name}-batch", "--batch-questions", *method))
    a, b = answers(reused / "answers.jsonl"), answers(single / "answers.jsonl")
    c = answers(tmp_path / f"{name}-batch" / "answers.jsonl")
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] == [r["token_ids"] for r in c]
    assert [r.get("outliers") for r in a] == [r.get("outliers") for r in b]
    assert a[0]["reuse"] is True and b[0]["reuse"] is False


def test_vcd_reuses_one_noised_image_per_image(checkpoints, pope_set, tmp_path, capsys):
    """With reuse VCD's noise is drawn once per image (seeded by the run's seed and the image's name), so
    the batched-question path gives the same answers; the per-question path draws it per question."""
    method = ["--method", "vcd", "--temperature", "1"]
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, tmp_path / "reuse", *method))
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, tmp_path / "batch", "--batch-questions", *method))
    a, c = answers(tmp_path / "reuse" / "answers.jsonl"), answers(tmp_path / "batch" / "answers.jsonl")
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in c]
    assert a[0]["method"] == "vcd" and a[0]["noise_step"] == 500 and a[0]["alpha"] == 1.0


def test_the_per_question_path_is_generate(checkpoints, pope_set, tmp_path, capsys):
    from minidamro.generate import main as generate_main
    run_ok(capsys, pope_args(checkpoints["gqa"], pope_set, tmp_path / "r", "--no-reuse", "--method", "damro",
                             "--topk", "4", "--temperature", "1"))
    r = answers(tmp_path / "r" / "answers.jsonl")[4]
    generate_main([r["image"], "--model", checkpoints["gqa"], "--prompt", r["prompt"], "--system", "llava_v1",
                   "--method", "damro", "--topk", "4", "--temperature", "1", "--seed", str(r["seed"]),
                   "--max-new-tokens", "6", "--json"])
    g = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert g["token_ids"] == r["token_ids"] and g["outliers"] == r["outliers"] and g["text"] == r["answer"]


def test_different_settings_are_refused_naming_the_difference(checkpoints, pope_set, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    with pytest.raises(SystemExit) as e:
        main(pope_args(checkpoints["mha"], pope_set, out, "--method", "damro"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and 'method = "plain"' in err and '"damro"' in err


def test_bad_inputs_are_reported_before_model_work_or_skipped(checkpoints, pope_set, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    lines = (pope_set / "coco_pope_random.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"question_id": 5, "image": "missing.png", "text": "Is there a cat?", "label": "no"})
    lines[7] = '{"question_id": 8, "image": '  # malformed
    q.write_text("\n".join(lines) + "\n")
    argv = ["pope", "--model", checkpoints["mha"], "--questions", str(q), "--images", str(pope_set / "img"),
            "--max-new-tokens", "3"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {q}:8: not a JSON line (and 1 more; --skip-bad leaves them out)")
    assert not (tmp_path / "a" / "answers.jsonl").exists()
    out, err = run_ok(capsys, argv + ["--out", str(tmp_path / "b"), "--skip-bad", "--json"])
    assert "missing.png" in err and f"{q}:5" in err and f"{q}:8" in err
    m = json.loads(out.splitlines()[-1])
    assert m["answers"] == 10 and m["skipped"] == ["q/5"] and m["q"]["pope"]["questions"] == 10


def test_progress_line(checkpoints, pope_set, tmp_path, capsys):
    _, err = run_ok(capsys, pope_args(checkpoints["mha"], pope_set, tmp_path / "r"))
    last = err.strip().splitlines()[-1]
    assert last.startswith("pope: 24/24 answers, ") and "answers/s" in last and last.endswith(" left")


def test_mme_run_writes_the_eval_tool_files(checkpoints, tmp_path, capsys):
    data = tmp_path / "MME"
    g = torch.Generator().manual_seed(5)
    for task, split_layout in (("existence", False), ("landmark", True)):
        root = data / task
        idir, qdir = (root / "images", root / "questions_answers_YN") if split_layout else (root, root)
        idir.mkdir(parents=True)
        qdir.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.frombytes("RGB", (20, 20), bytes(torch.randint(0, 256, (1200,), generator=g).tolist())).save(
                idir / f"{i:03d}.jpg")
            (qdir / f"{i:03d}.txt").write_text(f"Is there a dog in the image? Please answer yes or no.\tYes\n"
                                               f"Is there a cat in the image? Please answer yes or no.\tNo\n")
    out, _ = run_ok(capsys, ["mme", "--model", checkpoints["mha"], "--data", str(data), "--tasks", "all",
                             "--out", str(tmp_path / "run"), "--max-new-tokens", "4", "--json"])
    m = json.loads(out.splitlines()[-1])
    assert list(m["tasks"]) == ["existence", "landmark"] and m["answers"] == 8
    lines = (tmp_path / "run" / "mme_results" / "existence.txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].split("\t")[:3] == ["000.jpg", "Is there a dog in the image? Please answer yes "
                                                                       "or no.", "Yes"]
    out2, _ = run_ok(capsys, ["score", "mme", "--results", str(tmp_path / "run" / "mme_results"), "--json"])
    assert json.loads(out2.splitlines()[-1])["tasks"] == m["tasks"]


def test_chair_run_scores_its_captions(checkpoints, pope_set, tmp_path, capsys):
    pytest.importorskip("nltk")
    lst = tmp_path / "images.jsonl"
    lst.write_text("".join(json.dumps({"image": f"COCO_val2014_{i:012d}.png", "image_id": i}) + "\n" for i in range(3)))
    gt = tmp_path / "objects.json"
    gt.write_text(json.dumps({"0": ["dog"], "1": ["cat", "person"]}))
    try:
        out, _ = run_ok(capsys, ["chair", "--model", checkpoints["mha"], "--images", str(pope_set / "img"),
                                 "--image-list", str(lst), "--ground-truth", str(gt), "--out", str(tmp_path / "run"),
                                 "--max-new-tokens", "8", "--json"])
    except SystemExit:
        pytest.skip("NLTK data not available: " + capsys.readouterr().err)
    m = json.loads(out.splitlines()[-1])
    assert [s["image_id"] for s in m["sentences"]] == [0, 1, 2]
    rows = answers(tmp_path / "run" / "answers.jsonl")
    assert [s["caption"] for s in m["sentences"]] == [r["answer"] for r in rows]
    assert rows[0]["prompt"] == "Generate a short caption of this image."
    assert set(m["overall_metrics"]) == {"CHAIRs", "CHAIRi", "Recall", "Len"}


def test_next_checkpoint_reuse_gives_the_per_question_answers(next_checkpoints, pope_set, tmp_path, capsys):
    """LLaVA-NeXT: anyres tiles and an image-size-dependent prompt go through the same reuse path."""
    ckpt = next(iter(next_checkpoints.values()))
    method = ["--method", "damro", "--topk", "3"]
    run_ok(capsys, pope_args(ckpt, pope_set, tmp_path / "reuse", *method))
    run_ok(capsys, pope_args(ckpt, pope_set, tmp_path / "single", "--no-reuse", *method))
    a, b = answers(tmp_path / "reuse" / "answers.jsonl"), answers(tmp_path / "single" / "answers.jsonl")
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] and len(a) == 24
