"""Run the job scheduler: `python manage.py runscheduler` (see jobs.scheduler.engine)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.checks import database_driver_problems
from jobs.conf import InvalidConfig, JobsConfig, config, setting_label
from jobs.scheduler.engine import Engine

# The JobsConfig fields the command line overrides, and their flags.
FLAGS = {
    "max_concurrent_jobs": "--max-concurrent",
    "heartbeat_seconds": "--heartbeat",
    "lost_after_seconds": "--lost-after",
    "shutdown_grace_seconds": "--grace",
    "max_sleep_seconds": "--max-sleep",
}


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
        # One line naming the setting or flag, exit status 2, before anything starts.
        try:
            settings_config = config()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc), returncode=2) from exc
        for problem in database_driver_problems():
            raise CommandError(problem, returncode=2)
        self.check(tags=["jobs", "models"])
        cfg = with_flags(settings_config, options)
        engine = Engine(config=cfg)
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


def with_flags(base: JobsConfig, options: dict[str, Any]) -> JobsConfig:
    """Return `base` with the flags given applied; raise CommandError naming the flags at fault."""
    given = {name: options[flag[2:].replace("-", "_")] for name, flag in FLAGS.items()}
    try:
        return base.replace(**{name: value for name, value in given.items() if value is not None})
    except InvalidConfig as exc:
        problem = exc.problem
        if len(problem.fields) == 1:
            # argparse has made every flag a number: the one rule it can break is "finite and above 0".
            message = f"{FLAGS[problem.fields[0]]} must be a finite number above 0, not {problem.value}"
        else:
            keys = " and ".join(name.upper() for name in problem.fields)
            message = (
                f"{problem.describe(lambda name: FLAGS.get(name, setting_label(name)))}; set {keys} in JOBS to match"
            )
        raise CommandError(message, returncode=2) from exc
