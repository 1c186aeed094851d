"""Helpers for engine tests: make jobs with the services, build engines with short timings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from jobs import services
from jobs.models import Job
from jobs.scheduler.engine import Engine


@pytest.fixture
def make_job(db: None) -> Callable[..., Job]:
    def make(*, now: datetime, cron: str = "* * * * *", job_type: str = "test_noop", **fields: Any) -> Job:
        fields.setdefault("name", f"{job_type} job")
        return services.job_create(now=now, cron_expression=cron, job_type=job_type, **fields)

    return make


@pytest.fixture
def engine_factory(db: None) -> Callable[..., Engine]:
    engines: list[Engine] = []

    def make(*, now: datetime | None = None, **options: Any) -> Engine:
        if now is not None:
            options["clock"] = lambda: now
        options.setdefault("max_concurrent", 5)
        options.setdefault("heartbeat_seconds", 3600)
        engine = Engine(**options)
        engines.append(engine)
        return engine

    return make
