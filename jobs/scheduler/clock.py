"""One clock for every scheduler: the database server's.

Schedulers on several hosts compare times with each other through the database: a fire is due
when `next_run_at <= now`, a claim needs a heartbeat younger than half of `LOST_AFTER_SECONDS`, a
scheduler is presumed dead when its heartbeat is older than that. If each scheduler used its own
wall clock, one whose clock ran 90 s ahead would start runs 90 s early and see its peers' fresh
heartbeats as stale. So on PostgreSQL every time a scheduler writes or compares is the server's:
read with `clock_timestamp()` at each heartbeat and carried forward between readings by a
clock that only moves forward (CLOCK_BOOTTIME, which also counts time suspended), so a reading
costs no round trip and a jump of the host's wall clock changes nothing.

SQLite lives on one machine: its schedulers share the host's clock, which is the database's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from django.utils import timezone

logger = logging.getLogger("jobs.scheduler")

# A host clock further than this from the database's is logged (once, as an error).
SKEW_WARNING_SECONDS = 2.0


def _ticks() -> float:
    """Seconds from a clock that never goes back and counts suspended time where it can."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class DatabaseClock:
    """The database server's time, carried forward between readings by a monotonic clock.

    Until its first reading it gives the host's time. A reading is taken as the server's time
    when the reply arrived (it cannot be later), so this clock is never ahead of the server's
    by more than the time a reading takes to reach this host; it is behind by at most one
    round trip. Reading it is safe from any thread.
    """

    def __init__(
        self,
        *,
        read: Callable[[], datetime],
        ticks: Callable[[], float] = _ticks,
        local: Callable[[], datetime] = timezone.now,
    ) -> None:
        self._read = read
        self._ticks = ticks
        self._local = local
        self._anchor: tuple[datetime, float] | None = None  # (server time, ticks when read)
        self.offset_seconds: float | None = None  # server minus host, at the last reading
        self._warned = False

    def __call__(self) -> datetime:
        anchor = self._anchor
        if anchor is None:
            return self._local()
        server_time, at = anchor
        return server_time + timedelta(seconds=self._ticks() - at)

    def sync(self) -> None:
        """Read the server's clock (one short statement) and note how far the host's is off."""
        server_time = self._read()
        at, local = self._ticks(), self._local()
        self._anchor = (server_time, at)
        self.offset_seconds = (server_time - local).total_seconds()
        if abs(self.offset_seconds) > SKEW_WARNING_SECONDS and not self._warned:
            self._warned = True
            logger.error(
                "this host's clock is %.1fs %s the database server's; the scheduler goes by the "
                "database's clock, but fix the host's time synchronisation (NTP)",
                abs(self.offset_seconds),
                "behind" if self.offset_seconds > 0 else "ahead of",
            )


def database_now() -> datetime:
    """The database's time now (one statement on PostgreSQL; the host's on SQLite), for the web
    process's judgements of heartbeats and due runs (/health, /metrics)."""
    from .store import get_store

    return get_store().now()
