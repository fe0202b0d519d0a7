"""benchmarks/wgrad_bench.py: variant parsing, and a clear refusal where there is no Hopper GPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import wgrad_bench  # noqa: E402


def test_variants_parse_to_keyword_dicts():
    assert wgrad_bench.parse_variants("bk=64,stages=3; bn=128 ,stages=4;") == [
        {"bk": 64, "stages": 3}, {"bn": 128, "stages": 4}]
    assert wgrad_bench.parse_variants("") == []
    with pytest.raises(ValueError, match="key=int"):
        wgrad_bench.parse_variants("bk")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0),
                    reason="runs the benchmark on a Hopper GPU")
def test_refuses_without_a_hopper_gpu(tmp_path):
    with pytest.raises(SystemExit, match="Hopper"):
        wgrad_bench.main(["--out", str(tmp_path / "t.md")])
    assert not (tmp_path / "t.md").exists()
