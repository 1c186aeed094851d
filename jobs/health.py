"""What /health reports: the database and the schedulers' heartbeats."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection
from django.utils import timezone

from .conf import config
from .models import JobRun, SchedulerProcess
from .scheduler.clock import database_now

logger = logging.getLogger(__name__)


def health_report(*, require_scheduler: bool = True, now: datetime | None = None) -> dict[str, Any]:
    """Return the health report; its status is "ok" or "unhealthy"."""
    report: dict[str, Any] = {"status": "ok", "database": {"vendor": connection.vendor}}
    try:
        # Heartbeats are written by the database's clock (jobs.scheduler.clock): judged by it too.
        now = now or database_now()
        schedulers = list(
            SchedulerProcess.objects.alive(now, config().lost_after_seconds).values(
                "hostname", "pid", "started_at", "last_heartbeat_at"
            )
        )
        queued = JobRun.objects.ready(now).count()
    except DatabaseError as exc:
        report["time"] = timezone.now().isoformat()
        report["status"] = "unhealthy"
        report["database"]["ok"] = False
        # /health is public: the driver's message can name hosts and users, so it goes to the log.
        logger.warning("health check: database error", exc_info=True)
        report["database"]["error"] = type(exc).__name__
        return report
    report["time"] = now.isoformat()
    report["database"]["ok"] = True
    report["schedulers"] = [
        {**row, "heartbeat_age_seconds": round((now - row["last_heartbeat_at"]).total_seconds(), 3)}
        for row in schedulers
    ]
    report["queue_depth"] = queued
    if require_scheduler and not schedulers:
        report["status"] = "unhealthy"
        report["reason"] = "no scheduler has sent a heartbeat recently"
    return report
