"""The evaluation run: answers file, resume after a kill, shards, per-image reuse, input checks (tiny model)."""
import dataclasses
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


def test_prompt_template_and_system_are_settings(checkpoints, pope_set, reference_run, tmp_path, capsys):
    """The prompt is the template with the question in it, after the system text; both are stored in run.json,
    a change is refused on resume naming the setting, and score shows them."""
    out = tmp_path / "run"
    argv = pope_args(checkpoints["mha"], pope_set, out, "--prompt-template", "Q: {question} (yes or no)",
                     "--system", "", "--json")
    run_ok(capsys, argv)
    rows = answers(out / "answers.jsonl")
    assert rows[0]["prompt"] == "Q: Is there a dog in the image? (yes or no)"
    settings = json.load(open(out / "run.json"))
    assert settings["prompt_template"] == "Q: {question} (yes or no)" and settings["system"] == ""
    with pytest.raises(SystemExit) as e:
        main(pope_args(checkpoints["mha"], pope_set, out, "--system", ""))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "prompt_template" in err and "(yes or no)" in err
    text, _ = run_ok(capsys, ["score", str(out)])
    assert 'prompt "Q: {question} (yes or no)" after system text ""' in text
    default = json.load(open(reference_run / "run.json"))
    assert default["prompt_template"] == "{question} Please answer this question with one word."
    assert default["system"].startswith("A chat between a curious human")


def run_before_prompt_templates(reference_run, out):
    """A copy of the reference run as a version without --prompt-template wrote it: no prompt_template in run.json."""
    shutil.copytree(reference_run, out)
    settings = json.load(open(out / "run.json"))
    del settings["prompt_template"]
    (out / "run.json").write_text(json.dumps(settings))
    return out


def test_a_run_made_before_prompt_templates_resumes_with_the_default(checkpoints, pope_set, reference_run, tmp_path,
                                                                    capsys):
    out = run_before_prompt_templates(reference_run, tmp_path / "run")
    out_text, _ = run_ok(capsys, pope_args(checkpoints["mha"], pope_set, out, "--json"))  # nothing left: scores
    assert json.loads(out_text.splitlines()[-1])["answers"] == 24
    with pytest.raises(SystemExit):
        main(pope_args(checkpoints["mha"], pope_set, out, "--prompt-template", "{question}"))
    assert "prompt_template" in capsys.readouterr().err


@pytest.mark.parametrize("command, template, message", [
    ("pope", "Is there a dog?", "must contain {question}"),
    ("mme", "   ", "is empty"),
    ("chair", "Describe {question}", "CHAIR asks no question"),
    ("pope", "<image> {question}", "must not contain <image>"),
])
def test_impossible_prompt_templates_are_one_line(checkpoints, pope_set, tmp_path, capsys, command, template, message):
    common = ["--model", checkpoints["mha"], "--out", str(tmp_path / "r"), "--prompt-template", template]
    argv = {"pope": ["pope", "--questions", str(pope_set / "coco_pope_random.jsonl"), "--images", str(pope_set / "img")],
            "mme": ["mme", "--data", str(tmp_path)],
            "chair": ["chair", "--images", str(pope_set / "img"), "--image-list", str(tmp_path / "l.txt"),
                      "--ground-truth", str(tmp_path / "gt.json")]}[command]
    (tmp_path / "gt.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(argv + common)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and message in err and not (tmp_path / "r").exists()


def test_seeds_are_runs_of_their_own_that_share_the_image_prefix(checkpoints, pope_set, tmp_path, capsys, monkeypatch):
    """--seeds 2 writes OUT/seed-42 and OUT/seed-43, each answer for answer the run of that --seed alone (so
    keeping the image's prefix from one seed to the next changes nothing), with the image prepared once per
    image for DAMRO (its preparation draws nothing) and once per image and seed for VCD; score gives mean ± std."""
    from minidamro import damro, methods, vcd
    from minidamro.eval import score as score_mod
    calls = {"damro": 0, "vcd": 0}
    for name, module in (("damro", damro), ("vcd", vcd)):
        original = module.METHOD.prepare

        def counted(*args, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(*args, **kw)
        monkeypatch.setitem(methods.METHODS, name, dataclasses.replace(module.METHOD, prepare=counted))
    for method in ("damro", "vcd"):
        out = tmp_path / method
        argv = pope_args(checkpoints["mha"], pope_set, out, "--method", method, "--temperature", "1", "--seeds", "2")
        text, _ = run_ok(capsys, argv)
        assert "mean ± sample std over seeds [42, 43]" in text
        assert sorted(os.listdir(out)) == ["metrics.json", "seed-42", "seed-43"]
        for seed in (42, 43):
            alone = tmp_path / f"{method}-alone-{seed}"
            run_ok(capsys, pope_args(checkpoints["mha"], pope_set, alone, "--method", method, "--temperature", "1",
                                     "--seed", str(seed)))
            assert answers(out / f"seed-{seed}" / "answers.jsonl") == answers(alone / "answers.jsonl")
            assert json.load(open(out / f"seed-{seed}" / "run.json")) == json.load(open(alone / "run.json"))
        m = json.load(open(out / "metrics.json"))
        per = [m["per_seed"][s]["coco_pope_random"]["damro"]["accuracy"] for s in ("42", "43")]
        assert m["seeds"] == [42, 43] and m["mean"]["coco_pope_random"]["damro"]["accuracy"] == sum(per) / 2
        assert m["std"]["coco_pope_random"]["damro"]["accuracy"] == pytest.approx(abs(per[0] - per[1]) / 2 ** 0.5,
                                                                                  rel=1e-12)
    # 4 images; the runs of one seed alone prepare each image once per run: 2 x 4 for the single-seed runs
    assert calls["damro"] == 4 + 2 * 4 and calls["vcd"] == 2 * 4 + 2 * 4
    assert score_mod.seed_dirs(tmp_path / "damro")[0][0] == 42
    text, _ = run_ok(capsys, pope_args(checkpoints["mha"], pope_set, tmp_path / "damro", "--method", "damro",
                                       "--temperature", "1", "--seeds", "42,43"))  # resumes: nothing to do
    assert "damro alpha=2 beta=0.1 topk=10" in text


def test_score_tabulates_methods_side_by_side_and_refuses_other_differences(checkpoints, pope_set, reference_run,
                                                                          tmp_path, capsys):
    damro_run, other = tmp_path / "damro", tmp_path / "other"
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, damro_run, "--method", "damro"))
    text, _ = run_ok(capsys, ["score", str(reference_run), str(damro_run)])
    lines = text.splitlines()
    assert lines[0].startswith("pope: 2 runs; greedy; seed 42; rule damro")
    body = [line.split() for line in lines[3:]]
    assert [(b[0], b[1]) for b in body] == [("coco_pope_random", "plain"), ("coco_pope_random", "damro"),
                                            ("coco_pope_popular", "plain"), ("coco_pope_popular", "damro"),
                                            ("average", "plain"), ("average", "damro")]
    m = json.load(open(reference_run / "metrics.json"))
    assert body[0][2] == f"{100 * m['coco_pope_random']['damro']['accuracy']:.2f}"
    md, _ = run_ok(capsys, ["score", str(reference_run), str(damro_run), "--markdown", "--rule", "pope", "--json"])
    t = json.loads(md)
    assert t["columns"][:3] == ["split", "method", "Acc"] and t["rule"] == "pope" and len(t["rows"]) == 6
    assert t["rows"][0]["values"][0] == pytest.approx(100 * m["coco_pope_random"]["pope"]["accuracy"], rel=1e-12)
    md, _ = run_ok(capsys, ["score", str(reference_run), str(damro_run), "--markdown"])
    assert md.splitlines()[1].startswith("| split | method | Acc |")
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, other, "--max-new-tokens", "5"))
    with pytest.raises(SystemExit) as e:
        main(["score", str(reference_run), str(other)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "max_new_tokens = 6" in err and "max_new_tokens = 5" in err
    text, _ = run_ok(capsys, ["score", str(reference_run), str(other), "--allow-differences"])
    assert "differing: " in text.splitlines()[0]


def test_seed_directories_are_kept_consistent(checkpoints, pope_set, tmp_path, capsys):
    """Resuming an --seeds directory without --seeds, or adding seeds with other settings, is refused before any
    work, naming why; "42," is a list of one seed; neither_ids are not averaged over seeds."""
    out = tmp_path / "s"
    run_ok(capsys, pope_args(checkpoints["mha"], pope_set, out, "--seeds", "42,"))
    assert sorted(os.listdir(out)) == ["metrics.json", "seed-42"]
    for extra, says in ((["--seed", "42"], "resume them with --seeds"),
                        (["--seeds", "43,", "--max-new-tokens", "5"], "max_new_tokens")):
        argv = pope_args(checkpoints["mha"], pope_set, out, *extra)
        if "--max-new-tokens" in extra:
            argv = argv[:argv.index("--max-new-tokens")] + argv[argv.index("--max-new-tokens") + 2:]
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and says in err, err
    assert sorted(os.listdir(out)) == ["metrics.json", "seed-42"]  # nothing written
    m = json.load(open(out / "metrics.json"))
    assert "neither_ids" not in m["mean"]["coco_pope_random"]["damro"]
    assert "neither_ids" in m["per_seed"]["42"]["coco_pope_random"]["damro"]


def test_a_run_made_before_prompt_templates_tabulates_with_a_new_one(checkpoints, pope_set, reference_run, tmp_path,
                                                                    capsys):
    old = run_before_prompt_templates(reference_run, tmp_path / "old")
    text, _ = run_ok(capsys, ["score", str(old), str(reference_run)])
    assert text.startswith("pope: 2 runs; greedy; seed 42") and "differing" not in text
