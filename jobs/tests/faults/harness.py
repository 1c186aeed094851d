"""Fault tooling for the fault tests and the soak benchmark.

- `PgCluster`: a PostgreSQL cluster of its own (initdb into a temp dir, a free port), to stop,
  restart and kill without touching any other server on the machine.
- `FaultDatabase`: raw reads and writes with psycopg2 or sqlite3. The test process's Django
  connection points at the suite's own database, so the fault database is never reached
  through the ORM here; jobs are created by `create_jobs`, which runs the services in a
  subprocess configured for that database.
- `Fleet`: real `manage.py runscheduler` processes, with kill -9, SIGSTOP/SIGCONT, SIGTERM and
  /proc readings (resident memory, open database connections).
- `SqliteWriteLock`: another process's write lock on a SQLite file, held for a while.
- `audit`: what the run table and the executed-work file say about one fault run: fires without
  a row, work done twice, lines of runs that should not have run.

Everything here stops only what it started, by pid (a cluster: by its own data directory), and
removes what it made. `python -m jobs.tests.faults.harness create-jobs|trigger` is the
subprocess side of `create_jobs` and `trigger_jobs`.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[3]
MANAGE = ROOT / "manage.py"
SETTINGS = "jobs.tests.settings"
PG_DEFAULT_BINDIR = Path("/usr/lib/postgresql/15/bin")
# Job types whose runs leave a line in a file (jobs/tests/job_types.py), and whether each is
# safe to repeat: a lost run of a safe type is retried, so its fire may have two lines.
APPEND_TYPES = {"test_append": True, "test_append_unsafe": False}
# What a scheduler logs when it finds that another presumed it dead (jobs/scheduler/engine.py).
PRESUMED_DEAD = re.compile(r"was presumed dead|registering again")
ACTIVE_STATUSES = ("queued", "running")

T = TypeVar("T")


class PgUnavailable(RuntimeError):
    """The PostgreSQL server binaries needed for a cluster of our own are not installed."""


def wait_for(
    predicate: Callable[[], T | None], timeout: float, *, interval: float = 0.1, what: str | Callable[[], str] = ""
) -> T:
    """Return the first truthy value of `predicate()`; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g}s: {detail}" if detail else f"condition not met in {timeout}s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a PostgreSQL cluster of our own ---------------------------------------------------------------


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are; PgUnavailable when they are not installed."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(found.stdout.strip()))
    candidates.append(PG_DEFAULT_BINDIR)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise PgUnavailable(
        "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: looked in "
        + ", ".join(str(folder) for folder in candidates)
        + " (Debian: apt-get install postgresql-15)"
    )


class PgCluster:
    """A PostgreSQL cluster in a temp dir, on a free port of 127.0.0.1, with trust auth.

    Run as the `postgres` user when we are root (initdb refuses root), as ourselves otherwise.
    Durability is off (fsync, synchronous_commit, full_page_writes): it is thrown away.
    """

    def __init__(self, *, bindir: Path | None = None, max_connections: int = 200) -> None:
        self.bindir = bindir or pg_bindir()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PgUnavailable("running as root needs runuser to start PostgreSQL as the postgres user")
            self._prefix = [runuser, "-u", "postgres", "--"]
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log_path = self.root / "postgres.log"
        try:
            self.sockets.mkdir()
            if self._prefix:
                for path in (self.root, self.sockets):
                    shutil.chown(path, "postgres", "postgres")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
            settings = {
                "port": str(self.port),
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.sockets}'",
                "max_connections": str(max_connections),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "logging_collector": "off",
            }
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# faults harness\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [*self._prefix, str(self.bindir / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed with status {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        return result

    def url(self, name: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: end sessions and shut down cleanly; `immediate`: like a crash)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-m", mode, "-w", "-t", "60", "restart")

    def running(self) -> bool:
        command = [*self._prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        return subprocess.run(command, capture_output=True, timeout=30, cwd=self.root).returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create a database (a copy of `template` if given) and return its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url(), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        finally:
            conn.close()
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None

    def close(self) -> None:
        """Stop our own postmaster (only it: by our data directory) and remove the directory."""
        if self._postmaster_pid() is not None:
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.SubprocessError):
                pid = self._postmaster_pid()
                # Only a postmaster whose command line names our data directory is ours.
                if pid is not None and str(self.data) in _cmdline(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- the fault database, from the outside -----------------------------------------------------------


def fault_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of every subprocess that talks to the fault database."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "ENV_FILE": os.devnull,
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "text",
        **extra,
    }
    env.setdefault("SECRET_KEY", "faults-only-not-secret")
    return env


def migrate(database_url: str, *, timeout: float = 300) -> None:
    """Run `manage.py migrate` on the fault database, in a subprocess."""
    result = subprocess.run(
        [sys.executable, str(MANAGE), "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env=fault_env(database_url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _django_call(database_url: str, command: str, payload: dict[str, Any], timeout: float) -> Any:
    """Run `command` of this module's __main__ in a subprocess with Django set up for the database."""
    result = subprocess.run(
        [sys.executable, "-m", "jobs.tests.faults.harness", command],
        cwd=ROOT,
        env=fault_env(database_url, LOG_LEVEL="warning"),
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class CreatedJob:
    id: int
    next_run_at: datetime | None


def create_jobs(database_url: str, specs: Sequence[dict[str, Any]], *, timeout: float = 300) -> list[CreatedJob]:
    """Create jobs with `jobs.services.job_create(**spec)` (so next_run_at is computed as usual)."""
    created = _django_call(database_url, "create-jobs", {"jobs": list(specs)}, timeout)
    return [CreatedJob(item["id"], _parse_time(item["next_run_at"])) for item in created]


def trigger_jobs(database_url: str, job_ids: Sequence[int], *, timeout: float = 60) -> list[int]:
    """Queue a manual run of each job with `jobs.services.job_trigger`; return the run ids."""
    return [int(run_id) for run_id in _django_call(database_url, "trigger", {"job_ids": list(job_ids)}, timeout)]


@dataclass(frozen=True)
class RunRow:
    id: int
    job_id: int
    scheduled_for: datetime
    trigger: str
    attempt: int
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: int | None
    missed_fires: int
    skip_reason: str
    error: str


@dataclass(frozen=True)
class SchedulerRow:
    id: int
    hostname: str
    pid: int
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None


@dataclass(frozen=True)
class JobRow:
    id: int
    name: str
    job_type: str
    cron_expression: str
    timezone: str
    enabled: bool


_RUN_SELECT = (
    "SELECT id, job_id, scheduled_for, trigger, attempt, status, started_at, finished_at, worker_id, "
    "missed_fires, skip_reason, error FROM jobs_jobrun"
)


def _parse_time(value: Any) -> Any:
    """SQLite gives naive UTC text; PostgreSQL aware datetimes; JSON ISO text."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class FaultDatabase:
    """Short-lived raw connections to the fault database (psycopg2 or sqlite3)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.vendor = "sqlite" if url.startswith("sqlite:") else "postgres"
        self.port = (urlsplit(url).port or 5432) if self.vendor == "postgres" else None
        self.path = Path(url.removeprefix("sqlite://")) if self.vendor == "sqlite" else None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        if self.path is not None:
            conn: Any = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        else:
            import psycopg2

            conn = psycopg2.connect(self.url, connect_timeout=10)
            conn.autocommit = True
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement with %s placeholders; return its rows (none for a write)."""
        if self.vendor == "sqlite":
            sql = sql.replace("%s", "?")
        with self._connect() as conn:
            cursor = conn.cursor()
            try:
                cursor.execute(sql, tuple(params))
                return list(cursor.fetchall()) if cursor.description else []
            finally:
                cursor.close()

    def runs(self) -> list[RunRow]:
        rows = self.query(_RUN_SELECT + " ORDER BY id")
        return [
            RunRow(
                id=row[0],
                job_id=row[1],
                scheduled_for=_parse_time(row[2]),
                trigger=row[3],
                attempt=row[4],
                status=row[5],
                started_at=_parse_time(row[6]),
                finished_at=_parse_time(row[7]),
                worker_id=row[8],
                missed_fires=row[9],
                skip_reason=row[10] or "",
                error=row[11] or "",
            )
            for row in rows
        ]

    def schedulers(self) -> list[SchedulerRow]:
        rows = self.query(
            "SELECT id, hostname, pid, started_at, last_heartbeat_at, stopped_at FROM jobs_schedulerprocess ORDER BY id"
        )
        return [
            SchedulerRow(row[0], row[1], row[2], _parse_time(row[3]), _parse_time(row[4]), _parse_time(row[5]))
            for row in rows
        ]

    def jobs(self) -> list[JobRow]:
        rows = self.query("SELECT id, name, job_type, cron_expression, timezone, enabled FROM jobs_job ORDER BY id")
        return [JobRow(row[0], row[1], row[2], row[3], row[4], bool(row[5])) for row in rows]

    def live_scheduler(self, pid: int) -> int | None:
        """The id of the live (not stopped) SchedulerProcess row of `pid`, if any."""
        rows = self.query("SELECT id FROM jobs_schedulerprocess WHERE pid = %s AND stopped_at IS NULL", [pid])
        return int(rows[0][0]) if rows else None

    def running_on(self, pid: int) -> int:
        """How many runs are running on the live scheduler of `pid`."""
        rows = self.query(
            "SELECT COUNT(*) FROM jobs_jobrun AS run JOIN jobs_schedulerprocess AS process "
            "ON process.id = run.worker_id WHERE run.status = 'running' AND process.pid = %s "
            "AND process.stopped_at IS NULL",
            [pid],
        )
        return int(rows[0][0])

    def disable_jobs(self) -> datetime:
        """Disable every job as `job_pause` would (no next fire); return when, by this host's clock."""
        self.query("UPDATE jobs_job SET enabled = %s, next_run_at = NULL", [False])
        return datetime.now(UTC)

    def unsettled(self) -> int:
        """Runs still queued or running, or timed out with their thread still going."""
        rows = self.query(
            "SELECT COUNT(*) FROM jobs_jobrun WHERE status IN ('queued', 'running') "
            "OR (status = 'timed_out' AND finished_at IS NULL)"
        )
        return int(rows[0][0])

    def statuses(self, run_ids: Sequence[int]) -> dict[int, tuple[str, int | None]]:
        """Status and worker of each of the given runs."""
        if not run_ids:
            return {}
        marks = ", ".join(["%s"] * len(run_ids))
        rows = self.query(f"SELECT id, status, worker_id FROM jobs_jobrun WHERE id IN ({marks})", list(run_ids))
        return {row[0]: (row[1], row[2]) for row in rows}


# -- scheduler processes --------------------------------------------------------------------------


@dataclass
class SchedulerOptions:
    heartbeat: float = 1.0
    lost_after: float = 6.0
    grace: float = 10.0
    max_sleep: float = 1.0
    max_concurrent: int = 4

    def argv(self) -> list[str]:
        return [
            "--max-concurrent",
            str(self.max_concurrent),
            "--heartbeat",
            f"{self.heartbeat:g}",
            "--lost-after",
            f"{self.lost_after:g}",
            "--grace",
            f"{self.grace:g}",
            "--max-sleep",
            f"{self.max_sleep:g}",
        ]


class Fleet:
    """`manage.py runscheduler` processes on one database; stops only the ones it started."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        options: SchedulerOptions | None = None,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database = FaultDatabase(database_url)
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.options = options or SchedulerOptions()
        self.env = fault_env(database_url, **(env or {}))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: dict[int, Path] = {}
        self.paused: set[int] = set()
        self.killed: set[int] = set()
        self._logs: dict[int, Any] = {}

    def start(self, options: SchedulerOptions | None = None) -> subprocess.Popen[bytes]:
        argv = (options or self.options).argv()
        path = self.log_dir / f"scheduler-{len(self.procs)}.log"
        log = open(path, "wb")  # noqa: SIM115 - closed when the fleet is closed
        proc = subprocess.Popen(
            [sys.executable, str(MANAGE), "runscheduler", *argv],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        self.log_paths[proc.pid] = path
        self._logs[proc.pid] = log
        return proc

    def wait_registered(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """Wait until `proc` has its live SchedulerProcess row; return the row's id."""

        def registered() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"scheduler {proc.pid} exited with {proc.returncode}:\n{self.logs(proc)}")
            return self.database.live_scheduler(proc.pid)

        return wait_for(registered, timeout, what=lambda: f"scheduler {proc.pid} registered\n{self.logs(proc)}")

    def start_registered(self, count: int) -> list[subprocess.Popen[bytes]]:
        procs = [self.start() for _ in range(count)]
        for proc in procs:
            self.wait_registered(proc)
        return procs

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.procs if proc.poll() is None]

    def wait_busy(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
        """Wait until `proc` has a run running (so a fault hits work in flight); return how many."""
        return wait_for(
            lambda: self.database.running_on(proc.pid), timeout, interval=0.02, what=f"a run running on {proc.pid}"
        )

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed.add(proc.pid)
        self.paused.discard(proc.pid)

    def pause(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGSTOP)
        self.paused.add(proc.pid)

    def resume(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGCONT)
        self.paused.discard(proc.pid)

    def term(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)

    def stop_all(self, timeout: float = 30) -> dict[int, int | None]:
        """SIGTERM every live process, wait; return each one's exit status (None: still running)."""
        for proc in self.live():
            if proc.pid in self.paused:
                self.resume(proc)
            self.term(proc)
        deadline = time.monotonic() + timeout
        statuses: dict[int, int | None] = {}
        for proc in self.procs:
            if proc.pid in self.killed:
                continue
            try:
                statuses[proc.pid] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                statuses[proc.pid] = None
        return statuses

    @staticmethod
    def rss_kb(proc: subprocess.Popen[bytes]) -> int | None:
        """Resident memory (VmRSS) of a live process in kB."""
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def open_db_connections(self, proc: subprocess.Popen[bytes]) -> int | None:
        """TCP sockets of the process to the PostgreSQL port, or its descriptors open on the SQLite file."""
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        try:
            targets = []
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    targets.append(os.readlink(fd))
        except OSError:
            return None
        if self.database.path is not None:
            path = str(self.database.path.resolve())
            return sum(target == path for target in targets)
        inodes = {target[len("socket:[") : -1] for target in targets if target.startswith("socket:[")}
        port = f"{self.database.port:04X}"
        count = 0
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/net/{table}") as lines:
                next(lines, None)
                for line in lines:
                    columns = line.split()
                    if len(columns) > 9 and columns[2].rsplit(":", 1)[-1] == port and columns[9] in inodes:
                        count += 1
        return count

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        log = self._logs.get(proc.pid)
        if log is not None and not log.closed:
            log.flush()
        path = self.log_paths.get(proc.pid)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def logs(self, proc: subprocess.Popen[bytes] | None = None, *, tail: int | None = None) -> str:
        """The log of one process, or of all with a header each; the last `tail` lines of each."""
        procs = [proc] if proc is not None else self.procs
        parts = []
        for each in procs:
            lines = self.log_of(each).splitlines()
            if tail is not None:
                lines = lines[-tail:]
            parts.append(f"--- scheduler pid {each.pid} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def presumed_dead_lines(self, *, exclude: Collection[int] = ()) -> list[str]:
        """Log lines in which a scheduler says another presumed it dead (outside the `exclude` pids)."""
        return [
            f"pid {proc.pid}: {line}"
            for proc in self.procs
            if proc.pid not in exclude
            for line in self.log_of(proc).splitlines()
            if PRESUMED_DEAD.search(line)
        ]

    def close(self) -> None:
        """SIGCONT (if paused) and SIGKILL every process still running; close the logs."""
        for proc in self.procs:
            if proc.poll() is None:
                if proc.pid in self.paused:
                    proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for log in self._logs.values():
            log.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


# -- a held SQLite write lock ------------------------------------------------------------------------


class SqliteWriteLock:
    """Hold the write lock of a SQLite file (BEGIN IMMEDIATE) for `seconds`, on a thread, then let go."""

    def __init__(self, path: Path, seconds: float) -> None:
        self.path = path
        self.seconds = seconds
        self.acquired_at: float | None = None  # time.monotonic()
        self.released_at: float | None = None
        self._acquired = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="sqlite-write-lock", daemon=True)

    def start(self, *, timeout: float = 60) -> SqliteWriteLock:
        """Start holding; return once the lock is held."""
        self._thread.start()
        if not self._acquired.wait(timeout):
            raise AssertionError(f"could not take the write lock of {self.path} within {timeout}s")
        if self._error is not None:
            raise AssertionError(f"could not take the write lock of {self.path}: {self._error}")
        return self

    def _hold(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._error = exc
            self._acquired.set()
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.acquired_at = time.monotonic()
            self._acquired.set()
            self._release.wait(self.seconds)
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._error = exc
            self._acquired.set()
        finally:
            conn.close()
            self.released_at = time.monotonic()

    def release(self) -> None:
        """Let go now rather than when the time is up."""
        self._release.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def __enter__(self) -> SqliteWriteLock:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
        self.join(10)


# -- what ran ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One execution recorded by test_append: `job fire attempt run pid`."""

    job_id: int
    scheduled_for: datetime
    attempt: int
    run_id: int
    pid: int


def read_lines(path: Path) -> list[Line]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        job_id, fire, attempt, run_id, pid = text.split()
        lines.append(Line(int(job_id), datetime.fromisoformat(fire), int(attempt), int(run_id), int(pid)))
    return lines


def fires_between(expression: str, timezone: str, start: datetime, end: datetime) -> list[datetime]:
    """The job's fire times in [start, end]."""
    from jobs.schedule import next_fire_after

    fires: list[datetime] = []
    current = next_fire_after(expression, timezone, start - timedelta(microseconds=1))
    while current is not None and current <= end:
        fires.append(current)
        current = next_fire_after(expression, timezone, current)
    return fires


@dataclass
class Audit:
    """What the rows and the file say about a fault run; `problems` lists every broken promise."""

    fires: int = 0  # fire times in the windows
    with_row: int = 0  # ... that have their attempt-1 row
    covered: int = 0  # ... that a later run of the job counts in its missed_fires
    rows: int = 0
    executed: int = 0  # lines in the file
    succeeded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # by reason prefix
    missed_fires: int = 0
    lost: int = 0
    lost_safe: int = 0
    retried: int = 0
    doubled_explained: int = 0  # fires executed twice where a lost run explains it
    doubled_unexplained: int = 0
    lateness: list[float] = field(default_factory=list)  # started_at - scheduled_for, attempt-1 schedule runs
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def problem(self, kind: str, detail: str) -> None:
        self.problems[kind].append(detail)

    def summary(self) -> str:
        return (
            f"fires {self.fires} (row {self.with_row}, in missed_fires {self.covered}), rows {self.rows}, "
            f"executed {self.executed}, succeeded {self.succeeded}, skipped {dict(self.skipped)}, "
            f"missed_fires {self.missed_fires}, lost {self.lost} (safe {self.lost_safe}, retried {self.retried}), "
            f"doubles {self.doubled_explained} explained by lost / {self.doubled_unexplained} unexplained"
        )

    def report(self, examples: int = 8) -> str:
        """The summary and, per broken rule, how often and a few examples."""
        parts = [self.summary()]
        for kind, details in self.problems.items():
            parts.append(f"{kind}: {len(details)}")
            parts.extend(f"    {detail}" for detail in details[:examples])
        return "\n".join(parts)


def audit(
    *,
    jobs: Sequence[JobRow],
    runs: Sequence[RunRow],
    lines: Sequence[Line],
    schedulers: Sequence[SchedulerRow],
    killed_pids: set[int],
    windows: dict[int, tuple[datetime, datetime]] | None = None,
    only_killed_lose: bool = True,
) -> Audit:
    """Check a fault run against the promises (see the fault tests' docstrings).

    `windows` bounds each job's expected fires; without it, a job's window runs from its first
    to its last scheduled attempt-1 run. A line in the file for a lost run is accepted when the
    process that wrote it was killed with SIGKILL (its work was done, its outcome never written)
    or when the run's type is safe to repeat and it was retried. With `only_killed_lose`, runs
    may be lost only when their scheduler was killed.
    """
    report = Audit(rows=len(runs), executed=len(lines))
    job_by_id = {job.id: job for job in jobs}
    pid_of = {row.id: row.pid for row in schedulers}
    by_id = {run.id: run for run in runs}
    first_attempts: dict[tuple[int, datetime], RunRow] = {}
    by_fire: dict[tuple[int, datetime], list[RunRow]] = defaultdict(list)
    for run in runs:
        by_fire[(run.job_id, run.scheduled_for)].append(run)
        if run.attempt == 1 and run.trigger == "schedule":
            first_attempts[(run.job_id, run.scheduled_for)] = run
    lines_by_run: dict[int, list[Line]] = defaultdict(list)
    lines_by_fire: dict[tuple[int, datetime], list[Line]] = defaultdict(list)
    for line in lines:
        lines_by_run[line.run_id].append(line)
        lines_by_fire[(line.job_id, line.scheduled_for)].append(line)

    def safe(job_id: int) -> bool:
        job = job_by_id.get(job_id)
        return job is not None and APPEND_TYPES.get(job.job_type, False)

    # Every fire in the window: its own attempt-1 row, or counted in a later run's missed_fires.
    for job in jobs:
        own = sorted(fire for (job_id, fire) in first_attempts if job_id == job.id)
        if windows is not None and job.id in windows:
            start, end = windows[job.id]
        elif own:
            start, end = own[0], own[-1]
        else:
            continue
        fires = fires_between(job.cron_expression, job.timezone, start, end)
        covered: set[datetime] = set()
        for fire in own:
            row = first_attempts[(job.id, fire)]
            # The fires a run stands for are the latest ones before it that have no row of
            # their own (nor are already counted by an earlier run).
            index = bisect.bisect_left(fires, fire)
            left = row.missed_fires
            while left and index > 0:
                index -= 1
                if (job.id, fires[index]) not in first_attempts and fires[index] not in covered:
                    covered.add(fires[index])
                    left -= 1
        for fire in fires:
            has_row = (job.id, fire) in first_attempts
            report.fires += 1
            report.with_row += has_row
            report.covered += fire in covered
            if not has_row and fire not in covered:
                report.problem("fire with no row and not in any missed_fires", f"job {job.id} {fire.isoformat()}")

    for run in runs:
        if run.status in ACTIVE_STATUSES or (run.status == "timed_out" and run.finished_at is None):
            report.problem("run left unfinished", f"run {run.id} job {run.job_id} {run.status}")
        if run.status == "succeeded":
            report.succeeded += 1
            if run.job_id in job_by_id and job_by_id[run.job_id].job_type in APPEND_TYPES and not lines_by_run[run.id]:
                report.problem("succeeded run without its line", f"run {run.id} job {run.job_id}")
        elif run.status == "skipped":
            report.skipped[run.skip_reason.split(":", 1)[0] or "(no reason)"] += 1
            if not run.skip_reason:
                report.problem("skipped run without a reason", f"run {run.id}")
        elif run.status in ("failed", "timed_out"):
            report.problem(f"{run.status} run", f"run {run.id} job {run.job_id}: {run.error[:200]}")
        if run.attempt == 1 and run.trigger == "schedule":
            report.missed_fires += run.missed_fires
            if run.started_at is not None:
                report.lateness.append((run.started_at - run.scheduled_for).total_seconds())
        if run.status == "lost":
            report.lost += 1
            worker_pid = pid_of.get(run.worker_id) if run.worker_id is not None else None
            if only_killed_lose and worker_pid not in killed_pids:
                report.problem(
                    "run lost although its scheduler was not killed",
                    f"run {run.id} job {run.job_id} attempt {run.attempt} worker pid {worker_pid}: {run.error[:160]}",
                )
            retries = [other for other in by_fire[(run.job_id, run.scheduled_for)] if other.attempt == run.attempt + 1]
            if safe(run.job_id):
                report.lost_safe += 1
                if not retries:
                    report.problem("lost run of a safe type not retried", f"run {run.id} job {run.job_id}")
                report.retried += bool(retries)
            elif retries:
                report.problem("lost run of an unsafe type retried", f"run {run.id} job {run.job_id}")

    for run_id, run_lines in lines_by_run.items():
        if len(run_lines) > 1:
            report.problem("one run executed more than once", f"run {run_id}: pids {[line.pid for line in run_lines]}")
        line = run_lines[0]
        owner = by_id.get(run_id)
        if owner is None:
            report.problem("line of an unknown run", f"run {run_id} job {line.job_id}")
            continue
        if (owner.job_id, owner.scheduled_for, owner.attempt) != (line.job_id, line.scheduled_for, line.attempt):
            report.problem("line that does not match its run", f"run {run_id}: {line} vs {owner}")
        if owner.status == "succeeded":
            continue
        if owner.status == "lost":
            retried = any(other.attempt == owner.attempt + 1 for other in by_fire[(owner.job_id, owner.scheduled_for)])
            if all(each.pid in killed_pids for each in run_lines) or (safe(owner.job_id) and retried):
                continue
        report.problem(
            "line of a run that is not succeeded (nor lost by a killed scheduler, nor lost and retried)",
            f"run {run_id} job {owner.job_id} attempt {owner.attempt} {owner.status} written by pid {line.pid}",
        )

    for (job_id, fire), fire_lines in lines_by_fire.items():
        if len(fire_lines) < 2:
            continue
        explained = safe(job_id) and any(run.status == "lost" for run in by_fire[(job_id, fire)])
        if explained:
            report.doubled_explained += 1
        else:
            report.doubled_unexplained += 1
            report.problem(
                "fire executed more than once without a lost run of a safe type",
                f"job {job_id} {fire.isoformat()}: runs {[line.run_id for line in fire_lines]}",
            )
    return report


# -- the subprocess side of create_jobs / trigger_jobs ------------------------------------------------


def _main(argv: list[str]) -> int:
    import django

    django.setup()
    from jobs import services
    from jobs.models import Job

    payload = json.load(sys.stdin)
    if argv == ["create-jobs"]:
        created = []
        for spec in payload["jobs"]:
            job = services.job_create(**spec)
            created.append({"id": job.pk, "next_run_at": job.next_run_at.isoformat() if job.next_run_at else None})
        print(json.dumps(created))
        return 0
    if argv == ["trigger"]:
        print(json.dumps([services.job_trigger(Job.objects.get(pk=job_id)).pk for job_id in payload["job_ids"]]))
        return 0
    print(
        f"usage: python -m jobs.tests.faults.harness create-jobs|trigger < payload.json (not {argv})", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
