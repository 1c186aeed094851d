"""Jobs and runs built with the services and the ORM, as the scheduler would hand them to an executor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from jobs import services
from jobs.models import JobRun

FIRE = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def make_run() -> Callable[..., JobRun]:
    """Create a disabled job (validated like any other) and one queued run of it."""

    def make(
        job_type: str, parameters: dict[str, Any], *, scheduled_for: datetime = FIRE, attempt: int = 1, **fields: Any
    ) -> JobRun:
        fields.setdefault("name", f"{job_type} test")
        job = services.job_create(
            cron_expression="0 * * * *", job_type=job_type, parameters=parameters, enabled=False, **fields
        )
        return JobRun.objects.create(job=job, scheduled_for=scheduled_for, not_before=scheduled_for, attempt=attempt)

    return make
