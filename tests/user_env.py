"""The user's path, in the user's environment: what a fresh `pip install torch==2.13.0 -r requirements.txt`
gives, and nothing else (no transformers, no numpy, no nltk, no pytest).

    python tests/user_env.py build DIR            # in the test environment: tiny llava-hf checkpoints into DIR
    VENV/bin/python tests/user_env.py check DIR   # in a clean virtualenv: run the README's commands on them

`check` uses the standard library only. It runs, as subprocesses of the interpreter that runs it: `generate` on
the shipped toy model; the converter on the tiny llava-hf checkpoint to float32, float16 and bfloat16;
`generate` plain, DAMRO and VCD on each converted model, DAMRO again on each simulated CPU profile
(minidamro/kernels/cpu.py), the converter's int8 output with DAMRO, and `analyze`; a tiny InstructBLIP converted
and run with every method and `analyze`, and its full-shape benchmark's path at the quick size; a toy training run that saves
a checkpoint; the benchmarks on toy scenes (`toy render --benchmarks`, `eval pope --seeds`, `eval score` of two
runs, `eval mme`) and `toy outliers`; and the
commands that need an optional package (the benchmark's transformers comparison, CHAIR's nltk), which must
say so in one `error:` line. Every run's stderr must hold no traceback and no warning: what a user sees is the
answer and minidamro's own `note:` / `error:` lines. CI (.ci/run) runs both steps; any failure exits 1.
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "docs", "toy-1.png")
DTYPES = ("float32", "float16", "bfloat16")
PROFILES = ("host", "avx2", "no-onednn", "no-fp16")


def build(out: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny
    os.makedirs(out, exist_ok=True)
    tok = tiny.train_tokenizer(os.path.join(out, "tok"))
    tiny.build_hf_checkpoint("gqa", os.path.join(out, "hf-gqa"), tok, seed=1)
    import tiny_blip
    tiny_blip.build_hf_checkpoint("blip_gqa", os.path.join(out, "hf-blip"), tok, seed=2)
    print(f"built {out}/hf-gqa, {out}/hf-blip")


failures = []


def run(args, expect_ok=True, says=None, env=None):
    """Run `python ARGS` from the repository root; check the exit code, and that stderr holds no traceback and
    no warning (and `says`, if given: the one line an optional package's absence must print)."""
    cmd = [sys.executable, *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | (env or {}), timeout=600)
    shown = " ".join(args) + (f"  [{' '.join(f'{k}={v}' for k, v in env.items())}]" if env else "")
    problems = []
    if (p.returncode == 0) != expect_ok:
        problems.append(f"exit code {p.returncode}")
    if "Traceback" in p.stderr:
        problems.append("a traceback")
    if "warning" in p.stderr.lower():
        problems.append("a warning")
    if says is not None and not any(line.startswith("error:") and says in line for line in p.stderr.splitlines()):
        problems.append(f"no 'error: ... {says} ...' line")
    if problems:
        failures.append(shown)
        print(f"FAIL {shown}: {', '.join(problems)}\n--- stderr ---\n{p.stderr[-3000:]}\n--- stdout ---\n"
              f"{p.stdout[-1000:]}", flush=True)
    else:
        print(f"ok   {shown} ({time.perf_counter() - t:.1f} s)", flush=True)
    return p


def check(built: str):
    for package in ("transformers", "numpy", "nltk", "pytest"):  # the environment is the user's
        try:
            __import__(package)
            sys.exit(f"user_env: {package} is importable here; run this in a clean virtualenv")
        except ImportError:
            pass
    work = tempfile.mkdtemp(prefix="minidamro-user-env-")
    os.environ.setdefault("MINIDAMRO_CHOICES", os.path.join(work, "choices.json"))  # not the user's own
    run(["-m", "minidamro.generate", IMAGE])  # the shipped toy model: the README's first command
    for dtype in DTYPES:
        out = os.path.join(work, dtype)
        run(["weights_convert.py", os.path.join(built, "hf-gqa"), out, "--dtype", dtype])
        for method in ("plain", "damro", "vcd"):
            run(["-m", "minidamro.generate", IMAGE, "--model", out, "--method", method, "--max-new-tokens", "6"])
        for profile in PROFILES[1:]:  # the host's own profile ran above
            run(["-m", "minidamro.generate", IMAGE, "--model", out, "--method", "damro", "--max-new-tokens", "6"],
                env={"MINIDAMRO_CPU_PROFILE": profile})
    int8 = os.path.join(work, "int8")  # the 16 GB laptop's path: bfloat16 activations, int8 decoder weights
    run(["weights_convert.py", os.path.join(built, "hf-gqa"), int8, "--dtype", "bfloat16", "--quantize", "int8"])
    run(["-m", "minidamro.generate", IMAGE, "--model", int8, "--method", "damro", "--max-new-tokens", "6"])
    run(["-m", "minidamro.generate", IMAGE, "--model", int8, "--max-new-tokens", "6"],
        env={"MINIDAMRO_CPU_PROFILE": "no-int8pack"})
    run(["-m", "minidamro.analyze", IMAGE, "--model", os.path.join(work, "bfloat16"), "--max-new-tokens", "4",
         "--out", os.path.join(work, "analysis")])
    # InstructBLIP: both tokenizers (the Q-Former's WordPiece is minidamro's own), every method, the analysis, and
    # the streamed full-shape benchmark's path at its quick size (no transformers: its comparison is skipped).
    blip = os.path.join(work, "blip")
    run(["weights_convert.py", os.path.join(built, "hf-blip"), blip, "--dtype", "bfloat16"])
    run(["-m", "minidamro.generate", IMAGE, "--model", blip, "--compare", "--topk", "4", "--max-new-tokens", "6"])
    run(["-m", "minidamro.analyze", IMAGE, "--model", blip, "--method", "damro", "--topk", "4", "--max-new-tokens",
         "4", "--out", os.path.join(work, "analysis-blip")])
    run(["-m", "minidamro.bench.instructblip", "--size", "quick", "--workdir", os.path.join(work, "bench-blip"),
         "--tokens", "3"])
    # Training saves a checkpoint (it used safetensors' numpy writer): the smallest run of every stage.
    run(["-m", "minidamro.toy", "train", "--out", os.path.join(work, "toy"), "--vit-steps", "1", "--text-steps", "1",
         "--align-steps", "1", "--steps", "1", "--format-steps", "1", "--batch", "2"])
    # The benchmarks on toy scenes with the shipped model: files, two seeds, the side-by-side table, outliers.
    bench = os.path.join(work, "toybench")
    run(["-m", "minidamro.toy", "render", "--out", bench, "--count", "3", "--benchmarks"])
    for method in ("plain", "damro"):
        run(["-m", "minidamro.eval", "pope", "--questions", os.path.join(bench, "pope", "toy_pope_random.jsonl"),
             "--images", bench, "--method", method, "--seeds", "2", "--temperature", "1", "--max-new-tokens", "4",
             "--out", os.path.join(work, "pope-" + method)])
    run(["-m", "minidamro.eval", "score", os.path.join(work, "pope-plain"), os.path.join(work, "pope-damro"),
         "--markdown"])
    run(["-m", "minidamro.eval", "mme", "--data", os.path.join(bench, "mme"), "--max-new-tokens", "4",
         "--out", os.path.join(work, "mme")])
    run(["-m", "minidamro.toy", "outliers", "minidamro/toy/model", "--images", "3"])
    # Optional packages: one error line that names what to install.
    run(["-m", "minidamro.bench", "--size", "quick", "--workdir", os.path.join(work, "b")],
        expect_ok=False, says="transformers")
    chair = os.path.join(work, "caps.jsonl")
    with open(chair, "w") as f:
        f.write('{"image_id": 1, "caption": "a dog"}\n')
    run(["-m", "minidamro.eval", "score", "chair", "--captions", chair, "--ground-truth", work],
        expect_ok=False, says="nltk")
    if failures:
        print(f"{len(failures)} of the user's commands failed", file=sys.stderr)
        sys.exit(1)
    print("the user's commands all ran cleanly")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "check"):
        sys.exit(__doc__)
    build(sys.argv[2]) if sys.argv[1] == "build" else check(sys.argv[2])
