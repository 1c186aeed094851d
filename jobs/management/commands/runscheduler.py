"""Run the job scheduler: `python manage.py runscheduler` (see jobs.scheduler.engine)."""

from __future__ import annotations

import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.conf import problems
from jobs.scheduler.engine import Engine


class Command(BaseCommand):
    # Only the checks the scheduler depends on: the full set imports the API and admin, which
    # this long-lived process never uses (about 6 MB of resident memory).
    requires_system_checks: list[str] = []
    help = "Fire due jobs and execute their runs until stopped (SIGTERM/Ctrl-C: finish running jobs, then exit)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-concurrent", type=int, help="Runs at once (default MAX_CONCURRENT_JOBS).")
        parser.add_argument(
            "--once", action="store_true", help="One pass, wait for the runs it started, prune the run history, exit."
        )
        parser.add_argument("--heartbeat", type=float, help="Seconds between heartbeats.")
        parser.add_argument("--lost-after", type=float, help="Seconds of silence before a scheduler is dead.")
        parser.add_argument("--grace", type=float, help="Seconds to let running jobs finish on shutdown.")
        parser.add_argument("--max-sleep", type=float, help="Longest sleep between passes.")

    def handle(self, *args: Any, **options: Any) -> None:
        # One line naming the setting, exit status 2, before anything starts.
        for problem in problems():
            raise CommandError(problem, returncode=2)
        self.check(tags=["jobs", "models"])
        for name in ("max_concurrent", "heartbeat", "lost_after", "grace", "max_sleep"):
            value = options[name]
            if value is not None and not (math.isfinite(value) and value > 0):
                raise CommandError(
                    f"--{name.replace('_', '-')} must be a finite number above 0, not {value}", returncode=2
                )
        engine = Engine(
            max_concurrent=options["max_concurrent"],
            heartbeat_seconds=options["heartbeat"],
            lost_after=options["lost_after"],
            shutdown_grace=options["grace"],
            max_sleep=options["max_sleep"],
        )
        if engine.heartbeat_seconds * 2 > engine.lost_after:
            # Others would presume it dead between heartbeats, and its claims need a heartbeat
            # younger than half of the lost-after time.
            raise CommandError(
                f"--heartbeat ({engine.heartbeat_seconds:g}s) must be at most half of --lost-after "
                f"({engine.lost_after:g}s); set HEARTBEAT_SECONDS and LOST_AFTER_SECONDS in JOBS to match",
                returncode=2,
            )
        if options["once"]:
            try:
                outcomes = engine.run_once()
                engine.prune()
            finally:
                engine.stop()
            self.stdout.write(f"{len(outcomes)} run(s) finished")
            return
        engine.install_signal_handlers()
        engine.run_forever()
