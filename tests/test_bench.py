"""The benchmark's streamed 7B-shaped checkpoint has llava-1.5-7b-hf's layout: the keys and shapes transformers
builds from the same config.json, and a config that weights_convert.py accepts."""
import os
import subprocess
import sys

import pytest
import torch

import weights_convert
from minidamro.bench import llava7b
from minidamro.llava import Llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minidamro_name(key: str) -> str:
    return next(to + key[len(p):] for p, to in weights_convert.PREFIXES if key.startswith(p))


def test_7b_layout_matches_transformers_and_converts():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    hf = llava7b.hf_config(image_token=32000)
    shapes = llava7b.hf_shapes()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(**hf))
    expected = {minidamro_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert {minidamro_name(k): tuple(v) for k, v in shapes.items()} == expected
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 7_063_427_072  # llava-1.5-7b-hf's count

    cfg = weights_convert.build_config(hf, "config.json")
    with torch.device("meta"):
        ours = Llava(cfg).state_dict()
    # minidamro builds the ViT up to its feature layer (-2): the last layer and post_layernorm are dropped
    kept = {k: v for k, v in expected.items() if ".layers.23." not in k and "post_layernorm" not in k
            or k.startswith("language_model.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == kept


def test_7b_random_tensors_are_finite_and_typed():
    for name, shape in (("x.input_layernorm.weight", (8,)), ("x.mlp.fc1.bias", (8,)), ("x.q_proj.weight", (8, 4))):
        t = llava7b.random_tensor(name, shape, seed=1)
        assert t.shape == shape and torch.isfinite(t).all()
    assert torch.equal(llava7b.random_tensor("a.layer_norm1.weight", (3,), 0), torch.ones(3))
    assert torch.equal(llava7b.random_tensor("a.k_proj.weight", (3, 2), 5), llava7b.random_tensor("b", (3, 2), 5))


def test_instructblip_7b_layout_matches_transformers_and_converts():
    """The streamed InstructBLIP builder's keys and shapes are transformers' for its config.json, every one of them
    lands in minidamro's model (no ViT layer is dropped: the Q-Former reads the last), and the LLM is Vicuna-7B with
    the 32002-row vocabulary of the updated hub config."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    from minidamro.bench import instructblip
    from minidamro.instructblip import InstructBlip
    spec = instructblip.SPEC["7b"]
    hf, shapes = instructblip.hf_config(spec, "bfloat16"), instructblip.hf_shapes(spec)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(**hf))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v) for k, v in shapes.items()} == expected
    # Vicuna-7B is LLaMA-7B's 6,738,415,616 parameters with two more rows in embed_tokens and lm_head
    assert sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("language_model.")) == \
        6_738_415_616 + 2 * 2 * 4096
    cfg = weights_convert.build_config(hf, "config.json")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in InstructBlip(cfg).state_dict().items()}
    assert ours == {minidamro_name(k) if k.startswith("language_model") else k: v for k, v in expected.items()}


@pytest.mark.parametrize("module", ["minidamro.bench", "minidamro.bench.next", "minidamro.bench.reuse",
                                    "minidamro.bench.instructblip"])
def test_each_benchmark_command_starts(module):
    """The benchmarks take minutes and are not run here; each command at least imports and parses its options."""
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and f"python -m {module}" in p.stdout and not p.stderr, p.stderr
