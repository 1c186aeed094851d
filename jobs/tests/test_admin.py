"""The admin: the jobs list, the job form's validation and preview, run now / pause / resume, runs, schedulers."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from jobs import schedule, services
from jobs.forms import error_messages
from jobs.models import Job, JobRun, SchedulerProcess

pytestmark = pytest.mark.django_db

MakeJob = Callable[..., Job]

EMAIL_PARAMETERS = {"recipient": "team@example.com", "subject": "Weekly report"}


@pytest.fixture(autouse=True)
def plain_static_storage(settings: Any) -> None:
    # The production setting wants collectstatic's manifest; tests render the admin without one.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def make_job() -> MakeJob:
    def make(**fields: Any) -> Job:
        values: dict[str, Any] = {
            "name": "Weekly report",
            "cron_expression": "0 9 * * MON",
            "timezone": "Europe/Berlin",
            "job_type": "email_notification",
            "parameters": EMAIL_PARAMETERS,
            **fields,
        }
        return services.job_create(**values)

    return make


def form_data(*, change: bool = False, **overrides: Any) -> dict[str, Any]:
    """The POST body of the job form; `enabled=None` leaves the box unticked."""
    data: dict[str, Any] = {
        "name": "Weekly report",
        "description": "Mails the weekly numbers.",
        "job_type": "email_notification",
        "parameters": json.dumps(EMAIL_PARAMETERS),
        "enabled": "on",
        "cron_expression": "0 9 * * MON",
        "timezone": "Europe/Berlin",
        "misfire_policy": "run_once",
        "misfire_grace_seconds": "60",
        "overlap_policy": "forbid",
        "max_retries": "0",
        "retry_backoff_seconds": "30",
        "timeout_seconds": "3600",
        **overrides,
    }
    if change:
        # The recent-runs inline is view-only, but its management form still travels with the page.
        data.update({f"runs-{key}": "0" for key in ("TOTAL_FORMS", "INITIAL_FORMS", "MIN_NUM_FORMS", "MAX_NUM_FORMS")})
    return {key: value for key, value in data.items() if value is not None}


def staff_client(*codenames: str, username: str = "viewer") -> Client:
    user = User.objects.create_user(username, password="viewer-password-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames, content_type__app_label="jobs"))
    client = Client()
    client.force_login(user)
    return client


def add_run(job: Job, scheduled_for: datetime, **fields: Any) -> JobRun:
    return JobRun.objects.create(job=job, scheduled_for=scheduled_for, not_before=scheduled_for, **fields)


# --- the jobs list ---


@pytest.mark.parametrize(
    ("status", "colour"),
    [
        ("succeeded", "green"),
        ("failed", "red"),
        ("timed_out", "red"),
        ("lost", "red"),
        ("skipped", "grey"),
        ("running", "blue"),
        ("queued", "blue"),
    ],
)
def test_list_shows_schedule_in_words_zone_and_coloured_status(
    admin_client: Client, make_job: MakeJob, status: str, colour: str
) -> None:
    job = make_job()
    Job.objects.filter(pk=job.pk).update(last_run_status=status, last_run_at=timezone.now())

    response = admin_client.get(reverse("admin:jobs_job_changelist"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Weekly report" in html
    assert "0 9 * * MON" in html
    assert "At 09:00, only on Monday" in html
    assert "Europe/Berlin" in html
    assert f'class="jobs-badge jobs-badge--{colour}" title="{status}"' in html
    assert "jobs/admin.css" in html
    local = job.next_run_at.astimezone(ZoneInfo("Europe/Berlin"))  # type: ignore[union-attr]
    assert f"{job.next_run_at:%Y-%m-%d %H:%M} UTC" in html
    assert f"{local:%a %H:%M %Z}" in html


def test_list_shows_a_dash_for_a_job_never_run(admin_client: Client, make_job: MakeJob) -> None:
    make_job()

    html = admin_client.get(reverse("admin:jobs_job_changelist")).content.decode()

    assert "jobs-badge" not in html


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("", ["Berlin mail", "Paused export", "Tokyo failure"]),
        ("job_type=data_processing", ["Paused export"]),
        ("enabled__exact=0", ["Paused export"]),
        ("last_run_status=failed", ["Tokyo failure"]),
        ("last_run_status=never", ["Berlin mail", "Paused export"]),
        ("timezone=Asia/Tokyo", ["Tokyo failure"]),
        ("q=mail", ["Berlin mail"]),
        ("q=quarterly", ["Paused export"]),  # in the description
    ],
)
def test_list_filters_and_search(admin_client: Client, make_job: MakeJob, query: str, names: list[str]) -> None:
    make_job(name="Berlin mail")
    Job.objects.create(
        name="Paused export",
        description="The quarterly export.",
        cron_expression="@daily",
        timezone="UTC",
        job_type="data_processing",
        parameters={"dataset": "x"},
        enabled=False,
    )
    tokyo = make_job(name="Tokyo failure", timezone="Asia/Tokyo")
    Job.objects.filter(pk=tokyo.pk).update(last_run_status="failed")

    response = admin_client.get(f"{reverse('admin:jobs_job_changelist')}?{query}")

    assert response.status_code == 200
    assert sorted(job.name for job in response.context["cl"].result_list) == names


# --- the job form ---


def test_job_type_is_a_select_of_registered_types_and_help_texts_show(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:jobs_job_add"))

    html = response.content.decode()
    assert '<select name="job_type"' in html
    assert '<option value="email_notification">Email notification</option>' in html
    assert '<option value="data_processing">Data processing</option>' in html
    assert "Five fields (minute hour day-of-month month day-of-week)" in html  # cron help text
    assert "IANA time zone the schedule is read in" in html
    assert "email_notification: recipient, subject, body (optional)" in html
    assert '<datalist id="jobs-timezones">' in html
    assert '<option value="Europe/Berlin">' in html


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"cron_expression": "60 * * * *"}, "cron_expression", "minute: 60 is out of range 0-59"),
        ({"cron_expression": "0 9 * *"}, "cron_expression", "expected 5 fields"),
        ({"cron_expression": "@fortnightly"}, "cron_expression", "unknown macro '@fortnightly'"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone", "'Mars/Olympus_Mons' is not an IANA time zone"),
        (
            {"parameters": json.dumps({"recipient": "not-an-address", "subject": "Hi"})},
            "parameters",
            "recipient[0]: Enter a valid email address.",
        ),
        (
            {"parameters": json.dumps({"recipient": ["a@example.com", "nope"], "subject": "Hi"})},
            "parameters",
            "recipient[1]: Enter a valid email address.",
        ),
        (
            {"parameters": json.dumps({"recipient": "a@example.com", "subject": "Hi\nBcc: x@evil.test"})},
            "parameters",
            "subject: must not contain line breaks (header injection)",
        ),
        ({"parameters": json.dumps({"subject": "Hi"})}, "parameters", "recipient: This field is required."),
        ({"parameters": "{not json"}, "parameters", "Enter a valid JSON."),
        ({"parameters": "[1, 2]"}, "parameters", "must be a JSON object"),
        ({"job_type": "carrier_pigeon"}, "job_type", "Select a valid choice."),
        ({"name": ""}, "name", "This field is required."),
    ],
)
def test_form_refuses_bad_values_on_their_fields_and_writes_nothing(
    admin_client: Client, overrides: dict[str, Any], field: str, message: str
) -> None:
    response = admin_client.post(reverse("admin:jobs_job_add"), form_data(**overrides))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {field}
    assert any(message in text for text in errors[field]), errors[field]
    html = response.content.decode()
    assert "Please correct the error below." in html
    assert 'class="errorlist' in html
    assert Job.objects.count() == 0
    assert JobRun.objects.count() == 0


def test_form_reports_every_bad_field_at_once(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        form_data(cron_expression="60 * * * *", timezone="Nowhere/Town", parameters=json.dumps({"recipient": "x"})),
    )

    errors = response.context["adminform"].form.errors
    assert errors["cron_expression"] == ["minute: 60 is out of range 0-59"]
    assert errors["timezone"] == ["'Nowhere/Town' is not an IANA time zone (for example Europe/Berlin or UTC)"]
    assert errors["parameters"] == ["recipient[0]: Enter a valid email address.", "subject: This field is required."]
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (["plain"], ["plain"]),
        ({"recipient": {0: ["bad"]}}, ["recipient[0]: bad"]),
        ({"headers": {"X-A": ["too long"]}}, ["headers.X-A: too long"]),
        ({"non_field_errors": ["both set"]}, ["both set"]),
        ({"items": [{}, {"url": ["bad url"]}]}, ["items[1].url: bad url"]),
    ],
)
def test_error_details_become_readable_lines(detail: Any, expected: list[str]) -> None:
    assert error_messages(detail) == expected


def test_creating_a_job_through_the_form_saves_through_the_service(admin_client: Client) -> None:
    before = timezone.now()

    response = admin_client.post(reverse("admin:jobs_job_add"), form_data(cron_expression="0 9 * * mon"))

    assert response.status_code == 302
    job = Job.objects.get()
    assert job.name == "Weekly report"
    assert job.cron_expression == "0 9 * * MON"  # normalised by the service
    assert job.parameters == EMAIL_PARAMETERS
    assert job.enabled is True
    assert job.next_run_at is not None
    assert job.next_run_at == schedule.next_fire_after("0 9 * * MON", "Europe/Berlin", before)
    assert job.next_run_at.astimezone(ZoneInfo("Europe/Berlin")).strftime("%a %H:%M") == "Mon 09:00"
    assert response["Location"] == reverse("admin:jobs_job_changelist")
    # The admin logged the addition against the row the service created.
    assert admin_client.get(reverse("admin:jobs_job_history", args=[job.pk])).status_code == 200


def test_creating_a_disabled_job_leaves_next_run_empty(admin_client: Client) -> None:
    admin_client.post(reverse("admin:jobs_job_add"), form_data(enabled=None))

    assert Job.objects.get().next_run_at is None


def test_change_form_shows_description_and_next_five_fire_times(admin_client: Client, make_job: MakeJob) -> None:
    # Once a year, so the five times do not move while the test runs.
    job = make_job(cron_expression="30 7 1 JAN *", timezone="America/New_York")
    expected = schedule.fire_times(job.cron_expression, job.timezone, timezone.now(), 5)

    response = admin_client.get(reverse("admin:jobs_job_change", args=[job.pk]))

    html = response.content.decode()
    assert "At 07:30, on day 1 of the month, only in January" in html
    assert len(expected) == 5
    for instant in expected:
        assert f"{instant:%Y-%m-%d} 12:30:00 UTC" in html
        assert f"{instant.astimezone(ZoneInfo('America/New_York')):%Y-%m-%d} 07:30:00 EST" in html
    assert html.count("12:30:00 UTC") == 5


def test_change_form_preview_follows_daylight_saving(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job(cron_expression="0 9 * * *", timezone="Europe/Berlin")
    expected = schedule.fire_times(job.cron_expression, job.timezone, timezone.now(), 5)

    html = admin_client.get(reverse("admin:jobs_job_change", args=[job.pk])).content.decode()

    for instant in expected:
        local = instant.astimezone(ZoneInfo("Europe/Berlin"))
        assert f"{instant:%a %Y-%m-%d %H:%M:%S} UTC" in html
        assert f"{local:%a %Y-%m-%d} 09:00:00 {local:%Z}" in html


def test_changing_the_schedule_through_the_form_recomputes_next_run(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()
    url = reverse("admin:jobs_job_change", args=[job.pk])

    response = admin_client.post(url, form_data(change=True, cron_expression="0 18 * * FRI", timezone="UTC"))

    assert response.status_code == 302
    job.refresh_from_db()
    assert job.cron_expression == "0 18 * * FRI"
    assert job.next_run_at is not None
    assert job.next_run_at.strftime("%a %H:%M") == "Fri 18:00"


def test_unticking_enabled_in_the_form_pauses_the_job(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()

    response = admin_client.post(reverse("admin:jobs_job_change", args=[job.pk]), form_data(change=True, enabled=None))

    assert response.status_code == 302
    job.refresh_from_db()
    assert job.enabled is False
    assert job.next_run_at is None


def test_change_form_refuses_a_bad_cron_and_keeps_the_row(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()

    response = admin_client.post(
        reverse("admin:jobs_job_change", args=[job.pk]), form_data(change=True, cron_expression="0 25 * * *")
    )

    assert response.context["adminform"].form.errors == {"cron_expression": ["hour: 25 is out of range 0-23"]}
    job.refresh_from_db()
    assert job.cron_expression == "0 9 * * MON"


def test_change_page_lists_recent_runs_newest_first_capped(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()
    start = datetime(2026, 1, 1, 9, tzinfo=UTC)
    for day in range(25):
        add_run(
            job,
            start + timedelta(days=day),
            status="failed" if day == 24 else "succeeded",
            started_at=start + timedelta(days=day, seconds=1),
            finished_at=start + timedelta(days=day, seconds=3.5),
            error="ExecutorError: SMTP said no\nTraceback ..." if day == 24 else "",
        )

    response = admin_client.get(reverse("admin:jobs_job_change", args=[job.pk]))

    formset = response.context["inline_admin_formsets"][0].formset
    runs = [form.instance for form in formset.forms]
    assert len(runs) == 20
    assert runs[0].scheduled_for == start + timedelta(days=24)
    assert [run.scheduled_for for run in runs] == sorted((run.scheduled_for for run in runs), reverse=True)
    html = response.content.decode()
    assert "Recent runs (newest 20)" in html
    assert "jobs-badge--red" in html
    assert "ExecutorError: SMTP said no" in html
    assert "Traceback" not in html  # the excerpt is the first line; the whole error is on the run's page
    assert "2.50 s" in html
    assert f"?job__id__exact={job.pk}" in html  # the link to all of its runs
    assert 'name="runs-0-status"' not in html  # read-only


def test_add_page_has_no_runs_or_buttons(admin_client: Client) -> None:
    html = admin_client.get(reverse("admin:jobs_job_add")).content.decode()

    assert "Recent runs" not in html
    assert "Run now" not in html
    assert "Shown once the job is saved." in html


# --- run now, pause, resume ---


def test_run_now_button_queues_a_manual_run(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()
    change_url = reverse("admin:jobs_job_change", args=[job.pk])
    assert f'action="{reverse("admin:jobs_job_run", args=[job.pk])}"' in admin_client.get(change_url).content.decode()

    response = admin_client.post(reverse("admin:jobs_job_run", args=[job.pk]), follow=True)

    run = JobRun.objects.get()
    assert run.job == job
    assert run.trigger == JobRun.Trigger.MANUAL
    assert run.status == JobRun.Status.QUEUED
    assert run.attempt == 1
    assert response.redirect_chain == [(change_url, 302)]
    html = response.content.decode()
    assert f'Queued <a href="{reverse("admin:jobs_jobrun_change", args=[run.pk])}">run {run.pk}</a>' in html
    assert "jobs-badge--blue" in html  # the queued run is listed on the page


def test_run_now_also_works_for_a_paused_job(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job(enabled=False)

    admin_client.post(reverse("admin:jobs_job_run", args=[job.pk]))

    assert JobRun.objects.filter(job=job, trigger="manual").count() == 1


@pytest.mark.parametrize("name", ["run", "pause", "resume"])
def test_buttons_refuse_get(admin_client: Client, make_job: MakeJob, name: str) -> None:
    job = make_job()

    response = admin_client.get(reverse(f"admin:jobs_job_{name}", args=[job.pk]))

    assert response.status_code == 405
    assert JobRun.objects.count() == 0
    job.refresh_from_db()
    assert job.enabled is True


def test_buttons_need_the_csrf_token(admin_user: User, make_job: MakeJob) -> None:
    job = make_job()
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    response = client.post(reverse("admin:jobs_job_run", args=[job.pk]))

    assert response.status_code == 403
    assert JobRun.objects.count() == 0


def test_button_on_an_unknown_job_is_404(admin_client: Client) -> None:
    assert admin_client.post(reverse("admin:jobs_job_run", args=[999999])).status_code == 404


def test_pause_and_resume_buttons(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()
    change_url = reverse("admin:jobs_job_change", args=[job.pk])

    response = admin_client.post(reverse("admin:jobs_job_pause", args=[job.pk]))

    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.enabled, job.next_run_at) == (False, None)
    html = admin_client.get(change_url).content.decode()
    assert reverse("admin:jobs_job_resume", args=[job.pk]) in html
    assert reverse("admin:jobs_job_pause", args=[job.pk]) not in html
    assert "Paused: the job would fire at these times if resumed." in html

    before = timezone.now()
    admin_client.post(reverse("admin:jobs_job_resume", args=[job.pk]))

    job.refresh_from_db()
    assert job.enabled is True
    assert job.next_run_at == schedule.next_fire_after(job.cron_expression, job.timezone, before)


def _action(client: Client, action: str, jobs: list[Job]) -> Any:
    return client.post(
        reverse("admin:jobs_job_changelist"),
        {"action": action, "_selected_action": [job.pk for job in jobs]},
        follow=True,
    )


def test_bulk_actions_pause_resume_and_run_now(admin_client: Client, make_job: MakeJob) -> None:
    first, second, untouched = make_job(name="a"), make_job(name="b"), make_job(name="c")

    response = _action(admin_client, "pause", [first, second])

    assert "Paused 2 jobs." in response.content.decode()
    assert list(Job.objects.order_by("name").values_list("enabled", "next_run_at")) == [
        (False, None),
        (False, None),
        (True, untouched.next_run_at),
    ]

    response = _action(admin_client, "resume", [first, untouched])

    assert "Resumed 1 job." in response.content.decode()  # the other was not paused
    assert list(Job.objects.order_by("name").values_list("enabled", flat=True)) == [True, False, True]
    assert Job.objects.get(pk=first.pk).next_run_at is not None

    response = _action(admin_client, "run_now", [first, second])

    assert "Queued a manual run for 2 jobs." in response.content.decode()
    assert sorted(JobRun.objects.values_list("job__name", "trigger", "status")) == [
        ("a", "manual", "queued"),
        ("b", "manual", "queued"),
    ]


def test_a_user_without_change_permission_cannot_run_pause_or_resume(make_job: MakeJob) -> None:
    job = make_job()
    client = staff_client("view_job", "view_jobrun")

    change_page = client.get(reverse("admin:jobs_job_change", args=[job.pk]))
    changelist = client.get(reverse("admin:jobs_job_changelist"))

    assert change_page.status_code == 200
    assert "Run now" not in change_page.content.decode()
    assert changelist.status_code == 200
    assert 'value="run_now"' not in changelist.content.decode()
    for name in ("run", "pause", "resume"):
        assert client.post(reverse(f"admin:jobs_job_{name}", args=[job.pk])).status_code == 403
    _action(client, "run_now", [job])
    _action(client, "pause", [job])
    assert JobRun.objects.count() == 0
    job.refresh_from_db()
    assert job.enabled is True


def test_a_user_with_change_permission_can_run(make_job: MakeJob) -> None:
    job = make_job()
    client = staff_client("view_job", "change_job")

    assert client.post(reverse("admin:jobs_job_run", args=[job.pk])).status_code == 302
    assert JobRun.objects.filter(job=job, trigger="manual").count() == 1


def test_deleting_a_job_in_the_admin_removes_its_runs(admin_client: Client, make_job: MakeJob) -> None:
    job = make_job()
    add_run(job, datetime(2026, 1, 1, tzinfo=UTC))

    response = admin_client.post(reverse("admin:jobs_job_delete", args=[job.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert Job.objects.count() == 0
    assert JobRun.objects.count() == 0


# --- runs and scheduler processes ---


def test_runs_list_is_read_only_with_status_times_duration_error_and_worker(
    admin_client: Client, make_job: MakeJob
) -> None:
    job = make_job()
    started = datetime(2026, 3, 1, 8, 0, 2, tzinfo=UTC)
    worker = SchedulerProcess.objects.create(
        hostname="worker-1", pid=4242, started_at=started, last_heartbeat_at=started
    )
    run = add_run(
        job,
        datetime(2026, 3, 1, 8, tzinfo=UTC),
        status="timed_out",
        started_at=started,
        finished_at=started + timedelta(minutes=2, seconds=5),
        worker=worker,
        error="run exceeded timeout of 120 s\nmore detail",
        result={"sent": 0},
    )

    changelist = admin_client.get(reverse("admin:jobs_jobrun_changelist"))
    html = changelist.content.decode()
    assert changelist.status_code == 200
    assert "jobs-badge--red" in html
    assert "Timed Out" in html
    assert "2026-03-01 08:00:00 UTC" in html  # scheduled for
    assert ">08:00:02 UTC<" in html  # started, on the same day as scheduled
    assert "2.00 s late" in html
    assert "2 min 5 s" in html  # duration
    assert "attempt 1" in html
    assert "worker-1:4242" in html
    assert "run exceeded timeout of 120 s" in html
    assert reverse("admin:jobs_jobrun_add") not in html

    detail = admin_client.get(reverse("admin:jobs_jobrun_change", args=[run.pk]))
    assert detail.status_code == 200
    detail_html = detail.content.decode()
    assert "more detail" in detail_html
    assert "&quot;sent&quot;: 0" in detail_html
    assert 'name="_save"' not in detail_html

    assert admin_client.get(reverse("admin:jobs_jobrun_add")).status_code == 403
    response = admin_client.post(reverse("admin:jobs_jobrun_change", args=[run.pk]), {"status": "succeeded"})
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == "timed_out"


@pytest.mark.parametrize(
    ("query", "count"),
    [
        ("status__exact=failed", 1),
        ("trigger__exact=manual", 1),
        ("job__job_type=email_notification", 2),
        ("job__job_type=data_processing", 0),
        ("scheduled_for__year=2026&scheduled_for__month=3", 1),
    ],
)
def test_runs_list_filters(admin_client: Client, make_job: MakeJob, query: str, count: int) -> None:
    job = make_job()
    add_run(job, datetime(2026, 3, 1, tzinfo=UTC), status="failed")
    add_run(job, datetime(2026, 4, 1, tzinfo=UTC), trigger="manual")

    response = admin_client.get(f"{reverse('admin:jobs_jobrun_changelist')}?{query}")

    assert response.status_code == 200
    assert response.context["cl"].result_count == count


def test_run_times_keep_the_date_when_a_run_crosses_midnight(admin_client: Client, make_job: MakeJob) -> None:
    scheduled = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    add_run(
        make_job(),
        scheduled,
        status="succeeded",
        started_at=scheduled + timedelta(seconds=2),
        finished_at=scheduled + timedelta(seconds=3),
    )

    html = admin_client.get(reverse("admin:jobs_jobrun_changelist")).content.decode()

    assert ">2026-03-01 23:59:59 UTC<" in html
    assert ">2026-03-02 00:00:01 UTC<" in html
    assert "2.00 s late" in html


def test_runs_can_be_deleted_for_cleanup(admin_client: Client, make_job: MakeJob) -> None:
    run = add_run(make_job(), datetime(2026, 3, 1, tzinfo=UTC), status="succeeded")

    response = admin_client.post(reverse("admin:jobs_jobrun_delete", args=[run.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert JobRun.objects.count() == 0


def test_scheduler_processes_show_heartbeats_and_whether_alive(admin_client: Client) -> None:
    now = timezone.now()
    SchedulerProcess.objects.create(hostname="fresh", pid=1, started_at=now, last_heartbeat_at=now)
    SchedulerProcess.objects.create(
        hostname="silent", pid=2, started_at=now - timedelta(hours=1), last_heartbeat_at=now - timedelta(minutes=5)
    )
    SchedulerProcess.objects.create(hostname="stopped", pid=3, started_at=now, last_heartbeat_at=now, stopped_at=now)

    response = admin_client.get(reverse("admin:jobs_schedulerprocess_changelist"))

    assert response.status_code == 200
    cl = response.context["cl"]
    alive = {process.hostname: cl.model_admin.alive(process) for process in cl.result_list}
    assert alive == {"fresh": True, "silent": False, "stopped": False}
    html = response.content.decode()
    assert html.count('src="/static/admin/img/icon-yes.svg"') == 1
    assert html.count('src="/static/admin/img/icon-no.svg"') == 2
    assert "5 min 0 s" in html or "5 min 1 s" in html  # heartbeat age
    assert admin_client.get(reverse("admin:jobs_schedulerprocess_add")).status_code == 403


def test_a_view_only_user_sees_secrets_masked_and_an_editor_sees_them(make_job: MakeJob) -> None:
    parameters = {"url": "https://hooks.example.com/x", "headers": {"Authorization": "Bearer s3cret"}}
    job = make_job(job_type="http_request", parameters=parameters)
    url = reverse("admin:jobs_job_change", args=[job.pk])
    page = staff_client("view_job").get(url).content.decode()
    assert "s3cret" not in page and "********" in page
    assert "s3cret" in staff_client("view_job", "change_job", username="editor").get(url).content.decode()
    job.refresh_from_db()
    assert job.parameters == parameters  # masking is only what is shown


def test_the_parameters_box_starts_empty_with_an_example_for_every_type(admin_client: Client) -> None:
    from jobs.executors import all_executors

    page = admin_client.get(reverse("admin:jobs_job_add")).content.decode()
    box = page[page.index('<textarea name="parameters"') :]
    box = box[: box.index("</textarea>")]
    assert box.rstrip().endswith("{}")  # not "null"
    examples = json.loads(html.unescape(re.search(r'data-examples="([^"]*)"', box)[1]))  # type: ignore[index]
    assert set(examples) == set(all_executors())
    for name in ("email_notification", "data_processing", "http_request"):
        assert examples[name], name  # the built-in types show a real example
    for name, example in examples.items():
        # Every example is a job a person could save as it is.
        services.job_clean(cron_expression="0 9 * * *", timezone="UTC", job_type=name, parameters=example)


def test_the_admin_checks_what_its_user_may_schedule(make_job: MakeJob) -> None:
    client = staff_client("add_job", "view_job", "change_job", username="clerk")
    backup = form_data(job_type="data_processing", parameters=json.dumps({"dataset": "database_backup"}))
    response = client.post(reverse("admin:jobs_job_add"), backup)
    assert response.status_code == 200  # the form again, with the error on the field
    assert "schedule_database_backup" in response.content.decode()
    assert not Job.objects.filter(job_type="data_processing").exists()
    export = form_data(
        job_type="data_processing", parameters=json.dumps({"dataset": "model_export", "model": "auth.User"})
    )
    assert "auth.view_user" in client.post(reverse("admin:jobs_job_add"), export).content.decode()
    assert not Job.objects.filter(job_type="data_processing").exists()


@pytest.mark.postgres
def test_heartbeats_are_aged_by_the_database_clock_not_the_web_hosts(admin_client: Client, monkeypatch) -> None:
    from jobs.scheduler.clock import database_now

    beat = database_now()
    SchedulerProcess.objects.create(hostname="fresh", pid=1, started_at=beat, last_heartbeat_at=beat)
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + timedelta(seconds=90))  # this host runs ahead
    response = admin_client.get(reverse("admin:jobs_schedulerprocess_changelist"))
    cl = response.context["cl"]
    assert [cl.model_admin.alive(process) for process in cl.result_list] == [True]
    assert "1 min" not in response.content.decode()
