"""The /jobs endpoints: the seed's bodies, CRUD, validation, permissions, run now and lists."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import override_settings
from rest_framework import serializers
from rest_framework.test import APIClient

from jobs.executors.data_processing import DataProcessor
from jobs.models import Job, JobRun

pytestmark = pytest.mark.django_db

MakeJob = Callable[..., Job]


class RowCountProcessor(DataProcessor):
    """A data processor registered by these tests, as any app would register its own."""

    name = "row_count"
    description = "Counts rows."

    class parameters_serializer(serializers.Serializer):
        table = serializers.CharField()

    def process(self, run: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"rows": 0}


@pytest.fixture
def row_count_processor() -> Iterator[None]:
    jobs_settings = {**settings.JOBS, "DATA_PROCESSORS": [f"{__name__}.RowCountProcessor"]}
    with override_settings(JOBS=jobs_settings):
        yield


@pytest.fixture
def make_job() -> MakeJob:
    """Create a job row directly, for list and filter tests that need many."""

    def make(**fields: Any) -> Job:
        values: dict[str, Any] = {
            "name": "job",
            "cron_expression": "0 9 * * *",
            "timezone": "UTC",
            "job_type": "email_notification",
            "parameters": {"recipient": "a@example.com", "subject": "s"},
            "next_run_at": datetime(2026, 6, 2, 9, tzinfo=UTC),
            **fields,
        }
        if not values.get("enabled", True):
            values["next_run_at"] = None
        return Job.objects.create(**values)

    return make


def parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def next_local(hour: int, minute: int, zone: str, after: datetime) -> datetime:
    """The next hh:mm wall-clock time in `zone` after `after`, in UTC (independent of jobs.schedule)."""
    tz = ZoneInfo(zone)
    day = after.astimezone(tz).date()
    while True:
        candidate = datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz)
        if candidate > after:
            return candidate.astimezone(UTC)
        day += timedelta(days=1)


def counts() -> tuple[int, int]:
    return Job.objects.count(), JobRun.objects.count()


# --- The seed's requests ---------------------------------------------------------------------


def test_seed_body_creates_job_with_defaults(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    before = datetime.now(UTC)
    response = api.post("/jobs", job_data(), format="json")
    after = datetime.now(UTC)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "Daily reminder"
    assert body["cron_expression"] == "0 9 * * *"
    assert body["timezone"] == "UTC"
    assert body["enabled"] is True
    assert body["misfire_policy"] == "run_once"
    assert body["overlap_policy"] == "forbid"
    assert body["max_retries"] == 0
    assert body["schedule_description"] == "At 09:00"
    assert body["next_run_at"].endswith("Z")
    assert parse_time(body["next_run_at"]) in {next_local(9, 0, "UTC", before), next_local(9, 0, "UTC", after)}
    job = Job.objects.get(pk=body["id"])
    assert job.parameters == {"recipient": "admin@company.com", "subject": "Daily report ready"}
    assert job.next_run_at == parse_time(body["next_run_at"])


def test_next_run_at_is_the_local_time_in_utc(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    before = datetime.now(UTC)
    response = api.post("/jobs", job_data(timezone="Europe/Berlin"), format="json")
    after = datetime.now(UTC)

    assert response.status_code == 201, response.content
    next_run_at = parse_time(response.json()["next_run_at"])
    assert next_run_at in {next_local(9, 0, "Europe/Berlin", before), next_local(9, 0, "Europe/Berlin", after)}
    # 09:00 in Berlin is 07:00 or 08:00 UTC, never 09:00.
    assert next_run_at.hour in {7, 8}
    assert next_run_at.astimezone(ZoneInfo("Europe/Berlin")).hour == 9


@pytest.mark.parametrize("slash", ["", "/"])
def test_every_route_answers_with_and_without_trailing_slash(api: APIClient, make_job: MakeJob, slash: str) -> None:
    job = make_job(name="Daily reminder")
    assert job.next_run_at is not None
    run = JobRun.objects.create(job=job, scheduled_for=job.next_run_at, not_before=job.next_run_at)
    cache.clear()  # the run-now throttle counts per user

    assert api.get(f"/jobs{slash}").status_code == 200
    assert api.get(f"/jobs/{job.pk}{slash}").json()["name"] == "Daily reminder"
    assert len(api.get(f"/jobs/{job.pk}/runs{slash}").json()["results"]) == 1
    assert len(api.get(f"/runs{slash}").json()["results"]) == 1
    assert api.get(f"/runs/{run.pk}{slash}").json()["id"] == run.pk
    assert api.get(f"/job-types{slash}").status_code == 200
    assert api.get(f"/cron/preview{slash}", {"expression": "@daily"}).status_code == 200
    assert api.patch(f"/jobs/{job.pk}{slash}", {"name": "Renamed"}, format="json").status_code == 200
    assert api.post(f"/jobs/{job.pk}/pause{slash}").json()["enabled"] is False
    assert api.post(f"/jobs/{job.pk}/resume{slash}").json()["enabled"] is True
    assert api.post(f"/jobs/{job.pk}/run{slash}").status_code == 202
    assert api.delete(f"/jobs/{job.pk}{slash}").status_code == 204
    assert api.post(f"/jobs{slash}", {**make_body(), "name": "again"}, format="json").status_code == 201


def make_body(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "Daily reminder",
        "cron_expression": "0 9 * * *",
        "job_type": "email_notification",
        "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
        **overrides,
    }


def test_seed_get_list_and_detail(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    job_id = api.post("/jobs", job_data(), format="json").json()["id"]

    listed = api.get("/jobs")
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["results"]] == [job_id]
    detail = api.get(f"/jobs/{job_id}")
    assert detail.status_code == 200
    assert detail.json() == listed.json()["results"][0]


def test_unknown_dataset_is_refused_with_the_known_ones(
    api: APIClient, job_data: Callable[..., dict[str, Any]], row_count_processor: None
) -> None:
    response = api.post(
        "/jobs",
        job_data(
            name="Hourly sync",
            cron_expression="0 * * * *",
            job_type="data_processing",
            parameters={"dataset": "user_events"},
        ),
        format="json",
    )

    assert response.status_code == 400
    message = response.json()["parameters"]["dataset"][0]
    assert "user_events" in message
    assert "known datasets:" in message and "row_count" in message and "database_backup" in message
    assert Job.objects.count() == 0


def test_registered_dataset_is_accepted_and_its_parameters_checked(
    api: APIClient, job_data: Callable[..., dict[str, Any]], row_count_processor: None
) -> None:
    body = job_data(job_type="data_processing", parameters={"dataset": "row_count"})
    missing = api.post("/jobs", body, format="json")
    assert missing.status_code == 400
    assert "table" in missing.json()["parameters"]

    body["parameters"]["table"] = "auth_user"
    assert api.post("/jobs", body, format="json").status_code == 201

    body["parameters"]["colour"] = "red"
    unknown = api.post("/jobs", body, format="json")
    assert unknown.status_code == 400
    assert "colour" in unknown.json()["parameters"]
    assert Job.objects.count() == 1


# --- Changing and deleting -------------------------------------------------------------------


def test_put_replaces_the_job(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    job_id = api.post("/jobs", job_data(), format="json").json()["id"]

    response = api.put(
        f"/jobs/{job_id}",
        job_data(name="Weekly report", cron_expression="0 8 * * MON", timezone="America/New_York", max_retries=3),
        format="json",
    )

    assert response.status_code == 200, response.content
    job = Job.objects.get(pk=job_id)
    assert (job.name, job.cron_expression, job.timezone, job.max_retries) == (
        "Weekly report",
        "0 8 * * MON",
        "America/New_York",
        3,
    )
    assert job.next_run_at is not None
    local = job.next_run_at.astimezone(ZoneInfo("America/New_York"))
    assert (local.weekday(), local.hour, local.minute) == (0, 8, 0)
    assert response.json()["next_run_at"] == job.next_run_at.isoformat().replace("+00:00", "Z")


def test_put_without_required_fields_is_refused(api: APIClient, make_job: MakeJob) -> None:
    job = make_job(name="kept")

    response = api.put(f"/jobs/{job.pk}", {"name": "only a name"}, format="json")

    assert response.status_code == 400
    assert set(response.json()) == {"cron_expression", "job_type"}
    job.refresh_from_db()
    assert job.name == "kept"


@pytest.mark.parametrize(
    ("change", "expected_hour_utc"),
    [
        ({"cron_expression": "30 10 * * *"}, 10),
        ({"timezone": "Asia/Tokyo"}, 0),  # 09:00 in Tokyo is midnight UTC
    ],
)
def test_patching_the_schedule_recomputes_next_run(
    api: APIClient, make_job: MakeJob, change: dict[str, str], expected_hour_utc: int
) -> None:
    stale = datetime(2020, 1, 1, tzinfo=UTC)
    job = make_job(next_run_at=stale)

    response = api.patch(f"/jobs/{job.pk}", change, format="json")

    assert response.status_code == 200, response.content
    job.refresh_from_db()
    assert job.next_run_at is not None and job.next_run_at > datetime.now(UTC)
    assert job.next_run_at.hour == expected_hour_utc
    assert parse_time(response.json()["next_run_at"]) == job.next_run_at


def test_disabling_clears_next_run_and_enabling_computes_it(api: APIClient, make_job: MakeJob) -> None:
    job = make_job()

    disabled = api.patch(f"/jobs/{job.pk}", {"enabled": False}, format="json")
    assert disabled.status_code == 200
    assert disabled.json()["next_run_at"] is None
    job.refresh_from_db()
    assert job.next_run_at is None

    before = datetime.now(UTC)
    enabled = api.patch(f"/jobs/{job.pk}", {"enabled": True}, format="json")
    job.refresh_from_db()
    assert enabled.json()["enabled"] is True
    assert job.next_run_at in {next_local(9, 0, "UTC", before), next_local(9, 0, "UTC", datetime.now(UTC))}


def test_changing_only_the_name_keeps_next_run(api: APIClient, make_job: MakeJob) -> None:
    # A value no schedule computation would give: it must survive a rename untouched.
    kept = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
    job = make_job(next_run_at=kept)

    response = api.patch(f"/jobs/{job.pk}", {"name": "Renamed", "description": "why"}, format="json")

    assert response.status_code == 200
    job.refresh_from_db()
    assert (job.name, job.description, job.next_run_at) == ("Renamed", "why", kept)


def test_delete_removes_the_job_and_its_runs(api: APIClient, make_job: MakeJob) -> None:
    job, other = make_job(), make_job(name="other")
    for offset in range(3):
        when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=offset)
        JobRun.objects.create(job=job, scheduled_for=when, not_before=when, status=JobRun.Status.SUCCEEDED)
    JobRun.objects.create(
        job=other, scheduled_for=datetime(2026, 1, 1, tzinfo=UTC), not_before=datetime(2026, 1, 1, tzinfo=UTC)
    )

    response = api.delete(f"/jobs/{job.pk}")

    assert response.status_code == 204
    assert not Job.objects.filter(pk=job.pk).exists()
    assert list(JobRun.objects.values_list("job_id", flat=True)) == [other.pk]
    assert api.get(f"/jobs/{job.pk}").status_code == 404


@pytest.mark.parametrize("job_id", ["424242", "99999999999999999999", "9223372036854775808"])
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("get", ""),
        ("put", ""),
        ("patch", ""),
        ("delete", ""),
        ("post", "/run"),
        ("post", "/pause"),
        ("post", "/resume"),
        ("get", "/runs"),
    ],
)
def test_unknown_and_huge_ids_are_json_404(api: APIClient, job_id: str, method: str, suffix: str) -> None:
    response = getattr(api, method)(f"/jobs/{job_id}{suffix}", make_body(), format="json")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()
    assert counts() == (0, 0)


# --- Validation ------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "cron minute out of range",
        {"cron_expression": "60 9 * * *"},
        "cron_expression",
        "minute: 60 is out of range 0-59",
    ),
    ("cron wrong field count", {"cron_expression": "0 9 * *"}, "cron_expression", "expected 5 fields"),
    ("cron unknown name", {"cron_expression": "0 9 * * FUNDAY"}, "cron_expression", "day-of-week"),
    ("cron never fires", {"cron_expression": "0 0 30 2 *"}, "cron_expression", "never fires"),
    ("cron empty", {"cron_expression": ""}, "cron_expression", "blank"),
    ("timezone unknown", {"timezone": "Mars/Olympus"}, "timezone", "not an IANA time zone"),
    ("timezone path", {"timezone": "../../etc/passwd"}, "timezone", "not an IANA time zone"),
    ("job type unknown", {"job_type": "fax"}, "job_type", "known types: data_processing, email_notification"),
    ("parameters a list", {"parameters": ["admin@company.com"]}, "parameters", "must be a JSON object"),
    ("parameters a string", {"parameters": "recipient=admin"}, "parameters", "must be a JSON object"),
    ("max_retries too big", {"max_retries": 1000}, "max_retries", "less than or equal to 20"),
    ("max_retries huge", {"max_retries": 10**30}, "max_retries", "less than or equal to 20"),
    ("negative timeout", {"timeout_seconds": -5}, "timeout_seconds", "greater than or equal to 1"),
    ("zero backoff", {"retry_backoff_seconds": 0}, "retry_backoff_seconds", "greater than or equal to 1"),
    ("misfire policy", {"misfire_policy": "catch_up_all"}, "misfire_policy", "not a valid choice"),
    ("overlap policy", {"overlap_policy": "queue"}, "overlap_policy", "not a valid choice"),
    ("enabled not a boolean", {"enabled": "maybe"}, "enabled", "valid boolean"),
    ("name too long", {"name": "x" * 201}, "name", "no more than 200 characters"),
    ("name missing", {"name": None}, "name", "null"),
    ("NUL in name", {"name": "daily\x00"}, "name", "Null characters are not allowed"),
    ("NUL in cron", {"cron_expression": "0 9 * * *\x00"}, "cron_expression", "Null characters are not allowed"),
]

BAD_EMAIL_PARAMETERS: list[tuple[str, dict[str, Any], str]] = [
    ("bad address", {"recipient": "not-an-address", "subject": "s"}, "recipient"),
    ("bad address in list", {"recipient": ["ok@example.com", "nope"], "subject": "s"}, "recipient"),
    ("no recipient", {"subject": "s"}, "recipient"),
    ("newline in subject", {"recipient": "a@example.com", "subject": "hi\nBcc: victim@example.com"}, "subject"),
    ("carriage return in subject", {"recipient": "a@example.com", "subject": "hi\rBcc: x@example.com"}, "subject"),
    (
        "newline in from",
        {"recipient": "a@example.com", "subject": "s", "from_email": "a@b.com\nBcc: x@y.com"},
        "from_email",
    ),
    ("bad cc", {"recipient": "a@example.com", "subject": "s", "cc": ["x"]}, "cc"),
    ("template error", {"recipient": "a@example.com", "subject": "{% if %}"}, "subject"),
]


@pytest.mark.parametrize(("case", "overrides", "field", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_fields_are_refused_naming_the_field(
    api: APIClient,
    job_data: Callable[..., dict[str, Any]],
    case: str,
    overrides: dict[str, Any],
    field: str,
    message: str,
) -> None:
    response = api.post("/jobs", job_data(**overrides), format="json")

    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors, errors
    assert message in " ".join(errors[field]), errors
    assert counts() == (0, 0)


@pytest.mark.parametrize(
    ("case", "parameters", "field"), BAD_EMAIL_PARAMETERS, ids=[c[0] for c in BAD_EMAIL_PARAMETERS]
)
def test_bad_email_parameters_are_refused(
    api: APIClient, job_data: Callable[..., dict[str, Any]], case: str, parameters: dict[str, Any], field: str
) -> None:
    response = api.post("/jobs", job_data(parameters=parameters), format="json")

    assert response.status_code == 400, response.content
    assert field in response.json()["parameters"]
    assert counts() == (0, 0)


def test_several_bad_fields_are_all_reported(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    response = api.post(
        "/jobs", job_data(cron_expression="61 * * * *", timezone="Nowhere/City", job_type="fax"), format="json"
    )

    assert response.status_code == 400
    assert set(response.json()) == {"cron_expression", "timezone", "job_type"}
    assert response.json()["cron_expression"] == ["minute: 61 is out of range 0-59"]


@pytest.mark.parametrize(
    ("case", "parameters", "message"),
    [
        ("NUL in a value", {"recipient": "a@example.com", "subject": "s\x00"}, "NUL"),
        ("NUL in a key", {"recipient": "a@example.com", "subject": "s", "x\x00": 1}, "NUL"),
        ("oversize", {"recipient": "a@example.com", "subject": "s", "body": "x" * 70_000}, "at most 65536 bytes"),
        (
            "nested deeply",
            {"recipient": "a@example.com", "subject": "s", "body": json.loads("[" * 200 + "]" * 200)},
            "nested",
        ),
    ],
)
def test_unstorable_parameters_are_refused(
    api: APIClient, job_data: Callable[..., dict[str, Any]], case: str, parameters: dict[str, Any], message: str
) -> None:
    response = api.post("/jobs", job_data(parameters=parameters), format="json")

    assert response.status_code == 400
    assert message in response.json()["parameters"][0]
    assert counts() == (0, 0)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ('{"name": "Daily reminder",', "application/json", 400),
        ("NaN", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        ("[" * 100_000 + "]" * 100_000, "application/json", 400),
        ('[{"name": "Daily reminder"}]', "application/json", 400),
        ("null", "application/json", 400),
        ('"just a string"', "application/json", 400),
        ("name=x", "text/plain", 415),
    ],
    ids=["truncated", "nan", "not utf-8", "deeply nested", "list body", "null", "string", "text/plain"],
)
def test_malformed_bodies_are_refused(api: APIClient, body: str | bytes, content_type: str, status: int) -> None:
    response = api.post("/jobs", data=body, content_type=content_type)

    assert response.status_code == status
    assert isinstance(response.json(), dict)
    assert counts() == (0, 0)


def test_oversize_body_is_refused(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    body = job_data(description="x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))

    response = api.post("/jobs", body, format="json")

    assert response.status_code == 413
    assert counts() == (0, 0)


def test_refused_update_writes_nothing(api: APIClient, make_job: MakeJob) -> None:
    job = make_job(name="kept", cron_expression="0 9 * * *")
    before = Job.objects.filter(pk=job.pk).values().get()

    for change in [
        {"name": "new", "cron_expression": "0 25 * * *"},
        {"name": "new", "parameters": {"recipient": "bad", "subject": "s"}},
        {"name": "new", "job_type": "data_processing"},
        {"name": "new", "enabled": False, "timezone": "Atlantis/Capital"},
    ]:
        response = api.patch(f"/jobs/{job.pk}", change, format="json")
        assert response.status_code == 400, change

    assert Job.objects.filter(pk=job.pk).values().get() == before


def test_patching_parameters_is_checked_against_the_current_type(api: APIClient, make_job: MakeJob) -> None:
    job = make_job()

    response = api.patch(f"/jobs/{job.pk}", {"parameters": {"subject": "no recipient"}}, format="json")

    assert response.status_code == 400
    assert "recipient" in response.json()["parameters"]


# --- Permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/jobs"),
        ("post", "/jobs"),
        ("get", "/jobs/{job}"),
        ("put", "/jobs/{job}"),
        ("patch", "/jobs/{job}"),
        ("delete", "/jobs/{job}"),
        ("post", "/jobs/{job}/run"),
        ("post", "/jobs/{job}/pause"),
        ("post", "/jobs/{job}/resume"),
        ("get", "/jobs/{job}/runs"),
        ("get", "/jobs/99999999999999999999"),
    ],
)
def test_anonymous_requests_get_401(make_job: MakeJob, method: str, path: str) -> None:
    job = make_job()
    before = Job.objects.values().get()

    response = getattr(APIClient(), method)(path.format(job=job.pk), make_body(), format="json")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert Job.objects.values().get() == before
    assert JobRun.objects.count() == 0


def test_bad_token_gets_401(make_job: MakeJob) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    assert client.get("/jobs").status_code == 401


def test_user_without_permissions_gets_403(user_with_perms: Callable[..., APIClient], make_job: MakeJob) -> None:
    client = user_with_perms()
    job = make_job()

    assert client.get("/jobs").status_code == 403
    assert client.get(f"/jobs/{job.pk}").status_code == 403
    assert client.post("/jobs", make_body(), format="json").status_code == 403
    assert client.post(f"/jobs/{job.pk}/run").status_code == 403
    assert counts() == (1, 0)


def test_view_permission_reads_but_cannot_write(user_with_perms: Callable[..., APIClient], make_job: MakeJob) -> None:
    client = user_with_perms("view_job")
    job = make_job(name="visible")

    assert client.get("/jobs").json()["results"][0]["name"] == "visible"
    assert client.get(f"/jobs/{job.pk}").status_code == 200
    assert client.post("/jobs", make_body(), format="json").status_code == 403
    assert client.patch(f"/jobs/{job.pk}", {"name": "x"}, format="json").status_code == 403
    assert client.delete(f"/jobs/{job.pk}").status_code == 403
    for action in ["run", "pause", "resume"]:
        assert client.post(f"/jobs/{job.pk}/{action}").status_code == 403, action
    # A job's runs are runs: reading them needs the run view permission, as /runs does.
    assert client.get(f"/jobs/{job.pk}/runs").status_code == 403
    job.refresh_from_db()
    assert (job.name, job.enabled) == ("visible", True)
    assert counts() == (1, 0)


def test_change_permission_allows_run_pause_and_resume(
    user_with_perms: Callable[..., APIClient], make_job: MakeJob
) -> None:
    cache.clear()
    client = user_with_perms("view_job", "change_job")
    job = make_job()

    assert client.post(f"/jobs/{job.pk}/pause").json()["enabled"] is False
    assert client.post(f"/jobs/{job.pk}/resume").json()["enabled"] is True
    assert client.post(f"/jobs/{job.pk}/run").status_code == 202
    assert client.post("/jobs", make_body(), format="json").status_code == 403
    assert client.delete(f"/jobs/{job.pk}").status_code == 403
    assert counts() == (1, 1)


def test_add_and_delete_permissions(user_with_perms: Callable[..., APIClient]) -> None:
    client = user_with_perms("add_job", "delete_job")

    created = client.post("/jobs", make_body(), format="json")
    assert created.status_code == 201
    assert client.delete(f"/jobs/{created.json()['id']}").status_code == 204
    assert counts() == (0, 0)


def test_session_login_and_browsable_api(admin_user: User, make_job: MakeJob, plain_static_files: None) -> None:
    make_job(name="Seen in the browser")
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="admin", password="admin-password-123")

    page = client.get("/jobs", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/html")
    assert b"Seen in the browser" in page.content

    # Session writes need the CSRF token, as in the browsable API's forms.
    refused = client.post("/jobs", make_body(name="no token"), format="json")
    assert refused.status_code == 403
    token = client.cookies["csrftoken"].value
    created = client.post("/jobs", make_body(name="with token"), format="json", HTTP_X_CSRFTOKEN=token)
    assert created.status_code == 201
    assert sorted(Job.objects.values_list("name", flat=True)) == ["Seen in the browser", "with token"]


@pytest.fixture
def plain_static_files(settings: Any) -> None:
    # The browsable API links its CSS with {% static %}; the manifest storage used when DEBUG is
    # false needs `collectstatic` first, which test_misc.py covers for the docs.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


# --- Run now ---------------------------------------------------------------------------------


def test_run_now_queues_a_manual_run(api: APIClient, make_job: MakeJob) -> None:
    cache.clear()
    job = make_job(name="Daily reminder")
    before = datetime.now(UTC)

    response = api.post(f"/jobs/{job.pk}/run")

    assert response.status_code == 202
    body = response.json()
    run = JobRun.objects.get()
    assert body["id"] == run.pk
    assert (body["job"], body["job_name"], body["trigger"], body["status"], body["attempt"]) == (
        job.pk,
        "Daily reminder",
        "manual",
        "queued",
        1,
    )
    scheduled_for = parse_time(body["scheduled_for"])
    assert scheduled_for is not None and before <= scheduled_for <= datetime.now(UTC)
    assert body["not_before"] == body["scheduled_for"]
    assert (run.trigger, run.status) == (JobRun.Trigger.MANUAL, JobRun.Status.QUEUED)
    # Running now does not move the schedule.
    job.refresh_from_db()
    assert job.next_run_at == datetime(2026, 6, 2, 9, tzinfo=UTC)


def test_run_now_of_a_paused_job_still_queues(api: APIClient, make_job: MakeJob) -> None:
    cache.clear()
    job = make_job(enabled=False)

    assert api.post(f"/jobs/{job.pk}/run").status_code == 202
    assert JobRun.objects.filter(job=job, trigger="manual").count() == 1


def test_run_now_is_throttled(api: APIClient, make_job: MakeJob) -> None:
    cache.clear()
    job = make_job()
    rest = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"run_now": "2/minute"}}

    with override_settings(REST_FRAMEWORK=rest):
        statuses = [api.post(f"/jobs/{job.pk}/run").status_code for _ in range(3)]
        throttled = api.post(f"/jobs/{job.pk}/run")
        # Only run-now is throttled; reading and editing are not.
        assert api.get(f"/jobs/{job.pk}").status_code == 200
        assert api.post(f"/jobs/{job.pk}/pause").status_code == 200

    assert statuses == [202, 202, 429]
    assert throttled.status_code == 429
    assert int(throttled["Retry-After"]) > 0
    assert JobRun.objects.count() == 2
    cache.clear()


# --- Lists -----------------------------------------------------------------------------------


def test_pagination(api: APIClient, make_job: MakeJob) -> None:
    for number in range(7):
        make_job(name=f"job {number}")

    first = api.get("/jobs", {"page_size": 3}).json()
    assert first["count"] == 7
    assert [job["name"] for job in first["results"]] == ["job 0", "job 1", "job 2"]
    assert first["previous"] is None
    assert "page=2" in first["next"]
    assert "page_size=3" in first["next"]

    last = api.get("/jobs", {"page_size": 3, "page": 3}).json()
    assert [job["name"] for job in last["results"]] == ["job 6"]
    assert last["next"] is None

    assert len(api.get("/jobs").json()["results"]) == 7
    assert api.get("/jobs", {"page": 4, "page_size": 3}).status_code == 404
    assert len(api.get("/jobs", {"page_size": 10_000}).json()["results"]) == 7


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"job_type": "data_processing"}, ["sync"]),
        ({"enabled": "false"}, ["paused"]),
        ({"enabled": "true"}, ["report", "sync"]),
        ({"enabled": "0"}, ["paused"]),
        ({"last_run_status": "failed"}, ["sync"]),
        ({"next_run_after": "2026-06-02T00:00:00Z"}, ["sync"]),
        ({"next_run_before": "2026-06-02T00:00:00Z"}, ["report"]),
        ({"next_run_after": "2026-06-01T00:00:00Z", "next_run_before": "2026-06-03T00:00:00Z"}, ["report", "sync"]),
        ({"search": "monday"}, ["report"]),
        ({"search": "SYNC"}, ["sync"]),
        ({"ordering": "-next_run_at"}, ["sync", "report", "paused"]),
        ({"ordering": "next_run_at"}, ["report", "sync", "paused"]),
        ({"ordering": "-name"}, ["sync", "report", "paused"]),
        ({"ordering": "not_a_field"}, ["report", "sync", "paused"]),
    ],
)
def test_job_filters_search_and_ordering(
    api: APIClient, make_job: MakeJob, query: dict[str, str], expected: list[str]
) -> None:
    make_job(name="report", description="Every Monday", next_run_at=datetime(2026, 6, 1, 9, tzinfo=UTC))
    make_job(
        name="sync",
        job_type="data_processing",
        last_run_status="failed",
        next_run_at=datetime(2026, 6, 2, 9, tzinfo=UTC),
    )
    make_job(name="paused", enabled=False)

    response = api.get("/jobs", query)

    assert response.status_code == 200
    assert [job["name"] for job in response.json()["results"]] == expected


@pytest.mark.parametrize(
    "query",
    [
        {"next_run_after": "garbage"},
        {"enabled": "perhaps"},
        {"last_run_status": "exploded"},
        {"search": "\x00"},
    ],
)
def test_bad_filters_are_400_naming_the_parameter(api: APIClient, query: dict[str, str]) -> None:
    response = api.get("/jobs", query)

    assert response.status_code == 400
    assert set(response.json()) == set(query)
