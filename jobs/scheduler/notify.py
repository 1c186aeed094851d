"""Wake sleeping schedulers at once when jobs or runs change (PostgreSQL LISTEN/NOTIFY)."""

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
