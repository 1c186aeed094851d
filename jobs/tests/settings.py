"""Settings for the test suite and the scheduler processes it starts: the app's own, plus test job types."""

from scheduler_project.settings import *  # noqa: F403
from scheduler_project.settings import JOBS, STORAGES

TEST_EXECUTORS = [
    "jobs.tests.job_types.NoopExecutor",
    "jobs.tests.job_types.SleepExecutor",
    "jobs.tests.job_types.UnsafeSleepExecutor",
    "jobs.tests.job_types.FailExecutor",
    "jobs.tests.job_types.FlakyExecutor",
    "jobs.tests.job_types.HangExecutor",
    "jobs.tests.job_types.OddResultExecutor",
    "jobs.tests.job_types.AppendExecutor",
    "jobs.tests.job_types.UnsafeAppendExecutor",
]
JOBS = {**JOBS, "EXECUTORS": [*JOBS.get("EXECUTORS", []), *TEST_EXECUTORS]}

# Tests render admin and docs pages without running collectstatic first.
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
