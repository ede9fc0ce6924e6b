"""Speed and memory of minidamro against transformers on a random LLaVA-shaped checkpoint, on the CPU.

    python -m minidamro.bench [--size medium|7b|quick] [--out results.json] [--tokens N] [--runs N] [--workdir DIR]

Builds once (cached in --workdir) a random llava-hf checkpoint and converts it with weights_convert.py (which
drops the ViT's last layer, unused at layer -2):
    medium  CLIP ViT-B/14 at 336 px (12 x 768, 576 patches, features from layer -2) before an 8 x 1024 LLaMA (16
            heads, MLP 2816) with llava-hf's 32064-row vocabulary: 674 MB of LLM weights, float32 (transformers
            builds it).
    7b      LLaVA-1.5-7B's exact shapes in bfloat16 (llava7b.py writes it tensor by tensor, no transformers):
            14.1 GB per layout, cached in checkpoints/bench-7b.
    quick   a tiny model, to check the script itself.
Then times each implementation in its own subprocess, so memory is per implementation:

    hf              transformers LlavaForConditionalGeneration.generate, greedy, sdpa attention (the default)
    hf_damro        DAMRO as the authors' code runs it on transformers: two streams, each with its own
                    DynamicCache, two forward passes per token; outliers from hooks on the ViT layer's q/k_proj
    md_plain        minidamro.generation.generate
    md_damro        minidamro.damro.generate(batched=True): both streams in one forward per token
    md_damro_2call  the same with batched=False (two forwards per token), for information
    md_vcd          minidamro VCD (noise step 500) through the same core: two full-length streams, one forward
    md_plain_int8, md_damro_int8   md_plain and md_damro on the same checkpoint converted with --quantize int8
                    (built once into workdir/minidamro-int8): the decoder's linears and lm_head in int8
At 7b md_plain, md_damro, hf and the two int8 ones run (the others with --only), and each only if
/proc/meminfo's MemAvailable holds a generous estimate of its memory (otherwise it is skipped, with the reason
printed): transformers needs ~23 GiB there.

Timing: a timestamp as each token reaches the caller (a streamer for generate(), the iterators, the loop).
prefill = first token - call (vision tower, projector, prompt prefill, first choice); decode = (last token -
first token) / (N - 1). Figures are medians over --runs runs, after a 4-token warm-up run. EOS is ignored so
that every run makes N tokens (min_new_tokens for transformers; cfg.text.eos_token_id = -1 for minidamro).
Greedy, in the checkpoint's dtype, torch.set_num_threads(--threads). Memory: VmRSS / VmHWM (MiB) from
/proc/self/status before loading (Python + torch), after loading, and at the end. minidamro memory-maps its
weights, so pages count only once touched: compare the peak at the end.

Roofline: the memory read bandwidth is the best of a few simple kernels, each reading >= 1 GB per pass: a
float32 sum, and every kernels/linear.py formulation of x W^T (1 and 2 rows, float32 and bfloat16). A decode step
must read every decoder layer's weights, the final norm, lm_head, one embedding row, and each stream's KV
cache; that over the decode time, over the bandwidth, is the fraction of the limit an implementation reaches
(two forwards per token read the weights twice). The CPU model, torch build, BLAS, CPU capability and the
MKL_* / ATEN_* / OMP_* / MINIDAMRO_* environment are recorded, so figures from different machines can be
told apart. Timings are only meaningful on an otherwise idle machine: the load average is recorded.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

from .build import IMPLS, ROOT, SPEC, TOPK, weight_bytes
from .workers import worker

# ---------------------------------------------------------------- driver
def spawn(args, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "minidamro.bench", "--worker", name, "--worker-out", f.name,
               "--workdir", args.workdir, "--tokens", str(args.tokens), "--runs", str(args.runs),
               "--threads", str(args.threads), "--size", args.size]
        env = os.environ | {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return json.load(f)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def needed_bytes(name: str, w: dict) -> float:
    """A generous estimate of the memory an implementation needs: minidamro maps its weights (the ones it
    touches become resident), transformers copies them into its own tensors (23.1 GiB peak RSS at 7b bf16
    on a 24 GiB machine, file pages included; ~1.2x the weights in anonymous memory)."""
    return (1.25 if name.startswith("hf") else 1.0) * w["total"] + 2**30


def machine(threads: int) -> dict:
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    config = torch.__config__.show()
    libs = [line.strip(" -") for line in config.splitlines() if "Math Kernel" in line or "MKL-DNN" in line]
    blas = ", ".join([re.search(r"BLAS_INFO=(\w+)", config)[1] if "BLAS_INFO=" in config else "?"] + libs)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "torch_blas": blas, "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_config": config,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "load_avg": os.getloadavg(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("MKL_", "ATEN_", "OMP_", "MINIDAMRO_"))}}


def step_bytes(w: dict, spec: dict, prompt_len: int, tokens: int, streams: list[int]) -> float:
    """Bytes one decode step must read: the weights once (per_token: every decoder layer, the final norm,
    lm_head, one embedding row per stream) and each stream's KV cache, at its mean length over the decode."""
    t = spec["text"]
    per_position = 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"])
    per_position *= w["itemsize"]
    return w["per_token"] + sum(per_position * (prompt_len + shrink + tokens / 2) for shrink in streams)


def summarize(size: str, r: dict, w: dict, spec: dict, tokens: int) -> dict:
    bw = r["bandwidth"]["memory_gbs"]
    num_image = (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2
    streams = {"md_plain": [0], "hf": [0], "md_damro": [0, TOPK - num_image], "hf_damro": [0, TOPK - num_image],
               "md_damro_2call": [0, TOPK - num_image], "md_vcd": [0, 0]}
    s = {"memory_gbs": bw}
    for name, x in r.items():
        if name in streams and x:
            reads = step_bytes(w, spec, x["prompt_len"], tokens, streams[name])
            if name in ("hf_damro", "md_damro_2call"):  # two forwards: the weights are read twice
                reads += w["per_token"]
            s[f"{name} fraction of the memory bandwidth"] = reads / (x["decode_ms"] / 1e3) / (bw * 1e9)
    dec = lambda k: r[k]["decode_ms"] if r.get(k) else math.nan  # noqa: E731
    pre = lambda k: r[k]["prefill_s"] if r.get(k) else math.nan  # noqa: E731
    rss = lambda k: r[k]["mem_end"]["VmHWM"] / 1024 if r.get(k) else math.nan  # noqa: E731
    chain = r["bandwidth"]["chain_ms"]
    if size == "7b":
        s |= {
            "md_plain s/token (<= 0.45 on a 2-core Zen 5 at ~65 GB/s)": dec("md_plain") / 1e3,
            "md_damro / md_plain decode (<= 1.05)": dec("md_damro") / dec("md_plain"),
            "md_plain / hf decode (<= 0.85)": dec("md_plain") / dec("hf"),
            "md_plain / hf prefill (<= 0.9)": pre("md_plain") / pre("hf"),
            "md_plain peak RSS GiB (<= 14.5)": rss("md_plain"),
            "md_damro peak RSS GiB (<= 14.5)": rss("md_damro"),
            "hf peak RSS GiB": rss("hf"),
            "md_plain_int8 s/token": dec("md_plain_int8") / 1e3,
            "md_plain_int8 / md_plain decode (<= 0.75)": dec("md_plain_int8") / dec("md_plain"),
            "md_damro_int8 / md_plain_int8 decode (<= 1.05)": dec("md_damro_int8") / dec("md_plain_int8"),
            "md_plain_int8 / md_plain prefill (<= 1)": pre("md_plain_int8") / pre("md_plain"),
            "md_plain_int8 peak RSS GiB (<= 9)": rss("md_plain_int8"),
            "md_damro_int8 peak RSS GiB (<= 9)": rss("md_damro_int8"),
        }
    else:
        s |= {
            "md_damro / md_plain decode (<= 1.10)": dec("md_damro") / dec("md_plain"),
            "md_vcd / md_plain decode (<= 1.1)": dec("md_vcd") / dec("md_plain"),
            "md_vcd / md_plain prefill": pre("md_vcd") / pre("md_plain"),
            "md_plain / hf decode (<= 0.85)": dec("md_plain") / dec("hf"),
            "md_plain / hf prefill (<= 0.9)": pre("md_plain") / pre("hf"),
            "md_plain fraction of the memory bandwidth (>= 0.6)": s.get("md_plain fraction of the memory bandwidth",
                                                                         math.nan),
            "hf_damro / hf decode": dec("hf_damro") / dec("hf"),
            "md_damro / hf_damro decode": dec("md_damro") / dec("hf_damro"),
            "md_plain / linear layers alone, 1 row": dec("md_plain") / chain["1"] if chain else math.nan,
            "md_damro / linear layers alone, 2 rows": dec("md_damro") / chain["2"] if chain else math.nan,
            "md_plain peak RSS GiB": rss("md_plain"), "hf peak RSS GiB": rss("hf"),
        }
    for a, b in (("md_plain", "hf"), ("md_damro", "hf_damro")):
        if r.get(a) and r.get(b):
            s[f"{a} and {b} greedy tokens equal"] = r[a]["tokens"] == r[b]["tokens"]
    for a, b in (("md_plain_int8", "md_plain"), ("md_damro_int8", "md_damro")):  # random weights: reported only
        if r.get(a) and r.get(b):
            s[f"{a} greedy tokens equal to {b}'s (of {len(r[b]['tokens'])})"] = sum(
                x == y for x, y in zip(r[a]["tokens"], r[b]["tokens"]))
    return s


def main():
    p = argparse.ArgumentParser(prog="python -m minidamro.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--tokens", type=int, help="tokens generated per run (default 64; 16 at 7b; 8 with --quick)")
    p.add_argument("--runs", type=int, help="timed runs per implementation (default 5; 3 at 7b, 2 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="where the checkpoint is built and cached (default: a fixed temp dir; "
                                     "checkpoints/bench-7b for --size 7b)")
    p.add_argument("--size", choices=("medium", "7b", "quick"), default="medium",
                   help="medium: 674 MB float32 LLM (default); 7b: LLaVA-1.5-7B's shapes in bfloat16 (28 GB of "
                        "disk for both layouts, ~14 GiB of RAM for minidamro, ~23 GiB for transformers); quick: "
                        "a tiny model that checks the script itself in < 1 min")
    p.add_argument("--quick", action="store_true", help="the same as --size quick")
    p.add_argument("--only", help="comma-separated implementations to time (default: all of the size)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size = "quick"
    size, spec = args.size, SPEC[args.size]
    args.tokens = args.tokens or {"medium": 64, "7b": 16, "quick": 8}[size]
    # 3 at 7b, not 2: a median of two is their mean, and one disturbed run (a first timed DAMRO run took ~425 ms
    # per token against ~300 in the next, twice on the Zen 5 machine) moved DAMRO / plain from ~1.0 to 1.19
    args.runs = args.runs or {"medium": 5, "7b": 3, "quick": 2}[size]
    # 7b: 28 GB (both layouts), kept in the repository's gitignored checkpoints/ rather than a temp dir
    args.workdir = args.workdir or (os.path.join(ROOT, "checkpoints", "bench-7b") if size == "7b" else
                                    os.path.join(tempfile.gettempdir(), f"minidamro-bench-{size}"))
    if args.worker:
        return worker(args)
    try:  # the reference everything is timed against, and the builder of the medium and quick checkpoints
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("error: the benchmark compares minidamro with transformers, which is not installed: "
                 "pip install -r tests/requirements.txt")
    if args.tokens < 2:
        p.error("--tokens must be at least 2")
    # 7b: two forwards per token on transformers (hf_damro) and in minidamro (md_damro_2call) only double the
    # weight reads, which the medium size shows in minutes; here they would add ~10 minutes.
    impls = ("md_plain", "md_damro", "hf", "md_plain_int8", "md_damro_int8") if size == "7b" else IMPLS[:6]
    if args.only:
        impls = tuple(args.only.split(","))
        if not set(impls) <= set(IMPLS):
            p.error(f"--only takes some of {', '.join(IMPLS)}")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"checkpoint in {args.workdir}", file=sys.stderr)
    res = {"machine": machine(args.threads), "model": size, "tokens": args.tokens, "runs": args.runs}
    res["build"] = spawn(args, "build")
    if any(name.endswith("_int8") for name in impls):
        res["build_int8"] = spawn(args, "build_int8")
    res["weights"] = w = weight_bytes(args.workdir)
    print(f"weights: total {w['total'] / 1e6:.1f} MB, LLM {w['llm'] / 1e6:.1f} MB, vision {w['vision'] / 1e6:.1f} MB, "
          f"read per decode step {w['per_token'] / 1e6:.1f} MB (1e6 B) + the KV cache", file=sys.stderr)
    if size == "medium" and abs(w["llm"] - 673.78e6) > 1e6:
        print("warning: the LLM weights are not the intended 673.8 MB", file=sys.stderr)
    r = res["results"] = {"bandwidth": spawn(args, "bandwidth")}
    res["skipped"] = {}
    for name in impls:
        need, have = needed_bytes(name, w), mem_available()
        if need > have:  # one process at a time; a run that cannot fit would only be killed (or kill others)
            res["skipped"][name] = f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
            print(f"  {name}: skipped, {res['skipped'][name]}", file=sys.stderr)
            r[name] = None
        else:
            r[name] = spawn(args, name)
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["summary"] = s = summarize(size, r, w, spec, args.tokens)

    m, bw = res["machine"], r["bandwidth"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']} ({m['cpu_capability']}, "
          f"BLAS {m['torch_blas']}), transformers {m['transformers']}; load average {m['load_avg'][0]:.2f} at "
          f"start, {m['load_avg_end'][0]:.2f} at end")
    print(f"{size} model ({spec.get('dtype', 'float32')}), {args.tokens} tokens, median of {args.runs} runs, greedy\n")
    print(f"{'':<16}{'prefill':>8}{'decode ms/token':>17}{'of memory':>11}{'RSS MiB: before':>17}{'after':>7}"
          f"{'peak':>7}{'end':>7}")
    print(f"{'implementation':<16}{'s':>8}{'median':>9}{'best':>8}{'bandwidth':>11}{'load':>17}{'load':>7}")
    for name in impls:
        x = r[name]
        if x is None:
            print(f"{name:<16}skipped: {res['skipped'][name]}")
            continue
        frac = s.get(f"{name} fraction of the memory bandwidth", math.nan)
        print(f"{name:<16}{x['prefill_s']:>8.2f}{x['decode_ms']:>9.1f}{x['decode_best_ms']:>8.1f}{frac:>11.2f}"
              f"{x['mem_start']['VmRSS']:>17.0f}{x['mem_loaded']['VmRSS']:>7.0f}{x['mem_end']['VmHWM']:>7.0f}"
              f"{x['mem_end']['VmRSS']:>7.0f}")
    print("\nread bandwidth GB/s (>= 1 GB read per pass, best of 3): "
          + ", ".join(f"{k} {v:.1f}" for k, v in bw["bandwidth_gbs"].items()))
    prompt = next(x["prompt_len"] for x in r.values() if x and "prompt_len" in x)
    print(f"memory read bandwidth (the best of these): {bw['memory_gbs']:.1f} GB/s; a plain decode step reads "
          f"{step_bytes(w, spec, prompt, args.tokens, [0]) / 1e6:.1f} MB ({w['per_token'] / 1e6:.1f} MB of weights "
          f"+ the KV cache of ~{prompt + args.tokens // 2} positions): at most "
          f"{bw['memory_gbs'] * 1e9 / step_bytes(w, spec, prompt, args.tokens, [0]):.1f} tokens/s")
    if bw["chain_ms"]:
        print(f"the linear layers alone (kernels/linear.py): {bw['chain_ms']['1']:.1f} ms (1 row), "
              f"{bw['chain_ms']['2']:.1f} ms (2 rows)")
    for k, v in s.items():
        if k != "memory_gbs" and not k.endswith("fraction of the memory bandwidth"):
            print(f"  {k:<56} {f'{v:.3f}' if isinstance(v, float) else v}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
