"""`manage.py runscheduler`: bad options or settings stop it before it registers, with one line naming them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings

from jobs.models import SchedulerProcess

ROOT = Path(settings.BASE_DIR)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-concurrent", "0"], "--max-concurrent must be a finite number above 0, not 0"),
        (["--grace", "-1"], "--grace must be a finite number above 0, not -1.0"),
        (["--lost-after", "nan"], "--lost-after must be a finite number above 0, not nan"),
        (["--heartbeat", "inf"], "--heartbeat must be a finite number above 0, not inf"),
        (["--max-sleep=-inf"], "--max-sleep must be a finite number above 0, not -inf"),
        (["--grace", "NaN"], "--grace must be a finite number above 0, not nan"),
        (["--heartbeat", "20", "--lost-after", "30"], "--heartbeat (20s) must be at most half of --lost-after (30s)"),
        (["--heartbeat", "16"], "--heartbeat (16s) must be at most half of --lost-after (30s)"),
    ],
)
def test_bad_options_stop_it_before_it_registers(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as error:
        call_command("runscheduler", "--once", *args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert error.value.returncode == 2
    assert not SchedulerProcess.objects.exists()


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ({"LOST_AFTER_SECONDS": float("nan")}, "JOBS['LOST_AFTER_SECONDS']: nan is not a finite number of seconds"),
        ({"HEARTBEAT_SECONDS": float("inf")}, "JOBS['HEARTBEAT_SECONDS']: inf is not a finite number of seconds"),
        ({"MAX_SLEEP_SECONDS": 0}, "JOBS['MAX_SLEEP_SECONDS']: 0 is not a finite number of seconds above 0"),
        ({"SHUTDOWN_GRACE_SECONDS": "30"}, "JOBS['SHUTDOWN_GRACE_SECONDS']: '30' is not a number of seconds"),
        ({"MAX_CONCURRENT_JOBS": True}, "JOBS['MAX_CONCURRENT_JOBS']: True is not a whole number"),
        ({"MAX_CONCURRENT_JOBS": 0}, "JOBS['MAX_CONCURRENT_JOBS']: 0 is below the minimum of 1"),
        ({"RUN_RETENTION_DAYS": 1.5}, "JOBS['RUN_RETENTION_DAYS']: 1.5 is not a whole number"),
        ({"RESULT_MAX_BYTES": 10}, "JOBS['RESULT_MAX_BYTES']: 10 is below the minimum of 1024"),
        ({"EXECUTORS": "a.b.C"}, "JOBS['EXECUTORS']: must be a list"),
        ({"HTTP_HEADER_SECRETS": ["db password"]}, "JOBS['HTTP_HEADER_SECRETS']: 'db password' is not an environment"),
        ({"ALLOWED_OUTPUT_DIRS": ["relative/dir"]}, "JOBS['ALLOWED_OUTPUT_DIRS']: 'relative/dir' is not an absolute"),
        ({"HTTP_CA_BUNDLE": "/nonexistent/ca.pem"}, "JOBS['HTTP_CA_BUNDLE']: '/nonexistent/ca.pem' is not a readable"),
        ({"HEARTBEAT_SECONDS": 20.0}, "JOBS['HEARTBEAT_SECONDS'] (20s) must be at most half of"),
        ({"LOST_AFTER_SECOND": 30}, "JOBS['LOST_AFTER_SECOND'] is not a setting of this app; did you mean"),
    ],
)
def test_bad_jobs_settings_stop_it_with_one_line(db: None, jobs: dict[str, Any], message: str) -> None:
    with override_settings(JOBS={**settings.JOBS, **jobs}), pytest.raises(CommandError) as error:
        call_command("runscheduler", "--once")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert error.value.returncode == 2
    assert not SchedulerProcess.objects.exists()


def test_the_real_command_exits_2_with_one_line() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "jobs.tests.settings", "ENV_FILE": os.devnull}
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "runscheduler", "--lost-after", "nan"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["CommandError: --lost-after must be a finite number above 0, not nan"]


def test_a_heartbeat_of_half_the_lost_after_time_is_accepted(db: None) -> None:
    call_command("runscheduler", "--once", "--heartbeat", "15", "--lost-after", "30")
    assert SchedulerProcess.objects.get().stopped_at is not None


def test_system_check_ids_are_unique() -> None:
    sources = "\n".join(path.read_text() for path in (ROOT / "jobs").rglob("*.py") if "tests" not in path.parts)
    ids = re.findall(r'id="(jobs\.[EW]\d+)"', sources)
    assert ids and len(ids) == len(set(ids)), sorted(ids)


SIGNAL_WHILE_LOCKED = """
import os, signal, sys, time
import django
django.setup()
from jobs.scheduler.engine import Engine

engine = Engine(max_concurrent=1)
engine.install_signal_handlers()
# The signal arrives while the main thread holds the wake-up event's lock, as it does for a
# moment inside every Event.wait(): a handler that sets the event would wait for itself.
with engine.wakeup._cond:  # threading.Event's lock
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
time.sleep(0.5)
print("main thread went on", flush=True)
"""


def test_a_stop_signal_never_deadlocks_on_a_lock_the_main_thread_holds(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "jobs.tests.settings",
        "ENV_FILE": os.devnull,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_LOCKED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert "main thread went on" in done.stdout
    assert "stopping: no new runs" in done.stderr  # the stop was still requested
