"""A run directory that never loses work: settings, answers appended line by line, resume, shards, progress.

RUN_DIR/run.json        the settings every answer was made with (written once; a different command is refused)
RUN_DIR/answers.jsonl   one JSON line per question, flushed as it is produced (answers.K-of-N.jsonl per shard)
RUN_DIR/metrics.json    written (atomically) when every question of every shard has an answer
"""
import json
import os
import sys
import time

from .. import MinidamroError


def write_json_atomic(path: str, obj, indent=None):
    """Write to a temporary name in the same directory, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def shard_spec(text: str | None) -> tuple[int, int]:
    """--shard K/N, else torchrun's RANK / WORLD_SIZE, else 0/1."""
    if text is None:
        env = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if env[0] is None or env[1] is None:
            return 0, 1
        text = f"{env[0]}/{env[1]}"
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MinidamroError(f"--shard must be K/N (e.g. 0/4), got {text}") from None
    if not 0 <= k < n:
        raise MinidamroError(f"--shard K/N needs 0 <= K < N, got {text}")
    return k, n


def parse_seeds(text: str | None, seed: int) -> list[int] | None:
    """--seeds 42,43,44, or a count N: --seed, --seed + 1, ..., --seed + N - 1. None: one run, --seed."""
    if text is None:
        return None
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]  # "42," is a list of one seed; "42" a count
    except ValueError:
        raise MinidamroError(f"--seeds takes seeds separated by commas or a count, got {text}") from None
    seeds = parts if "," in text else list(range(seed, seed + parts[0])) if parts else []
    if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= x < 2**63 for x in seeds):
        raise MinidamroError(f"--seeds: give distinct seeds in [0, 2^63) or a count >= 1, got {text}")
    return seeds


def answers_name(k: int, n: int) -> str:
    return "answers.jsonl" if n == 1 else f"answers.{k}-of-{n}.jsonl"


def check_settings(out: str, settings: dict, absent: dict | None = None):
    """Record the settings on a fresh directory; refuse different ones naming the first difference.
    absent: settings that runs made by older versions did not record, with the value they then had."""
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        write_json_atomic(path, settings, indent=1)
        return
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise MinidamroError(f"cannot read {path}: {e}") from None
    old = {**(absent or {}), **old}
    for key in list(settings) + [k for k in old if k not in settings]:  # the first difference in the run's order
        if old.get(key) != settings.get(key):
            raise MinidamroError(f"{out} holds a run with {key} = {json.dumps(old.get(key))}, this command has "
                                 f"{key} = {json.dumps(settings.get(key))}: use another --out to change settings")


def read_answers(path: str, repair: bool = False) -> list[dict]:
    """The complete lines of an answers file. A torn last line (a killed run: no final newline, or not JSON)
    is dropped, and with `repair` cut off the file so appending continues after the last complete answer.
    A bad line anywhere else is an error: that file was not written by an interrupted run."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        try:
            obj = json.loads(line) if end >= 0 else None
            if not isinstance(obj, dict) or "id" not in obj:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            if end >= 0 and data[end + 1:].strip():
                raise MinidamroError(f"{path}: line {len(out) + 1} is not an answer line (not a torn last line)") \
                    from None
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(pos)
                print(f"warning: {path}: dropped a torn last line ({len(line)} bytes)", file=sys.stderr)
            break
        out.append(obj)
        pos = end + 1
    return out


def merged_answers(out: str) -> list[dict]:
    """Every shard's answers, one per id (an answer beats a 'skipped' record; two different answers for one
    id, e.g. from shards run with different N, are an error)."""
    files = sorted(f for f in os.listdir(out) if f.startswith("answers") and f.endswith(".jsonl"))
    by_id = {}
    for name in files:
        for obj in read_answers(os.path.join(out, name)):
            old = by_id.get(obj["id"])
            if old is None or "skipped" in old:
                by_id[obj["id"]] = obj
            elif "skipped" not in obj and old.get("token_ids") != obj.get("token_ids"):
                raise MinidamroError(f"{out}: two different answers for {obj['id']} ({name} and another shard)")
    return list(by_id.values())


class Progress:
    """One line on stderr: done / total, answers per second (this process), time left."""

    def __init__(self, total: int, done: int, label: str, every: float = 2.0):
        self.total, self.done, self.label, self.every = total, done, label, every
        self.start, self.new, self.last = time.monotonic(), 0, 0.0
        self.tty = sys.stderr.isatty()

    def step(self, final: bool = False):
        now = time.monotonic()
        if not final:
            self.done += 1
            self.new += 1
        if not final and now - self.last < self.every:
            return
        self.last = now
        rate = self.new / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 \
            else f"{left / 86400:.1f} days"
        line = f"{self.label}: {self.done}/{self.total} answers, {rate:.2f} answers/s, {eta} left"
        print(("\r" + line + ("\n" if final else "")) if self.tty else line, file=sys.stderr, end="", flush=True)
        if not self.tty:
            print(file=sys.stderr, flush=True)
