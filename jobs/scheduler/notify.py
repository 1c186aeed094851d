"""Wake sleeping schedulers soon after jobs or runs change.

PostgreSQL: NOTIFY on a channel the schedulers LISTEN to. SQLite has no NOTIFY; a scheduler asks
`PRAGMA data_version`, which changes when another connection commits, a few times a second.
"""

from __future__ import annotations

import logging

from django.db import DatabaseError, connection

CHANNEL = "jobs_scheduler"
logger = logging.getLogger(__name__)


def notify_schedulers() -> None:
    """Send a NOTIFY on PostgreSQL; on other databases schedulers wake by their own timer."""
    if connection.vendor != "postgresql":
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {CHANNEL}")
    except DatabaseError:
        # The change is committed; the schedulers will still see it on their next pass.
        logger.warning("could not notify schedulers", exc_info=True)


class CommitWatcher:
    """SQLite: tell whether another connection has committed since the last look.

    `PRAGMA data_version` reads a counter in the database's shared memory, so asking costs
    microseconds and no I/O. The first call, and the first after a reconnect, says False.
    """

    def __init__(self) -> None:
        self._last: int | None = None

    def changed(self) -> bool:
        # Straight to the driver: asked several times a second, Django's cursor layers would
        # cost more than the question.
        connection.ensure_connection()
        version = connection.connection.execute("PRAGMA data_version").fetchone()[0]
        changed = self._last is not None and version != self._last
        self._last = version
        return changed
