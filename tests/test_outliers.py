"""The ViT outlier-token diagnostics (minidamro/outliers.py): against transformers' hidden states and attention,
by hand, and through `analyze` and `toy outliers`."""
import json
import os

import torch

import tiny
from minidamro import damro, outliers
from minidamro.analyze import main as analyze_main
from minidamro.capture import Capture
from minidamro.image import preprocess
from minidamro.llava import load_model
from minidamro.toy import MODEL_DIR
from minidamro.toy.__main__ import main as toy_main
from test_parity import noise_image

U = 2.0 ** -24  # float32's unit roundoff


def test_diagnostics_equal_the_same_numbers_from_transformers(hf_checkpoints, checkpoints):
    """norm_ratio from HF's hidden states, top_k_share and cls_self from HF's eager attention (mean of heads).

    Bounds: each patch norm of ours is within the measured relative deviation delta of HF's (both float32),
    so the max and the median (order statistics) are each within delta, and their ratio within 2 delta (+ 4 u
    for the division and norm roundings). The top-k share is a sum of k attention probabilities, each within
    the measured max deviation d of HF's row: within k d (+ 4 u)."""
    name = "mha"
    hf, model = tiny.hf_model(hf_checkpoints[name]), load_model(checkpoints[name])
    pixels = preprocess(noise_image(40, 33, seed=5), model.cfg.preprocessor)
    k = 3
    got = outliers.diagnose(model, pixels, k, mode="heads")
    layer = damro.selection_layer(model)
    with torch.no_grad():
        out = hf.model.vision_tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    ours = []
    model.encode_image(pixels, Capture(vit_layers=tuple(range(layer + 1))), hidden_states=ours)
    assert len(got["norm_ratio"]) == len(ours)
    for i, h in enumerate(ours):
        mine, theirs = h[0, 1:].norm(dim=-1), out.hidden_states[i][0, 1:].norm(dim=-1)
        delta = float(((mine - theirs).abs() / theirs).max())
        want = float(theirs.max() / theirs.median())
        assert abs(got["norm_ratio"][i] - want) <= want * (2 * delta + 4 * U), (i, got["norm_ratio"][i], want)
    row = out.attentions[layer][0, :, 0].mean(0)  # HF: (heads, 1 + N) [CLS] rows, mean over heads
    cap = Capture(vit_layers=(layer,))
    model.encode_image(pixels, cap)
    mine = damro.cls_attention(cap, layer, "heads")
    d = float((mine - row).abs().max())
    top = row[1:].topk(k)
    assert abs(got["top_k_share"] - float(top.values.sum())) <= k * d + 4 * U
    assert abs(got["cls_self"] - float(row[0])) <= d + 2 * U
    assert got["top_k"] == damro.select_outliers(mine, k).tolist()  # DAMRO's own selection, as DAMRO makes it
    for i, h in enumerate(ours):  # patches at >= 3x the median norm, counted from the same norms
        n = h[0, 1:].norm(dim=-1)
        assert got["high_norm"][i] == int((n / n.median() >= outliers.HIGH_NORM).sum())
    assert [float(row[1:][j]) for j in got["top_k"]] == sorted(
        (float(row[1:][j]) for j in got["top_k"]), reverse=True)


def test_the_criterion_and_the_summary_by_hand():
    a = {"selection_layer": 2, "k": 2, "norm_ratio": [1.0, 4.0, 6.0], "top_k": [5, 9], "top_k_norm_ratio": [6.0, 3.0],
         "top_k_share": 0.6, "cls_self": 0.1, "top_k_background": 1.0, "high_norm": [0, 1, 2],
         "high_norm_background": [0, 1, 1]}
    b = dict(a, top_k_norm_ratio=[6.0, 2.9], norm_ratio=[1.0, 2.0, 2.0], top_k_share=0.7, top_k_background=0.5)
    c = dict(a, top_k_share=0.49, cls_self=0.3)
    assert [outliers.has_outliers(x) for x in (a, b, c)] == [True, False, False]
    s = outliers.summary([a, b, c])
    assert s["with_outliers"] == 1 / 3 and s["norm_ratio"] == [1.0, 4.0, 6.0] and s["top_k_share"] == 0.6
    assert s["top_k_norm_ratio_min"] == 3.0 and s["cls_self"] == 0.1 and s["top_k_background"] == 2.5 / 3
    assert s["high_norm"] == [0, 3, 6] and s["high_norm_background"] == [0, 3, 3]
    assert "with" in outliers.table({"m": s}).splitlines()[0]


def test_analyze_and_toy_outliers_write_the_diagnostics(checkpoints, tmp_path, capsys):
    out = tmp_path / "a"
    analyze_main([os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "toy-1.png"), "--model",
                  checkpoints["mha"], "--out", str(out), "--max-new-tokens", "3", "--topk", "3"])
    js = json.loads((out / "analysis.json").read_text())
    assert js["outlier_diagnostics"]["top_k"] == js["outliers"] and js["outlier_diagnostics"]["k"] == 3
    assert (out / "vit_outliers.png").stat().st_size > 1000
    capsys.readouterr()
    toy_main(["outliers", MODEL_DIR, "--images", "6", "--out", str(tmp_path / "o")])
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "outliers.json").read_text())
    s = res["model"]["summary"]
    assert s["images"] == 6 and s["k"] == 4 and len(res["model"]["images"]) == 6
    assert text.splitlines()[1].split()[0] == "model" and (tmp_path / "o" / "outliers.png").is_file()
    # the shipped toy ViT: no outliers; its [CLS] reads background patches (docs/toy.md)
    assert s["with_outliers"] == 0 and s["top_k_background"] >= 0.75
