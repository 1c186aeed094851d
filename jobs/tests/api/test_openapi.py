"""The OpenAPI schema documents every answer with real examples, and the docs pages load nothing from outside."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from django.core.cache import cache
from django.utils import timezone
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from jobs.models import Job, SchedulerProcess

pytestmark = pytest.mark.django_db

SCHEMA_ACCEPT = "application/vnd.oai.openapi+json"
SEED_EMAIL_JOB = {
    "name": "Daily reminder",
    "cron_expression": "0 9 * * *",
    "job_type": "email_notification",
    "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
}
SEED_DATA_JOB = {
    "name": "Hourly data sync",
    "cron_expression": "0 * * * *",
    "job_type": "data_processing",
    "parameters": {"dataset": "user_events"},
}


@pytest.fixture
def document() -> dict[str, Any]:
    response = APIClient().get("/schema", HTTP_ACCEPT=SCHEMA_ACCEPT)
    assert response.status_code == 200
    return response.json()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in {"get", "put", "patch", "post", "delete"}:
                yield path, method, operation


# --- Docs pages ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/docs/", "/redoc", "/redoc/", "/schema", "/schema/"])
def test_docs_and_schema_answer_with_and_without_trailing_slash(path: str) -> None:
    response = APIClient().get(path)

    assert response.status_code == 200
    assert response.content


@pytest.mark.parametrize("path", ["/docs", "/redoc/"])
def test_docs_pages_name_no_other_host(path: str) -> None:
    response = APIClient().get(path)

    html = response.content.decode()
    assert re.findall(r"""https?://|["'(]//""", html) == []  # no address of any host, nor scheme-relative
    # The browser itself refuses anything from elsewhere, whatever the bundled scripts ask for.
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "http" not in policy


# --- The schema: error answers and examples --------------------------------------------------

READ = ["400", "401", "403", "406"]  # too many query fields; no login; no permission; Accept
WRITE = [*READ, "413", "415"]  # plus a body too large, or of a type no parser takes
ANSWERS = {
    "GET /jobs": ["200", *READ, "404"],  # 404: a page past the last
    "POST /jobs": ["201", *WRITE],
    "GET /jobs/{id}": ["200", *READ, "404"],
    "PUT /jobs/{id}": ["200", *WRITE, "404"],
    "PATCH /jobs/{id}": ["200", *WRITE, "404"],
    "DELETE /jobs/{id}": ["204", *READ, "404"],
    "POST /jobs/{id}/run": ["202", *WRITE, "404", "429"],
    "POST /jobs/{id}/pause": ["200", *WRITE, "404"],
    "POST /jobs/{id}/resume": ["200", *WRITE, "404"],
    "GET /jobs/{id}/runs": ["200", *READ, "404"],
    "GET /runs": ["200", *READ, "404"],
    "GET /runs/{id}": ["200", *READ, "404"],
    "GET /job-types": ["200", *READ],
    "GET /cron/preview": ["200", *READ],
    "GET /health": ["200", "400", "406", "503"],  # no login
    "GET /metrics": ["200", "400", "401", "403", "404"],  # any Accept; 404: an unknown ?format=
}


def test_every_operation_documents_every_status_it_answers(document: dict[str, Any]) -> None:
    documented = {f"{method.upper()} {path}": sorted(op["responses"]) for path, method, op in operations(document)}

    assert documented == {operation: sorted(statuses) for operation, statuses in ANSWERS.items()}


def test_error_answers_share_the_error_shapes(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["properties"]["detail"]["type"] == "string"
    assert schemas["Error"]["required"] == ["detail"]
    assert schemas["ValidationError"]["type"] == "object"

    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith("4"):
                continue
            content = response["content"]["application/json"]
            expected = "ValidationError" if status == "400" else "Error"
            assert content["schema"] == {"$ref": f"#/components/schemas/{expected}"}, (method, path, status)
            assert content["examples"], (method, path, status)
            assert response["description"], (method, path, status)


def _error_example(document: dict[str, Any], operation: str, status: str) -> Any:
    method, path = operation.split(" ")
    content = document["paths"][path][method.lower()]["responses"][status]["content"]["application/json"]
    return content["examples"][f"Error{status}"]["value"]


@pytest.mark.parametrize(
    ("operation", "status", "request_"),
    [
        ("GET /jobs/{id}", "401", {"client": "anonymous", "path": "/jobs/1"}),
        ("GET /jobs/{id}", "403", {"client": "no permissions", "path": "/jobs/1"}),
        ("GET /jobs/{id}", "404", {"path": "/jobs/424242"}),
        ("GET /runs/{id}", "404", {"path": "/runs/424242"}),
        ("GET /runs", "404", {"path": "/runs?cursor=bm90IG91cnM="}),
        ("GET /jobs", "406", {"path": "/jobs", "HTTP_ACCEPT": "image/png"}),
        ("GET /job-types", "400", {"path": "/job-types?" + "&".join(["x=1"] * 1001)}),
        ("POST /jobs", "400", {"method": "post", "path": "/jobs", "body": {"cron_expression": "60 9 * * *"}}),
        ("POST /jobs", "413", {"method": "post", "path": "/jobs", "body": {"description": "x" * 2_700_000}}),
        ("POST /jobs", "415", {"method": "post", "path": "/jobs", "raw": "a,b", "content_type": "text/csv"}),
    ],
)
def test_error_examples_are_what_the_api_answers(
    api: APIClient, user_with_perms: Any, document: dict[str, Any], operation: str, status: str, request_: Any
) -> None:
    client = {"anonymous": APIClient(), "no permissions": user_with_perms()}.get(request_.pop("client", ""), api)
    method, path = request_.pop("method", "get"), request_.pop("path")
    if "body" in request_:
        response = client.post(path, {**SEED_EMAIL_JOB, **request_.pop("body")}, format="json")
    elif "raw" in request_:
        response = client.post(path, request_.pop("raw"), content_type=request_.pop("content_type"))
    else:
        response = getattr(client, method)(path, **request_)

    assert response.status_code == int(status)
    assert response.json() == _error_example(document, operation, status)


def test_health_is_public_and_metrics_are_text(document: dict[str, Any]) -> None:
    health = document["paths"]["/health"]["get"]["responses"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]

    assert {"401", "403"}.isdisjoint(health)
    assert "503" in health
    assert set(metrics["200"]["content"]) == {
        "text/plain; version=0.0.4",
        "application/openmetrics-text; version=1.0.0",
    }
    assert "406" not in metrics  # /metrics answers whatever a scraper accepts


def _examples(content: dict[str, Any]) -> dict[str, Any]:
    return {example.get("summary", name): example["value"] for name, example in content["examples"].items()}


def test_job_creation_is_documented_with_the_seeds_bodies(api: APIClient, document: dict[str, Any]) -> None:
    create = document["paths"]["/jobs"]["post"]
    requests = _examples(create["requestBody"]["content"]["application/json"])
    assert requests["Daily reminder (the seed's email job)"] == SEED_EMAIL_JOB
    data_job = requests["Weekly backup (a data_processing job)"]
    assert data_job["job_type"] == "data_processing"

    # Each request example is accepted as written, and answers what the 201 example shows.
    created = _examples(create["responses"]["201"]["content"]["application/json"])
    for body in requests.values():
        response = api.post("/jobs", body, format="json")
        assert response.status_code == 201, response.content
        assert set(response.json()) == set(created["Daily reminder"])
    assert Job.objects.count() == len(requests)
    assert {key: created["Daily reminder"][key] for key in SEED_EMAIL_JOB} == SEED_EMAIL_JOB

    # The seed's data job names a dataset nobody registered: the 400 example is the real answer.
    refused = _examples(create["responses"]["400"]["content"]["application/json"])
    response = api.post("/jobs", SEED_DATA_JOB, format="json")
    assert response.status_code == 400
    assert refused["The seed's data job: no such dataset"] == response.json()


def test_no_request_example_is_a_placeholder(document: dict[str, Any]) -> None:
    create = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]

    assert "string" not in str(_examples(create))


# --- Schemathesis ----------------------------------------------------------------------------


@pytest.fixture
def wsgi_app(transactional_db: None) -> Any:
    """The project's WSGI application, committing as in production.

    All operations run in one test, so inside a test transaction one database error (a bug
    schemathesis should report) would abort every later request on PostgreSQL.
    """
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


@pytest.fixture
def token(admin_user: Any) -> str:
    cache.clear()  # run-now throttling counts in the cache
    # A live scheduler, so that /health answers 200 and any 5xx is a bug.
    now = timezone.now()
    SchedulerProcess.objects.create(hostname="schemathesis", pid=1, started_at=now, last_heartbeat_at=now)
    return Token.objects.create(user=admin_user).key


@pytest.fixture
def api_schema(wsgi_app: Any) -> Any:
    return schemathesis.openapi.from_wsgi("/schema", wsgi_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_is_documented_and_none_is_a_server_error(case: Any, token: str) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Token {token}"}, checks=[not_a_server_error, status_code_conformance]
    )


# --- The docs in a real browser --------------------------------------------------------------


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium page, as the admin's browser test drives it."""
    from django.db import connections

    from jobs.tests.test_admin_browser import CHROMIUM, CHROMIUM_ARGS, _unavailable

    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (pip install -r requirements-dev.txt)")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # see test_admin_browser.py
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()
            connections.close_all()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "rendered"), [("/redoc", "Run the job now"), ("/docs/", "Job Scheduler API")])
def test_docs_load_nothing_from_another_host(browser_page: Any, live_server: Any, path: str, rendered: str) -> None:
    local = urlsplit(live_server.url).netloc
    requested: list[Any] = []
    answered: list[str] = []
    browser_page.on("request", lambda request: requested.append(request))
    browser_page.on("response", lambda response: answered.append(response.url))

    def elsewhere(url: str) -> bool:
        # blob: and data: URLs are made in the page itself (ReDoc's search worker, icons).
        parts = urlsplit(url)
        return parts.scheme in {"http", "https"} and parts.netloc != local

    browser_page.goto(f"{live_server.url}{path}")
    browser_page.get_by_role("heading", name=rendered).first.wait_for()
    browser_page.wait_for_load_state("networkidle")

    # Only this server was asked for anything: not even an attempt the page's policy would block
    # (ReDoc's bundle names a logo on cdn.redoc.ly; the copy served here does not).
    assert [url for url in answered if elsewhere(url)] == []
    assert [(r.url, r.failure) for r in requested if elsewhere(r.url)] == []
    assert any(urlsplit(url).path.startswith(("/static/", "/redoc/")) for url in answered)


def test_the_served_redoc_bundle_names_no_outside_address(client: Any) -> None:
    import re

    body = client.get("/redoc/redoc.standalone.js").content
    assert b"cdn.redoc.ly" not in body and len(body) > 500_000
    page = client.get("/redoc").content.decode()
    assert '<script src="/redoc/redoc.standalone.js">' in page
    assert not re.search(r'(src|href)="https?://', page)
