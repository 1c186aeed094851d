"""Run one JobRun through its executor and say how it ended (its `Outcome`); the store writes it back."""

from __future__ import annotations

import functools
import json
import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from jobs.conf import config
from jobs.executors import UnknownJobType, get_executor
from jobs.executors.base import OutcomeUnknown, RunTimedOut
from jobs.models import JobRun

from . import retry

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended, ready to be written back."""

    run: JobRun
    status: str
    finished_at: datetime
    result: Any = None
    error: str = ""
    # Timed out while its thread still runs: stored without `finished_at` (the job counts as
    # running for overlap_policy=forbid) until the thread ends.
    lingering: bool = False
    # Failed after its work may have been done (a mail handed over, its reply lost).
    maybe_done: bool = False

    @property
    def stored_finished_at(self) -> datetime | None:
        return None if self.lingering else self.finished_at

    @property
    def result_json(self) -> str | None:
        """The result as the JSON text both databases store (SQL NULL for no result, as the ORM does)."""
        return None if self.result is None else json.dumps(self.result)

    @functools.cached_property
    def retry_at(self) -> datetime | None:
        """When its retry may start, or None when it gets none (decided once: the back-off has jitter)."""
        return retry.next_attempt(self.run, self.status, ended_at=self.finished_at, maybe_done=self.maybe_done)


# A JSON \u0000 escape (not an escaped backslash followed by "u0000"): PostgreSQL's jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def cap_result(result: Any) -> Any:
    """Return the result as data every database stores, replaced by a note when it is too large.

    NaN and infinities (not JSON) and anything else JSON cannot express are stored as the
    result's repr; NUL characters, which PostgreSQL refuses, are dropped.
    """
    if result is None:
        return None
    try:
        text = json.dumps(result, cls=DjangoJSONEncoder, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(repr(result))
    text = _JSON_NUL.sub(r"\1", text)
    limit = config().result_max_bytes
    if len(text) > limit:
        return {"truncated": True, "size_bytes": len(text), "preview": text[: min(limit, 2000)]}
    return json.loads(text)


def _format_error(exc: BaseException) -> str:
    limit = config().error_max_chars
    message = f"{type(exc).__name__}: {exc}"
    trace = "".join(traceback.format_exception(exc))
    text = f"{message}\n\n{trace}".replace("\x00", "")  # PostgreSQL refuses NUL in text
    if len(text) > limit:
        text = text[: limit // 2] + "\n[... traceback truncated ...]\n" + text[-limit // 2 :]
    return text


def execute(run: JobRun, *, clock: Callable[[], datetime] = timezone.now) -> Outcome:
    """Run the job's executor for `run` and return the outcome; never raises.

    The executor bounds its waits by `run.deadline` (see executors.base.seconds_left); when
    that runs out inside it, the run is timed out, as when the engine's clock stops it.
    """
    try:
        result = get_executor(run.job.job_type).execute(run)
    except UnknownJobType:
        return Outcome(
            run, JobRun.Status.FAILED, clock(), error=f"unknown job type {run.job.job_type!r} on this scheduler"
        )
    except RunTimedOut as exc:
        return _without_unsafe_retry(Outcome(run, JobRun.Status.TIMED_OUT, clock(), error=_format_error(exc)))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of user code is the run's failure
        logger.error(
            "run raised job=%s run=%s",
            run.job_id,
            run.pk,
            exc_info=exc,
            extra={"job_id": run.job_id, "run_id": run.pk},
        )
        outcome = Outcome(
            run, JobRun.Status.FAILED, clock(), error=_format_error(exc), maybe_done=isinstance(exc, OutcomeUnknown)
        )
        return _without_unsafe_retry(outcome)
    return Outcome(run, JobRun.Status.SUCCEEDED, clock(), result=cap_result(result))


def timed_out(run: JobRun, now: datetime) -> Outcome:
    """The outcome of a run that overran its job's timeout while its thread goes on."""
    return _without_unsafe_retry(
        Outcome(
            run,
            JobRun.Status.TIMED_OUT,
            now,
            error=f"timed out after {run.job.timeout_seconds}s; its slot was freed",
            lingering=True,
        )
    )


def _without_unsafe_retry(outcome: Outcome) -> Outcome:
    """Say on the run why it is not retried although retries are left."""
    if retry.refused_as_unsafe(outcome.run, outcome.status, maybe_done=outcome.maybe_done):
        outcome.error = (
            f"not retried: a {outcome.run.job.job_type} run is not safe to repeat, and this one may have "
            f"done its work before it {'timed out' if outcome.status == JobRun.Status.TIMED_OUT else 'failed'}\n"
            f"{outcome.error}"
        )
    return outcome
