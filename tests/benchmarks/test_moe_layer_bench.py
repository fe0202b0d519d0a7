"""benchmarks/moe_layer.py: the paired rounds (alternating rows, median of per-round ratios) and a tiny CPU run."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import moe_layer  # noqa: E402


def test_paired_rounds_alternate_and_take_the_median_of_per_round_ratios(monkeypatch, seed):
    """Scripted times: the order of calls alternates row by row, and the ratio is the median of the rounds' ratios
    (drawn until the ratio of the medians prints differently, so that computing that instead fails)."""
    while True:
        base = (torch.rand(5) * 5 + 5).tolist()
        layer = (torch.rand(5) * 5 + 5).tolist()
        ratio_of_medians = sorted(base)[2] / sorted(layer)[2]
        if f"{ratio_of_medians:.1%}" != f"{sorted(b / m for b, m in zip(base, layer))[2]:.1%}":
            break
    calls, scripted = [], {"dense": iter(base), "layer": iter(layer)}

    def fake_timeit(fn, warmup, iters, device, repeats=5):
        assert (warmup, iters, repeats) == (1, 7, 1)
        return next(scripted[fn()])

    monkeypatch.setattr(moe_layer, "timeit", fake_timeit)

    def step(name):
        def run():
            calls.append(name)
            return name
        return run

    results, table = moe_layer.paired_rounds({"dense": step("dense"), "layer": step("layer")}, 5, 7,
                                             torch.device("cpu"))
    assert calls == ["dense", "layer"] * 5
    assert [r["layer"] for r in results] == layer
    ratios = sorted(b / m for b, m in zip(base, layer))
    row = next(line for line in table.splitlines() if line.startswith("| layer |"))
    assert f"| {ratios[2]:.1%} |" in row and f"{ratios[0]:.1%}-{ratios[-1]:.1%}" in row
    assert f"| {sorted(layer)[2]:.2f} |" in row


def test_paired_rounds_reject_what_cannot_be_paired():
    with pytest.raises(ValueError, match="two rows"):
        moe_layer.paired_rounds({"dense": lambda: None}, 3, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="one round"):
        moe_layer.paired_rounds({"a": lambda: None, "b": lambda: None}, 0, 1, torch.device("cpu"))


def test_tiny_cpu_run_pairs_the_dense_mlp_with_the_layer(tmp_path):
    out = tmp_path / "table.md"
    moe_layer.main(["--tokens", "64", "--dim", "32", "--ffn", "16", "--experts", "4", "--topk", "2", "--device", "cpu",
                    "--dtype", "float32", "--kernels", "grouped_mm", "--warmup", "1", "--iters", "1", "--paired", "2",
                    "--out", str(out)])
    text = out.read_text()
    assert "Paired rounds (2 x 1 calls per row" in text
    assert "| moe_layer[grouped_mm] |" in text.split("Paired rounds")[1]
