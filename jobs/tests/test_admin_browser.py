"""The admin as a person uses it: a real headless Chromium against the live server.

Needs Debian's Chromium (`apt-get install chromium`); Playwright only drives it. Outside CI a
machine without it skips this test; in CI (CI=true) a missing browser fails it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connections

from jobs.models import Job, JobRun

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/admin_job.png")
PASSWORD = "browser-password-123"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test (apt-get install chromium)")
    pytest.skip(reason)


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (pip install -r requirements-dev.txt)")
    # The live server serves static files through staticfiles' finders, without collectstatic's manifest.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    # Playwright's sync API keeps an event loop running in this thread, so Django takes the test's
    # (synchronous) ORM calls for async code: allow them, and close the connections they open
    # inside the block, or the test database cannot be dropped afterwards.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()
            connections.close_all()


def test_create_a_job_see_its_fire_times_and_run_it_now(page: Any, live_server: Any) -> None:
    from playwright.sync_api import expect

    User.objects.create_superuser("operator", "operator@example.com", PASSWORD)

    page.goto(f"{live_server.url}/admin/jobs/job/add/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("h1")).to_have_text("Add job")

    # Choosing a type puts its example into the empty parameters box; another type replaces
    # the example, but never what a person typed.
    expect(page.locator("#id_parameters")).to_have_value("{}")
    page.select_option("#id_job_type", "http_request")
    expect(page.locator("#id_parameters")).to_have_value(re.compile('"url"'))
    page.select_option("#id_job_type", "email_notification")
    expect(page.locator("#id_parameters")).to_have_value(re.compile('"recipient"'))
    page.fill("#id_parameters", '{"recipient": "me@example.com"}')
    page.select_option("#id_job_type", "http_request")
    expect(page.locator("#id_parameters")).to_have_value('{"recipient": "me@example.com"}')

    # A mistake first: the message appears on the cron field and nothing is saved.
    page.fill("#id_name", "Weekly report")
    page.fill("#id_description", "Mails the weekly numbers to the team.")
    page.select_option("#id_job_type", "email_notification")
    page.fill("#id_parameters", '{"recipient": "team@example.com", "subject": "Weekly numbers"}')
    page.fill("#id_cron_expression", "60 9 * * MON")
    page.fill("#id_timezone", "Europe/Berlin")
    page.click("input[name=_continue]")
    expect(page.locator(".field-cron_expression .errorlist")).to_have_text("minute: 60 is out of range 0-59")
    assert Job.objects.count() == 0

    page.fill("#id_cron_expression", "0 9 * * MON")
    page.click("input[name=_continue]")

    expect(page.locator(".messagelist .success")).to_contain_text("was added successfully")
    job = Job.objects.get()
    assert job.next_run_at is not None
    preview = page.locator(".field-schedule_preview")
    expect(preview).to_contain_text("At 09:00, only on Monday")
    rows = preview.locator(".jobs-fire-times tbody tr")
    expect(rows).to_have_count(5)
    for index in range(5):
        expect(rows.nth(index)).to_contain_text(re.compile(r"Mon \d{4}-\d\d-\d\d 09:00:00 CES?T"))
    expect(rows.first).to_contain_text(f"{job.next_run_at:%Y-%m-%d %H:%M:%S} UTC")

    page.click("button[name=run_now]")

    expect(page.locator(".messagelist .success")).to_contain_text("Queued run")
    run = JobRun.objects.get()
    assert (run.job_id, run.trigger, run.status) == (job.pk, "manual", "queued")
    runs = page.locator("#runs-group tbody tr.has_original")
    expect(runs).to_have_count(1)
    expect(runs.first).to_contain_text("Queued")
    expect(runs.first).to_contain_text("Manual")
    # The stylesheet is served and applied: a queued badge is blue.
    badge_colour = runs.first.locator(".jobs-badge").evaluate("el => getComputedStyle(el).backgroundColor")
    assert badge_colour == "rgb(29, 95, 180)"
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.goto(f"{live_server.url}/admin/jobs/job/")
    row = page.locator("#result_list tbody tr").first
    expect(row).to_contain_text("Weekly report")
    expect(row).to_contain_text("At 09:00, only on Monday")
    expect(row).to_contain_text("Europe/Berlin")
    page.screenshot(path=str(SCREENSHOT.with_name("admin_job_list.png")), full_page=True)
