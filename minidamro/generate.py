"""python -m minidamro.generate IMAGE: answer about an image with LLaVA-1.5, -NeXT or InstructBLIP, plainly, with
DAMRO or VCD.

    python -m minidamro.generate photo.jpg --model checkpoints/llava-1.5-7b --prompt "What is in this image?"
    python -m minidamro.generate photo.jpg --method damro --alpha 2 --beta 0.1 --topk 10
    python -m minidamro.generate photo.jpg --method vcd --noise-step 500
    python -m minidamro.generate photo.jpg --compare          # plain, DAMRO and VCD, same seed
    python -m minidamro.generate photo.jpg --compare plain,vcd
    python -m minidamro.generate photo.jpg --model checkpoints/instructblip-vicuna-7b --method damro --topk 4

Text is streamed as it is generated. Any problem with the input is one `error:` line on stderr and a
non-zero exit (2 for a malformed command line, 1 otherwise).
"""
import argparse
import json
import math
import os
import random
import sys

import torch

from . import MinidamroError, contrastive, damro, generation, methods, vcd
from .anyres import model_pixels
from .image import load_image
from .llava import DTYPES, load_model, read_config
from .tokenizer import LLAVA_V1_SYSTEM, Tokenizer, instruction_ids, load_tokenizer, model_prompt_ids

NO_MODEL = ("no model: pass --model DIR or set MINIDAMRO_MODEL. To make one, download llava-hf/llava-1.5-7b-hf "
            "(e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir llava-1.5-7b-hf`) and run "
            "`python weights_convert.py llava-1.5-7b-hf checkpoints/llava-1.5-7b`")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def add_arguments(p: argparse.ArgumentParser, prompt: str | None, max_new_tokens: int):
    """The options generate and analyze share; with prompt None, all but the image and the prompt (eval's)."""
    if prompt is not None:
        p.add_argument("image", help="an image file (any format and mode Pillow reads)")
    p.add_argument("--model", default=os.environ.get("MINIDAMRO_MODEL"),
                   help="converted checkpoint directory (default: $MINIDAMRO_MODEL)")
    if prompt is not None:
        p.add_argument("--prompt", default=prompt)
    p.add_argument("--system", default=None,
                   help="text put before 'USER:' (InstructBLIP: before the raw prompt); 'llava_v1' is the llava_v1 "
                        "system text the DAMRO scripts use")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the one torch.Generator (default: random)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    p.add_argument("--pad-square", action="store_true",
                   help="pad the image to a square of the mean colour first, as the original LLaVA code does")
    p.add_argument("--method", choices=tuple(methods.METHODS), default="plain")
    d, v = damro.DamroConfig(), vcd.VcdConfig()
    p.add_argument("--alpha", type=float, default=None,
                   help=f"contrast strength (Eq. 5); default: the method's own (DAMRO {d.alpha:g}, VCD {v.alpha:g})")
    p.add_argument("--beta", type=float, default=None,
                   help=f"plausibility cutoff (Eq. 6); default: the method's own (DAMRO {d.beta:g}, VCD {v.beta:g})")
    p.add_argument("--topk", type=int, default=d.topk, help="DAMRO outlier tokens")
    p.add_argument("--outlier-attention", choices=damro.OUTLIER_ATTENTION, default=None,
                   help="full: the released code's full-width [CLS] q.k (LLaVA's default); heads: mean of per-head "
                        "attention (InstructBLIP's default, as its release)")
    p.add_argument("--gather", choices=damro.GATHER, default=None,
                   help="InstructBLIP: the ViT rows DAMRO's second stream reads: release (default: row j for patch "
                        "j, the release's off-by-one) or patches (the patches themselves)")
    p.add_argument("--noise-step", type=int, default=v.noise_step,
                   help=f"VCD diffusion step of the noised image, 0..{vcd.NUM_STEPS - 1} (default {v.noise_step})")


def method_config(a, name: str, model_type: str | None = None):
    """The named method's config from the command line: the options it has, its own defaults for the rest (those of
    the model type of --model, read from its config.json when not given)."""
    model_type = model_type or read_config(a.model).model_type
    return methods.make_config(methods.get(name), model_type, alpha=a.alpha, beta=a.beta, topk=a.topk,
                               outlier_attention=a.outlier_attention, gather=a.gather, noise_step=a.noise_step)


def compare_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in methods.METHODS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of distinct methods out of "
                                         f"{', '.join(methods.METHODS)}, got {text!r}")
    return names


def parse_args(argv=None):
    p = Parser(prog="python -m minidamro.generate", description=__doc__.split("\n")[0])
    add_arguments(p, prompt="What is in this image?", max_new_tokens=256)
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument("--compare", nargs="?", type=compare_list, const=list(methods.METHODS), default=None,
                   metavar="METHODS", help="run several methods one after the other with one seed: "
                   f"{','.join(methods.METHODS)} (the default) or a comma-separated list of them")
    p.add_argument("--two-forwards", action="store_true",
                   help="decode DAMRO's or VCD's two streams in two forward passes per token, as the released code "
                        "does: bit-identical to it, ~1.8x slower (the default batches them: equal up to float rounding)")
    return p.parse_args(argv)


def system_text(a) -> str | None:
    return LLAVA_V1_SYSTEM if a.system == "llava_v1" else a.system


def default_model(a):
    """Without --model and MINIDAMRO_MODEL, the toy model shipped in the package (minidamro/toy/model)."""
    from .toy import MODEL_DIR
    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        raise MinidamroError(NO_MODEL)
    print(f"note: no --model and no MINIDAMRO_MODEL: using the toy model shipped in {os.path.relpath(MODEL_DIR)} "
          "(a tiny LLaVA trained on the toy world of minidamro.toy, not LLaVA-1.5)", file=sys.stderr)
    a.model = MODEL_DIR


def check_options(a):
    if not a.model:
        default_model(a)
    if a.max_new_tokens < 1:
        raise MinidamroError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    if not (a.temperature == 0 or 1e-6 <= a.temperature < math.inf):
        raise MinidamroError(f"--temperature must be 0 (greedy) or a finite number >= 1e-6, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise MinidamroError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.seed is not None and not 0 <= a.seed < 2**63:
        raise MinidamroError(f"--seed must be in [0, 2**63), got {a.seed}")
    if "<image>" in a.prompt or "<image>" in (a.system or ""):
        raise MinidamroError("the prompt must not contain <image>: the template puts the one image in place")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise MinidamroError(f"unknown --device {a.device}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinidamroError("--device cuda asked for, but PyTorch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MinidamroError("--device mps asked for, but PyTorch sees no MPS device")
    if device.type not in ("cpu", "cuda", "mps"):
        raise MinidamroError(f"--device must be cpu, cuda or mps, got {a.device}")


def encode_prompt(model, tok: Tokenizer, prompt: str, system: str | None, max_new_tokens: int, image_size=None):
    """The prompt's ids (L,) on the model's device, `<image>` expanded, and how many tokens to generate:
    at most max_new_tokens, and no more than the context has room for (a prompt it cannot hold is an error).
    `image_size` (height, width) is the image's: LLaVA-NeXT's image-token count depends on it."""
    cfg = model.cfg
    ids = model_prompt_ids(tok, cfg, prompt, system, image_size)
    room = cfg.text.max_position_embeddings - len(ids)
    if room < 1:
        raise MinidamroError(f"the prompt takes {len(ids)} tokens; the model's context holds "
                             f"{cfg.text.max_position_embeddings}")
    return torch.tensor(ids, device=model.lm_head.weight.device), min(max_new_tokens, room)


def stream(tokens, tok: Tokenizer, out) -> list[int]:
    """Print the text of the tokens as they come. After each piece that is not a byte of a character, the
    new ids are decoded onto what is already shown (a byte run may still turn out invalid and become
    U+FFFDs, so it waits for its end): each id is decoded once, and the printed text is the final text."""
    ids, shown, done = [], "", 0  # ids[:done] are printed, as `shown`
    for t in tokens:
        ids.append(t)
        if not tok.closes_byte_run(t):
            continue
        new = tok.decode(ids[done:], strip_space=not shown)
        out.write(new)
        out.flush()
        shown, done = shown + new, len(ids)
    out.write(tok.decode(ids[done:], strip_space=not shown) + "\n")
    return ids


def run(a, out=None) -> dict:
    out = out or sys.stdout
    check_options(a)
    image = load_image(a.image)  # before the model: a bad path should not wait for gigabytes to load
    model = load_model(a.model, a.device, a.dtype)
    cfg = model.cfg
    tok = load_tokenizer(a.model, cfg)
    pixels, image_size = model_pixels(image, cfg, pad_to_square=a.pad_square)  # NeXT: tiles and the size
    system = system_text(a)
    ids, max_new = encode_prompt(model, tok, a.prompt, system, a.max_new_tokens, image_size)
    instruction = instruction_ids(tok, cfg, a.prompt, system)  # InstructBLIP's Q-Former reads the prompt too
    names = a.compare or [a.method]
    configs = {name: method_config(a, name, cfg.model_type) for name in names}
    for name, mcfg in configs.items():  # every setting is checked before any answer starts
        methods.get(name).check(model, mcfg)
    seed = a.seed if a.seed is not None else random.randrange(2**63)

    results = {}
    for name, mcfg in configs.items():
        sampler = generation.Sampler(a.temperature, a.top_p, seed, a.device)
        info, tokens = contrastive.generate(model, ids, pixels, methods.get(name), mcfg, sampler, max_new,
                                            batched=not a.two_forwards, image_size=image_size,
                                            instruction=instruction)
        result = {"method": name} | methods.settings(mcfg) | info
        if a.compare:
            shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ({} if name == "plain" else
                              {"alpha": mcfg.alpha, "beta": mcfg.beta} | info).items())
            out.write(f"[{name}{f' ({shown})' if shown else ''}]\n")
        token_ids = stream(tokens, tok, out)
        result |= {"text": tok.decode(token_ids), "token_ids": token_ids,
                   "stopped_at_eos": token_ids[-1] == cfg.text.eos_token_id}
        results[name] = result
    common = {"image": a.image, "prompt": a.prompt, "system": system, "seed": seed, "temperature": a.temperature,
              "top_p": a.top_p, "max_new_tokens": max_new, "model": a.model}
    obj = {**common, **results} if a.compare else {**common, **results[a.method]}
    if a.json:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return obj


def fail(message: str, code: int = 1):
    """The one line a user sees for bad input, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def guarded(work, *args):
    """Run a command's work, turning user errors (and out-of-memory and the like) into one line."""
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?" , not a crash
    try:
        return work(*args)
    except MinidamroError as e:
        fail(str(e))
    except MemoryError:
        fail("out of memory")
    except (RuntimeError, OSError) as e:
        fail(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv=None):
    guarded(run, parse_args(argv))


if __name__ == "__main__":
    main()
