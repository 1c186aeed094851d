"""When the engine looks for work, when it heartbeats, and how long it may sleep: two small
objects that hold the engine's timing decisions, fed the times by the engine (so tests can
drive them with any clock)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

# A floor on any sleep, so that a due row locked by another scheduler cannot make the loop spin.
MIN_SLEEP_SECONDS = 0.002
# A claim needs a heartbeat younger than half of lost-after (see the store); the engine writes
# one before claiming once its last is older than this fraction, as after a pause.
HEARTBEAT_BEFORE_CLAIM = 0.25


class WakePlan:
    """Whether a pass looks for due jobs and queued runs, or only records outcomes; and how long
    to sleep after it.

    A pass looks when told of a change elsewhere (NOTIFY, the commit counter, a peer presumed
    dead), at least every `max_sleep` seconds, and when the earliest known fire or queued run
    comes due. Between looks, a finished run is only written back, with a claim only when the
    last claim filled every free slot (more may be waiting).
    """

    def __init__(self, max_sleep: float) -> None:
        self.max_sleep = max_sleep
        self._changed = False
        self._poll_at = 0.0  # time.monotonic() of the next look regardless
        self._next_due: datetime | None = None  # earliest known next fire or queued run
        self._next_due_stale = True  # must be read again before sleeping
        self._next_due_has_queue = False  # it took queued runs into account
        self._backlog = False

    @property
    def backlog(self) -> bool:
        """The last claim filled every free slot, so more runs may be waiting."""
        return self._backlog

    def changed_elsewhere(self) -> None:
        """Jobs or runs changed outside this engine: the next pass looks."""
        self._changed = True

    def should_look(self, now: datetime, mono: float) -> bool:
        due = self._next_due is not None and now >= self._next_due
        return self._changed or mono >= self._poll_at or due

    def looking(self, mono: float) -> None:
        """A pass is looking now: the next look is due within max_sleep at the latest."""
        self._changed = False
        self._poll_at = mono + self.max_sleep
        self._next_due = None
        self._next_due_stale = True

    def claimed(self, got: int, asked: int) -> None:
        self._backlog = got >= asked

    def queued_more(self) -> None:
        """A pass queued runs beyond its first claim: claim again."""
        self._backlog = True

    def recorded(self, all_succeeded: bool) -> None:
        if not all_succeeded:
            self._next_due_stale = True  # a retry may now be queued; look for it when it is due

    def sleep_seconds(
        self,
        *,
        mono: float,
        clock: Callable[[], datetime],
        slots_free: bool,
        wake_by: float,
        next_due: Callable[[bool], datetime | None],
    ) -> float:
        """Seconds to sleep: until the next look, `wake_by` (a monotonic time: a heartbeat, a
        run's deadline) or the next fire or queued run, whichever is first.

        `next_due(include_queue)` reads the earliest fire (and queued run) from the database:
        once per look, or when a slot frees for queued runs, not after every finished run.
        """
        include_queue = slots_free and not self._backlog
        if self._next_due_stale or (include_queue and not self._next_due_has_queue):
            self._next_due = next_due(include_queue)
            self._next_due_stale, self._next_due_has_queue = False, include_queue
        timeout = min(self._poll_at, wake_by) - mono
        if self._next_due is not None:
            timeout = min(timeout, (self._next_due - clock()).total_seconds())
        return max(timeout, MIN_SLEEP_SECONDS)


class Heartbeat:
    """When this scheduler heartbeats, and whether it may judge other schedulers dead.

    It judges others only once it has been connected for a full `lost_after`, since it started
    or since its last database error: just back from an outage, it cannot tell a dead peer
    from one that is still reconnecting.
    """

    def __init__(self, interval: float, lost_after: float) -> None:
        self.interval = interval
        self.lost_after = lost_after
        self.next_at = 0.0  # time.monotonic() of the next heartbeat
        self.beat_at: datetime | None = None  # the last heartbeat written, by the scheduler's clock
        self._judge_from: float | None = None  # monotonic; None: not connected since an error

    def registered(self, at: datetime, mono: float) -> None:
        self.beat_at = at
        self.next_at = mono + self.interval
        self._judge_from = mono + self.lost_after

    def due(self, mono: float) -> bool:
        return mono >= self.next_at

    def beating(self, mono: float) -> None:
        """A heartbeat is being written: the next one is an interval away."""
        self.next_at = mono + self.interval

    def written(self, at: datetime) -> None:
        self.beat_at = at

    def needed_before_claiming(self, now: datetime) -> bool:
        """Paused or cut off (the clock moved on, perhaps not the monotonic one): claims need a
        fresh heartbeat first, or a new identity if another presumed this scheduler dead."""
        return self.beat_at is not None and now - self.beat_at > timedelta(
            seconds=self.lost_after * HEARTBEAT_BEFORE_CLAIM
        )

    def connection_lost(self) -> None:
        self._judge_from = None

    def connected(self, mono: float) -> None:
        if self._judge_from is None:
            self._judge_from = mono + self.lost_after

    def may_judge(self, mono: float) -> bool:
        return self._judge_from is not None and mono >= self._judge_from
