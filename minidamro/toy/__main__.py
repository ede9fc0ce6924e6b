"""python -m minidamro.toy train|eval: the toy world's model and hallucination lab.

    python -m minidamro.toy train --out checkpoints/toy      # a tiny LLaVA from scratch (CPU, minutes)
    python -m minidamro.toy eval                             # the lab: POPE-style splits + captions, per method
    python -m minidamro.toy render --out scenes/ --count 8   # images of the world with their ground truth
    python -m minidamro.toy outliers minidamro/toy/model     # does the ViT have DAMRO's high-norm tokens?
    python -m minidamro.toy render --out toybench --benchmarks  # and POPE / CHAIR / MME files for eval
"""
import json
import math
import os
import sys
import tempfile
import time

from ..eval.run import parse_seeds, write_json_atomic
from ..generate import Parser, guarded
from .. import MinidamroError
from . import MODEL_DIR


def plot_losses(losses: dict, path: str, title: str):
    """The training curves drawn with Pillow, the stages side by side (raw per-step loss in grey, a 25-step
    running mean in blue, log y)."""
    import math
    from PIL import Image, ImageDraw
    series = [v for stage in losses.values() for v in stage]
    W, H, L, R, T, B = 800, 360, 56, 16, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.log10(max(min(series), 1e-4)), math.log10(max(series))
    lo, hi = math.floor(lo), math.ceil(hi) if hi > lo else lo + 1

    def xy(i, v):
        x = L + (W - L - R) * i / max(1, len(series) - 1)
        y = T + (H - T - B) * (hi - math.log10(max(v, 1e-4))) / (hi - lo)
        return x, y
    for e in range(lo, hi + 1):
        y = xy(0, 10 ** e)[1]
        d.line((L, y, W - R, y), fill=(225, 225, 225))
        d.text((4, y - 6), f"1e{e}", fill="black")
    first = 0
    for stage, values in losses.items():
        d.line([xy(first + i, v) for i, v in enumerate(values)], fill=(190, 190, 190))
        mean = [sum(values[max(0, i - 24):i + 1]) / len(values[max(0, i - 24):i + 1]) for i in range(len(values))]
        d.line([xy(first + i, v) for i, v in enumerate(mean)], fill=(30, 70, 230), width=2)
        x = xy(first, 1)[0]
        d.line((x, T, x, H - B), fill=(120, 120, 120))
        d.text((x + 4, T + 4), f"{stage} ({len(values)})", fill="black")
        first += len(values)
    d.rectangle((L, T, W - R, H - B), outline="black")
    d.text((L, 8), title, fill="black")
    d.text(((W - 160) // 2, H - 18), "training step, stage after stage", fill="black")
    img.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def cmd_train(a):
    from . import train as T
    import torch
    precision = a.precision
    if precision == "auto":  # bfloat16 autocast only where oneDNN has bfloat16 kernels: 11x slower without them
        from ..kernels import cpu
        precision = "bf16" if cpu.support().onednn_bf16 else "fp32"
    tc = T.TrainConfig(batch=a.batch, lr=a.lr, joint_lr=a.joint_lr, seed=a.seed, threads=a.threads,
                       precision=precision, vit_steps=a.vit_steps, text_steps=a.text_steps, questions=a.questions,
                       align_steps=a.align_steps, steps=a.steps, mix=tuple(a.mix), text_mix=tuple(a.text_mix),
                       vit_objective=a.vit_objective, vit_lr=a.vit_lr, vit_weight_decay=a.vit_weight_decay,
                       format_steps=a.format_steps, format_lr=a.format_lr, system_share=a.system_share,
                       init=a.init or "")
    if min(a.batch, a.threads, a.questions) < 1 or min(tc.stage_steps().values()) < 0 or not (
            0 < a.lr < 1 and 0 < a.joint_lr < 1 and 0 < a.format_lr < 1 and 0 <= a.system_share <= 1
            and 0 <= a.vit_lr < 1):
        raise MinidamroError("--batch, --threads and --questions must be >= 1, the steps >= 0, --lr, --joint-lr "
                             "and --format-lr in (0, 1), --system-share in [0, 1]")
    for flag, mix in (("--mix", a.mix), ("--text-mix", a.text_mix)):
        if not all(math.isfinite(x) and x >= 0 for x in mix) or abs(sum(mix) - 1) > 1e-6:
            raise MinidamroError(f"{flag} takes three shares >= 0 that sum to 1 (existence questions, captions, "
                                 "attributes)")
    if not sum(tc.stage_steps().values()):
        raise MinidamroError("every stage has 0 steps: nothing to train")
    if a.init and not os.path.isfile(os.path.join(a.init, "config.json")):
        raise MinidamroError(f"--init {a.init} is not a minidamro checkpoint")
    if a.init:
        from ..llava import read_config
        if read_config(a.init).text.quantization:  # its int8 weights are buffers: training could not change them
            raise MinidamroError(f"--init {a.init} is quantized: train from the float checkpoint it was "
                                 "converted from")
    outs = [a.out] + [f"{a.out}-after-{stage}" for stage in T.STAGES if a.save_stages]
    for out in outs:
        if os.path.exists(out) and not a.force:
            raise MinidamroError(f"{out} exists; pass --force to replace it")
    if a.precision == "auto":
        print(f"note: --precision auto: {precision} on this CPU (the shipped model was trained with bf16)",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as work:
        start = time.time()
        def save_stage(stage, model, tok_file):  # a checkpoint to resume from with --init
            T.save_checkpoint(model, tok_file, f"{a.out}-after-{stage}")
        model, tok, tok_file, losses = T.train(tc, work, after_stage=save_stage if a.save_stages else None)
        minutes = (time.time() - start) / 60
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
        T.save_checkpoint(model, tok_file, a.out, dtype, extra={"train": vars(tc) | {"minutes": round(minutes, 1)}})
    with open(os.path.join(a.out, "losses.json"), "w") as f:
        json.dump({k: [round(v, 5) for v in vs] for k, vs in losses.items()}, f)
    plot_losses(losses, os.path.join(a.out, "loss.png"),
                f"toy LLaVA training loss by stage (text: answers + probes; align: answers + regression), "
                f"batch {tc.batch}, {minutes:.1f} min")
    print(f"wrote {a.out} ({minutes:.1f} min)", file=sys.stderr)


def cmd_eval(a):
    from ..llava import load_model
    from ..tokenizer import Tokenizer
    from .. import damro
    from . import lab
    import torch
    torch.set_num_threads(a.threads)
    for name in a.methods:
        if name not in lab.METHODS:
            raise MinidamroError(f"--methods: unknown method {name} (have {', '.join(lab.METHODS)})")
    if not 1 <= a.images <= 10000 or not 0 <= a.captions <= a.images:
        raise MinidamroError("--images must be in 1..10000 and --captions in 0..images")
    if not (a.temperature == 0 or 1e-6 <= a.temperature < math.inf):
        raise MinidamroError(f"--temperature must be 0 (greedy) or a finite number >= 1e-6, got {a.temperature}")
    seeds = parse_seeds(a.seeds, 0) or [0]  # as eval's --seeds, counting from 0
    dcfg = damro.DamroConfig(a.alpha, a.beta, a.topk)
    model = load_model(a.model)
    dcfg.check(model.cfg.vision.num_patches)
    tok = Tokenizer(os.path.join(a.model, "tokenizer.model"), model.cfg.special_tokens)
    if len(seeds) == 1:
        result = lab.run(model, tok, a.seed, a.images, a.captions, a.methods, dcfg, temperature=a.temperature,
                         decode_seed=seeds[0])
        result["settings"]["model"] = a.model
        print(lab.table(result))
    else:
        result = lab.run_seeds(model, tok, a.seed, a.images, a.captions, a.methods, dcfg, seeds, a.temperature)
        result["mean"]["settings"]["model"] = a.model
        print(lab.table(result["mean"], result["std"]))
    if a.json:
        print(json.dumps(result, separators=(",", ":")))


def cmd_outliers(a):
    """The ViT outlier diagnostics (minidamro/outliers.py) of one or more checkpoints on the lab's scenes: a table,
    and with --out, outliers.json (per model: the summary and every image's numbers) and outliers.png."""
    from ..llava import load_model
    from .. import outliers
    from . import lab
    import torch
    torch.set_num_threads(a.threads)
    if not 1 <= a.images <= 10000 or a.topk < 1:
        raise MinidamroError("--images must be in 1..10000 and --topk >= 1")
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        raise MinidamroError(f"--out {a.out} exists and is not a directory")
    results = {}
    from . import splits, world
    for path in a.models:
        model = load_model(path)
        if (model.cfg.vision.image_size, model.cfg.vision.patch_size) != (world.SIZE, 14):
            raise MinidamroError(f"{path} is not a toy-world model ({world.SIZE} px, patch 14); for another "
                                 "checkpoint, python -m minidamro.analyze IMAGE writes the same diagnostics")
        name = os.path.basename(os.path.normpath(path))
        if name in results:
            raise MinidamroError(f"two models are named {name}: give them directories with different names")
        per_image = lab.vit_outliers(model, splits.lab_scenes(a.seed, a.images), a.topk)
        results[name] = {"model": path, "summary": outliers.summary(per_image), "images": per_image}
    print(outliers.table({n: r["summary"] for n, r in results.items()}))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_json_atomic(os.path.join(a.out, "outliers.json"), results)
        fig = outliers.figure({n: r["summary"] for n, r in results.items()},
                              f"ViT outliers on {a.images} lab scenes of seed {a.seed} (medians)")
        fig.save(os.path.join(a.out, "outliers.png.tmp"), format="PNG")
        os.replace(os.path.join(a.out, "outliers.png.tmp"), os.path.join(a.out, "outliers.png"))
        print(f"wrote {a.out}/outliers.json and outliers.png", file=sys.stderr)


def cmd_render(a):
    """Images of the world with their ground truth: DIR/toy-SEED-I.png and DIR/truth.jsonl; with --benchmarks
    the lab's pool of scenes (DIR/toy-SEED-IIII.png) and the benchmarks' files for them (benchmarks.py)."""
    import random
    from dataclasses import asdict
    from . import benchmarks, splits, world
    if not 1 <= a.count <= 10000:
        raise MinidamroError(f"--count must be in 1..10000, got {a.count}")
    if a.benchmarks and a.probe:
        raise MinidamroError("--benchmarks draws the lab's pool (half probe scenes); leave out --probe")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise MinidamroError(f"--out {a.out} exists and is not a directory")
    held = [d for d in ("pope", "chair", "mme") if os.path.exists(os.path.join(a.out, d))]
    if a.benchmarks and held:  # MME reads every task file in its folders: an older render's would join in
        raise MinidamroError(f"--out {a.out} already holds benchmark files ({', '.join(held)}/): use a new directory")
    os.makedirs(a.out, exist_ok=True)
    if a.benchmarks:
        scenes = splits.lab_scenes(a.seed, a.count)
        names = [f"toy-{a.seed}-{i:04d}.png" for i in range(a.count)]  # as the lab names them
    else:
        rng = random.Random(a.seed)
        scenes = [world.sample_scene(rng, probe=a.probe) for _ in range(a.count)]
        names = [f"toy-{a.seed}-{i}.png" for i in range(a.count)]
    lines = []
    for scene, name in zip(scenes, names):
        path = os.path.join(a.out, name)
        world.render(scene).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
        lines.append(json.dumps({"image": name, "caption": world.caption(scene),
                                 "objects": [asdict(o) | {"position": o.position} for o in scene.objects]}))
    benchmarks.write_text(os.path.join(a.out, "truth.jsonl"), "\n".join(lines) + "\n")
    if a.benchmarks:
        benchmarks.write(a.out, a.seed, scenes, names)
    print(f"wrote {a.count} images and truth.jsonl to {a.out}" +
          (" with pope/, chair/ and mme/ (the benchmarks' files)" if a.benchmarks else ""), file=sys.stderr)


def main(argv=None):
    p = Parser(prog="python -m minidamro.toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the toy model from scratch")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--force", action="store_true", help="replace --out if it exists")
    from .train import TrainConfig
    d = TrainConfig()
    t.add_argument("--vit-steps", type=int, default=d.vit_steps, help="stage 1: the ViT alone (0 skips a stage)")
    t.add_argument("--vit-objective", choices=("cls+patch", "cls", "global"), default=d.vit_objective,
                   help="stage 1's labels: [CLS] the kinds present and each patch its kind (default); [CLS] alone, "
                        "the kinds and their colours (cls); or that for [CLS] and every patch token (global)")
    t.add_argument("--vit-lr", type=float, default=d.vit_lr, help="stage 1's peak learning rate (0: --lr)")
    t.add_argument("--vit-weight-decay", type=float, default=d.vit_weight_decay,
                   help="stage 1's AdamW weight decay (negative: the other stages' 0.05)")
    t.add_argument("--text-steps", type=int, default=d.text_steps,
                   help="stage 2: the LLM alone, on the scenes written as words")
    t.add_argument("--questions", type=int, default=d.questions,
                   help="stage 2: questions per existence or attribute conversation")
    t.add_argument("--text-mix", type=float, nargs=3, default=list(d.text_mix), metavar=("EXIST", "CAPTION", "ATTR"),
                   help="stages 2 and 3: shares of existence questions, captions, attribute questions")
    t.add_argument("--align-steps", type=int, default=d.align_steps, help="stage 3: the projector alone")
    t.add_argument("--steps", type=int, default=d.steps, help="stage 4: the projector and the LLM on images")
    t.add_argument("--mix", type=float, nargs=3, default=list(d.mix), metavar=("EXIST", "CAPTION", "ATTR"),
                   help="stages 4 and 5: shares of existence questions, captions, attribute questions")
    t.add_argument("--format-steps", type=int, default=d.format_steps,
                   help="stage 5: stage 4 again, also in the benchmarks' question forms and system text")
    t.add_argument("--format-lr", type=float, default=d.format_lr, help="stage 5's peak learning rate")
    t.add_argument("--system-share", type=float, default=d.system_share,
                   help="stage 5: share of batches after the llava_v1 system text")
    t.add_argument("--batch", type=int, default=d.batch, help="scenes per step")
    t.add_argument("--lr", type=float, default=d.lr, help="stages 1-3's peak learning rate")
    t.add_argument("--joint-lr", type=float, default=d.joint_lr, help="stage 4's peak learning rate")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--threads", type=int, default=d.threads)
    t.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: matmuls under bfloat16 autocast (weights and optimizer float32), ~1.4x faster than "
                        "fp32 where the CPU has bfloat16 kernels (AVX-512 BF16, AMX) and ~11x slower where it has "
                        "not (AVX2 only); auto (default) picks bf16 where oneDNN has bfloat16 kernels, else fp32")
    t.add_argument("--init", default=None, help="start from this checkpoint instead of from scratch "
                   "(with the finished stages' steps set to 0, this resumes a run from a checkpoint)")
    t.add_argument("--save-stages", action="store_true", help="also save OUT-after-STAGE after each stage, to "
                   "resume from with --init (the scene stream restarts: not bitwise the uninterrupted run)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored weights")
    e = sub.add_parser("eval", help="the hallucination lab: POPE-style splits and captions, per decoding method")
    e.add_argument("--model", default=MODEL_DIR, help="checkpoint (default: the shipped toy model)")
    e.add_argument("--seed", type=int, default=2026, help="the lab's world seed (training used 0 and 1)")
    e.add_argument("--images", type=int, default=120, help="images in the pool (half are probe scenes)")
    e.add_argument("--captions", type=int, default=60, help="the first N images are also captioned")
    e.add_argument("--methods", nargs="+", default=None, help="decoding methods (default: all)")
    from .. import damro
    dd = damro.DamroConfig()
    e.add_argument("--alpha", type=float, default=dd.alpha)
    e.add_argument("--beta", type=float, default=dd.beta)
    e.add_argument("--topk", type=int, default=dd.topk)
    e.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, as the lab's tables")
    e.add_argument("--seeds", default=None, help="decoding seeds, separated by commas, or a count N (0 .. N - 1); "
                                                 "each seeds the sampler of every question and VCD's noise; several: "
                                                 "mean ± std (default: 0)")
    e.add_argument("--threads", type=int, default=1, help="torch threads (1: the model is too small to share)")
    e.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    o = sub.add_parser("outliers", help="ViT outlier-token diagnostics of checkpoints on the lab's scenes")
    o.add_argument("models", nargs="+", help="checkpoint directories")
    o.add_argument("--seed", type=int, default=2026, help="the lab's world seed")
    o.add_argument("--images", type=int, default=60)
    o.add_argument("--topk", type=int, default=4, help="k: DAMRO's outliers per image")
    o.add_argument("--out", default=None, help="directory for outliers.json and outliers.png")
    o.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("render", help="draw scenes of the world, with their ground truth")
    r.add_argument("--out", required=True, help="directory for the PNGs and truth.jsonl")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--count", type=int, default=8)
    r.add_argument("--probe", action="store_true", help="probe scenes: an anchor without its planted partner")
    r.add_argument("--benchmarks", action="store_true",
                   help="the lab's pool of scenes and, for them, POPE question files, a CHAIR image list with its "
                        "ground truth and vocabulary, and MME task folders, for python -m minidamro.eval")
    a = p.parse_args(argv)
    if a.cmd == "eval" and a.methods is None:
        from .lab import METHODS
        a.methods = list(METHODS)
    guarded({"train": cmd_train, "eval": cmd_eval, "render": cmd_render, "outliers": cmd_outliers}[a.cmd], a)


if __name__ == "__main__":
    main()
