"""Speed and memory of minidamro against transformers on a random LLaVA-shaped checkpoint, on the CPU.

    python -m minidamro.bench [--out results.json] [--tokens 64] [--runs 5] [--workdir DIR] [--quick]

Builds once (cached in --workdir) a random llava-hf checkpoint: CLIP ViT-B/14 at 336 px (12 x 768, 576
patches, features from layer -2) before an 8 x 1024 LLaMA (16 heads, MLP 2816) with llava-hf's 32064-row
vocabulary, 674 MB of LLM weights in float32; converts it with weights_convert.py (which drops the ViT's last
layer, unused at layer -2). Then times each implementation in its own subprocess, so memory is per implementation:

    hf              transformers LlavaForConditionalGeneration.generate, greedy, sdpa attention (the default)
    hf_damro        DAMRO as the authors' code runs it on transformers: two streams, each with its own
                    DynamicCache, two forward passes per token; outliers from hooks on the ViT layer's q/k_proj
    md_plain        minidamro.generation.generate
    md_damro        minidamro.damro.generate(batched=True): both streams in one forward per token
    md_damro_2call  the same with batched=False (two forwards per token), for information
    md_vcd          minidamro VCD (noise step 500) through the same core: two full-length streams, one forward

Timing: a timestamp as each token reaches the caller (a streamer for generate(), the iterators, the loop).
prefill = first token - call (vision tower, projector, prompt prefill, first choice); decode = (last token -
first token) / (N - 1). Figures are medians over --runs runs, after a 4-token warm-up run. EOS is ignored so
that every run makes N tokens (min_new_tokens for transformers; cfg.text.eos_token_id = -1 for minidamro).
Greedy, float32, torch.set_num_threads(--threads). Memory: VmRSS / VmHWM (MiB) from /proc/self/status before
loading (Python + torch), after loading, and at the end. minidamro memory-maps its weights, so pages count
only once touched: compare the peak at the end.

Roofline: the bytes one decode step must read from the weights (lm_head, every decoder layer's linears and
RMSNorms, the final norm, one embedding row; not the KV cache), over the best float32 matrix-vector bandwidth
measured here (F.linear of 1 x K by N x K, and torch.mv, on >= 1 GB of weights cycled so none stays in cache).
Timings are only meaningful on an otherwise idle machine: the load average is recorded.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {
    "full": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=336, patch_size=14, hidden_act="quick_gelu"),
                 text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)),
    "quick": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14, hidden_act="quick_gelu"),
                  text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)),
}
IMAGE_TOKEN, PAD_TOKEN, SP_VOCAB = 32000, 32001, 400  # a small sentencepiece model: ids only need to be valid
PROMPT, TOPK, ALPHA, BETA = "Describe this image in detail.", 10, 2.0, 0.1
IMPLS = ("hf", "hf_damro", "md_plain", "md_damro", "md_damro_2call", "md_vcd")


# ---------------------------------------------------------------- the checkpoint
def build(workdir: str, size: str):
    """Random llava-hf checkpoint in workdir/hf, converted to workdir/minidamro; skipped if already there."""
    stamp = os.path.join(workdir, "spec.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == SPEC[size]:
                return
    import sentencepiece as spm
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    import weights_convert
    hf, spec = os.path.join(workdir, "hf"), SPEC[size]
    os.makedirs(hf, exist_ok=True)
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(f"USER: {PROMPT} ASSISTANT: a cat on a red sofa, {i} windows and {i * 7} birds."
                          for i in range(3000)))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(hf, "tokenizer"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(cfg).save_pretrained(hf)
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                     "single_word": False, "special": True}
    s = spec["vision"]["image_size"]
    for name, d in {
        "tokenizer_config.json": {"added_tokens_decoder": {str(IMAGE_TOKEN): tok("<image>"),
                                                           str(PAD_TOKEN): tok("<pad>")},
                                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                  "legacy": False, "tokenizer_class": "LlamaTokenizer"},
        "preprocessor_config.json": {
            "crop_size": {"height": s, "width": s}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": s}},
    }.items():
        with open(os.path.join(hf, name), "w") as f:
            json.dump(d, f, indent=2)
    weights_convert.convert(hf, os.path.join(workdir, "minidamro"), force=True)
    with open(stamp, "w") as f:
        json.dump(spec, f)


def weight_bytes(workdir: str) -> dict:
    """Bytes by part, from the converted safetensors header. `per_token` is what one decode step must read:
    lm_head, every decoder layer (attention, MLP, both RMSNorms), the final norm, and one embedding row."""
    with open(os.path.join(workdir, "minidamro", "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    emb = size["language_model.embed_tokens.weight"]
    llm = sum(v for k, v in size.items() if k.startswith(("language_model.", "lm_head.")))
    row = emb // header["language_model.embed_tokens.weight"]["shape"][0]
    vision = sum(v for k, v in size.items() if k.startswith("vision_tower."))
    return {"total": sum(size.values()), "llm": llm, "vision": vision, "per_token": llm - emb + row}


# ---------------------------------------------------------------- workers (one subprocess each)
def memory() -> dict:
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f)
    return {k: int(st[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}  # MB (MiB)


def inputs(workdir: str):
    """Prompt ids (L,) with the image expanded, and float32 pixels (1, 3, S, S) of a synthetic image."""
    import torch
    from PIL import Image
    from .image import preprocess
    from .llava import read_config
    from .tokenizer import Tokenizer, build_prompt, prompt_ids
    cfg = read_config(os.path.join(workdir, "minidamro"))
    tok = Tokenizer(os.path.join(workdir, "minidamro", "tokenizer.model"), cfg.special_tokens)
    ids = prompt_ids(tok, build_prompt(PROMPT), cfg.image_token_index, cfg.num_image_tokens)
    s = cfg.vision.image_size
    y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    noise = torch.randint(0, 40, (s, s), generator=torch.Generator().manual_seed(0))
    rgb = torch.stack([x * 255 // s, y * 255 // s, (x * y + noise) % 256], -1).to(torch.uint8)
    return torch.tensor(ids), preprocess(Image.fromarray(rgb.numpy()), cfg.preprocessor)


def hf_runner(workdir: str, impl: str):
    import torch
    from transformers import DynamicCache, LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(workdir, "hf"), dtype=torch.float32).eval()
    ids, pixels = inputs(workdir)

    class Stamps(BaseStreamer):  # generate() puts the prompt first, then each new token as it is chosen
        def __init__(self):
            self.calls, self.t, self.tokens = 0, [], []

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.t.append(time.perf_counter())
                self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    def plain(n):
        s = Stamps()
        t0 = time.perf_counter()
        model.generate(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       pixel_values=pixels, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                       streamer=s)
        return t0, s.t, s.tokens

    inner = model.model
    vit = getattr(inner.vision_tower, "vision_model", inner.vision_tower)  # v5 flattens CLIPVisionModel
    sel = vit.encoder.layers[model.config.vision_feature_layer]  # -2: its output is the image features
    grab = {}
    for mod, key in ((sel.self_attn.q_proj, "q"), (sel.self_attn.k_proj, "k"), (inner.multi_modal_projector, "feat")):
        mod.register_forward_hook(lambda m, a, out, key=key: grab.__setitem__(key, out))
    img = (ids == IMAGE_TOKEN).nonzero()[:, 0]
    cd_ids = torch.cat([ids[:img[0]], ids.new_full((TOPK,), IMAGE_TOKEN), ids[img[-1] + 1:]])

    @torch.inference_mode()
    def damro(n):  # the released code's shape: two caches, two forward passes per token
        t0, t, tokens = time.perf_counter(), [], []
        cache, cd_cache = DynamicCache(config=model.config.text_config), DynamicCache(config=model.config.text_config)
        l = model(input_ids=ids[None], pixel_values=pixels, cache=cache, logits_to_keep=1).logits[0, -1].float()
        q, k = grab["q"][0, 0], grab["k"][0]  # full width, no head split: softmax(q_cls . K^T / sqrt(D))
        outliers = torch.softmax(k @ q / k.shape[-1] ** 0.5, -1)[1:].topk(TOPK).indices
        emb = model.get_input_embeddings()(cd_ids)
        emb[cd_ids == IMAGE_TOKEN] = grab["feat"][0, outliers]
        l_cd = model(inputs_embeds=emb[None], cache=cd_cache, logits_to_keep=1).logits[0, -1].float()
        for i in range(n):
            d = ((1 + ALPHA) * l - ALPHA * l_cd).masked_fill(l < math.log(BETA) + l.max(), float("-inf"))
            tok = d.argmax()
            t.append(time.perf_counter())
            tokens.append(int(tok))
            if i < n - 1:
                l = model(input_ids=tok.view(1, 1), cache=cache).logits[0, -1].float()
                l_cd = model(input_ids=tok.view(1, 1), cache=cd_cache).logits[0, -1].float()
        return t0, t, tokens

    return (plain if impl == "hf" else damro), {"attn_implementation": model.config._attn_implementation}


def md_runner(workdir: str, impl: str):
    from . import contrastive, damro, generation, vcd
    from .llava import load_model
    model = load_model(os.path.join(workdir, "minidamro"))
    model.cfg.text.eos_token_id = -1  # never stop early: every run makes exactly n tokens
    ids, pixels = inputs(workdir)

    def run(n):
        t0 = time.perf_counter()
        if impl == "md_plain":
            it = generation.generate(model, ids, pixels, generation.Sampler(), n)
        elif impl == "md_vcd":
            _, it = contrastive.generate(model, ids, pixels, vcd.METHOD, vcd.VcdConfig(), generation.Sampler(), n)
        else:
            _, it = damro.generate(model, ids, pixels, damro.DamroConfig(alpha=ALPHA, beta=BETA, topk=TOPK),
                                   generation.Sampler(), n, batched=impl == "md_damro")
        t, tokens = [], []
        for tok in it:
            t.append(time.perf_counter())
            tokens.append(tok)
        return t0, t, tokens
    return run, {}


def matvec(spec: dict, reps: int, pool: float) -> dict:
    """Achieved float32 matrix-vector bandwidth, GB/s (1e9 B/s), 1 x K times N x K transposed as nn.Linear does
    (and torch.mv), median of `reps` calls cycling over >= `pool` bytes of weights so that none stays in cache.
    "chain_1row" runs the linear layers of one decode step in order (every decoder layer, then lm_head): what a
    decode step would cost with these kernels and nothing else; "chain_2row" the same for 2 rows."""
    import torch
    import torch.nn.functional as F
    out, chain_ms = {}, {}
    for n, k in ((32064, 1024), (2816, 1024), (1024, 2816), (1024, 1024)):
        copies = max(2, math.ceil(pool / (n * k * 4)))
        ws, x = [torch.randn(n, k) for _ in range(copies)], torch.randn(1, k)
        for name, f in (("linear", lambda w: F.linear(x, w)), ("mv", lambda w: torch.mv(w, x[0]))):
            for w in ws:
                f(w)
            times = []
            for r in range(reps):
                t = time.perf_counter()
                f(ws[r % copies])
                times.append(time.perf_counter() - t)
            out[f"{name}_{n}x{k}"] = n * k * 4 / statistics.median(times) / 1e9
        del ws
    t = spec["text"]
    d, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    shapes = [(d, d)] * 4 + [(i, d), (i, d), (d, i)]
    ws = [torch.randn(s) for _ in range(t["num_hidden_layers"]) for s in shapes] + [torch.randn(v, d)]
    for rows in (1, 2):  # 2 rows: the floor of a batched DAMRO step, both streams in one read
        xs, times = {k: torch.randn(rows, k) for k in (d, i)}, []
        for _ in range(reps // 2):
            t0 = time.perf_counter()
            for w in ws:
                F.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t0)
        chain_ms[rows] = 1e3 * statistics.median(times[1:])
        out[f"chain_{rows}row"] = sum(w.numel() * 4 for w in ws) / chain_ms[rows] / 1e6
    return {"bandwidth_gbs": out, "chain_ms": chain_ms}


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    res = {"load_avg_start": os.getloadavg(), "mem_start": memory()}
    if args.worker == "build":
        build(args.workdir, "quick" if args.quick else "full")
    elif args.worker == "matvec":
        res |= matvec(SPEC["full"], 30, 1e9) if not args.quick else matvec(SPEC["quick"], 10, 128e6)
    else:
        t = time.perf_counter()
        run, info = (hf_runner if args.worker.startswith("hf") else md_runner)(args.workdir, args.worker)
        res |= info | {"load_s": time.perf_counter() - t, "mem_loaded": memory()}
        run(min(4, args.tokens))  # warm-up
        prefill, decode, gaps = [], [], []
        for _ in range(args.runs):
            t0, t, tokens = run(args.tokens)
            assert len(t) == args.tokens, f"{args.worker} made {len(t)} tokens, not {args.tokens}"
            prefill.append(t[0] - t0)
            decode.append((t[-1] - t[0]) / (len(t) - 1))
            gaps += [b - a for a, b in zip(t, t[1:])]
        res |= {"prefill_s": statistics.median(prefill), "decode_ms": 1e3 * statistics.median(decode),
                "decode_best_ms": 1e3 * min(decode), "decode_gap_median_ms": 1e3 * statistics.median(gaps),
                "prefill_runs_s": prefill,
                "decode_runs_ms": [1e3 * d for d in decode], "tokens": tokens}
    res["mem_end"] = memory()
    with open(args.worker_out, "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------- driver
def spawn(args, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "minidamro.bench", "--worker", name, "--worker-out", f.name,
               "--workdir", args.workdir, "--tokens", str(args.tokens), "--runs", str(args.runs),
               "--threads", str(args.threads)] + ["--quick"] * args.quick
        env = os.environ | {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return json.load(f)


def machine(threads: int) -> dict:
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "load_avg": os.getloadavg()}


def summarize(r: dict, w: dict) -> dict:
    bw = max(v for k, v in r["matvec"]["bandwidth_gbs"].items() if k != "chain_2row")  # best 1-row bandwidth
    roofline_ms = w["per_token"] / bw / 1e6
    dec, best = (lambda k: r[k]["decode_ms"]), (lambda k: r[k]["decode_best_ms"])  # noqa: E731
    limit = 1.1 * w["total"] / 2**20 + 300
    return {
        "bandwidth_gbs": bw, "roofline_ms": roofline_ms, "rss_limit_mb": limit,
        "md_damro / md_plain decode (<= 1.15)": dec("md_damro") / dec("md_plain"),
        "md_vcd / md_plain decode (<= 1.1)": dec("md_vcd") / dec("md_plain"),
        "md_vcd / md_plain prefill": r["md_vcd"]["prefill_s"] / r["md_plain"]["prefill_s"],
        "md_plain / hf decode (<= 1)": dec("md_plain") / dec("hf"),
        "md_plain roofline fraction, bytes read per token (>= 0.85)": roofline_ms / dec("md_plain"),
        # Issue 4 states its bound as all LLM weight bytes (embedding table included) / bandwidth.
        "md_plain roofline fraction, all LLM weight bytes (>= 0.85)": w["llm"] / bw / 1e6 / dec("md_plain"),
        "md_plain / hf prefill (<= 1)": r["md_plain"]["prefill_s"] / r["hf"]["prefill_s"],
        "md_plain peak RSS / limit (<= 1)": r["md_plain"]["mem_end"]["VmHWM"] / limit,
        "md_damro peak RSS / limit (<= 1)": r["md_damro"]["mem_end"]["VmHWM"] / limit,
        "hf_damro / hf decode": dec("hf_damro") / dec("hf"),
        "md_damro / hf_damro decode": dec("md_damro") / dec("hf_damro"),
        "md_damro roofline fraction": roofline_ms / dec("md_damro"),
        "md_plain / linear layers alone, 1 row": dec("md_plain") / r["matvec"]["chain_ms"]["1"],
        "md_damro / linear layers alone, 2 rows": dec("md_damro") / r["matvec"]["chain_ms"]["2"],
        "md_damro / md_plain decode, best runs": best("md_damro") / best("md_plain"),
        "md_plain / hf decode, best runs": best("md_plain") / best("hf"),
        "md_plain and hf greedy tokens equal": r["md_plain"]["tokens"] == r["hf"]["tokens"],
        "md_damro and hf_damro greedy tokens equal": r["md_damro"]["tokens"] == r["hf_damro"]["tokens"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--tokens", type=int, help="tokens generated per run (default 64; 8 with --quick)")
    p.add_argument("--runs", type=int, help="timed runs per implementation (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="where the checkpoint is built and cached (default: a fixed temp dir)")
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the script itself in < 1 min")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tokens = args.tokens or (8 if args.quick else 64)
    args.runs = args.runs or (2 if args.quick else 5)
    size = "quick" if args.quick else "full"
    args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), f"minidamro-bench-{size}")
    if args.worker:
        return worker(args)
    if args.tokens < 2:
        p.error("--tokens must be at least 2")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"checkpoint in {args.workdir}", file=sys.stderr)
    res = {"machine": machine(args.threads), "model": size, "tokens": args.tokens, "runs": args.runs}
    res["build"] = spawn(args, "build")
    res["weights"] = w = weight_bytes(args.workdir)
    print(f"weights: total {w['total'] / 1e6:.1f} MB, LLM {w['llm'] / 1e6:.1f} MB, vision {w['vision'] / 1e6:.1f} MB, "
          f"read per decode step {w['per_token'] / 1e6:.1f} MB (1e6 B)", file=sys.stderr)
    if size == "full" and abs(w["llm"] - 673.78e6) > 1e6:
        print("warning: the LLM weights are not the intended 673.8 MB", file=sys.stderr)
    res["results"] = r = {name: spawn(args, name) for name in ("matvec",) + IMPLS}
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["summary"] = s = summarize(r, w)

    m, mv = res["machine"], r["matvec"]
    print(f"\n{m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}, "
          f"load average {m['load_avg'][0]:.2f} at start, {m['load_avg_end'][0]:.2f} at end")
    print(f"{size} model, {args.tokens} tokens, median of {args.runs} runs, float32, greedy\n")
    print(f"{'':<16}{'prefill':>8}{'decode ms/token':>17}{'RSS MiB: before':>17}{'after':>7}{'peak':>7}{'end':>7}")
    print(f"{'implementation':<16}{'s':>8}{'median':>9}{'best':>8}{'load':>17}{'load':>7}")
    for name in IMPLS:
        x = r[name]
        print(f"{name:<16}{x['prefill_s']:>8.2f}{x['decode_ms']:>9.1f}{x['decode_best_ms']:>8.1f}"
              f"{x['mem_start']['VmRSS']:>17.0f}{x['mem_loaded']['VmRSS']:>7.0f}{x['mem_end']['VmHWM']:>7.0f}"
              f"{x['mem_end']['VmRSS']:>7.0f}")
    print("\nmatvec GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in mv["bandwidth_gbs"].items()))
    print(f"roofline: {w['per_token'] / 1e6:.1f} MB per token / {s['bandwidth_gbs']:.1f} GB/s = "
          f"{s['roofline_ms']:.1f} ms;"
          f" the linear layers alone: {mv['chain_ms']['1']:.1f} ms (1 row), {mv['chain_ms']['2']:.1f} ms (2 rows);"
          f" peak RSS limit 1.1 x {w['total'] / 2**20:.0f} MiB + 300 = {s['rss_limit_mb']:.0f} MiB")
    for k, v in s.items():
        if k not in ("bandwidth_gbs", "roofline_ms", "rss_limit_mb"):
            print(f"  {k:<44} {v if isinstance(v, bool) else f'{v:.3f}'}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
