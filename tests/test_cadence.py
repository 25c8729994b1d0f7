"""The loop's cadence: when it logs, saves, monitors and stops, from step and minutes alone."""

from __future__ import annotations

from ibot.train.cadence import END, MAX_MINUTES, MAX_STEPS, SIGNAL, Cadence, DecodeWatch
from ibot.train.schedules import budget_total_steps


def _run(cadence: Cadence, total: int, minutes_per_step: float = 0.0, signal_at: int = 0) -> list[tuple]:
    """Step a cadence like the loop does; (step, log, save, monitor, stop) of every step that did something."""
    done, monitors = [], 0
    for step in range(1, total + 1):
        minutes = step * minutes_per_step if cadence.reads_clock(step, total) else None
        act = cadence.after_step(step, total, minutes, monitors, signalled=0 < signal_at <= step)
        monitors += act.monitor and not act.stop
        if act.log or act.save or act.monitor or act.stop:
            done.append((step, act.log, act.save, act.monitor, act.stop))
        if act.stop:
            break
    return done


def test_logs_and_saves_on_their_own_steps_and_at_the_end() -> None:
    done = _run(Cadence(log_every=3, checkpoint_every=4), total=10)
    assert done == [
        (3, True, False, False, ""),
        (4, False, True, False, ""),
        (6, True, False, False, ""),
        (8, False, True, False, ""),
        (9, True, False, False, ""),
        (10, True, True, False, END),
    ]


def test_max_steps_stops_with_a_checkpoint() -> None:
    assert _run(Cadence(log_every=5, checkpoint_every=100, max_steps=7), total=20)[-1] == (
        7,
        True,
        True,
        False,
        MAX_STEPS,
    )


def test_the_clock_is_read_only_at_log_steps_of_timed_runs() -> None:
    untimed = Cadence(log_every=5, checkpoint_every=100)
    timed = Cadence(log_every=5, checkpoint_every=100, max_minutes=1.0)
    assert not any(untimed.reads_clock(s, 100) for s in range(1, 100))
    assert [s for s in range(1, 100) if timed.reads_clock(s, 100)] == list(range(5, 100, 5))
    budget = Cadence(log_every=5, checkpoint_every=100, budget_minutes=1.0)
    assert budget.reads_clock(7, total_steps=7)  # the estimated end of a budget, between log steps


def test_max_minutes_stops_at_the_first_log_step_past_it() -> None:
    done = _run(Cadence(log_every=4, checkpoint_every=100, max_minutes=1.0), total=100, minutes_per_step=0.1)
    assert done[-1] == (12, True, True, False, MAX_MINUTES)  # 10 steps = 1.0 min, read at 12


def test_monitor_every_period_and_at_the_end_not_on_a_signal() -> None:
    cadence = Cadence(log_every=1, checkpoint_every=100, monitor_every_minutes=1.0)
    done = _run(cadence, total=25, minutes_per_step=0.1)
    assert [d[0] for d in done if d[3]] == [10, 20, 25]
    signalled = _run(cadence, total=25, minutes_per_step=0.1, signal_at=15)
    assert signalled[-1] == (15, True, True, False, SIGNAL)


def test_monitor_every_so_many_steps_and_at_the_end() -> None:
    cadence = Cadence(log_every=10, checkpoint_every=100, monitor_every_steps=4)
    assert [d[0] for d in _run(cadence, total=10) if d[3]] == [4, 8, 10]
    assert not any(cadence.reads_clock(s, 10) for s in range(1, 11))  # no clock needed


def test_a_signal_saves_at_once_and_the_end_wins_over_it() -> None:
    cadence = Cadence(log_every=10, checkpoint_every=100)
    assert _run(cadence, total=50, signal_at=13)[-1] == (13, True, True, False, SIGNAL)
    assert _run(cadence, total=13, signal_at=13)[-1][-1] == END


def test_a_run_at_its_last_step_is_finished() -> None:
    cadence = Cadence(log_every=5, checkpoint_every=100, max_steps=7)
    assert [s for s in range(10) if cadence.finished(s, total_steps=9)] == [7, 8, 9]
    assert Cadence(log_every=5, checkpoint_every=100).finished(9, total_steps=9)


def _budget_run(cadence: Cadence, minutes_at, planned: int = 10_000) -> int:  # type: ignore[no-untyped-def]
    """Step a budget run like the loop does (re-planned whenever the clock is read); the step it stops at."""
    total = planned
    for step in range(1, planned + 1):
        minutes = minutes_at(step) if cadence.reads_clock(step, total) else None
        if minutes is not None:
            total = budget_total_steps(step, minutes, cadence.budget_minutes)
        if cadence.after_step(step, total, minutes, 0, signalled=False).stop:
            return step
    raise AssertionError("the budget never ended")


def test_a_budget_shorter_than_a_log_window_ends_on_time() -> None:
    # 0.02 min a step: 5 steps fill 0.1 min; the first log step (20) lies far past it.
    cadence = Cadence(log_every=20, checkpoint_every=1000, budget_minutes=0.1)
    assert _budget_run(cadence, lambda step: 0.02 * step) == 5


def test_a_budget_ends_within_a_step_when_the_pace_drops() -> None:
    # 0.001 min a step, then 10x slower from step 41 (another process took the core): the budget of
    # 0.1 min is spent at step 46, long before the estimate made at the fast pace (step 100).
    def minutes_at(step: int) -> float:
        return 0.001 * min(step, 40) + 0.01 * max(0, step - 40)

    cadence = Cadence(log_every=20, checkpoint_every=1000, budget_minutes=0.1)
    assert _budget_run(cadence, minutes_at) in (46, 47)


def test_a_budget_with_a_slow_start_still_fills_its_time() -> None:
    # The first step pays for the loader's start (3 s); then 0.001 min a step: 97 steps fit.
    cadence = Cadence(log_every=20, checkpoint_every=1000, budget_minutes=0.1)
    assert _budget_run(cadence, lambda step: 0.05 + 0.0005 * step) in (100, 101)


def test_decode_watch_needs_a_whole_epoch_without_an_image() -> None:
    # 10 samples an epoch, 4 a batch, from the start of the stream: the third batch ends at 12.
    watch = DecodeWatch(per_rank=10, batch_size=4)
    assert [watch.batch(decoded=False) for _ in range(3)] == [False, False, True]
    # A decoded image at sample 4 starts the stretch again: the epoch [10, 20) is spanned at 20.
    watch = DecodeWatch(per_rank=10, batch_size=4)
    assert [watch.batch(decoded) for decoded in (True, False, False, False, False)] == [False] * 4 + [True]
    # A resumed stream (samples 0-7 drawn before): not the rest of epoch 0, but [10, 20), at 20.
    watch = DecodeWatch(per_rank=10, batch_size=4, position=8)
    assert [watch.batch(decoded=False) for _ in range(3)] == [False, False, True]
