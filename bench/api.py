"""API: latency of the REST API's lists, detail, create and metrics over a large run history.

    .venv/bin/python bench/api.py [--jobs 100000] [--runs 1000000] [--requests 200] [--seconds 10]
        [--clients 1,4] [--keep] [--database-url URL] [--target-p99-ms 50]

Loads --jobs jobs and --runs runs into a throwaway PostgreSQL database with INSERT ... SELECT
over generate_series (no ORM rows), then VACUUM ANALYZE. The runs cover the last 30 days, one
after another, so ids grow with time as in production; every second run belongs to the busiest
1 % of the jobs (about 500 runs each at the defaults), the others are spread over all jobs. Most
succeeded; some failed, were skipped, lost or timed out; the newest few are running or queued.
The finished-run counters (kept by the scheduler's store, not by triggers) are left empty: /metrics
reads them in the same time whatever they hold. The load reports the share of the runs table VACUUM could mark
all-visible: a long transaction anywhere on the server holds it back, and index-only scans then
read the table too, so figures taken then are not comparable.

Then gunicorn serves the project's WSGI app (`scheduler_project.wsgi`, its own settings, DEBUG
false) with 2 sync workers on a free port of 127.0.0.1, and each request below is sent --requests
times or for --seconds, whichever ends first, by 1 and then by 4 concurrent clients (threads, one
keep-alive connection each), authenticated as a superuser with `Authorization: Token ...`:

    GET /jobs, GET /jobs?ordering=-next_run_at, GET /jobs/{id} (random jobs), POST /jobs,
    GET /runs, GET /runs?status=failed, GET /jobs/{id}/runs (jobs with over a page of runs),
    GET /metrics, and the second page of every list (its `next` link, whatever the pagination).

Figures per request and client count: p50, p99 and max latency, requests/s, and the status codes
seen (a non-2xx answer or a broken connection is counted and makes the exit status 1). For each
list page and for /metrics, the SQL the view runs is captured in this process (the same view,
settings and database, through DRF's test client) and each statement on the jobs tables is
EXPLAIN (ANALYZE, BUFFERS)-ed: its top node, its scans and its execution time.

Output: one JSON line on stdout; progress, the plans and a table on stderr, with whether each p99
at one client meets --target-p99-ms (issue #12: 50 ms at 1M and at 10M runs).

--database-url with a database name measures that database instead of a throwaway one: it is
migrated, loaded only if it holds no runs, and never dropped (so `--keep` once, then
`--database-url .../bench_api_<pid>` measures the same data again without loading it).

gunicorn is a runtime requirement (requirements.txt), so it is in .venv already.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from scheduler_project.env import redact_password

TARGET_P99_MS = 50.0
HISTORY = 30 * 86400  # seconds of run history: RUN_RETENTION_DAYS' default
BUSY_SHARE = 100  # 1 job in this many is busy, and holds every second run
LOAD_CHUNK = 100_000  # runs per INSERT statement (each its own transaction)
PROGRESS_EVERY = 1_000_000  # runs between progress lines
REQUEST_TIMEOUT = 120.0  # seconds for one HTTP request (a 10M-run list page may take seconds)
STATEMENT_TIMEOUT_MS = 30 * 60 * 1000  # for one loading statement, VACUUM or EXPLAIN
SAMPLE_JOBS = 200  # random jobs the detail request cycles through
SAMPLE_BUSY_JOBS = 20  # jobs with over a page of runs, for /jobs/{id}/runs
WORKERS = 2
USERNAME = "bench-api"
CREATE_BODY = {
    "name": "Daily reminder",
    "cron_expression": "0 9 * * *",
    "job_type": "email_notification",
    "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
}


def say(message: str) -> None:
    """Print one progress line on stderr at once: stdout carries only the JSON line."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs to load (default 100000)")
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs to load (default 1000000)")
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per request kind and client count (default 200)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10, help="stop a request kind after this long, even short of --requests"
    )
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests per request kind first")
    parser.add_argument("--clients", default="1,4", help="comma-separated concurrent client counts (default 1,4)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway database (its URL is printed)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_PG_URL", harness.DEFAULT_PG_URL),
        help=(
            f"a PostgreSQL server to create the throwaway database on (default {harness.DEFAULT_PG_URL}, or "
            "BENCH_PG_URL), or a database to use as it is (loaded only if it has no runs, never dropped)"
        ),
    )
    parser.add_argument("--target-p99-ms", type=float, default=TARGET_P99_MS, help="p99 target at one client")
    parser.add_argument("--no-plans", action="store_true", help="skip EXPLAIN ANALYZE of the list queries")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="stop everything after this many seconds")
    args = parser.parse_args(argv)
    args.client_counts = harness.counts_option(parser, args.clients, "--clients", minimum=1, example="1,4")
    if args.jobs < 1 or args.runs < 0:
        parser.error("--jobs must be at least 1 and --runs at least 0")
    if args.requests < 1 or args.seconds <= 0:
        parser.error("--requests and --seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    # The whole run is bounded: SIGTERM makes the `finally` blocks stop gunicorn and drop the database.
    watchdog = threading.Timer(args.timeout, os.kill, args=(os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()
    problem = harness.postgres_available(server_url(args.database_url))
    if problem:
        say(f"PostgreSQL not available at {args.database_url}: {problem}")
        print(json.dumps({"benchmark": "api", "skipped": problem}), flush=True)
        return 0
    with database(args) as (url, name, throwaway):
        say(f"database: {name}" + (" (kept afterwards)" if args.keep or not throwaway else " (throwaway)"))
        env = environment(url)
        with contextlib.redirect_stdout(sys.stderr):  # harness.say prints on stdout, which is for the JSON
            harness.migrate_and_set_up(env)
        load = load_data(args.jobs, args.runs)
        figures = measure(args, env)
        figures.update(
            {
                "benchmark": "api",
                "database": name,
                "database_kept": args.keep or not throwaway,
                "database_url": redact_password(url) if args.keep or not throwaway else None,
                "load": load,
            }
        )
    watchdog.cancel()
    print(json.dumps(figures), flush=True)
    return 0 if figures["all_answered_2xx"] else 1


# -- the database --------------------------------------------------------------------------------


def server_url(url: str) -> str:
    """The URL without its database name: what the server-level checks connect through."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[tuple[str, str, bool]]:
    """Yield (url, name, throwaway): the database named in --database-url, or a throwaway one."""
    name = urlsplit(args.database_url).path.strip("/")
    if name:
        yield args.database_url, name, False
        return
    with harness.throwaway_database("postgres", "bench_api", args.database_url, keep=args.keep) as db:
        yield db.url, db.name, True


def environment(url: str) -> dict[str, str]:
    """The environment of gunicorn and of this process's Django: the project's own settings."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_project.settings",
        "ENV_FILE": os.devnull,
        "SECRET_KEY": "bench-" + "x" * 50,
        "DEBUG": "false",
        "DATABASE_URL": url,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Plain HTTP on the loopback: no redirect to https (a proxy would terminate TLS).
        "SECURE_SSL_REDIRECT": "false",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "text",
    }


def load_data(jobs: int, runs: int) -> dict[str, Any]:
    """Load the jobs and runs unless the database has runs already; VACUUM ANALYZE; return the timings."""
    from django.db import connection

    from jobs.models import Job, JobRun

    if JobRun.objects.exists():
        have = {"jobs": Job.objects.count(), "runs": JobRun.objects.count()}
        say(f"the database holds {have['jobs']} jobs and {have['runs']} runs already: not loading")
        return {"loaded": False, **have}
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        # Losing the rows in a crash costs nothing here; this saves a WAL flush per statement.
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SELECT setseed(0.12), now()")
        now = cursor.fetchone()[1]
    now_sql = f"'{now.isoformat()}'::timestamptz"  # one instant for every statement of the load
    jobs_s, busy, runs_s = insert_jobs_and_runs(jobs, runs, now_sql)

    vacuum_started = time.monotonic()
    with connection.cursor() as cursor:
        # As autovacuum would soon do: statistics and visibility maps as on settled tables.
        cursor.execute("VACUUM ANALYZE")
        cursor.execute("SELECT pg_total_relation_size('jobs_jobrun'), pg_total_relation_size('jobs_job')")
        run_bytes, job_bytes = cursor.fetchone()
        cursor.execute("RESET statement_timeout; RESET synchronous_commit")
    vacuum_s = time.monotonic() - vacuum_started
    total_s = time.monotonic() - started
    say(
        f"VACUUM ANALYZE in {vacuum_s:.1f}s; loaded in {total_s:.1f}s in all; runs table with indexes "
        f"{run_bytes / 2**20:.0f} MB, jobs table {job_bytes / 2**20:.0f} MB"
    )
    visibility = all_visible()
    return {
        "loaded": True,
        "jobs": jobs,
        "runs": runs,
        "busy_jobs": busy,
        "jobs_s": round(jobs_s, 2),
        "runs_s": round(runs_s, 2),
        "vacuum_analyze_s": round(vacuum_s, 2),
        "total_s": round(total_s, 2),
        "runs_table_mb": round(run_bytes / 2**20, 1),
        "jobs_table_mb": round(job_bytes / 2**20, 1),
        **visibility,
    }


def insert_jobs_and_runs(jobs: int, runs: int, now_sql: str) -> tuple[float, int, float]:
    """Insert the jobs, then the runs in chunks; return the seconds each took and the busy jobs."""
    from jobs.models import Job, JobRun

    started = time.monotonic()
    insert_generated(Job, job_columns(jobs, now_sql), f"(SELECT g, {randoms(3)} FROM generate_series(1, {jobs}) g) s")
    ids = Job.objects.order_by("id").values_list("id", flat=True)
    first_job, last_job = ids.first(), ids.last()
    if first_job is None or last_job is None or last_job - first_job + 1 != jobs:
        raise RuntimeError(f"the loaded jobs' ids are not contiguous ({first_job}..{last_job} for {jobs} jobs)")
    jobs_s = time.monotonic() - started
    say(f"loaded {jobs} jobs in {jobs_s:.1f}s")

    busy = max(1, jobs // BUSY_SHARE)
    runs_started = time.monotonic()
    for low in range(1, runs + 1, LOAD_CHUNK):
        high = min(runs, low + LOAD_CHUNK - 1)
        source = run_source(low=low, high=high, total=runs, first_job=first_job, jobs=jobs, busy=busy, now=now_sql)
        insert_generated(JobRun, RUN_COLUMNS, source)
        if high % PROGRESS_EVERY == 0 and high < runs:
            say(f"  {high} runs loaded after {time.monotonic() - runs_started:.1f}s")
    runs_s = time.monotonic() - runs_started
    say(f"loaded {runs} runs in {runs_s:.1f}s")
    return jobs_s, busy, runs_s


def all_visible() -> dict[str, Any]:
    """The share of the runs table VACUUM could mark all-visible; below 1 when an older transaction
    (in any database of the server) holds the horizon back, and index-only scans then visit the heap."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT relallvisible, relpages FROM pg_class WHERE relname = 'jobs_jobrun'")
        visible, pages = cursor.fetchone()
        cursor.execute(
            "SELECT datname, pid, extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity "
            "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() ORDER BY xact_start LIMIT 1"
        )
        oldest = cursor.fetchone()
    share = visible / pages if pages else 1.0
    figures: dict[str, Any] = {"runs_all_visible_share": round(share, 3)}
    if oldest:
        figures["oldest_other_transaction"] = {"database": oldest[0], "pid": oldest[1], "age_s": round(oldest[2], 1)}
    if share < 0.9:
        holder = f" (oldest transaction: database {oldest[0]}, pid {oldest[1]}, {oldest[2]:.0f}s old)" if oldest else ""
        say(f"warning: VACUUM marked only {share:.0%} of the runs table all-visible{holder}")
    return figures


def randoms(count: int) -> str:
    """`random() AS r1, ...`: in a subquery, so each is drawn once per row however often it is used."""
    return ", ".join(f"random() AS r{i}" for i in range(1, count + 1))


def insert_generated(model: Any, columns: dict[str, str], source: str) -> None:
    """INSERT ... SELECT `columns` (column -> SQL over `source`) into the model's table.

    Columns not named (a field added since this was written, say) get their field's default.
    """
    from django.db import connection

    names: list[str] = []
    values: list[str] = []
    params: list[Any] = []
    for model_field in model._meta.concrete_fields:
        if model_field.primary_key:
            continue
        names.append(connection.ops.quote_name(model_field.column))
        if model_field.column in columns:
            values.append(columns[model_field.column])
        else:
            values.append("%s")
            params.append(model_field.get_db_prep_save(model_field.get_default(), connection))
    unknown = set(columns) - {model_field.column for model_field in model._meta.concrete_fields}
    if unknown:
        raise RuntimeError(f"{model._meta.db_table} has no column {', '.join(sorted(unknown))}")
    sql = f"INSERT INTO {model._meta.db_table} ({', '.join(names)}) SELECT {', '.join(values)} FROM {source}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def job_columns(jobs: int, now: str) -> dict[str, str]:
    """Jobs of two types with realistic parameters; 95 % enabled, due within a day. No literal %: there are params."""
    email = (
        "jsonb_build_object('recipient', jsonb_build_array('team' || mod(g, 97) || '@example.com'), "
        "'subject', 'Report ' || g || ' is ready', 'body', 'Hello,' || chr(10) || 'the report is ready.')"
    )
    webhook = (
        "jsonb_build_object('method', 'POST', 'url', 'https://hooks.example.com/sync/' || g, "
        "'json', jsonb_build_object('source', 'scheduler', 'full', r2 < 0.1), "
        "'headers', jsonb_build_object('Authorization', jsonb_build_object('from_env', 'HOOK_TOKEN')), "
        "'timeout_seconds', 20, 'expected_status', jsonb_build_array(200, 202))"
    )
    return {
        "name": "(ARRAY['Daily report', 'Sync CRM', 'Nightly backup', 'Invoice reminder', 'Cache warm-up'])"
        "[1 + mod(g, 5)] || ' ' || g",
        "description": "CASE WHEN mod(g, 3) = 0 THEN 'Loaded by bench/api.py as job ' || g ELSE '' END",
        "cron_expression": "(ARRAY['*/5 * * * *', '0 * * * *', '0 9 * * *', '30 2 * * *', '0 9 * * MON', "
        "'*/15 * * * *', '0 0 1 * *', '0 6 * * 1-5', '@daily', '0 */4 * * *'])[1 + mod(g, 10)]",
        "timezone": "(ARRAY['UTC', 'Europe/Berlin', 'America/New_York', 'Asia/Tokyo'])[1 + mod(g, 4)]",
        "job_type": "CASE WHEN r1 < 0.6 THEN 'email_notification' ELSE 'http_request' END",
        "parameters": f"CASE WHEN r1 < 0.6 THEN {email} ELSE {webhook} END",
        "enabled": "r2 < 0.95",
        "next_run_at": f"CASE WHEN r2 < 0.95 THEN {now} + r3 * interval '1 day' END",
        "last_run_at": f"{now} - r3 * interval '1 hour'",
        "last_run_status": "CASE WHEN r3 < 0.95 THEN 'succeeded' ELSE 'failed' END",
        "created_at": f"{now} - interval '400 days' + (g::float8 / {jobs}) * interval '365 days'",
        "updated_at": f"{now} - interval '35 days' + (g::float8 / {jobs}) * interval '30 days'",
    }


def run_source(*, low: int, high: int, total: int, first_job: int, jobs: int, busy: int, now: str) -> str:
    """Runs `low`..`high` of `total`: one every HISTORY/total seconds up to now, half of them of the busy jobs."""
    queued = min(total, max(1, total // 10_000))
    running = min(total - queued, 20)
    step = HISTORY / max(total, 1)
    return (
        "(SELECT g, r4, r5, "
        f"CASE WHEN mod(g, 2) = 0 THEN {first_job} + floor(r1 * {busy}) "
        f"ELSE {first_job} + floor(r1 * {jobs}) END::bigint AS job_id, "
        f"CASE WHEN g > {total - queued} THEN 'queued' WHEN g > {total - queued - running} THEN 'running' "
        "WHEN r2 < 0.90 THEN 'succeeded' WHEN r2 < 0.95 THEN 'failed' WHEN r2 < 0.98 THEN 'skipped' "
        "WHEN r2 < 0.99 THEN 'lost' ELSE 'timed_out' END AS status, "
        f"{now} - make_interval(secs => ({total} - g + 1) * {step!r}) AS scheduled_for, "
        "make_interval(secs => 0.002 + r3 * 0.2) AS lateness, "
        "make_interval(secs => 0.05 + power(r4, 4) * 300) AS duration "
        f"FROM (SELECT g, {randoms(5)} FROM generate_series({low}, {high}) g) raw) s"
    )


RUN_COLUMNS = {
    "job_id": "job_id",
    "scheduled_for": "scheduled_for",
    "trigger": "CASE WHEN r5 < 0.02 THEN 'retry' WHEN r5 < 0.03 THEN 'manual' ELSE 'schedule' END",
    "attempt": "CASE WHEN r5 < 0.02 THEN 2 ELSE 1 END",
    "status": "status",
    "not_before": "scheduled_for",
    "started_at": "CASE WHEN status IN ('queued', 'skipped') THEN NULL ELSE scheduled_for + lateness END",
    "finished_at": "CASE WHEN status IN ('queued', 'running') THEN NULL WHEN status = 'skipped' THEN scheduled_for "
    "ELSE scheduled_for + lateness + duration END",
    "result": "CASE WHEN status = 'succeeded' THEN jsonb_build_object('status', 200, "
    "'elapsed_ms', round(extract(epoch FROM duration) * 1000)) END",
    "error": "CASE status WHEN 'failed' THEN 'HTTP 503 from https://hooks.example.com/sync: Service Unavailable' "
    "WHEN 'lost' THEN 'The scheduler running this run stopped heartbeating.' "
    "WHEN 'timed_out' THEN 'Timed out after 300 seconds.' ELSE '' END",
    "skip_reason": "CASE WHEN status = 'skipped' THEN 'The previous run was still active (overlap policy forbid).' "
    "ELSE '' END",
    "created_at": "scheduled_for",
}


# -- gunicorn and the requests -------------------------------------------------------------------


class Gunicorn:
    """gunicorn serving the project's WSGI app on a free loopback port; its log goes to a temp file."""

    def __init__(self, env: dict[str, str], *, workers: int) -> None:
        executable = Path(sys.executable).parent / "gunicorn"
        if not executable.exists():
            raise RuntimeError(f"no {executable}: install requirements.txt into the virtualenv")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._log_dir = tempfile.mkdtemp(prefix="bench-api-")
        self.log_path = Path(self._log_dir) / "gunicorn.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(executable), "scheduler_project.wsgi:application", "--workers", str(workers)]
            + ["--worker-class", "sync", "--bind", f"127.0.0.1:{self.port}", "--timeout", str(int(REQUEST_TIMEOUT))]
            + ["--graceful-timeout", "10", "--log-level", "warning"],
            cwd=harness.ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the server answers (the health check, without asking for a scheduler)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", "/health?scheduler=false")
                connection.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)
            finally:
                connection.close()
        raise RuntimeError(f"gunicorn did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM to the master (it stops its workers), SIGKILL after 30 s; remove the log."""
        status = harness.stop_process(self.proc, grace=30)
        self._log.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)
        return status


@dataclass(frozen=True)
class Request:
    """One kind of request: sent to each of `paths` in turn."""

    label: str
    method: str
    paths: tuple[str, ...]
    body: bytes | None = None
    accept: str = "application/json"
    is_list: bool = False


@dataclass
class Client:
    """Sends requests over one keep-alive connection (gunicorn's sync workers close it; it reopens)."""

    port: int
    token: str
    connection: http.client.HTTPConnection = field(init=False)

    def __post_init__(self) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)

    def send(self, request: Request, path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Token {self.token}", "Accept": request.accept}
        if request.body is not None:
            headers["Content-Type"] = "application/json"
        try:
            self.connection.request(request.method, path, body=request.body, headers=headers)
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            raise

    def get_json(self, path: str) -> Any:
        request = Request(path, "GET", (path,))
        status, body = self.send(request, path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.connection.close()


def next_path(page: Any) -> str | None:
    """The path and query of a list page's `next` link, whatever the pagination; None without one."""
    link = page.get("next") if isinstance(page, dict) else None
    if not link:
        return None
    parts = urlsplit(link)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def api_token() -> str:
    """A superuser's API token (created once): permission checks cost no queries, as for an admin."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user_model = get_user_model()
    user = user_model.objects.filter(username=USERNAME).first()
    if user is None:
        user = user_model.objects.create_superuser(USERNAME, "bench@example.com", None)
    token, _ = Token.objects.get_or_create(user=user)
    return str(token.key)


def sample_jobs() -> tuple[list[int], list[int]]:
    """Random job ids, and jobs with more than a page (50) of runs, found from random runs."""
    from django.db import connection

    rng = random.Random(12)
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), max(id) FROM jobs_job")
        low, high = cursor.fetchone()
        candidates = rng.sample(range(low, high + 1), min(4 * SAMPLE_JOBS, high - low + 1))
        cursor.execute("SELECT id FROM jobs_job WHERE id = ANY(%s)", [candidates])
        jobs = [row[0] for row in cursor.fetchall()][:SAMPLE_JOBS]
        rng.shuffle(jobs)
        cursor.execute("SELECT min(id), max(id) FROM jobs_jobrun")
        low, high = cursor.fetchone()
        busy: list[int] = []
        if low is not None:
            # A random run's job is a busy one as often as the busy jobs hold runs.
            ids = rng.sample(range(low, high + 1), min(200, high - low + 1))
            cursor.execute("SELECT DISTINCT job_id FROM jobs_jobrun WHERE id = ANY(%s)", [ids])
            for (job_id,) in cursor.fetchall():
                cursor.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs_jobrun WHERE job_id = %s LIMIT 51) r", [job_id]
                )
                if cursor.fetchone()[0] > 50:
                    busy.append(job_id)
                if len(busy) == SAMPLE_BUSY_JOBS:
                    break
    return jobs, busy


def build_requests(client: Client) -> tuple[list[Request], list[str]]:
    """The request kinds to measure, their second pages found through `next`; and what is missing."""
    jobs, busy = sample_jobs()
    missing: list[str] = []
    requests: list[Request] = []

    def add_list(label: str, paths: Sequence[str]) -> None:
        requests.append(Request(f"GET {label}", "GET", tuple(paths), is_list=True))
        try:
            second = [found for found in (next_path(client.get_json(path)) for path in paths) if found]
        except RuntimeError as exc:  # the first page is measured all the same, and its answers counted
            missing.append(f"GET {label} page 2 ({exc})")
            return
        if second:
            requests.append(Request(f"GET {label} page 2", "GET", tuple(second), is_list=True))
        else:
            missing.append(f"GET {label} page 2 (no next link)")

    add_list("/jobs", ["/jobs"])
    add_list("/jobs?ordering=-next_run_at", ["/jobs?ordering=-next_run_at"])
    requests.append(Request("GET /jobs/{id}", "GET", tuple(f"/jobs/{job}" for job in jobs)))
    requests.append(Request("POST /jobs", "POST", ("/jobs",), body=json.dumps(CREATE_BODY).encode()))
    add_list("/runs", ["/runs"])
    add_list("/runs?status=failed", ["/runs?status=failed"])
    if busy:
        add_list("/jobs/{id}/runs", [f"/jobs/{job}/runs" for job in busy])
    else:
        missing.append("GET /jobs/{id}/runs (no job has over a page of runs)")
    requests.append(Request("GET /metrics", "GET", ("/metrics",), accept="text/plain"))
    return requests, missing


def measure_request(
    port: int, token: str, request: Request, *, clients: int, count: int, seconds: float
) -> dict[str, Any]:
    """Send `request` from `clients` threads until `count` are sent or `seconds` pass; the figures."""
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    issued = 0
    window: dict[str, float] = {}

    def start() -> None:
        window["start"] = time.monotonic()
        window["deadline"] = window["start"] + seconds

    barrier = threading.Barrier(clients, action=start)

    def client_loop() -> None:
        nonlocal issued
        client = Client(port, token)
        try:
            barrier.wait(timeout=60)
            while True:
                with lock:
                    if issued >= count or time.monotonic() >= window["deadline"]:
                        return
                    path = request.paths[issued % len(request.paths)]
                    issued += 1
                began = time.perf_counter()
                try:
                    status, _ = client.send(request, path)
                except (OSError, http.client.HTTPException) as exc:
                    outcome = f"error {type(exc).__name__}"
                else:
                    outcome = str(status)
                elapsed = time.perf_counter() - began
                with lock:
                    statuses[outcome] += 1
                    if not outcome.startswith("error"):
                        latencies.append(elapsed)
                    window["end"] = time.monotonic()
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    cpu_before, cpu_started = host_cpu_ticks(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + REQUEST_TIMEOUT + 60)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"{request.label}: a client did not finish in time")
    cpu_after, cpu_elapsed = host_cpu_ticks(), time.monotonic() - cpu_started
    busy = (cpu_after[0] - cpu_before[0]) / harness.CLOCK_TICKS / cpu_elapsed
    steal = (cpu_after[1] - cpu_before[1]) / harness.CLOCK_TICKS / cpu_elapsed
    elapsed = window.get("end", window.get("start", 0.0)) - window.get("start", 0.0)
    not_2xx = sum(n for outcome, n in statuses.items() if not outcome.startswith("2"))
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else None,
        **{f"{name}_ms": value for name, value in harness.spread_ms(latencies).items()},
        "statuses": dict(sorted(statuses.items())),
        "not_2xx": not_2xx,
        # The whole host's CPU meanwhile, in cores: the clients, gunicorn and PostgreSQL, and any
        # neighbour. One client keeps about one core busy; much more means the figures are shared.
        "host_cpu_busy_cores": round(busy, 2),
        "host_cpu_steal_cores": round(steal, 2),
    }


def host_cpu_ticks() -> tuple[int, int]:
    """Busy (user, nice, system, irq, softirq) and stolen clock ticks of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    values += [0] * (8 - len(values))
    return values[0] + values[1] + values[2] + values[5] + values[6], values[7]


def warm_up(client: Client, request: Request, count: int) -> None:
    """Send a few unmeasured requests, so both workers have imported and connected; report odd answers."""
    for i in range(count):
        path = request.paths[i % len(request.paths)]
        status, body = client.send(request, path)
        if not 200 <= status < 300:
            say(f"  warning: warm-up {request.method} {path} answered {status}: {body[:200]!r}")


# -- plans ---------------------------------------------------------------------------------------


def capture_plans(requests: Sequence[Request], token: str) -> dict[str, Any]:
    """Run each list page (and /metrics) in this process, and EXPLAIN ANALYZE its statements on the jobs tables."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    # WhiteNoise warns once that collectstatic has not run: no static file is served here.
    warnings.filterwarnings("ignore", message="No directory at")
    client = APIClient(HTTP_HOST="127.0.0.1")
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    plans: dict[str, Any] = {}
    with connection.cursor() as cursor:
        cursor.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    for request in requests:
        if not (request.is_list or request.label == "GET /metrics"):
            continue
        path = request.paths[0]
        with CaptureQueriesContext(connection) as captured:
            response = client.get(path, HTTP_ACCEPT=request.accept)
        statements = [query["sql"] for query in captured.captured_queries]
        explained = [explain(sql) for sql in statements if on_jobs_tables(sql)]
        plans[request.label] = {
            "path": path,
            "status": response.status_code,
            "queries": len(statements),
            "statements": explained,
            "execution_ms_total": round(sum(plan["execution_ms"] for plan in explained), 2),
        }
        say(
            f"plan of {request.label} ({path}): {len(statements)} queries, "
            f"{len(explained)} on the jobs tables, {plans[request.label]['execution_ms_total']:.1f} ms executing"
        )
        for plan in explained:
            seq = f"  (seq scan of {', '.join(plan['seq_scans'])})" if plan["seq_scans"] else ""
            say(f"  {plan['execution_ms']:9.2f} ms  {plan['scan']:5}  {plan['outline']}{seq}")
    return plans


def on_jobs_tables(sql: str) -> bool:
    return sql.lstrip().upper().startswith("SELECT") and '"jobs_' in sql


def explain(sql: str) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) one statement: its top node, its scans, its time and its plan."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        (document,) = cursor.fetchone()
    if isinstance(document, str):
        document = json.loads(document)
    root = document[0]["Plan"]
    nodes = list(walk(root))
    scans = [node_label(node) for node in nodes if "Scan" in node["Node Type"]]
    seq_scans = sorted({node.get("Relation Name", "?") for node in nodes if node["Node Type"] == "Seq Scan"})
    # A sequential scan of a small table (the scheduler processes) is fine; of jobs or runs, it grows.
    growing = [table for table in seq_scans if table in GROWING_TABLES]
    return {
        "sql": sql,
        "top": node_label(root),
        "outline": outline(root),
        "scan": "seq" if growing else ("index" if scans else "none"),
        "scans": scans,
        "seq_scans": seq_scans,
        "rows": root.get("Actual Rows"),
        "execution_ms": round(document[0]["Execution Time"], 3),
        "planning_ms": round(document[0]["Planning Time"], 3),
        "buffers": {"hit": root.get("Shared Hit Blocks", 0), "read": root.get("Shared Read Blocks", 0)},
        "plan": plan_lines(root),
    }


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def node_label(node: dict[str, Any]) -> str:
    label = str(node["Node Type"])
    if "Index Name" in node:
        label += f" using {node['Index Name']}"
    if "Relation Name" in node:
        label += f" on {node['Relation Name']}"
    return label


def outline(node: dict[str, Any]) -> str:
    """The plan's nodes on one line: `Limit > Sort > (Seq Scan on a; Hash > Seq Scan on b)`."""
    children = node.get("Plans", [])
    if not children:
        return node_label(node)
    if len(children) == 1:
        return f"{node_label(node)} > {outline(children[0])}"
    return f"{node_label(node)} > ({'; '.join(outline(child) for child in children)})"


GROWING_TABLES = ("jobs_job", "jobs_jobrun")
PLAN_DETAILS = ("Sort Key", "Sort Method", "Index Cond", "Filter", "Rows Removed by Filter", "Hash Cond")


def plan_lines(node: dict[str, Any], depth: int = 0) -> list[str]:
    """The plan as indented text lines, like EXPLAIN's own, with the details that explain the cost."""
    details = "".join(f"; {name}: {node[name]}" for name in PLAN_DETAILS if name in node)
    line = (
        f"{'  ' * depth}{'-> ' if depth else ''}{node_label(node)} (time {node.get('Actual Total Time', 0):.2f} ms, "
        f"rows {node.get('Actual Rows')}, loops {node.get('Actual Loops')}, "
        f"buffers hit {node.get('Shared Hit Blocks', 0)} read {node.get('Shared Read Blocks', 0)}{details})"
    )
    lines = [line]
    for child in node.get("Plans", []):
        lines.extend(plan_lines(child, depth + 1))
    return lines


# -- the benchmark -------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit and the uncommitted changes under jobs/ that these figures belong to."""

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *arguments], cwd=harness.ROOT, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "diff_stat_jobs_api": git("diff", "--stat", "--", "jobs/api"),
        "diff_stat_jobs": git("diff", "--stat", "--", "jobs"),
        "untracked_jobs": git("ls-files", "--others", "--exclude-standard", "--", "jobs"),
    }


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    token = api_token()
    state = git_state()
    load_average = {"start": os.getloadavg()}
    say(f"git HEAD {state['head']}; jobs/api changes: {state['diff_stat_jobs_api'] or 'none'}")
    server = Gunicorn(env, workers=WORKERS)
    try:
        server.wait_ready()
        say(f"gunicorn ({WORKERS} sync workers) pid {server.proc.pid} on 127.0.0.1:{server.port}")
        client = Client(server.port, token)
        try:
            requests, missing = build_requests(client)
            for note in missing:
                say(f"not measured: {note}")
            plans = {} if args.no_plans else capture_plans(requests, token)
            results: dict[str, dict[str, Any]] = {request.label: {} for request in requests}
            for clients in args.client_counts:
                for request in requests:
                    if clients == args.client_counts[0]:
                        warm_up(client, request, args.warmup)
                    figures = measure_request(
                        server.port, token, request, clients=clients, count=args.requests, seconds=args.seconds
                    )
                    results[request.label][str(clients)] = figures
                    say(
                        f"{request.label}, {clients} client{'s' if clients > 1 else ''}: {figures['requests']} in "
                        f"{figures['seconds']:.1f}s, p50 {figures['p50_ms']} p99 {figures['p99_ms']} ms, "
                        f"{figures['requests_per_s']}/s, statuses {figures['statuses']}"
                    )
        finally:
            client.close()
    finally:
        status = server.stop()
        say(f"gunicorn stopped (exit status {status})")
    load_average["end"] = os.getloadavg()
    target = args.target_p99_ms
    first = str(args.client_counts[0])
    met = {
        label: by_clients[first]["p99_ms"] is not None and by_clients[first]["p99_ms"] <= target
        for label, by_clients in results.items()
    }
    answered = all(figures["not_2xx"] == 0 for by_clients in results.values() for figures in by_clients.values())
    print_table(results, met, target, first)
    return {
        "git": state,
        "server": {"workers": WORKERS, "worker_class": "sync", "wsgi": "scheduler_project.wsgi"},
        # The clients, gunicorn and PostgreSQL share this host's CPUs with whatever else runs on it.
        "host": {"cpus": os.cpu_count(), "load_average": load_average},
        "requests_per_kind": args.requests,
        "seconds_per_kind": args.seconds,
        "clients": args.client_counts,
        "results": results,
        "not_measured": missing,
        "plans": plans,
        "target": {"p99_ms": target, "clients": int(first), "met": met, "all_met": all(met.values())},
        "all_answered_2xx": answered,
    }


def print_table(results: dict[str, dict[str, Any]], met: dict[str, bool], target: float, first: str) -> None:
    width = max(len(label) for label in results) + 2
    say("")
    say(
        f"{'request':{width}}{'clients':>7}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>8}"
        f"{'non-2xx':>9}{'host cpu':>10}  p99 <= {target:g} ms"
    )
    for label, by_clients in results.items():
        for clients, figures in by_clients.items():
            verdict = ("yes" if met[label] else "NO") if clients == first else ""
            say(
                f"{label if clients == first else '':{width}}{clients:>7}{figures['requests']:>6}"
                f"{_ms(figures['p50_ms']):>9}{_ms(figures['p99_ms']):>9}{_ms(figures['max_ms']):>9}"
                f"{figures['requests_per_s'] or 0:>8.1f}{figures['not_2xx']:>9}"
                f"{figures['host_cpu_busy_cores']:>10.2f}  {verdict}"
            )
    say(f"(host cpu: cores busy on the whole host while measuring, of {os.cpu_count()}, neighbours included)")
    failed = [label for label, ok in met.items() if not ok]
    say(f"target p99 <= {target:g} ms at {first} client: " + ("met" if not failed else f"NOT met by {len(failed)}"))


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
