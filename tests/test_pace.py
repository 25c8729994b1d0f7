"""PaceWatch on synthetic log windows: which step-time jumps warn, and only once (no clock involved)."""

from __future__ import annotations

import pytest

from ibot.train.pace import JUMP, WAIT_GROWTH, PaceWatch


def _feed(windows: list[tuple[float, float]]) -> list[tuple[int, object]]:
    """(window index, jump) for each window that reported one; windows are (images/s, data-wait share)."""
    watch = PaceWatch()
    return [(i, jump) for i, (ips, share) in enumerate(windows) if (jump := watch.observe(ips, share)) is not None]


def test_two_slow_windows_without_more_wait_report_the_jump_once() -> None:
    steady = [(100.0, 0.05)] * 4
    slow = [(20.0, 0.05), (25.0, 0.06)] + [(10.0, 0.05)] * 5  # it gets worse still: no second report
    reports = _feed(steady + slow)
    assert [i for i, _ in reports] == [5]  # the second slow window
    jump = reports[0][1]
    assert jump.ratio == pytest.approx(4.0)  # the milder of the two: 1/25 s against 1/100 s per image
    assert jump.seconds_per_image_before == pytest.approx(0.01)
    assert jump.wait_share == pytest.approx(0.06)


def test_one_slow_window_is_not_a_jump() -> None:
    # A checkpoint written after a log line stretches the next window alone.
    assert _feed([(100.0, 0.0)] * 3 + [(10.0, 0.0)] + [(100.0, 0.0)] * 3 + [(10.0, 0.0), (100.0, 0.0)]) == []


def test_slow_windows_that_the_data_wait_explains_are_not_a_jump() -> None:
    grown = 0.05 + WAIT_GROWTH + 0.01
    assert _feed([(100.0, 0.05)] * 3 + [(20.0, grown), (20.0, 0.05)]) == []
    assert _feed([(100.0, 0.05)] * 3 + [(20.0, 0.05 + WAIT_GROWTH - 0.01)] * 2) != []  # grew, but not by enough


def test_the_threshold_and_the_earlier_windows() -> None:
    just_below = 100.0 / JUMP * 1.01
    assert _feed([(100.0, 0.0)] * 3 + [(just_below, 0.0)] * 4) == []
    assert _feed([(100.0, 0.0)] * 3 + [(100.0 / JUMP, 0.0)] * 2) != []
    assert _feed([(10.0, 0.0)] * 2) == []  # no earlier window to compare with
    # The earlier pace is their median: one fast outlier does not make the usual pace a jump.
    assert _feed([(100.0, 0.0), (1000.0, 0.0), (100.0, 0.0), (100.0, 0.0), (100.0, 0.0)]) == []
    assert _feed([(0.0, 0.0)] * 5) == []  # a window without images (all batches empty) is no pace


def test_the_message_names_the_remedy_for_the_device() -> None:
    watch = PaceWatch()
    jump = None
    for ips in (100.0, 100.0, 19.6, 19.6):
        jump = watch.observe(ips, 0.02) or jump
    assert jump is not None
    cpu = jump.message("cpu", 0)
    assert cpu.startswith("steps take 5.1x longer than before while the data wait did not grow (2 % of the time)")
    assert cpu.endswith("another process may be competing for the CPU cores; try train.threads=1")
    assert "train.threads=1" not in jump.message("cpu", 1) and "free a CPU core" in jump.message("cpu", 1)
    assert "cuda device" in jump.message("cuda", 0) and "train.threads" not in jump.message("cuda", 0)
