"""The job type the benchmarks schedule: it does nothing, so only the scheduler's own cost is measured."""

from __future__ import annotations

from typing import Any

from jobs.executors import Executor


class NoopExecutor(Executor):
    name = "bench_noop"
    description = "Does nothing (benchmarks)."
    safe_to_repeat = True

    def execute(self, run: Any) -> None:
        return None
