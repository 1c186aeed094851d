"""What both benchmarks share: a throwaway database, real scheduler processes, /proc readings, statistics.

Each benchmark runs once per database. With `--database both` (the default) the script starts
itself again once per database, relays the progress lines and ends with one JSON line holding
both results; that way every run configures Django for exactly one database. Every process a
benchmark starts is stopped by its own pid, and every database or temp file it makes is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "manage.py"
DATABASES = ("sqlite", "postgres")
DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

if str(ROOT) not in sys.path:
    # `python bench/burst.py` puts bench/ on the path, not the project.
    sys.path.insert(0, str(ROOT))


def say(message: str) -> None:
    """Print one progress line at once (the parent process relays it)."""
    print(message, flush=True)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", choices=[*DATABASES, "both"], default="both", help="default: both, in turn")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        help=f"PostgreSQL server to create the throwaway database on (default {DEFAULT_PG_URL}, or BENCH_PG_URL)",
    )
    parser.add_argument("--max-concurrent", type=int, default=5, help="the scheduler's slots (default 5)")
    parser.add_argument("--log-level", default="info", help="the scheduler's LOG_LEVEL (its log goes to a temp file)")
    parser.add_argument(
        "--scheduler-python",
        metavar="PATH",
        default=sys.executable,
        help="the interpreter that runs the scheduler processes (default: this one). A virtualenv made "
        "from requirements.txt alone measures the daemon as deployed: REST framework imports the "
        "optional packages it finds, and the development tools bring some (requests, Pygments)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="sample the scheduler process with py-spy while measuring; collapsed stacks go to DIR",
    )


def counts_option(parser: argparse.ArgumentParser, text: str, option: str, *, minimum: int, example: str) -> list[int]:
    """The sorted, distinct whole numbers of a comma-separated option, each at least `minimum`;
    a usage error naming `option` otherwise."""
    try:
        counts = sorted({int(count) for count in str(text).split(",") if count.strip()})
    except ValueError:
        parser.error(f"{option} takes whole numbers separated by commas, e.g. {example}")
    if not counts or counts[0] < minimum:
        parser.error(f"{option} needs at least one count, {'all positive' if minimum > 0 else 'none negative'}")
    return counts


def postgres_missing(args: argparse.Namespace, benchmark: str) -> bool:
    """With --database postgres and no server answering at --pg-url: say so, print the
    benchmark's skipped line, and return True (the benchmark then exits 0)."""
    if args.database != "postgres":
        return False
    problem = postgres_available(args.pg_url)
    if problem:
        say(f"PostgreSQL not available at {args.pg_url}: {problem}")
        print(json.dumps({"benchmark": benchmark, "database": "postgres", "skipped": problem}))
    return problem is not None


def due_second(lead: float) -> datetime:
    """The first whole second at least `lead` seconds from now."""
    from django.utils import timezone

    return (timezone.now() + timedelta(seconds=lead)).replace(microsecond=0) + timedelta(seconds=1)


def create_jobs_not_due(prefix: str, count: int, *, start: int = 0, batch: int = 5000, **fields: Any) -> None:
    """Bulk-create jobs `prefix` `start` to `prefix` `count - 1`, of the no-op type, overlap
    allowed, never due by themselves (a fire two days ahead at least; the benchmarks set
    next_run_at directly when they want one); `fields` sets more of each job."""
    from jobs import schedule
    from jobs.models import Job

    later = schedule.next_fire_after("0 0 1 1 *", "UTC", due_second(2 * 86400))
    for first in range(start, count, batch):
        Job.objects.bulk_create(
            [
                Job(
                    name=f"{prefix} {i}",
                    cron_expression="0 0 1 1 *",
                    timezone="UTC",
                    job_type="bench_noop",
                    overlap_policy=Job.OverlapPolicy.ALLOW,
                    next_run_at=later,
                    **fields,
                )
                for i in range(first, min(first + batch, count))
            ],
            batch_size=500,
        )


def arm(prefix: str, due: datetime) -> None:
    """Make every job named `prefix` N due at `due` and wake the schedulers, as a job change
    through the services would."""
    from jobs.models import Job
    from jobs.scheduler.notify import notify_schedulers

    Job.objects.filter(name__startswith=prefix).update(next_run_at=due)
    notify_schedulers()


def finished_count(due: datetime) -> int:
    """How many runs fired at `due` have finished."""
    from jobs.models import JobRun

    return JobRun.objects.filter(scheduled_for=due).exclude(status__in=JobRun.ACTIVE).count()


def add_arming_arguments(parser: argparse.ArgumentParser, *, what: str, drain_timeout: float) -> None:
    """--lead and --drain-timeout, for benchmarks that make jobs due at a second ahead."""
    parser.add_argument(
        "--lead",
        type=float,
        default=7.0,
        help=f"seconds between arming {what} and its due second; must exceed the schedulers' max sleep (5s)",
    )
    parser.add_argument("--drain-timeout", type=float, default=drain_timeout, help=f"give up on {what} after this long")


def fire_figures(due: datetime, jobs: int) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """The runs of the jobs fired at `due`, as (job id, status, attempt, created at, started at,
    finished at, worker pid) rows, and what burst and drain report alike: the counts, whether
    each of `jobs` jobs ran exactly once and succeeded at its first attempt, and when the last
    run was fired (seconds after `due`)."""
    from jobs.models import JobRun

    rows = list(
        JobRun.objects.filter(scheduled_for=due).values_list(
            "job_id", "status", "attempt", "created_at", "started_at", "finished_at", "worker__pid"
        )
    )
    per_job = Counter(row[0] for row in rows)
    statuses = Counter(row[1] for row in rows)
    exactly_once = (
        len(per_job) == jobs
        and set(per_job.values()) == {1}
        and statuses == Counter({"succeeded": jobs})
        and {row[2] for row in rows} == {1}
    )
    return rows, {
        "due": due.isoformat(),
        "runs": len(rows),
        "jobs_run": len(per_job),
        "statuses": dict(statuses),
        "exactly_once": exactly_once,
        "fired_s": rounded((max(row[3] for row in rows) - due).total_seconds()) if rows else None,
    }


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the `finally` blocks stop processes and drop databases."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# -- one run per database ------------------------------------------------------------------------


def run_each_database(script: str, argv: Sequence[str], benchmark: str, timeout: float) -> int:
    """Run `script` once per database in a child process; print one JSON line with every result."""
    results: dict[str, Any] = {}
    status = 0
    for database in DATABASES:
        say(f"=== {benchmark} on {database} ===")
        command = [sys.executable, script, *_without_database(argv), "--database", database]
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
        last_json: str | None = None
        # A child that outlives its time gets SIGTERM, which makes it clean up and exit.
        watchdog = threading.Timer(timeout, _terminate, args=(child,))
        watchdog.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                line = line.rstrip("\n")
                if line.startswith("{"):
                    last_json = line
                else:
                    say(f"[{database}] {line}")
        finally:
            watchdog.cancel()
            stop_process(child, grace=60)
        if child.returncode != 0 or last_json is None:
            status = 1
            results[database] = {"database": database, "error": f"exit status {child.returncode}"}
        else:
            results[database] = json.loads(last_json)
    print(json.dumps({"benchmark": benchmark, "results": results}), flush=True)
    return status


def _terminate(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def _without_database(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--database":
            skip = True
        elif not arg.startswith("--database="):
            kept.append(arg)
    return kept


# -- a throwaway database ------------------------------------------------------------------------


@dataclass
class Database:
    vendor: str
    url: str
    name: str


def postgres_available(admin_url: str) -> str | None:
    """Return why the PostgreSQL server cannot be used, or None when it answers."""
    import psycopg2

    try:
        psycopg2.connect(_pg_dsn(admin_url, "postgres"), connect_timeout=5).close()
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _pg_dsn(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


def _pg_admin(admin_url: str, statement: str) -> None:
    import psycopg2

    conn = psycopg2.connect(_pg_dsn(admin_url, "postgres"), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


@contextmanager
def throwaway_database(vendor: str, prefix: str, admin_url: str, *, keep: bool = False) -> Iterator[Database]:
    """Create an empty database (a temp SQLite file, or a PostgreSQL database) and remove it afterwards.

    `keep`: leave the PostgreSQL database in place (bench/api.py --keep, to measure it again).
    """
    if vendor == "sqlite":
        folder = tempfile.mkdtemp(prefix=f"{prefix}-")
        path = Path(folder) / "bench.sqlite3"
        try:
            yield Database("sqlite", f"sqlite:///{path}", str(path))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    name = f"{prefix}_{os.getpid()}"
    _pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _pg_admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield Database("postgres", _pg_dsn(admin_url, name), name)
    finally:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # noqa: BLE001 - Django may not be set up yet; the drop is what matters
            pass
        if not keep:
            _pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def migrated_database(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Database, dict[str, str]]]:
    """A throwaway database of --database, migrated, with Django set up for it in this process;
    yields it and the environment of the scheduler processes to start on it."""
    with throwaway_database(args.database, prefix, args.pg_url) as database:
        say(f"database: {database.vendor} {database.name}")
        env = environment(database, args)
        migrate_and_set_up(env)
        yield database, env


def environment(database: Database, args: argparse.Namespace) -> dict[str, str]:
    """The environment of the scheduler processes and of this process's own Django."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "ENV_FILE": os.devnull,
        "SECRET_KEY": "bench-" + "x" * 50,
        "DEBUG": "false",
        "DATABASE_URL": database.url,
        "MAX_CONCURRENT_JOBS": str(args.max_concurrent),
        "LOG_LEVEL": args.log_level,
        "LOG_FORMAT": "text",
    }


def migrate_and_set_up(env: dict[str, str]) -> None:
    """Run `manage.py migrate` on the database, then configure Django in this process for it."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(MANAGE), "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True, timeout=300
    )
    say(f"migrated in {time.monotonic() - started:.1f}s")
    os.environ.update(env)
    import django

    django.setup()


# -- a real scheduler process --------------------------------------------------------------------


class Scheduler:
    """One `manage.py runscheduler` process; its output goes to a temp log file."""

    def __init__(
        self, env: dict[str, str], *, max_concurrent: int, python: str = sys.executable, extra: Sequence[str] = ()
    ) -> None:
        self._log_dir = tempfile.mkdtemp(prefix="bench-scheduler-")
        self.log_path = Path(self._log_dir) / "scheduler.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [python, str(MANAGE), "runscheduler", "--max-concurrent", str(max_concurrent), *extra],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.exit_status: int | None = None

    def wait_registered(self, timeout: float = 60) -> None:
        """Wait until the process has written its SchedulerProcess row."""
        from jobs.models import SchedulerProcess

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited with {self.proc.returncode}:\n{self.log_tail()}")
            if SchedulerProcess.objects.filter(pid=self.pid, stopped_at__isnull=True).exists():
                return
            time.sleep(0.05)
        raise RuntimeError(f"scheduler did not register within {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def count_log_lines(self, needle: str) -> int:
        if not self._log.closed:
            self._log.flush()
        return sum(needle in line for line in self.log_path.read_text(errors="replace").splitlines())

    def stop(self, grace: float = 30) -> int:
        """SIGTERM (running jobs finish), then SIGKILL after `grace` seconds; return the exit status."""
        if self.exit_status is None:
            self.exit_status = stop_process(self.proc, grace=grace)
            self._log.close()
        return self.exit_status

    def remove_log(self) -> None:
        shutil.rmtree(self._log_dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen[Any], *, grace: float) -> int:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


# -- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the ")" of the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def pg_backends() -> list[int]:
    """Server pids of the other connections to this PostgreSQL database: the scheduler's."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [row[0] for row in cursor.fetchall()]


def total_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of several processes; NaN when one has gone (the sum would be incomplete)."""
    try:
        return sum(cpu_seconds(pid) for pid in pids)
    except FileNotFoundError:
        return math.nan


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def rounded(value: float, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def spread_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of durations given in seconds, in milliseconds."""
    return {
        "p50": rounded(percentile(seconds, 50) * 1000, 2),
        "p99": rounded(percentile(seconds, 99) * 1000, 2),
        "max": rounded(max(seconds) * 1000, 2) if seconds else None,
    }


def redirect_logging(stream: TextIO) -> None:
    """Send this process's log handlers to `stream` (the engine logs a line per run start and end)."""
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


# -- sampling profiles of the real scheduler process ----------------------------------------------


class PySpy:
    """`py-spy record` of one process (ours) into a collapsed-stack file, for where-the-time-goes reports."""

    def __init__(self, pid: int, output: Path, *, rate: int = 250) -> None:
        executable = Path(sys.executable).parent / "py-spy"
        found = str(executable) if executable.exists() else shutil.which("py-spy")
        if not found:
            raise RuntimeError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
        self.output = output
        self.proc = subprocess.Popen(
            [found, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nonblocking"]
            + ["--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop sampling; py-spy writes its file on SIGINT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, grace=5)


@contextmanager
def sampled(args: argparse.Namespace, label: str, pid: int) -> Iterator[None]:
    """With --py-spy, sample process `pid` while the block runs, then print where its time went."""
    profile = py_spy_output(args, label)
    if profile is None:
        yield
        return
    spy = PySpy(pid, profile)
    try:
        yield
    finally:
        spy.stop()
        for line in summarize_collapsed(profile):
            say(line)


def summarize_collapsed(path: Path, top: int = 25) -> list[str]:
    """The functions with the most samples on top of the stack (self) and anywhere in it (total)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    if not path.exists():
        return [f"no profile was written to {path}"]
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples of non-idle threads in {path}"]
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"top {top} by {title}:")
        lines.extend(f"  {100 * count / max(samples, 1):5.1f}%  {name}" for name, count in counter.most_common(top))
    return lines


def py_spy_output(args: argparse.Namespace, label: str) -> Path | None:
    """Where a --py-spy profile labelled `label` goes, or None without --py-spy."""
    if not args.py_spy:
        return None
    folder = Path(args.py_spy).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{label}.txt"


def _frame_name(frame: str) -> str:
    """'execute (django/db/backends/utils.py:105)' -> 'execute (django/db/backends/utils.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where).replace(str(ROOT) + "/", "")
    return f"{name} ({where})"
