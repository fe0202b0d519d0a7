"""benchmarks/pipeline_schedules.py: the replay that gives each schedule's theoretical bubble."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from pipeline_schedules import UNSPLIT_COSTS, single_stage_order, theoretical_bubble  # noqa: E402


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_1f1b_replay_gives_the_textbook_bubble(pp, m):
    order = single_stage_order("1f1b", pp, m)
    assert sorted(order[0]) == sorted([("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)])
    layers = [range(2 * s, 2 * s + 2) for s in range(pp)]
    assert theoretical_bubble(order, layers) == pytest.approx((pp - 1) / (m + pp - 1))


def test_split_backward_fills_the_wait_for_the_next_stage():
    # one microbatch, two single-layer stages; W of the last stage runs while the first waits for its gradient
    order = {0: [("F", 0, 0), ("I", 0, 0), ("W", 0, 0)], 1: [("F", 1, 0), ("I", 1, 0), ("W", 1, 0)]}
    layers = [range(0, 1), range(1, 2)]
    # split: rank 1 runs F 1-2, I 2-3, W 3-4; rank 0 runs F 0-1, I 3-4 (after rank 1's I), W 4-5 -> 3 of 5 busy
    assert theoretical_bubble(order, layers) == pytest.approx(1 - 3 / 5)
    # whole backward in I: rank 1 runs I 2-4, rank 0 runs I 4-6 -> 3 of 6 busy
    assert theoretical_bubble(order, layers, UNSPLIT_COSTS) == pytest.approx(1 - 3 / 6)


def test_a_deadlocking_order_is_an_error():
    order = {0: [("I", 0, 0), ("F", 0, 0)]}
    with pytest.raises(RuntimeError, match="deadlocks"):
        theoretical_bubble(order, [range(1)])
