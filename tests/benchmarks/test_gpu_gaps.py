"""benchmarks/gpu_gaps.py on a hand-made trace: steps between marker kernels, the first one left out."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu_gaps import MARKER, gap_report  # noqa: E402


def _kernel(name, ts, dur, corr=None):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_steady_steps_between_markers():
    events = [
        _kernel(MARKER, 0, 1),
        _kernel("warm", 500, 100),  # step 1, after a long host wait: left out
        _kernel(MARKER, 601, 1),
        _kernel("a", 602, 100),
        _kernel("b", 702, 50),  # back to back
        _kernel(MARKER, 752, 1),
        _kernel("a", 753, 100),
        _kernel("b", 893, 50, corr=7),  # 40 us idle before it
        _kernel(MARKER, 943, 1),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 880, "dur": 5, "tid": 1,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 870, "dur": 20, "tid": 1, "args": {}},
    ]
    report = gap_report(events, steps=99)
    # two steady steps: 602 -> 943 span, 300 busy, 40 us idle and 1 us where the marker ran
    assert report.startswith("GPU span 0.17 ms per step, busy 0.15 ms, idle 0.02 ms in 2 gaps (1 of 5 us or more)")
    assert "| 40 | a | b | 13 | aten::mm |" in report


def test_without_markers_divides_by_steps():
    events = [_kernel("a", 0, 100), _kernel("b", 150, 50)]
    report = gap_report(events, steps=2)
    assert report.startswith("GPU span 0.10 ms per step, busy 0.07 ms, idle 0.03 ms in 1 gaps")
