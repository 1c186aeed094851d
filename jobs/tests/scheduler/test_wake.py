"""The engine's timing decisions (jobs/scheduler/wake.py), driven with times passed in: no database,
no threads, no sleeping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from jobs.scheduler.wake import HEARTBEAT_BEFORE_CLAIM, MIN_SLEEP_SECONDS, Heartbeat, WakePlan

MAX_SLEEP = 10.0
FAR = 1e9  # a wake_by that is never the earliest


class NextDue:
    """A stand-in for `store.next_wakeup`: returns `due` and notes each `include_queue` it is asked with."""

    def __init__(self, due: datetime | None = None) -> None:
        self.due = due
        self.calls: list[bool] = []

    def __call__(self, include_queue: bool) -> datetime | None:
        self.calls.append(include_queue)
        return self.due


def sleep(
    plan: WakePlan,
    now: datetime,
    *,
    mono: float,
    next_due: Callable[[bool], datetime | None],
    slots_free: bool = True,
    wake_by: float = FAR,
) -> float:
    return plan.sleep_seconds(mono=mono, clock=lambda: now, slots_free=slots_free, wake_by=wake_by, next_due=next_due)


# -- WakePlan: whether a pass looks ----------------------------------------------------------------


@pytest.mark.parametrize("mono", [0.0, 0.001, 12345.0])
def test_a_new_plan_looks_at_once(now: datetime, mono: float) -> None:
    assert WakePlan(MAX_SLEEP).should_look(now, mono)


def test_a_new_plan_does_not_sleep(now: datetime) -> None:
    assert sleep(WakePlan(MAX_SLEEP), now, mono=100.0, next_due=NextDue()) == MIN_SLEEP_SECONDS


@pytest.mark.parametrize(
    ("mono", "looks"),
    [(100.0, False), (105.0, False), (109.999, False), (110.0, True), (500.0, True)],
)
def test_after_looking_it_looks_again_once_max_sleep_has_passed(now: datetime, mono: float, looks: bool) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    assert plan.should_look(now, mono) is looks


def test_a_change_elsewhere_makes_the_next_pass_look(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    plan.changed_elsewhere()
    assert plan.should_look(now, 100.5)


def test_looking_answers_a_change_elsewhere(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.changed_elsewhere()
    plan.looking(100.0)
    assert not plan.should_look(now, 100.5)


@pytest.mark.parametrize(("seconds_later", "looks"), [(0.0, False), (2.999, False), (3.0, True), (4.0, True)])
def test_the_next_due_time_makes_it_look(now: datetime, seconds_later: float, looks: bool) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    sleep(plan, now, mono=100.0, next_due=NextDue(now + timedelta(seconds=3)))
    # The monotonic clock stays before max_sleep: only the due time can make it look.
    assert plan.should_look(now + timedelta(seconds=seconds_later), 101.0) is looks


def test_a_next_due_time_read_before_looking_is_forgotten(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    sleep(plan, now, mono=100.0, next_due=NextDue(now + timedelta(seconds=3)))
    plan.looking(100.0)
    assert not plan.should_look(now + timedelta(seconds=5), 101.0)


# -- WakePlan: backlog ---------------------------------------------------------------------------


@pytest.mark.parametrize(("got", "asked", "backlog"), [(3, 3, True), (1, 1, True), (2, 3, False), (0, 3, False)])
def test_a_claim_leaves_a_backlog_only_when_it_was_full(got: int, asked: int, backlog: bool) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.claimed(got, asked)
    assert plan.backlog is backlog


def test_a_partial_claim_clears_the_backlog() -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.claimed(3, 3)
    plan.claimed(1, 3)
    assert not plan.backlog


def test_a_new_plan_has_no_backlog() -> None:
    assert not WakePlan(MAX_SLEEP).backlog


def test_queuing_more_leaves_a_backlog() -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.claimed(0, 3)
    plan.queued_more()
    assert plan.backlog


# -- WakePlan: when next_due is read ---------------------------------------------------------------


def test_next_due_is_read_once_per_look(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    next_due = NextDue(now + timedelta(seconds=60))
    plan.looking(100.0)
    sleep(plan, now, mono=100.0, next_due=next_due)
    sleep(plan, now, mono=101.0, next_due=next_due)
    sleep(plan, now, mono=102.0, next_due=next_due)
    assert len(next_due.calls) == 1
    plan.looking(110.0)
    sleep(plan, now, mono=110.0, next_due=next_due)
    assert len(next_due.calls) == 2


@pytest.mark.parametrize(("all_succeeded", "reads"), [(False, 2), (True, 1)])
def test_a_run_that_did_not_succeed_makes_it_read_next_due_again(
    now: datetime, all_succeeded: bool, reads: int
) -> None:
    plan = WakePlan(MAX_SLEEP)
    next_due = NextDue(now + timedelta(seconds=60))
    plan.looking(100.0)
    sleep(plan, now, mono=100.0, next_due=next_due)
    plan.recorded(all_succeeded=all_succeeded)
    sleep(plan, now, mono=101.0, next_due=next_due)
    assert len(next_due.calls) == reads


def test_a_freed_slot_makes_it_read_next_due_again_with_the_queue(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    next_due = NextDue(now + timedelta(seconds=60))
    plan.looking(100.0)
    sleep(plan, now, mono=100.0, next_due=next_due, slots_free=False)
    sleep(plan, now, mono=101.0, next_due=next_due, slots_free=True)
    # Once read with the queue, it is not read again until the next look.
    sleep(plan, now, mono=102.0, next_due=next_due, slots_free=True)
    sleep(plan, now, mono=103.0, next_due=next_due, slots_free=False)
    assert next_due.calls == [False, True]


@pytest.mark.parametrize(
    ("slots_free", "backlog", "include_queue"),
    [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
)
def test_next_due_includes_the_queue_only_with_free_slots_and_no_backlog(
    now: datetime, slots_free: bool, backlog: bool, include_queue: bool
) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    plan.claimed(2, 2 if backlog else 3)
    next_due = NextDue()
    sleep(plan, now, mono=100.0, next_due=next_due, slots_free=slots_free)
    assert next_due.calls == [include_queue]


# -- WakePlan: how long to sleep ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wake_by", "due_in", "seconds"),
    [
        (FAR, None, 8.0),  # the next look: looked at 100, max_sleep 10, now 102
        (FAR, 60.0, 8.0),
        (105.0, None, 3.0),  # a heartbeat or a run's deadline
        (105.0, 4.0, 3.0),
        (FAR, 0.5, 0.5),  # the next fire or queued run
        (105.0, 2.5, 2.5),
    ],
)
def test_it_sleeps_until_the_earliest_of_next_look_wake_by_and_next_due(
    now: datetime, wake_by: float, due_in: float | None, seconds: float
) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    due = None if due_in is None else now + timedelta(seconds=due_in)
    assert sleep(plan, now, mono=102.0, wake_by=wake_by, next_due=NextDue(due)) == pytest.approx(seconds)


def test_the_next_due_time_is_measured_on_the_clock_given(now: datetime) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    # Due 5 s after `now`, but the clock already reads 2 s after it.
    seconds = plan.sleep_seconds(
        mono=100.0,
        clock=lambda: now + timedelta(seconds=2),
        slots_free=True,
        wake_by=FAR,
        next_due=NextDue(now + timedelta(seconds=5)),
    )
    assert seconds == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("wake_by", "due_in"),
    [(FAR, -30.0), (FAR, 0.0), (50.0, None), (100.0, None), (FAR, 0.0001)],
    ids=["due-in-the-past", "due-now", "wake-by-past", "wake-by-now", "due-sooner-than-the-floor"],
)
def test_it_never_sleeps_less_than_the_floor(now: datetime, wake_by: float, due_in: float | None) -> None:
    plan = WakePlan(MAX_SLEEP)
    plan.looking(100.0)
    due = None if due_in is None else now + timedelta(seconds=due_in)
    assert sleep(plan, now, mono=100.0, wake_by=wake_by, next_due=NextDue(due)) == MIN_SLEEP_SECONDS


# -- Heartbeat -------------------------------------------------------------------------------------

INTERVAL = 10.0
LOST_AFTER = 60.0


def registered(now: datetime, mono: float = 100.0) -> Heartbeat:
    heartbeat = Heartbeat(INTERVAL, LOST_AFTER)
    heartbeat.registered(now, mono)
    return heartbeat


def test_registering_is_the_first_heartbeat(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    assert heartbeat.beat_at == now
    assert heartbeat.next_at == 100.0 + INTERVAL


@pytest.mark.parametrize(("mono", "due"), [(100.0, False), (109.999, False), (110.0, True), (200.0, True)])
def test_a_heartbeat_is_due_an_interval_after_the_last(now: datetime, mono: float, due: bool) -> None:
    assert registered(now, 100.0).due(mono) is due


def test_beating_puts_the_next_heartbeat_an_interval_away(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    heartbeat.beating(112.0)
    assert heartbeat.next_at == 112.0 + INTERVAL
    assert not heartbeat.due(121.999)
    assert heartbeat.due(122.0)


def test_the_last_beat_is_the_one_written(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    heartbeat.beating(112.0)
    assert heartbeat.beat_at == now  # being written is not written yet
    heartbeat.written(now + timedelta(seconds=12))
    assert heartbeat.beat_at == now + timedelta(seconds=12)


LIMIT = LOST_AFTER * HEARTBEAT_BEFORE_CLAIM


@pytest.mark.parametrize(
    ("age", "needed"),
    [(0.0, False), (LIMIT - 0.001, False), (LIMIT, False), (LIMIT + 0.001, True), (LOST_AFTER * 2, True)],
    ids=["fresh", "just-under", "at-the-limit", "just-over", "long-paused"],
)
def test_a_heartbeat_is_needed_before_claiming_once_the_last_is_too_old(
    now: datetime, age: float, needed: bool
) -> None:
    heartbeat = registered(now)
    assert heartbeat.needed_before_claiming(now + timedelta(seconds=age)) is needed


def test_the_age_before_claiming_counts_from_the_last_beat_written(now: datetime) -> None:
    heartbeat = registered(now)
    heartbeat.written(now + timedelta(seconds=LOST_AFTER))
    assert not heartbeat.needed_before_claiming(now + timedelta(seconds=LOST_AFTER + LIMIT))
    assert heartbeat.needed_before_claiming(now + timedelta(seconds=LOST_AFTER + LIMIT + 0.001))


def test_no_heartbeat_is_needed_before_claiming_when_none_was_written(now: datetime) -> None:
    assert not Heartbeat(INTERVAL, LOST_AFTER).needed_before_claiming(now)


def test_it_does_not_judge_before_registering() -> None:
    assert not Heartbeat(INTERVAL, LOST_AFTER).may_judge(1e9)


@pytest.mark.parametrize(("mono", "judges"), [(100.0, False), (159.999, False), (160.0, True), (1000.0, True)])
def test_it_judges_others_a_full_lost_after_after_registering(now: datetime, mono: float, judges: bool) -> None:
    assert registered(now, 100.0).may_judge(mono) is judges


def test_a_lost_connection_stops_judging_until_connected_for_a_full_lost_after(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    assert heartbeat.may_judge(200.0)
    heartbeat.connection_lost()
    assert not heartbeat.may_judge(200.0)
    assert not heartbeat.may_judge(1e9)
    heartbeat.connected(210.0)
    assert not heartbeat.may_judge(210.0 + LOST_AFTER - 0.001)
    assert heartbeat.may_judge(210.0 + LOST_AFTER)


def test_a_connection_lost_before_judging_also_restarts_the_wait(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    heartbeat.connection_lost()
    heartbeat.connected(130.0)
    assert not heartbeat.may_judge(160.0)  # would judge here had it stayed connected
    assert heartbeat.may_judge(130.0 + LOST_AFTER)


def test_being_connected_does_not_move_the_judge_time(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    heartbeat.connected(130.0)  # the engine says so after every pass
    assert heartbeat.may_judge(160.0)


def test_being_connected_again_after_a_loss_does_not_move_the_judge_time(now: datetime) -> None:
    heartbeat = registered(now, 100.0)
    heartbeat.connection_lost()
    heartbeat.connected(210.0)
    heartbeat.connected(250.0)
    assert heartbeat.may_judge(210.0 + LOST_AFTER)
