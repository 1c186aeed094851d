"""Settings from the environment and .env: bad values stop start-up with one line; SQLite is tuned."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection, transaction

from jobs.models import Job

BASE_DIR = Path(__file__).resolve().parents[2]
MANAGE = str(BASE_DIR / "manage.py")


def environment(tmp_path: Path, **values: str | None) -> dict[str, str]:
    """A clean environment for a child process: nothing from this test run's settings leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "ENV_FILE": os.devnull,
        "SECRET_KEY": "settings-test-secret",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SECURE_SSL_REDIRECT": "false",
    }
    for name, value in values.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def manage(tmp_path: Path, *args: str, **values: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, MANAGE, *args],
        env=environment(tmp_path, **values),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def print_settings(tmp_path: Path, expression: str, **values: str | None) -> str:
    result = manage(
        tmp_path, "shell", "--no-imports", "-c", f"from django.conf import settings as s; print({expression})", **values
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


BAD_VALUES = [
    ({"MAX_CONCURRENT_JOBS": "abc"}, "MAX_CONCURRENT_JOBS", "'abc' is not a whole number"),
    ({"MAX_CONCURRENT_JOBS": "0"}, "MAX_CONCURRENT_JOBS", "below the minimum of 1"),
    ({"DATABASE_URL": "nonsense://x"}, "DATABASE_URL", "'nonsense://x' is not a valid database URL"),
    ({"DATABASE_URL": "postgres://u@db.example.com:port/x"}, "DATABASE_URL", "not a valid database URL"),
    ({"DEBUG": "maybe"}, "DEBUG", "'maybe' is not a boolean"),
    ({"TIME_ZONE": "Mars/Olympus"}, "TIME_ZONE", "'Mars/Olympus' is not an IANA time zone"),
    ({"TIME_ZONE": "localtime"}, "TIME_ZONE", "'localtime' is not an IANA time zone"),
    ({"SECRET_KEY": None, "DEBUG": "false"}, "SECRET_KEY", "required when DEBUG is false"),
    ({"SECRET_KEY": "", "DEBUG": None}, "SECRET_KEY", "required when DEBUG is false"),
    ({"EMAIL_PORT": "x"}, "EMAIL_PORT", "'x' is not a whole number"),
    ({"EMAIL_PORT": "70000"}, "EMAIL_PORT", "above the maximum of 65535"),
    ({"EMAIL_URL": "nonsense"}, "EMAIL_URL", "not a valid email URL"),
    ({"EMAIL_USE_TLS": "true", "EMAIL_USE_SSL": "true"}, "EMAIL_USE_TLS", "cannot be true together"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "'xml' is not one of text, json"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "'loud' is not one of"),
    ({"RUN_NOW_THROTTLE": "often"}, "RUN_NOW_THROTTLE", "'often' is not a valid rate"),
]


@pytest.mark.parametrize(
    ("values", "name", "message"), BAD_VALUES, ids=[case[1] + ":" + str(case[0]) for case in BAD_VALUES]
)
def test_bad_value_stops_start_up_with_one_line(
    tmp_path: Path, values: dict[str, str | None], name: str, message: str
) -> None:
    result = manage(tmp_path, "check", **values)

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"configuration error: {name}: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_password_in_a_bad_url_is_not_printed(tmp_path: Path) -> None:
    result = manage(tmp_path, "check", DATABASE_URL="postgres://app:hunter2@db.example.com:port/x")

    assert result.returncode == 2
    assert "hunter2" not in result.stderr
    assert "app:***@db.example.com" in result.stderr


def test_wsgi_entry_point_stops_the_same_way(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import scheduler_project.wsgi"],
        env={**environment(tmp_path, DEBUG="maybe"), "PYTHONPATH": str(BASE_DIR)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["configuration error: DEBUG: 'maybe' is not a boolean (use true or false)"]


def test_good_values_pass_the_checks(tmp_path: Path) -> None:
    result = manage(
        tmp_path,
        "check",
        MAX_CONCURRENT_JOBS="12",
        TIME_ZONE="Europe/Berlin",
        EMAIL_URL="submission://mailer:pw@smtp.example.com",
        LOG_FORMAT="JSON",
        RUN_NOW_THROTTLE="5/hour",
    )

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_debug_needs_no_secret_key(tmp_path: Path) -> None:
    assert manage(tmp_path, "check", SECRET_KEY=None, DEBUG="true").returncode == 0


def test_values_are_read(tmp_path: Path) -> None:
    printed = print_settings(
        tmp_path,
        "s.JOBS['MAX_CONCURRENT_JOBS'], s.TIME_ZONE, s.LOG_FORMAT, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_USE_TLS, "
        "s.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']['run_now']",
        MAX_CONCURRENT_JOBS="12",
        TIME_ZONE="Europe/Berlin",
        LOG_FORMAT="JSON",
        EMAIL_URL="submission://mailer:pw@smtp.example.com",
        RUN_NOW_THROTTLE="5/hour",
    )

    assert printed == "12 Europe/Berlin json smtp.example.com 587 True 5/hour"


def test_defaults(tmp_path: Path) -> None:
    printed = print_settings(
        tmp_path, "s.DEBUG, s.JOBS['MAX_CONCURRENT_JOBS'], s.TIME_ZONE, s.LOG_FORMAT, s.EMAIL_BACKEND"
    )

    assert printed == "False 5 UTC text django.core.mail.backends.console.EmailBackend"


def test_dotenv_file_is_read_but_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / "settings.env"
    dotenv.write_text(
        "# a comment\nMAX_CONCURRENT_JOBS=7\nTIME_ZONE=Europe/Berlin\nLOG_FORMAT=json\nSECRET_KEY=from-dotenv\n"
    )

    printed = print_settings(
        tmp_path,
        "s.JOBS['MAX_CONCURRENT_JOBS'], s.TIME_ZONE, s.LOG_FORMAT, s.SECRET_KEY",
        ENV_FILE=str(dotenv),
        TIME_ZONE="Asia/Tokyo",
        SECRET_KEY=None,
    )

    assert printed == "7 Asia/Tokyo json from-dotenv"


def test_bad_value_in_dotenv_file_is_named(tmp_path: Path) -> None:
    dotenv = tmp_path / "settings.env"
    dotenv.write_text("MAX_CONCURRENT_JOBS=lots\n")

    result = manage(tmp_path, "check", ENV_FILE=str(dotenv))

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["configuration error: MAX_CONCURRENT_JOBS: 'lots' is not a whole number"]


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    assert manage(tmp_path, "check", ENV_FILE=str(tmp_path / "absent.env")).returncode == 0


@pytest.mark.sqlite
def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    database = tmp_path / "fresh.sqlite3"

    printed = print_settings(
        tmp_path,
        "*[__import__('django.db').db.connection.cursor().execute(f'PRAGMA {p}').fetchone()[0] "
        "for p in ('journal_mode', 'busy_timeout', 'synchronous')]",
        DATABASE_URL=f"sqlite:///{database}",
    )

    assert printed == "wal 20000 1"  # synchronous=NORMAL
    # WAL is a property of the file: any later connection, even a plain one, sees it.
    with sqlite3.connect(database) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_sqlite_takes_the_write_lock_when_a_transaction_starts() -> None:
    with connection.cursor() as cursor:
        assert cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cursor.execute("PRAGMA busy_timeout").fetchone()[0] == 20000
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
    try:
        with transaction.atomic():
            # BEGIN IMMEDIATE: the lock is held before the first write, so two writers queue on
            # the busy timeout instead of one failing with "database is locked" mid-transaction.
            Job.objects.count()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            # Readers are never blocked in WAL mode.
            assert other.execute("SELECT count(*) FROM jobs_job").fetchone()[0] == 0
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def _serve_and_get(
    tmp_path: Path, path: str, *, headers: dict[str, str] | None = None, **values: str | None
) -> tuple[int, str, str]:
    """Start `manage.py runserver` as `make run` would, GET `path` without following redirects;
    return the status, the Location header and what the server logged."""
    import http.client
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, MANAGE, "runserver", "--noreload", f"127.0.0.1:{port}"],
            env=environment(tmp_path, **values),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", path, headers=headers or {})
                    answer = connection.getresponse()
                    status, location = answer.status, answer.getheader("Location") or ""
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(10)
    return status, location, log.read_text()


def test_runserver_with_the_env_file_make_run_writes_serves_plain_http(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    done = subprocess.run(
        [sys.executable, str(BASE_DIR / "scripts" / "local_env.py"), str(env_file)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "SECRET_KEY" in env_file.read_text()
    assert "SECURE_SSL_REDIRECT=false" in env_file.read_text()
    # Written again: nothing is added twice, the key is kept.
    before = env_file.read_text()
    subprocess.run([sys.executable, str(BASE_DIR / "scripts" / "local_env.py"), str(env_file)], check=True)
    assert env_file.read_text() == before
    status, _, _ = _serve_and_get(
        tmp_path, "/jobs", ENV_FILE=str(env_file), SECRET_KEY=None, SECURE_SSL_REDIRECT=None, DEBUG=None
    )
    assert status == 401  # the API itself answered, over plain HTTP


def test_production_settings_keep_redirecting_to_https(tmp_path: Path) -> None:
    status, location, _ = _serve_and_get(tmp_path, "/jobs", SECURE_SSL_REDIRECT=None, DEBUG=None)
    assert status == 301 and location.startswith("https://")


def test_a_bad_host_header_logs_one_warning_line_without_a_traceback(tmp_path: Path) -> None:
    status, _, log = _serve_and_get(tmp_path, "/jobs", headers={"Host": "evil.example"})
    assert status == 400
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "Invalid HTTP_HOST header" in line]
    assert len(lines) == 1 and " WARNING " in lines[0], log


def test_a_postgresql_connect_gives_up_after_10_seconds_unless_the_url_says_otherwise() -> None:
    from scheduler_project.env import database_from_url

    assert database_from_url("postgres://u@127.0.0.1:5432/x", base_dir=Path("/srv"))["OPTIONS"]["connect_timeout"] == 10
    chosen = database_from_url("postgres://u@127.0.0.1:5432/x?connect_timeout=3", base_dir=Path("/srv"))
    assert int(chosen["OPTIONS"]["connect_timeout"]) == 3


MISSPELLED = "JOBS['LOST_AFTER_SECOND'] is not a setting of this app; did you mean 'LOST_AFTER_SECONDS'?"


def with_jobs(tmp_path: Path, jobs: str) -> dict[str, str]:
    """Write a settings module that changes JOBS; return the variables that select it."""
    (tmp_path / "changed_settings.py").write_text(f"from jobs.tests.settings import *  # noqa: F403\n\nJOBS = {jobs}\n")
    return {"DJANGO_SETTINGS_MODULE": "changed_settings", "PYTHONPATH": str(tmp_path)}


def test_the_scheduler_started_with_a_misspelled_jobs_key_exits_2_naming_it(tmp_path: Path) -> None:
    result = manage(tmp_path, "runscheduler", **with_jobs(tmp_path, '{**JOBS, "LOST_AFTER_SECOND": 60}'))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"CommandError: {MISSPELLED}"]


def test_the_wsgi_entry_point_refuses_a_misspelled_jobs_key_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import scheduler_project.wsgi"],
        env={**environment(tmp_path), **with_jobs(tmp_path, '{**JOBS, "LOST_AFTER_SECOND": 60}')},
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"configuration error: {MISSPELLED}"]


def test_check_names_a_misspelled_jobs_key(tmp_path: Path) -> None:
    result = manage(tmp_path, "check", **with_jobs(tmp_path, '{**JOBS, "LOST_AFTER_SECOND": 60}'))

    assert result.returncode == 1
    assert f"(jobs.E006) {MISSPELLED}" in result.stderr
