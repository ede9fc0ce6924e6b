"""InstructBLIP at full shape: a random instructblip-vicuna-7b-shaped checkpoint converts, loads memory-mapped and
generates plain and DAMRO; time and memory, next to transformers on the same files where memory allows.

    python -m minidamro.bench.instructblip --workdir checkpoints/bench-blip [--dtype bfloat16] [--tokens 16]
    python -m minidamro.bench.instructblip --size quick --workdir checkpoints/bench-blip-quick   # seconds

Builds once (cached in --workdir) a random checkpoint in the hub layout of Salesforce/instructblip-vicuna-7b,
written tensor by tensor into shards of <= 4 GB with an index, as the hub's (no transformers needed, never the
whole model in memory): EVA ViT-g/14 (39 x 1408, 16 heads, MLP 6144, 224 px: 257 tokens), the Q-Former (12 x
768, cross-attention every second layer, 30523-row vocabulary), 32 queries, Vicuna-7B (32 x 4096, MLP 11008,
32002-row vocabulary: [PAD] 32000, <image> 32001), 7.9e9 parameters, bfloat16. weights_convert.py then converts
it to --dtype. The prompt is InstructBLIP's: 32 image slots, BOS, ~8 prompt tokens, so the prefill is ~41 tokens
(LLaVA-1.5's is ~600): the ViT and the Q-Former are most of it.

Each implementation runs in its own process (memory is per process): md_plain, md_damro (minidamro's DAMRO with
the release's POPE settings for InstructBLIP: alpha 0.5, beta 0.1, topk 4, mean over heads, its gather) and, if
transformers is installed and /proc/meminfo's MemAvailable holds 1.25 x the checkpoint + 1 GiB, hf
(InstructBlipForConditionalGeneration.generate, greedy, SDPA). Each makes a 2-token warm-up run (minidamro measures
its kernel choices at first use), then one timed greedy run of --tokens tokens, EOS ignored; prefill = call ->
first token (ViT, Q-Former, projection, prompt prefill, first choice); decode = ms per token after the first; peak
RSS = VmHWM. The machine (lscpu's model name) is recorded: compare figures from one run only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from ..checkpoint import write_safetensors
from .build import ROOT, write_tokenizer
from .llava7b import random_tensor

PAD_TOKEN, IMAGE_TOKEN = 32000, 32001
PROMPT, TOPK, ALPHA, BETA = "Describe this image in detail.", 4, 0.5, 0.1  # the release's POPE settings
SHARD_BYTES = 4 << 30
SPEC = {
    "7b": dict(vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14),
               qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            vocab_size=30523, max_position_embeddings=512),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32002, max_position_embeddings=2048, rms_norm_eps=1e-6),
               num_query_tokens=32),
    "quick": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14),
                  qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=30523, max_position_embeddings=512),
                  text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=32002, max_position_embeddings=2048, rms_norm_eps=1e-6),
                  num_query_tokens=32),
}


def hf_config(spec: dict, dtype: str) -> dict:
    return {"architectures": ["InstructBlipForConditionalGeneration"], "model_type": "instructblip", "dtype": dtype,
            "num_query_tokens": spec["num_query_tokens"], "image_token_index": IMAGE_TOKEN,
            "vision_config": spec["vision"] | {"model_type": "instructblip_vision_model", "hidden_act": "gelu",
                                               "layer_norm_eps": 1e-6, "qkv_bias": True},
            "qformer_config": spec["qformer"] | {"model_type": "instructblip_qformer", "hidden_act": "gelu",
                                                 "cross_attention_frequency": 2, "layer_norm_eps": 1e-12,
                                                 "encoder_hidden_size": spec["vision"]["hidden_size"]},
            "text_config": spec["text"] | {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": False,
                                           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}


def hf_shapes(spec: dict) -> dict:
    """Hub key -> shape (transformers' InstructBLIP names)."""
    v, q, t = spec["vision"], spec["qformer"], spec["text"]
    d, p, n_pos = v["hidden_size"], v["patch_size"], (v["image_size"] // v["patch_size"]) ** 2 + 1
    h, D = q["hidden_size"], t["hidden_size"]
    s = {"query_tokens": (1, spec["num_query_tokens"], h),
         "vision_model.embeddings.class_embedding": (1, 1, d), "vision_model.embeddings.position_embedding": (1, n_pos, d),
         "vision_model.embeddings.patch_embedding.weight": (d, 3, p, p), "vision_model.embeddings.patch_embedding.bias": (d,)}

    def linear(prefix, out, inp):
        s[prefix + ".weight"], s[prefix + ".bias"] = (out, inp), (out,)

    def norm(prefix, n):
        s[prefix + ".weight"], s[prefix + ".bias"] = (n,), (n,)
    for i in range(v["num_hidden_layers"]):
        L = f"vision_model.encoder.layers.{i}."
        linear(L + "self_attn.qkv", 3 * d, d)
        linear(L + "self_attn.projection", d, d)
        linear(L + "mlp.fc1", v["intermediate_size"], d)
        linear(L + "mlp.fc2", d, v["intermediate_size"])
        norm(L + "layer_norm1", d)
        norm(L + "layer_norm2", d)
    norm("vision_model.post_layernorm", d)
    s["qformer.embeddings.word_embeddings.weight"] = (q["vocab_size"], h)
    s["qformer.embeddings.position_embeddings.weight"] = (q["max_position_embeddings"], h)
    norm("qformer.embeddings.layernorm", h)
    for i in range(q["num_hidden_layers"]):
        L = f"qformer.encoder.layer.{i}."
        for block, source in [("attention", h)] + ([("crossattention", d)] if i % 2 == 0 else []):
            linear(L + block + ".attention.query", h, h)
            linear(L + block + ".attention.key", h, source)
            linear(L + block + ".attention.value", h, source)
            linear(L + block + ".output.dense", h, h)
            norm(L + block + ".output.LayerNorm", h)
        for ffn in ("", "_query"):
            linear(L + f"intermediate{ffn}.dense", q["intermediate_size"], h)
            linear(L + f"output{ffn}.dense", h, q["intermediate_size"])
            norm(L + f"output{ffn}.LayerNorm", h)
    linear("language_projection", D, h)
    F, V, lm = t["intermediate_size"], t["vocab_size"], "language_model.model."
    s[lm + "embed_tokens.weight"] = (V, D)
    for i in range(t["num_hidden_layers"]):
        L = f"{lm}layers.{i}."
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (D, D)), ("self_attn.v_proj", (D, D)),
                            ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                            ("mlp.down_proj", (D, F))):
            s[L + name + ".weight"] = shape
        s[L + "input_layernorm.weight"] = s[L + "post_attention_layernorm.weight"] = (D,)
    s[lm + "norm.weight"], s["language_model.lm_head.weight"] = (D,), (V, D)
    return s


def write_hf(hf: str, spec: dict, dtype):
    """config.json, sharded safetensors + index (hub layout, `dtype`), streamed one tensor at a time."""
    import torch
    shapes = hf_shapes(spec)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(hf_config(spec, str(dtype).removeprefix("torch.")), f, indent=2)
    shards, size = [{}], 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name], size = shape, size + n
    seeds = {name: seed for seed, name in enumerate(shapes)}
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(hf, name), shard, dtype, lambda k: random_tensor(k, shapes[k], seeds[k]))
        weight_map |= dict.fromkeys(shard, name)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_tokenizers(workdir: str, hf: str, spec: dict):
    """The LLM's sentencepiece tokenizer with the release's settings (bos "</s>", [PAD] and <image> added), BLIP's
    preprocessor settings, and a small Q-Former WordPiece vocabulary (ids only need to be valid)."""
    write_tokenizer(workdir, hf, spec["vision"]["image_size"])  # tokenizer.model (+ JSON rewritten below)
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                     "single_word": False, "special": True}
    s = spec["vision"]["image_size"]
    files = {"tokenizer_config.json": {"added_tokens_decoder": {str(PAD_TOKEN): tok("[PAD]"),
                                                                 str(IMAGE_TOKEN): tok("<image>")},
                                       "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                                       "pad_token": "[PAD]", "legacy": False, "tokenizer_class": "LlamaTokenizer"},
             "preprocessor_config.json": {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                                          "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                          "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                                          "rescale_factor": 1 / 255, "size": {"height": s, "width": s},
                                          "image_processor_type": "BlipImageProcessor"}}
    for name, d in files.items():
        with open(os.path.join(hf, name), "w") as f:
            json.dump(d, f, indent=2)
    os.makedirs(os.path.join(hf, "qformer_tokenizer"), exist_ok=True)
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz.,?!") + "describe this image in detail .".split()
    with open(os.path.join(hf, "qformer_tokenizer", "vocab.txt"), "w") as f:
        f.write("\n".join(dict.fromkeys(words)) + "\n")


def read_stamp(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build(workdir: str, size: str, dtype: str):
    """The random hub-layout checkpoint in workdir/hf (bfloat16), converted to workdir/minidamro; each step skipped
    when its stamp says it is already there (another --dtype converts again, from the same source)."""
    import shutil
    import torch
    import weights_convert
    hf, source = os.path.join(workdir, "hf"), {"spec": SPEC[size], "model": "instructblip"}
    stamp, hf_stamp = os.path.join(workdir, "spec.json"), os.path.join(hf, "minidamro-bench.json")
    if read_stamp(hf_stamp) != source:
        shutil.rmtree(hf, ignore_errors=True)  # no shard of another size left behind
        os.makedirs(hf)
        t0 = time.perf_counter()
        write_hf(hf, SPEC[size], torch.bfloat16)
        write_tokenizers(workdir, hf, SPEC[size])
        with open(hf_stamp, "w") as f:
            json.dump(source, f)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if read_stamp(stamp) != source | {"dtype": dtype}:
        t0 = time.perf_counter()
        weights_convert.convert(hf, os.path.join(workdir, "minidamro"), dtype=dtype, force=True)
        print(f"converted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        with open(stamp, "w") as f:
            json.dump(source | {"dtype": dtype}, f)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def inputs(md: str):
    """Pixels of a synthetic image, the LLM prompt ids and the Q-Former ids, as minidamro builds them (the tests
    check they are transformers' processor's)."""
    import torch
    from ..image import image_from_hwc, preprocess
    from ..llava import read_config
    from ..tokenizer import instruction_ids, load_tokenizer, model_prompt_ids
    cfg = read_config(md)
    tok = load_tokenizer(md, cfg)
    s = cfg.vision.image_size
    y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    rgb = torch.stack([x * 255 // s, y * 255 // s, (x * y) % 256], -1).to(torch.uint8)
    pixels = preprocess(image_from_hwc(rgb), cfg.preprocessor)
    return pixels, torch.tensor(model_prompt_ids(tok, cfg, PROMPT)), instruction_ids(tok, cfg, PROMPT)


def worker(a):
    """One implementation in its own process: load, then one timed run of --tokens greedy tokens."""
    import torch
    torch.set_num_threads(a.threads)
    md = os.path.join(a.workdir, "minidamro")
    pixels, ids, instruction = inputs(md)
    if a.impl == "hf":
        from transformers import InstructBlipForConditionalGeneration
        from transformers.generation.streamers import BaseStreamer
        model = InstructBlipForConditionalGeneration.from_pretrained(os.path.join(a.workdir, "hf"),
                                                                     dtype=getattr(torch, a.dtype)).eval()

        class Stamps(BaseStreamer):  # generate() puts the prompt first, then each new token as it is chosen
            def __init__(self):
                self.calls, self.t = 0, []

            def put(self, value):
                self.calls += 1
                if self.calls > 1:
                    self.t.append(time.perf_counter())

            def end(self):
                pass
        def run(n):
            s, t0 = Stamps(), time.perf_counter()
            model.generate(pixel_values=pixels.to(model.dtype), qformer_input_ids=instruction[None],
                           input_ids=ids[None], do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=s)
            return t0, s.t
    else:
        from .. import damro, generation
        from ..llava import load_model
        model = load_model(md)
        model.cfg.text.eos_token_id = -1  # never stop early: every run makes exactly --tokens tokens

        def run(n):
            t0 = time.perf_counter()
            if a.impl == "md_plain":
                it = generation.generate(model, ids, pixels, generation.Sampler(), n, instruction=instruction)
            else:
                cfg = damro.METHOD.default_config("instructblip")
                cfg.alpha, cfg.beta, cfg.topk = ALPHA, BETA, TOPK
                _, it = damro.generate(model, ids, pixels, cfg, generation.Sampler(), n, instruction=instruction)
            return t0, [time.perf_counter() for _ in it]
    run(2)  # warm-up: kernel choices, oneDNN's primitives
    t0, times = run(a.tokens)
    print(json.dumps({"impl": a.impl, "prompt_tokens": len(ids), "prefill_s": times[0] - t0,
                      "decode_ms_per_token": 1000 * (times[-1] - times[0]) / max(1, len(times) - 1),
                      "peak_rss_mib": peak_rss_mib(), "dtype": a.dtype}))


def checkpoint_bytes(hf: str) -> int:
    return sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors"))


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser(prog="python -m minidamro.bench.instructblip", description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SPEC), default="7b")
    ap.add_argument("--workdir", required=True, help="where the random checkpoint is built and cached")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--impl", choices=("md_plain", "md_damro", "hf"), help=argparse.SUPPRESS)  # a worker process
    a = ap.parse_args()
    if a.impl:
        return worker(a)
    build(a.workdir, a.size, a.dtype)
    impls = ["md_plain", "md_damro"]
    try:
        import transformers  # noqa: F401
        need = 1.25 * checkpoint_bytes(os.path.join(a.workdir, "hf")) + 2**30
        if mem_available() >= need:
            impls.append("hf")
        else:
            print(f"hf skipped: it needs ~{need / 2**30:.1f} GiB, MemAvailable is {mem_available() / 2**30:.1f} GiB",
                  file=sys.stderr)
    except ImportError:
        print("hf skipped: transformers is not installed", file=sys.stderr)
    results = []
    for impl in impls:
        cmd = [sys.executable, "-m", "minidamro.bench.instructblip", "--impl", impl, "--size", a.size, "--workdir",
               a.workdir, "--dtype", a.dtype, "--tokens", str(a.tokens), "--threads", str(a.threads)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(f"{impl} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump({"size": a.size, "spec": SPEC[a.size], "cpu": cpu_name(), "threads": a.threads,
                       "results": results}, f, indent=2)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
