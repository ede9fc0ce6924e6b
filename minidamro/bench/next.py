"""LLaVA-NeXT at full shape: a random llava-v1.6-vicuna-7b-shaped checkpoint converts and generates; time and memory.

    python -m minidamro.bench.next --size 7b --workdir checkpoints/bench-next [--device cuda] [--dtype bfloat16] [--tokens 16]
    python -m minidamro.bench.next --size quick --workdir checkpoints/bench-next-quick       # the same path in seconds

Builds once (cached in --workdir) a random LLaVA-NeXT checkpoint in transformers' in-memory key layout:
`--size 7b` is llava-v1.6-vicuna-7b's shape (CLIP ViT-L/14 at 336 px, 24 x 1024; Vicuna-7B, 32 x 4096, MLP
11008, 32064-row vocabulary; the v1.6 pinpoints), written tensor by tensor into 2 GB shards (never the whole
model in memory), then converts it with weights_convert.py to --dtype. The image is 672 x 672: a 2 x 2 tile
grid plus the base tile, 5 ViT inputs and 576 + 48 * 49 = 2,928 image tokens, so the prefill is ~2,950
tokens. Then, each in its own subprocess, plain and DAMRO greedy decoding of --tokens tokens (EOS ignored; one run,
after a short warm-up run on CUDA only):
prefill (ViT on 5 tiles, projector, packing, prompt prefill: call -> first token), decode ms/token, peak RSS
(VmHWM) and, on CUDA, peak allocated GPU memory. transformers is used only to know the key names and shapes.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from .build import IMAGE_TOKEN, PROMPT, ROOT, write_tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SPEC = {
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
               pinpoints=PINPOINTS, image=(672, 672)),
    "quick": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14),
                  text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096),
                  pinpoints=[[p // 6 for p in pp] for pp in PINPOINTS], image=(112, 112)),
}
TOPK = 10
SHARD_BYTES = 2 << 30


def build(workdir: str, size: str, dtype: str):
    """Random NeXT checkpoint in workdir/hf (bfloat16), converted to workdir/minidamro; skipped if already there."""
    stamp = os.path.join(workdir, "spec.json")
    want = {"spec": SPEC[size], "dtype": dtype}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    import weights_convert
    spec, hf = SPEC[size], os.path.join(workdir, "hf")
    os.makedirs(hf, exist_ok=True)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=spec["pinpoints"])
    cfg.save_pretrained(hf)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaNextForConditionalGeneration(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(hf, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0
    for key, shape in shapes.items():  # LayerNorm / RMSNorm weights near 1, biases near 0, matrices std 0.02
        t = torch.randn(shape, generator=g) * (0.02 if len(shape) > 1 else 0.1)
        if len(shape) == 1 and key.endswith("weight") and "newline" not in key:
            t += 1
        shard[key] = t.to(torch.bfloat16)
        shard_bytes += shard[key].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    write_tokenizer(workdir, hf, spec["vision"]["image_size"], image_processor_type="LlavaNextImageProcessor",
                    do_pad=True, image_grid_pinpoints=spec["pinpoints"])
    t0 = time.perf_counter()
    weights_convert.convert(hf, os.path.join(workdir, "minidamro"), dtype=dtype, force=True)
    print(f"converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with open(stamp, "w") as f:
        json.dump(want, f)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def worker(a):
    """One method, in its own process: load, one short warm-up, then the timed run."""
    import torch
    from .. import damro, generation
    from ..anyres import model_pixels
    from ..generate import encode_prompt
    from ..image import image_from_hwc
    from ..llava import load_model
    from ..tokenizer import Tokenizer
    torch.set_num_threads(a.threads)
    md = os.path.join(a.workdir, "minidamro")
    model = load_model(md, a.device)
    model.cfg.text.eos_token_id = -1  # never stop early: every run makes exactly --tokens tokens
    tok = Tokenizer(os.path.join(md, "tokenizer.model"), model.cfg.special_tokens)
    w, h = SPEC[a.size]["image"]
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rgb = torch.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).to(torch.uint8)
    pixels, image_size = model_pixels(image_from_hwc(rgb), model.cfg)
    ids, _ = encode_prompt(model, tok, PROMPT, None, a.tokens, image_size)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def run(n):
        t0 = time.perf_counter()
        if a.method == "plain":
            it = generation.generate(model, ids, pixels, generation.Sampler(device=a.device), n, image_size=image_size)
        else:
            _, it = damro.generate(model, ids, pixels, damro.DamroConfig(topk=TOPK), generation.Sampler(device=a.device),
                                   n, image_size=image_size)
        times = []
        for _ in it:
            sync()
            times.append(time.perf_counter())
        return t0, times
    if a.device.startswith("cuda"):  # CUDA's first calls set up kernels; on the CPU a warm-up prefill of
        run(2)                       # ~2,950 tokens would only double the run time
        torch.cuda.reset_peak_memory_stats()
    t0, times = run(a.tokens)
    out = {"method": a.method, "prompt_tokens": len(ids), "tiles": pixels.shape[0],
           "image_tokens": model.cfg.image_tokens(image_size), "prefill_s": times[0] - t0,
           "decode_ms_per_token": 1000 * (times[-1] - times[0]) / max(1, len(times) - 1),
           "peak_rss_mib": peak_rss_mib(), "dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    if a.device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(prog="python -m minidamro.bench.next", description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SPEC), default="7b")
    ap.add_argument("--workdir", required=True, help="where the random checkpoint is built and cached")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--method", choices=("plain", "damro"), help=argparse.SUPPRESS)  # a worker process
    a = ap.parse_args()
    if a.method:
        return worker(a)
    try:  # the builder of the random checkpoint reads the key names and shapes from it
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("error: building the benchmark's checkpoint needs transformers, which is not installed: "
                 "pip install -r tests/requirements.txt")
    build(a.workdir, a.size, a.dtype)
    results = []
    for method in ("plain", "damro"):
        cmd = [sys.executable, "-m", "minidamro.bench.next", "--method", method, "--size", a.size, "--workdir",
               a.workdir, "--device", a.device, "--tokens", str(a.tokens), "--threads", str(a.threads)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: the {method} run failed: {done.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump({"size": a.size, "spec": SPEC[a.size], "results": results}, f, indent=2)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
