"""/health with the database unreachable: a real process, a real refused connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import django, json
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()  # allows the test client's host, as pytest-django does
response = Client().get("/health")
print(json.dumps({"status": response.status_code, "body": response.json()}))
"""


def test_health_is_503_without_naming_the_database_when_it_is_unreachable() -> None:
    # Nothing listens on port 1 of the loopback: the connection is refused at once.
    unreachable = "postgres://secret_user@127.0.0.1:1/secret_db"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "jobs.tests.settings",
        "DATABASE_URL": unreachable,
        "ENV_FILE": os.devnull,
        "LOG_LEVEL": "critical",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["status"] == 503
    body = answer["body"]
    assert body["status"] == "unhealthy"
    assert body["database"] == {"vendor": "postgresql", "ok": False, "error": "OperationalError"}
    assert "secret" not in done.stdout


@pytest.mark.postgres
def test_health_judges_heartbeats_by_the_database_clock_not_the_web_hosts(db: None, monkeypatch) -> None:
    """Schedulers write heartbeats by the database server's clock; a web host whose clock runs
    90 s ahead must not see them all as stale and report the service down."""
    from datetime import timedelta

    from django.utils import timezone

    from jobs.health import health_report
    from jobs.models import SchedulerProcess
    from jobs.scheduler.clock import database_now

    beat = database_now()
    SchedulerProcess.objects.create(hostname="h", pid=1, started_at=beat, last_heartbeat_at=beat)
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + timedelta(seconds=90))
    report = health_report()
    assert report["status"] == "ok", report
    assert report["schedulers"][0]["heartbeat_age_seconds"] < 5
