"""/cron/preview, /job-types, /health, the OpenAPI schema and the offline docs."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from rest_framework.test import APIClient

from jobs.models import JobRun, SchedulerProcess

pytestmark = pytest.mark.django_db

# --- /cron/preview ---------------------------------------------------------------------------


def test_preview_runs_a_repeated_local_time_once(api: APIClient) -> None:
    # 2026-10-25: Berlin falls back from 03:00 CEST to 02:00 CET, so 02:30 happens twice.
    response = api.get("/cron/preview?expression=30 2 * * *&timezone=Europe/Berlin&after=2026-10-24T12:00:00Z&count=3")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["expression"] == "30 2 * * *"
    assert body["timezone"] == "Europe/Berlin"
    assert body["description"] == "At 02:30"
    assert body["fixed_time"] is True
    assert body["fire_times"] == [
        {"utc": "2026-10-25T00:30:00Z", "local": "2026-10-25T02:30:00+02:00"},
        {"utc": "2026-10-26T01:30:00Z", "local": "2026-10-26T02:30:00+01:00"},
        {"utc": "2026-10-27T01:30:00Z", "local": "2026-10-27T02:30:00+01:00"},
    ]


def test_preview_runs_a_skipped_local_time_after_the_gap(api: APIClient) -> None:
    # 2026-03-29: Berlin springs forward from 02:00 to 03:00, so 02:30 does not exist.
    response = api.get(
        "/cron/preview",
        {"expression": "30 2 * * *", "timezone": "Europe/Berlin", "after": "2026-03-28T12:00:00Z", "count": "2"},
    )

    assert [time["local"] for time in response.json()["fire_times"]] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]


def test_preview_defaults(api: APIClient) -> None:
    before = datetime.now(UTC)

    body = api.get("/cron/preview", {"expression": "@hourly"}).json()

    assert body["timezone"] == "UTC"
    assert body["fixed_time"] is False
    times = [datetime.fromisoformat(time["utc"].replace("Z", "+00:00")) for time in body["fire_times"]]
    assert len(times) == 5
    assert before < times[0] <= before + timedelta(hours=1)
    assert all(later - earlier == timedelta(hours=1) for earlier, later in zip(times, times[1:], strict=False))


def test_preview_accepts_the_maximum_count(api: APIClient) -> None:
    body = api.get(
        "/cron/preview", {"expression": "*/5 * * * *", "count": "100", "after": "2026-01-01T00:00:00Z"}
    ).json()

    assert len(body["fire_times"]) == 100
    assert body["fire_times"][-1]["utc"] == "2026-01-01T08:20:00Z"


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"expression": "60 * * * *"}, "expression", "minute: 60 is out of range 0-59"),
        ({"expression": "* * *"}, "expression", "expected 5 fields"),
        ({"expression": "@reboot"}, "expression", "unknown macro"),
        ({}, "expression", "required"),
        ({"expression": "* * * * *", "count": 0}, "count", "greater than or equal to 1"),
        ({"expression": "* * * * *", "count": 101}, "count", "less than or equal to 100"),
        ({"expression": "* * * * *", "count": "ten"}, "count", "valid integer"),
        ({"expression": "* * * * *", "after": "tomorrow"}, "after", "Datetime has wrong format"),
        ({"expression": "* * * * *", "after": "9999-12-31T23:59:00Z"}, "after", "between the years"),
        ({"expression": "* * * * *", "timezone": "Mars/Olympus"}, "timezone", "not an IANA time zone"),
        ({"expression": "* * * * *\x00"}, "expression", "Null characters"),
    ],
)
def test_preview_refuses_bad_input_naming_the_field(
    api: APIClient, query: dict[str, Any], field: str, message: str
) -> None:
    response = api.get("/cron/preview", query)

    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert message in response.json()[field][0]


def test_preview_needs_a_login(user_with_perms: Any) -> None:
    assert APIClient().get("/cron/preview", {"expression": "@daily"}).status_code == 401
    assert user_with_perms().get("/cron/preview", {"expression": "@daily"}).status_code == 403
    assert (
        user_with_perms("view_job", username="viewer").get("/cron/preview", {"expression": "@daily"}).status_code == 200
    )


# --- /job-types ------------------------------------------------------------------------------


def test_job_types_list_the_builtin_types_with_json_schemas(api: APIClient) -> None:
    response = api.get("/job-types")

    assert response.status_code == 200
    types = {item["name"]: item for item in response.json()}
    assert {"email_notification", "data_processing"} <= set(types)
    for item in types.values():
        assert set(item) == {"name", "label", "description", "safe_to_repeat", "parameters_schema"}
        jsonschema.Draft202012Validator.check_schema(item["parameters_schema"])
    assert types["email_notification"]["safe_to_repeat"] is False
    assert types["data_processing"]["safe_to_repeat"] is True

    email = jsonschema.Draft202012Validator(types["email_notification"]["parameters_schema"])
    assert email.is_valid({"recipient": "admin@company.com", "subject": "Daily report ready"})
    assert email.is_valid({"recipient": ["a@example.com", "b@example.com"], "subject": "s", "cc": ["c@example.com"]})
    assert not email.is_valid({"subject": "no recipient"})
    assert not email.is_valid({"recipient": "a@example.com", "subject": "s", "colour": "red"})


def test_job_types_need_a_login(user_with_perms: Any) -> None:
    assert APIClient().get("/job-types").status_code == 401
    assert user_with_perms().get("/job-types").status_code == 403


# --- /health ---------------------------------------------------------------------------------


def heartbeat(age: timedelta, **fields: Any) -> SchedulerProcess:
    now = datetime.now(UTC)
    return SchedulerProcess.objects.create(
        hostname="sched-1", pid=99, started_at=now - timedelta(hours=1), last_heartbeat_at=now - age, **fields
    )


def test_health_is_503_without_a_scheduler() -> None:
    response = APIClient().get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["database"]["ok"] is True
    assert body["schedulers"] == []
    assert "heartbeat" in body["reason"]


def test_health_is_200_with_a_fresh_heartbeat() -> None:
    heartbeat(timedelta(seconds=2))
    when = datetime.now(UTC) - timedelta(minutes=1)
    JobRun.objects.create(job=_job(), scheduled_for=when, not_before=when)

    response = APIClient().get("/health/")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert [(item["hostname"], item["pid"]) for item in body["schedulers"]] == [("sched-1", 99)]
    assert 1 < body["schedulers"][0]["heartbeat_age_seconds"] < 60
    assert body["queue_depth"] == 1


@pytest.mark.parametrize(
    "process",
    [
        {"age": timedelta(minutes=10)},
        {"age": timedelta(seconds=1), "stopped_at": datetime(2026, 1, 1, tzinfo=UTC)},
    ],
    ids=["stale heartbeat", "stopped"],
)
def test_health_ignores_stale_and_stopped_schedulers(process: dict[str, Any]) -> None:
    heartbeat(**process)

    assert APIClient().get("/health").status_code == 503


def test_health_can_ignore_schedulers() -> None:
    response = APIClient().get("/health", {"scheduler": "false"})

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_health_needs_no_credentials_and_ignores_bad_ones() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token wrong")

    assert client.get("/health", {"scheduler": "false"}).status_code == 200


def _job() -> Any:
    from jobs.models import Job

    return Job.objects.create(name="j", cron_expression="@daily", timezone="UTC", job_type="email_notification")


# --- OpenAPI schema and docs -----------------------------------------------------------------


def test_schema_is_a_valid_openapi_3_document() -> None:
    import openapi_spec_validator as validator

    response = APIClient().get("/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    document = response.json()
    validator.validate(document)
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    # Documented once each, as the seed writes them.
    for path in [
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/run",
        "/jobs/{id}/pause",
        "/jobs/{id}/resume",
        "/jobs/{id}/runs",
        "/runs",
        "/runs/{id}",
        "/job-types",
        "/cron/preview",
        "/health",
        "/metrics",
    ]:
        assert path in paths, path
    assert not [path for path in paths if path.endswith("/")]
    assert set(paths["/jobs"]) == {"get", "post"}
    assert "202" in paths["/jobs/{id}/run"]["post"]["responses"]
    run_filters = {parameter["name"] for parameter in paths["/jobs/{id}/runs"]["get"]["parameters"]}
    assert {"status", "trigger", "scheduled_after", "scheduled_before", "cursor", "ordering"} <= run_filters
    job_filters = {parameter["name"] for parameter in paths["/jobs"]["get"]["parameters"]}
    assert {"job_type", "enabled", "last_run_status", "next_run_after", "next_run_before", "search"} <= job_filters
    assert "tokenAuth" in document["components"]["securitySchemes"]


# What the app uses outside tests (jobs/tests/settings.py swaps in plain storage).
PRODUCTION_STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}


@pytest.fixture(scope="module")
def collected_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run collectstatic once, as `make run` and a deployment do, into a temporary STATIC_ROOT."""
    root = tmp_path_factory.mktemp("static")
    with override_settings(STATIC_ROOT=root, STORAGES=PRODUCTION_STORAGES):
        call_command("collectstatic", "--noinput", verbosity=0)
    return root


@pytest.mark.parametrize(("page", "marker"), [("/docs", b"swagger-ui"), ("/redoc", b"redoc")])
def test_docs_work_offline_from_local_static_files(
    collected_static: Path, settings: Any, page: str, marker: bytes
) -> None:
    settings.STATIC_ROOT = collected_static
    settings.STORAGES = PRODUCTION_STORAGES
    client = Client()  # created after the settings change, so whitenoise serves this STATIC_ROOT

    response = client.get(page)

    assert response.status_code == 200
    html = response.content
    assert marker in html.lower()
    assert not re.findall(rb"""(?:src|href)\s*=\s*["'](?:https?:)?//""", html), "docs must not load from a CDN"
    assert b"fonts.googleapis.com" not in html
    if page == "/docs":
        assert re.search(rb'"validatorUrl":\s*null', html), "Swagger UI must not call validator.swagger.io"
    # Bundled files; ReDoc's script is served by the app itself, without its outside logo.
    assets = re.findall(rb"""["'](/static/[^"']+|/redoc/redoc\.standalone\.js)["']""", html)
    assert assets
    assert b"/schema" in html
    for asset in {path.decode() for path in assets}:
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert served.getvalue()  # the body, streamed or not


def test_docs_need_no_login(collected_static: Path, settings: Any) -> None:
    settings.STATIC_ROOT = collected_static
    assert Client().get("/schema").status_code == 200
    assert Client().get("/").status_code == 302
