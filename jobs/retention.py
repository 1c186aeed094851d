"""Run-history retention: finished runs older than an age, or beyond a count per job, go."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db.models import Count

from .models import JobRun

logger = logging.getLogger(__name__)

BATCH = 1000


def prune_runs(*, now: datetime, max_age: timedelta, keep_per_job: int) -> int:
    """Delete finished runs older than `max_age` and all but the newest `keep_per_job` of each job."""
    finished = JobRun.objects.filter(status__in=JobRun.FINISHED)
    deleted = 0
    while True:
        ids = list(finished.filter(created_at__lt=now - max_age).values_list("id", flat=True)[:BATCH])
        if not ids:
            break
        deleted += JobRun.objects.filter(id__in=ids).delete()[0]
    crowded = finished.values("job_id").annotate(total=Count("id")).filter(total__gt=keep_per_job)
    for row in crowded:
        newest = finished.filter(job_id=row["job_id"]).order_by("-id").values_list("id", flat=True)
        oldest_kept = newest[keep_per_job - 1]
        deleted += finished.filter(job_id=row["job_id"], id__lt=oldest_kept).delete()[0]
    if deleted:
        logger.info("pruned %d old runs", deleted)
    return deleted
