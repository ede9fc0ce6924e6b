"""Measured kernel choices: made once per machine, kept in a small cache file, and a reference mode.

The fastest exact formulation of a linear layer or of attention depends on the CPU, the BLAS, the dtype, the
shapes and the thread count (see linear.py, attention.py), so kernels/ times the candidates once and keeps the
fastest. Timed afresh in every process, close calls flip and two runs of one command could round differently
and run at different speeds. So, like FFTW's wisdom or inductor's autotuning cache, every decision is written
to a per-machine cache file, and every later process on that machine makes the same ones:

    $MINIDAMRO_CHOICES, default ~/.cache/minidamro/choices.json ($XDG_CACHE_HOME respected)

The file holds one entry per machine key (CPU model, a hash of its feature flags, the torch version, the
simulated CPU profile, ATen's vector path and any ISA limit set in the environment); each decision's own key
names the thread count. A decision is read, measured and written under a lock on a sidecar file, so processes
started together (torchrun shards) measure it once and agree. A missing, unreadable, corrupt or
stale (other format) file is measured anew and rewritten, never an error; the file is replaced atomically
(written to a temporary name, then renamed), so a reader never sees half of it. Delete it to measure again.

MINIDAMRO_REFERENCE=1 is the reference mode: nothing is measured, read or written; every linear layer is
F.linear on its own weight (no packed copy, no other formulation, no float32 GEMM for half-precision weights)
and attention is SDPA unless MINIDAMRO_ATTENTION forces the eager form: exactly transformers' operations, for
bit-for-bit comparison with Hugging Face in the same dtype and for anyone who wants the slow, obvious path.
"""
import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager

import torch

from .. import MinidamroError
from . import cpu

CACHE_ENV = "MINIDAMRO_CHOICES"
REFERENCE_ENV = "MINIDAMRO_REFERENCE"
FORMAT = 1

_made: dict = {}    # this process's decisions, key string -> value (a formulation's name or a bool)
_fast: dict = {}    # the same, by (key tuple, threads): the decode loop's lookup
_loaded: dict | None = None  # the cache file's decisions for this machine, read once per process
_unavailable: dict = {}  # candidate -> the error it raised while being measured (kept out of the choice)


def reference() -> bool:
    value = os.environ.get(REFERENCE_ENV, "0")
    if value not in ("0", "1", ""):
        raise MinidamroError(f"{REFERENCE_ENV}={value!r}: must be 1 (reference mode) or 0")
    return value == "1"


def path() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "minidamro", "choices.json")


def machine() -> dict:
    """What makes two processes the same machine for these choices (the thread count is in each decision's key)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.strip()
    except OSError:
        pass
    isa = [os.environ.get(v, "") for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")]
    return {"cpu": model, "flags": hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
            "torch": torch.__version__, "profile": cpu.profile(), "isa": "/".join([cpu.support().capability, *isa])}


def machine_key() -> str:
    m = machine()
    return f"{m['cpu']} | flags {m['flags']} | torch {m['torch']} | {m['profile']} | {m['isa']}"


def _read() -> dict:
    """The whole file, or an empty one if it is missing, unreadable, corrupt or of another format."""
    try:
        with open(path()) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("machines"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"format": FORMAT, "machines": {}}


def _write(key: str, value):
    """Add one decision to the file: read it again (another process may have added some), then replace it."""
    data = _read()
    entry = data["machines"].setdefault(machine_key(), {})
    if not isinstance(entry, dict):
        entry = data["machines"][machine_key()] = {}
    entry[key] = value
    target = os.path.abspath(path())
    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".choices-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; this file may be shared by a machine's users
        os.replace(tmp, target)
        tmp = None
    except OSError:  # a read-only home: the decision holds for this process, and is measured again next time
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


@contextmanager
def _locked():
    """Hold an exclusive lock on the cache file's sidecar while a decision is read, measured and written, so that
    processes started together (torchrun shards) measure it once and all make the same choice."""
    try:
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(path())), exist_ok=True)
        f = open(path() + ".lock", "a")
    except (ImportError, OSError):  # no POSIX locks, or nowhere to write: unlocked
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def decide(key: tuple, measure, allowed=(True, False)):
    """The decision for `key` (a tuple of str / int / dtype; the thread count is added): this process's, else
    the cache file's for this machine, else measure() -> one of `allowed` (a formulation's name, or a bool;
    or a function giving them, called only then), kept. A cached value that is not one of `allowed` (a
    hand-edited file, a formulation renamed since) counts as missing: it is measured again and rewritten.

    Called for every linear layer and attention of every decode step, so a decision made is one dict lookup
    on the key tuple (the string key, the file and `allowed` are only for the first call)."""
    fast = (key, torch.get_num_threads())
    if fast in _fast:
        return _fast[fast]
    k = " ".join(map(str, (*key, f"threads={fast[1]}")))
    allowed = allowed() if callable(allowed) else allowed

    def valid(v):
        return isinstance(v, (str, bool)) and any(v is a or (isinstance(a, str) and v == a) for a in allowed)
    if k not in _made:
        global _loaded
        if _loaded is None:
            entry = _read()["machines"].get(machine_key(), {})
            _loaded = entry if isinstance(entry, dict) else {}
        if valid(_loaded.get(k)):
            _made[k] = _loaded[k]
        else:
            with _locked():  # another process may have decided it since this one read the file
                entry = _read()["machines"].get(machine_key(), {})
                if isinstance(entry, dict) and valid(entry.get(k)):
                    _made[k] = entry[k]
                else:
                    _made[k] = measure()
                    _write(k, _made[k])
    _fast[fast] = _made[k]
    return _made[k]


def chosen() -> dict:
    """This process's decisions so far, key -> value (the benchmark records them)."""
    return dict(_made)


def unavailable() -> dict:
    """Candidates that raised while being measured, and what they raised (kept out of every choice)."""
    return dict(_unavailable)


def forget():
    """Drop this process's decisions and the file's that were read (the tests, after changing the file)."""
    global _loaded
    _made.clear()
    _fast.clear()
    _unavailable.clear()
    _loaded = None


def fastest(times: dict) -> str:
    """The fastest candidate of {name: seconds}, among those that ran (an unavailable one is missing)."""
    return min(times, key=times.get)


def timed_candidates(names, run) -> dict:
    """{name: run(name)} for each name whose run does not raise: a candidate that fails on this CPU or build
    while being measured is marked unavailable (recorded, with its error) instead of failing the load."""
    out = {}
    for name in names:
        try:
            out[name] = run(name)
        except RuntimeError as e:
            mark_unavailable(name, e)
    return out


def mark_unavailable(name: str, error: Exception):
    _unavailable[name] = str(error).splitlines()[0] if str(error) else type(error).__name__
