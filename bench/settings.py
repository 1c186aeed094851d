"""Settings for the benchmarks and the scheduler processes they start: the app's own plus `bench_noop`."""

from scheduler_project.settings import *  # noqa: F403
from scheduler_project.settings import JOBS

JOBS = {**JOBS, "EXECUTORS": [*JOBS.get("EXECUTORS", []), "bench.job_types.NoopExecutor"]}
