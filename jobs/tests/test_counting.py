"""bounded_count: exact up to its limit, an estimate that never looks exact above it."""

from __future__ import annotations

import pytest
from django.db import connection

from jobs import services
from jobs.counting import bounded_count
from jobs.models import Job

pytestmark = pytest.mark.django_db


def _jobs(count: int) -> None:
    for number in range(count):
        services.job_create(name=f"j{number}", cron_expression="0 0 1 1 *", job_type="test_noop")


def test_counts_up_to_the_limit_are_exact() -> None:
    _jobs(12)
    assert bounded_count(Job.objects.all(), limit=12) == (12, False)
    assert bounded_count(Job.objects.filter(name="j3"), limit=5) == (1, False)


def test_above_the_limit_postgresql_estimates_and_never_says_a_number_that_looks_exact() -> None:
    _jobs(12)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Job._meta.db_table}")
    counted, estimated = bounded_count(Job.objects.all(), limit=5)
    if connection.vendor == "postgresql":
        assert estimated is True and counted > 5
    else:  # SQLite keeps no statistics: it counts
        assert (counted, estimated) == (12, False)
