"""The decoding methods by name, for the commands (generate, analyze, eval): each is a `contrastive.Method`.

A new method of the contrastive family is a config dataclass, a check, a `prepare` that builds each
stream's image features, and a rule (usually DAMRO's Eq. 5-6, `damro.rule`); add it here to offer it everywhere.
"""
from dataclasses import asdict, fields

from . import MinidamroError, damro, vcd
from .contrastive import PLAIN, Method

METHODS: dict[str, Method] = {m.name: m for m in (PLAIN, damro.METHOD, vcd.METHOD)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise MinidamroError(f"--method must be one of {', '.join(METHODS)}, got {name}")
    return METHODS[name]


def make_config(method: Method, model_type: str = "llava", **settings):
    """The method's config from the settings it has a field for; the others, and None values, are ignored
    (so one set of command-line options serves every method, each keeping its own defaults, and those of the
    model type: DAMRO on InstructBLIP selects by the mean over heads, as the release does)."""
    names = {f.name for f in fields(method.config)}
    base = method.defaults(model_type) if method.defaults else {}
    return method.config(**(base | {k: v for k, v in settings.items() if k in names and v is not None}))


def settings(cfg) -> dict:
    """A method config's settings as recorded (run.json, --json, analysis.json): those that apply to the model. A
    None is a setting another model type has (DAMRO's gather is InstructBLIP's), so it is left out, and runs made
    before it existed record the same settings."""
    return {k: v for k, v in asdict(cfg).items() if v is not None}
