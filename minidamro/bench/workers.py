"""The benchmark's workers: each implementation timed in a process of its own (python -m minidamro.bench --worker)."""
import json
import math
import os
import statistics
import time

from .build import ALPHA, BETA, IMAGE_TOKEN, PROMPT, SPEC, TOPK, build, build_int8

# ---------------------------------------------------------------- workers (one subprocess each)
def memory() -> dict:
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f)
    return {k: int(st[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}  # MB (MiB)


def inputs(workdir: str):
    """Prompt ids (L,) with the image expanded, and float32 pixels (1, 3, S, S) of a synthetic image."""
    import torch
    from ..image import image_from_hwc, preprocess
    from ..llava import read_config
    from ..tokenizer import Tokenizer, build_prompt, prompt_ids
    cfg = read_config(os.path.join(workdir, "minidamro"))
    tok = Tokenizer(os.path.join(workdir, "minidamro", "tokenizer.model"), cfg.special_tokens)
    ids = prompt_ids(tok, build_prompt(PROMPT), cfg.image_token_index, cfg.num_image_tokens)
    s = cfg.vision.image_size
    y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    noise = torch.randint(0, 40, (s, s), generator=torch.Generator().manual_seed(0))
    rgb = torch.stack([x * 255 // s, y * 255 // s, (x * y + noise) % 256], -1).to(torch.uint8)
    return torch.tensor(ids), preprocess(image_from_hwc(rgb), cfg.preprocessor)


def hf_runner(workdir: str, impl: str):
    import torch
    from transformers import DynamicCache, LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    with open(os.path.join(workdir, "spec.json")) as f:
        dtype = getattr(torch, json.load(f).get("dtype", "float32"))  # the checkpoint's: bfloat16 at 7b
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(workdir, "hf"), dtype=dtype).eval()
    ids, pixels = inputs(workdir)
    pixels = pixels.to(dtype)

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

    return (plain if impl == "hf" else damro), {"attn_implementation": model.config._attn_implementation,
                                                "prompt_len": len(ids)}


def md_runner(workdir: str, impl: str):
    from .. import contrastive, damro, generation, vcd
    from ..llava import load_model
    model = load_model(os.path.join(workdir, "minidamro-int8" if impl.endswith("_int8") else "minidamro"))
    impl = impl.removesuffix("_int8")
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
    from ..kernels.linear import Linear
    packed = sum(m.packed is not None for m in model.modules() if isinstance(m, Linear))
    return run, {"prompt_len": len(ids), "linear": os.environ.get("MINIDAMRO_LINEAR", "auto"), "packed_linears": packed}


def bandwidth(spec: dict, pool: float, reps: int = 3) -> dict:
    """GB/s (1e9 B/s) that simple kernels read, each over >= `pool` bytes so nothing stays in cache, the best of
    `reps` passes: a float32 sum, and every kernels/linear.py formulation of x W^T for 1 and 2 rows, float32 and
    bfloat16, on the model's MLP up-projection shape (N = intermediate, K = hidden). Their best is the memory
    read bandwidth the roofline uses. "chain": kernels/linear.py (auto) over one decode step's linear layers in
    order, in the model's dtype: what a step would cost with those kernels and nothing else (not at 7b: it
    would need a second copy of the weights)."""
    import torch
    from ..kernels import linear
    out, best = {}, lambda f: min(timed(f) for _ in range(reps))  # noqa: E731
    x = torch.ones(math.ceil(pool / 4))
    out["sum float32"] = x.numel() * 4 / best(lambda: x.sum()) / 1e9
    del x
    t = spec["text"]
    n, k = t["intermediate_size"], t["hidden_size"]
    for dtype in (torch.float32, torch.bfloat16):
        copies = math.ceil(pool / (n * k * dtype.itemsize))
        ws = torch.full((copies, n, k), 0.01, dtype=dtype).unbind()  # written, so the pages are real
        for rows in (1, 2):
            xs = torch.ones(rows, k, dtype=dtype)
            for name in linear.candidates(rows):
                f = linear.FORMS[name]
                out[f"{name} {str(dtype)[6:]} {rows} row"] = copies * n * k * dtype.itemsize / best(
                    lambda: [f(xs, w, None) for w in ws]) / 1e9
        del ws
    res = {"bandwidth_gbs": out, "memory_gbs": max(out.values()), "chain_ms": {}}
    if spec.get("dtype", "float32") == "float32":
        d, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
        shapes = [(d, d)] * 4 + [(i, d), (i, d), (d, i)]
        ws = [torch.randn(s) for _ in range(t["num_hidden_layers"]) for s in shapes] + [torch.randn(v, d)]
        for rows in (1, 2):  # 2 rows: the floor of a batched DAMRO step, both streams in one read
            xs = {k: torch.randn(rows, k) for k in (d, i)}
            step = lambda: [linear.linear(xs[w.shape[1]], w) for w in ws]  # noqa: E731
            step()  # measured here, once per machine
            res["chain_ms"][rows] = 1e3 * best(step)
    return res


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    res = {"load_avg_start": os.getloadavg(), "mem_start": memory()}
    if args.worker == "build":
        build(args.workdir, args.size)
    elif args.worker == "build_int8":
        build_int8(args.workdir)
    elif args.worker == "bandwidth":
        res |= bandwidth(SPEC[args.size], 1.1e9 if args.size != "quick" else 128e6)
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
        if not args.worker.startswith("hf"):
            # The kernel choices this process made (formulation per linear shape and row count, packing, the
            # attention form of decode steps and of prefills; measured once per machine, then read from the
            # cache file) and any candidate that failed here.
            from ..kernels import choices
            res["chosen"], res["unavailable"] = choices.chosen(), choices.unavailable()
    res["mem_end"] = memory()
    with open(args.worker_out, "w") as f:
        json.dump(res, f)

