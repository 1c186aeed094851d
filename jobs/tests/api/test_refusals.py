"""What the API refuses, and what it shows to whom: inputs that would make unbounded work, names
that are not what they look like, secrets, and the browsable form's defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from jobs import services
from jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "zone_name", ["localtime", "Factory", "posixrules", "posix/Europe/Berlin", "Europe/Berlin\u200b", "\u202eUTC"]
)
def test_time_zones_that_are_host_files_or_disguised_are_refused(
    api: APIClient, job_data: Callable[..., dict[str, Any]], zone_name: str
) -> None:
    response = api.post("/jobs", job_data(timezone=zone_name), format="json")
    assert response.status_code == 400, response.content
    assert "is not an IANA time zone" in response.json()["timezone"][0]
    preview = api.get("/cron/preview", {"expression": "0 9 * * *", "timezone": zone_name})
    assert preview.status_code == 400 and "timezone" in preview.json()
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (" ".join(f"w{i}" for i in range(1000)), "at most 200 characters"),
        (" ".join(f"w{i}" for i in range(11)), "at most 10 words"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_search_is_bounded(api: APIClient, query: str, message: str) -> None:
    response = api.get("/jobs", {"search": query})
    assert response.status_code == 400, response.content
    assert response.json() == {"search": [message]}


def test_search_within_the_bounds_works(api: APIClient, job_data: Callable[..., dict[str, Any]]) -> None:
    api.post("/jobs", job_data(name="nightly backup of things"), format="json")
    words = "nightly backup of things " + " ".join(["things"] * 6)
    response = api.get("/jobs", {"search": words})
    assert response.status_code == 200 and response.json()["count"] == 1


@pytest.mark.parametrize("fmt", ["json", "multipart"])
def test_a_description_is_bounded(api: APIClient, job_data: Callable[..., dict[str, Any]], fmt: str) -> None:
    body = job_data(description="x" * 10_001)
    if fmt == "multipart":
        body["parameters"] = '{"recipient": "admin@company.com", "subject": "s"}'
    response = api.post("/jobs", body, format=fmt)
    assert response.status_code == 400, response.content
    assert "10000" in response.json()["description"][0]
    assert not Job.objects.exists()
    assert api.post("/jobs", job_data(description="x" * 10_000), format="json").status_code == 201


def test_the_browsable_form_starts_enabled_with_the_types_and_the_default_zone(api: APIClient) -> None:
    page = api.get("/jobs", HTTP_ACCEPT="text/html").content.decode()
    form = page[page.index('<form action="/jobs"') :]
    assert 'name="enabled"' in form and "checked" in form[form.index('name="enabled"') - 200 :][:400]
    for job_type in ("email_notification", "data_processing", "http_request"):
        assert f'<option value="{job_type}"' in form
    assert 'name="timezone"' in form and 'value="UTC"' in form[form.index('name="timezone"') - 300 :][:600]


def test_secrets_are_masked_for_those_who_may_view_but_not_change(
    api: APIClient, user_with_perms: Callable[..., APIClient]
) -> None:
    parameters = {
        "url": "https://hooks.example.com/x",
        "headers": {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y", "X-Trace": "visible"},
        "json": {"password": "hunter2", "note": "plain"},
    }
    job = services.job_create(name="hook", cron_expression="0 9 * * *", job_type="http_request", parameters=parameters)
    viewer = user_with_perms("view_job", username="viewer")
    shown = viewer.get(f"/jobs/{job.pk}").json()["parameters"]
    assert shown["headers"] == {"Authorization": "********", "X-Api-Key": "********", "X-Trace": "visible"}
    assert shown["json"] == {"password": "********", "note": "plain"}
    assert "s3cret" not in viewer.get("/jobs").content.decode()
    # Whoever may change the job sees (and can keep) what is stored.
    editor = user_with_perms("view_job", "change_job", username="editor")
    assert editor.get(f"/jobs/{job.pk}").json()["parameters"] == parameters
    assert api.get(f"/jobs/{job.pk}").json()["parameters"] == parameters


EXPORT_USERS = {"dataset": "model_export", "model": "auth.User", "fields": ["id", "username"]}
BACKUP = {"dataset": "database_backup"}


def _job(parameters: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "name": "data job",
        "cron_expression": "0 2 * * *",
        "job_type": "data_processing",
        "parameters": parameters,
        **fields,
    }


def test_exporting_a_model_needs_view_permission_on_it(user_with_perms: Callable[..., APIClient]) -> None:
    creator = user_with_perms("add_job", "view_job", username="creator")
    response = creator.post("/jobs", _job(EXPORT_USERS), format="json")
    assert response.status_code == 400, response.content
    assert "auth.view_user" in str(response.json()["parameters"])
    assert not Job.objects.exists()
    # The scheduler's own tables are no exception.
    allowed = creator.post("/jobs", _job({"dataset": "model_export", "model": "jobs.JobRun"}), format="json")
    assert allowed.status_code == 400 and "jobs.view_jobrun" in str(allowed.json()["parameters"])
    reader = user_with_perms("add_job", "view_job", "view_jobrun", username="reader")
    response = reader.post("/jobs", _job({"dataset": "model_export", "model": "jobs.JobRun"}), format="json")
    assert response.status_code == 201, response.content


def test_a_backup_job_needs_its_own_permission(user_with_perms: Callable[..., APIClient]) -> None:
    creator = user_with_perms("add_job", "view_job", username="creator")
    response = creator.post("/jobs", _job(BACKUP), format="json")
    assert response.status_code == 400, response.content
    assert "schedule_database_backup" in str(response.json()["parameters"])
    operator = user_with_perms("add_job", "view_job", "schedule_database_backup", username="operator")
    assert operator.post("/jobs", _job(BACKUP), format="json").status_code == 201


def test_changing_a_job_into_a_backup_is_checked_too(user_with_perms: Callable[..., APIClient]) -> None:
    job = services.job_create(**_job({"dataset": "model_export", "model": "jobs.Job"}))
    editor = user_with_perms("change_job", "view_job", username="editor")
    response = editor.patch(f"/jobs/{job.pk}", {"parameters": BACKUP}, format="json")
    assert response.status_code == 400, response.content
    put = editor.put(f"/jobs/{job.pk}", _job(BACKUP), format="json")
    assert put.status_code == 400
    job.refresh_from_db()
    assert job.parameters == {"dataset": "model_export", "model": "jobs.Job"}
    # A change that keeps what the user may schedule passes.
    assert editor.patch(f"/jobs/{job.pk}", {"name": "renamed"}, format="json").status_code == 200
