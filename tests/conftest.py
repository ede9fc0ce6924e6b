import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402
import torch  # noqa: E402

# Kernel decisions go to a cache file of this run's own (minidamro/kernels/choices.py), never the user's, and
# every subprocess a test starts shares it.
os.environ["MINIDAMRO_CHOICES"] = os.path.join(tempfile.mkdtemp(prefix="minidamro-test-choices-"), "choices.json")

# The test models are tiny: one thread is fastest, and several threads spin badly on a busy 2-core machine.
# MINIDAMRO_TEST_THREADS=n runs the suite on n threads instead (the float bounds must hold on any count).
torch.set_num_threads(int(os.environ.get("MINIDAMRO_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    return tiny.train_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory, tokenizer_model):
    """name -> directory of a tiny random llava-hf style checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    return {name: tiny.build_hf_checkpoint(name, str(root / name), tokenizer_model, seed=i)
            for i, name in enumerate(tiny.CONFIGS)}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, hf_checkpoints):
    """name -> directory of the same checkpoint converted by weights_convert.py (float32)."""
    import weights_convert
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, src in hf_checkpoints.items():
        out[name] = str(root / name)
        weights_convert.convert(src, out[name])
    return out


@pytest.fixture(scope="session")
def next_hf_checkpoints(tmp_path_factory, tokenizer_model):
    """name -> directory of a tiny random llava-hf style LLaVA-NeXT checkpoint."""
    root = tmp_path_factory.mktemp("hf_next")
    return {name: tiny.build_hf_checkpoint(name, str(root / name), tokenizer_model, seed=10 + i)
            for i, name in enumerate(tiny.NEXT_CONFIGS)}


@pytest.fixture(scope="session")
def next_checkpoints(tmp_path_factory, next_hf_checkpoints):
    """name -> the same NeXT checkpoint converted by weights_convert.py (float32)."""
    import weights_convert
    root = tmp_path_factory.mktemp("converted_next")
    out = {}
    for name, src in next_hf_checkpoints.items():
        out[name] = str(root / name)
        weights_convert.convert(src, out[name])
    return out


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """No kernel decisions yet, in this process or in the cache file (a new one in tmp_path)."""
    from minidamro.kernels import choices
    monkeypatch.setenv(choices.CACHE_ENV, str(tmp_path / "choices.json"))
    choices.forget()
    yield tmp_path / "choices.json"
    choices.forget()


@pytest.fixture(scope="session")
def blip_hf_checkpoints(tmp_path_factory, tokenizer_model):
    """name -> directory of a tiny random InstructBLIP checkpoint in the hub layout (tests/tiny_blip.py)."""
    import tiny_blip
    root = tmp_path_factory.mktemp("hf_blip")
    return {name: tiny_blip.build_hf_checkpoint(name, str(root / name), tokenizer_model, seed=20 + i)
            for i, name in enumerate(tiny_blip.CONFIGS)}


@pytest.fixture(scope="session")
def blip_checkpoints(tmp_path_factory, blip_hf_checkpoints):
    """name -> the same InstructBLIP checkpoint converted by weights_convert.py (float32)."""
    import weights_convert
    root = tmp_path_factory.mktemp("converted_blip")
    out = {}
    for name, src in blip_hf_checkpoints.items():
        out[name] = str(root / name)
        weights_convert.convert(src, out[name])
    return out
