"""Every error under the API answers JSON in DRF's shape; the admin and the docs keep their HTML pages."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import DisallowedHost, PermissionDenied, RequestDataTooBig, TooManyFieldsSent
from django.test import Client, RequestFactory
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart
from rest_framework.test import APIClient

from jobs.models import Job, JobRun
from scheduler_project import urls

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"


def form_body(fields: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(fields)


def seed_fields(**overrides: str) -> dict[str, str]:
    """The seed's email job as form fields; parameters travel as JSON text."""
    return {
        "name": "Daily reminder",
        "cron_expression": "0 9 * * *",
        "job_type": "email_notification",
        "parameters": json.dumps({"recipient": "admin@company.com", "subject": "Daily report ready"}),
        **overrides,
    }


def assert_json_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json", response["Content-Type"]
    body = response.json()
    assert isinstance(body, dict) and body
    assert b"Traceback" not in response.content
    return body


def client_errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records at ERROR or above, or carrying a traceback: a client's mistake deserves neither."""
    return [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


# --- Unknown URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/jobs/abc", "/jobs/abc/", "/runs/x/y", "/nope", "/jobs/1/nope", "/cron", "/metrics/x", "/job-types/1"],
)
def test_unknown_urls_under_the_api_are_json_404(api: APIClient, path: str) -> None:
    assert assert_json_error(api.get(path), 404) == {"detail": "Not found."}
    assert assert_json_error(APIClient().post(path, {}, format="json"), 404) == {"detail": "Not found."}


@pytest.mark.parametrize("path", ["/docs/nope", "/redoc/nope", "/api-auth/nope", "/static/nope.css"])
def test_unknown_urls_outside_the_api_keep_django_pages(path: str) -> None:
    response = Client().get(path)

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_unknown_admin_urls_keep_the_admin_page(admin_user: User) -> None:
    client = Client()
    client.force_login(admin_user)

    response = client.get("/admin/jobs/nope/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


# --- Errors raised before or outside DRF -----------------------------------------------------


def test_too_many_form_fields_is_json_400_without_a_traceback(api: APIClient, caplog: pytest.LogCaptureFixture) -> None:
    fields = seed_fields(**{f"extra{index}": "x" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS)})

    response = api.post("/jobs", form_body(fields), content_type=FORM)

    assert "fields" in assert_json_error(response, 400)["detail"]
    assert Job.objects.count() == 0
    assert client_errors_logged(caplog) == []


def test_too_many_query_parameters_is_json_400_without_a_traceback(
    api: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    query = "&".join(f"search={index}" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    response = api.get(f"/jobs?{query}")

    assert "fields" in assert_json_error(response, 400)["detail"]
    assert client_errors_logged(caplog) == []


def test_wrong_method_is_json_405(api: APIClient) -> None:
    assert assert_json_error(api.put("/jobs", {}, format="json"), 405) == {"detail": 'Method "PUT" not allowed.'}
    assert assert_json_error(api.delete("/job-types"), 405) == {"detail": 'Method "DELETE" not allowed.'}


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/csv", 415),
        ("application/xml", 415),
        ("multipart/form-data", 400),
        ("multipart/form-data; boundary=", 400),
    ],
)
def test_unusable_content_types_are_json_errors(api: APIClient, content_type: str, status: int) -> None:
    assert_json_error(api.post("/jobs", b"name=x", content_type=content_type), status)
    assert Job.objects.count() == 0


def test_bad_host_header_is_json_400_under_the_api() -> None:
    body = assert_json_error(Client().get("/jobs", HTTP_HOST="evil.example"), 400)

    assert body == {"detail": "Invalid Host header."}
    assert b"evil.example" not in Client().get("/jobs", HTTP_HOST="evil.example").content


def test_bad_host_header_keeps_the_html_page_in_the_admin() -> None:
    response = Client().get("/admin/login/", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


def test_server_errors_are_json_without_a_traceback(monkeypatch: pytest.MonkeyPatch, api: APIClient) -> None:
    from jobs.api.views import JobTypesView

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(JobTypesView, "get", broken)
    api.raise_request_exception = False

    response = api.get("/job-types")

    assert assert_json_error(response, 500) == {"detail": "A server error occurred."}
    assert b"secret internals" not in response.content


@pytest.mark.parametrize(
    ("handler", "exception", "status", "detail"),
    [
        ("handler400", TooManyFieldsSent("too many"), 400, "Too many fields"),
        ("handler400", RequestDataTooBig("big"), 413, "Request body is larger than"),
        ("handler400", DisallowedHost("bad host"), 400, "Invalid Host header."),
        ("handler403", PermissionDenied(), 403, "You do not have permission to perform this action."),
        ("handler404", None, 404, "Not found."),
        ("handler500", None, 500, "A server error occurred."),
    ],
)
def test_django_error_handlers_answer_json_under_the_api_and_html_elsewhere(
    handler: str, exception: Exception | None, status: int, detail: str
) -> None:
    view: Callable[..., Any] = _resolve(getattr(urls, handler))
    args = () if handler == "handler500" else (exception,)

    api_response = view(RequestFactory().get("/jobs/1"), *args)
    admin_response = view(RequestFactory().get("/admin/jobs/job/"), *args)

    assert api_response.status_code == status
    assert api_response["Content-Type"] == "application/json"
    assert json.loads(api_response.content)["detail"].startswith(detail)
    assert admin_response["Content-Type"].startswith("text/html")


def _resolve(handler: Any) -> Callable[..., Any]:
    from django.utils.module_loading import import_string

    return import_string(handler) if isinstance(handler, str) else handler


# --- Form and multipart bodies: bounded like JSON, no files ----------------------------------


def test_form_and_multipart_bodies_create_a_job(api: APIClient) -> None:
    assert api.post("/jobs", form_body(seed_fields()), content_type=FORM).status_code == 201
    multipart = api.post("/jobs", seed_fields(name="From a form"))  # the test client's default is multipart

    assert multipart.status_code == 201, multipart.content
    assert sorted(Job.objects.values_list("name", flat=True)) == ["Daily reminder", "From a form"]
    assert Job.objects.get(name="From a form").parameters == {
        "recipient": "admin@company.com",
        "subject": "Daily report ready",
    }


@pytest.mark.parametrize("encoding", ["form", "multipart"])
def test_oversize_form_and_multipart_bodies_are_413(api: APIClient, encoding: str) -> None:
    fields = seed_fields(description="x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))
    if encoding == "form":
        response = api.post("/jobs", form_body(fields), content_type=FORM)
    else:
        response = api.post("/jobs", encode_multipart(BOUNDARY, fields), content_type=MULTIPART_CONTENT)

    body = assert_json_error(response, 413)
    assert body == {"detail": f"Request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."}
    assert Job.objects.count() == 0


def test_oversize_multipart_file_is_413_like_any_body(api: APIClient, tmp_path: Any) -> None:
    # Django's own multipart limit counts only the non-file fields; the body limit counts every byte.
    upload = tmp_path / "big.bin"
    upload.write_bytes(b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))
    with upload.open("rb") as handle:
        response = api.post("/jobs", {**seed_fields(), "attachment": handle})

    assert_json_error(response, 413)
    assert Job.objects.count() == 0


def test_file_parts_are_refused_naming_the_field(api: APIClient, tmp_path: Any) -> None:
    upload = tmp_path / "note.txt"
    upload.write_text("hello")
    with upload.open("rb") as handle:
        response = api.post("/jobs", {**seed_fields(), "attachment": handle})

    body = assert_json_error(response, 400)
    assert list(body) == ["attachment"]
    assert "file" in body["attachment"][0]
    assert Job.objects.count() == 0


def test_too_many_multipart_fields_is_json_400(api: APIClient, caplog: pytest.LogCaptureFixture) -> None:
    fields = seed_fields(**{f"extra{index}": "x" for index in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS)})

    response = api.post("/jobs", encode_multipart(BOUNDARY, fields), content_type=MULTIPART_CONTENT)

    assert "fields" in assert_json_error(response, 400)["detail"]
    assert client_errors_logged(caplog) == []


@pytest.mark.parametrize(
    "body",
    [
        b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="name"\r\n\r\nunterminated',
        b"--" + BOUNDARY.encode() + b"\r\nno headers at all\r\n--" + BOUNDARY.encode() + b"--\r\n",
        b"\x00\xff" * 50,
    ],
    ids=["truncated", "no part headers", "binary garbage"],
)
def test_malformed_multipart_is_a_json_4xx_and_writes_nothing(
    api: APIClient, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    response = api.post("/jobs", body, content_type=MULTIPART_CONTENT)

    assert 400 <= response.status_code < 500
    assert_json_error(response, response.status_code)
    assert (Job.objects.count(), JobRun.objects.count()) == (0, 0)
    assert client_errors_logged(caplog) == []
