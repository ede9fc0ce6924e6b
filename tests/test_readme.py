"""Every command in the README runs as written, so the front door cannot rot.

The commands are read from README.md itself: each line of a code block and each inline `python ...` span
outside tables. Those that need what a fresh clone lacks (a real checkpoint or data set, or the 7B benchmark's
28 GB: each line that names `checkpoints/`, `/path/to/`, `hf download`, `runs/` or `--size 7b`, and the lines
after an `export MINIDAMRO_MODEL` in its block), that install packages (CI does) or
that run this suite are listed, not run. The rest run with bash, exactly as written, in a fresh copy of the
repository's tracked files (so outputs such as `--out analysis/` land there) against the shipped toy model,
and must exit 0 with no traceback and no warning on stderr. The long ones (training, the lab, the benchmarks:
minutes each; an evaluation over several seeds) are marked `long` and run only with MINIDAMRO_LONG_TESTS=1.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_REAL = ("checkpoints/", "/path/to/", "hf download", "runs/", "--size 7b")  # --size 7b: 28 GB, 14+ GiB
LONG = ("minidamro.toy train", "minidamro.toy eval", "minidamro.bench", "--seeds", "toyeval/")


def readme_commands() -> list[tuple[str, str]]:
    """(command, kind) for every command in the README; kind: quick, long, real (needs a checkpoint or data
    set), setup (installs packages) or suite (runs the tests)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        real = False  # an `export MINIDAMRO_MODEL=...` makes the block's later lines use a real checkpoint
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                real = real or line.startswith("export ")
                out.append((line, "real" if real or any(m in line for m in NEEDS_REAL) else kind(line)))
    prose = "\n".join(line for line in re.sub(r"```.*?```", "", text, flags=re.S).splitlines()
                      if not line.startswith("|"))  # tables name modules; the commands are in the text
    for span in re.findall(r"`(python [^`]+)`", prose):
        out.append((span, "real" if any(m in span for m in NEEDS_REAL) else kind(span)))
    return list(dict.fromkeys(out))


def kind(command: str) -> str:
    if command.startswith("pip "):
        return "setup"
    if "pytest" in command:
        return "suite"
    return "long" if any(marker in command for marker in LONG) else "quick"


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_each_kind():
    kinds = {k for _, k in COMMANDS}
    assert {"quick", "long", "real", "setup", "suite"} <= kinds, kinds
    assert "python -m minidamro.generate docs/toy-1.png --compare" in [c for c, _ in COMMANDS]


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The repository's files as a fresh clone of them would have them (tracked, and new ones not ignored), and a
    `python` that is this interpreter."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(root, name))
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    # A wrapper, not a symlink: a symlinked virtualenv interpreter would lose its environment.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return root


def run_as_written(command: str, root) -> None:
    env = os.environ | {"PATH": f"{root / '.bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MINIDAMRO_MODEL", None)  # as a newcomer has it: the toy model
    p = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, f"{command}: exit {p.returncode}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr and "warning" not in p.stderr.lower(), f"{command}:\n{p.stderr[-2000:]}"


@pytest.mark.parametrize("command", [c for c, k in COMMANDS if k == "quick"])
def test_a_quick_readme_command_runs_as_written(command, fresh_copy):
    run_as_written(command, fresh_copy)


@pytest.mark.skipif(os.environ.get("MINIDAMRO_LONG_TESTS") != "1", reason="minutes each: MINIDAMRO_LONG_TESTS=1")
@pytest.mark.parametrize("command", [c for c, k in COMMANDS if k == "long"])
def test_a_long_readme_command_runs_as_written(command, fresh_copy):
    run_as_written(command, fresh_copy)
