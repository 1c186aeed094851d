"""The list pages: what each costs in queries, which index serves it, and how they page.

GET /runs and /jobs/{id}/runs page by keyset cursor with no count; GET /jobs keeps page numbers
and a count that is exact up to a limit and estimated above it (see docs/api.md).
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from django.db import connection
from pytest_django import DjangoAssertNumQueries
from rest_framework.test import APIClient

from jobs.api.pagination import EXACT_COUNT_LIMIT, BoundedCountPaginator
from jobs.models import Job, JobRun, SchedulerProcess
from jobs.tests.plans import explain, statements

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)
STATUSES = ["succeeded"] * 17 + ["failed", "skipped", "queued"]


def add_jobs(count: int, *, runs_per_job: int, first: int = 0) -> list[Job]:
    """Create `count` jobs, every seventh disabled, each with runs an hour apart.

    The runs of all jobs share their fire times, as jobs on one schedule do: a page of the history
    ends among runs with the same `scheduled_for`.
    """
    worker = SchedulerProcess.objects.create(hostname="w", pid=first + 1, started_at=T0, last_heartbeat_at=T0)
    jobs = Job.objects.bulk_create(
        Job(
            name=f"job {first + n:04d}",
            cron_expression=["0 9 * * *", "*/15 * * * *", "0 0 1 * *"][n % 3],
            timezone="UTC",
            job_type="data_processing" if n % 2 else "email_notification",
            parameters={"recipient": "a@example.com", "subject": "s", "password": "hunter2"},
            enabled=n % 7 != 0,
            next_run_at=None if n % 7 == 0 else T0 + timedelta(minutes=(n * 37) % 1000),
        )
        for n in range(count)
    )
    runs = []
    for job in jobs:
        for hour in range(runs_per_job):
            status = STATUSES[(hour + job.pk) % len(STATUSES)]
            fire = T0 - timedelta(hours=hour)
            started = None if status == "queued" else fire + timedelta(seconds=2)
            runs.append(
                JobRun(
                    job=job,
                    scheduled_for=fire,
                    not_before=fire,
                    status=status,
                    started_at=started,
                    finished_at=started and started + timedelta(seconds=1),
                    worker=worker if hour % 2 else None,
                )
            )
    JobRun.objects.bulk_create(runs)
    return jobs


def page_query(recorded: list[tuple[str, Any]], table: str) -> tuple[str, Any]:
    """Return the statement that read the page's rows from `table`."""
    (query,) = [
        (sql, params)
        for sql, params in recorded
        if sql.startswith("SELECT") and f'FROM "{table}"' in sql and "LIMIT" in sql and "COUNT(" not in sql
    ]
    return query


def with_params(path: str, **params: Any) -> str:
    """Return `path` with `params` added to its query string (the test client's `data` would replace it)."""
    return f"{path}{'&' if '?' in path else '?'}{urlencode(params)}"


def results(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.content
    return response.json()["results"]


# --- Query counts --------------------------------------------------------------------------------

# Token authentication is one query; /jobs adds its bounded count, /jobs/{id}/runs its job.
LIST_PAGES = [
    ("/jobs", 3),
    ("/jobs?ordering=-next_run_at", 3),
    ("/jobs?ordering=name&job_type=email_notification&enabled=true", 3),
    ("/jobs?search=job&next_run_after=2026-06-01T00:00:00Z", 3),
    ("/runs", 2),
    ("/runs?status=failed&status=succeeded", 2),
    ("/runs?job_type=data_processing&trigger=schedule&ordering=scheduled_for", 2),
    ("/runs?ordering=-id&scheduled_after=2026-05-01T00:00:00Z&started_before=2026-07-01T00:00:00Z", 2),
    ("/runs?job={job}", 2),
    ("/jobs/{job}/runs", 3),
    ("/jobs/{job}/runs?status=succeeded&ordering=scheduled_for", 3),
]


@pytest.mark.parametrize(("path", "queries"), LIST_PAGES)
def test_a_list_page_costs_the_same_queries_at_any_page_size_and_table_size(
    api: APIClient, django_assert_num_queries: DjangoAssertNumQueries, path: str, queries: int
) -> None:
    job = add_jobs(60, runs_per_job=3)[1]
    path = path.format(job=job.pk)

    for page_size in (5, 50):
        with django_assert_num_queries(queries):
            assert 0 < len(results(api.get(with_params(path, page_size=page_size)))) <= page_size
    add_jobs(60, runs_per_job=3, first=60)
    with django_assert_num_queries(queries) as captured:
        page = api.get(with_params(path, page_size=50)).json()
    # The next page costs what the first did.
    if page["next"]:
        with django_assert_num_queries(queries):
            assert results(api.get(page["next"]))
    # The history is never counted.
    if "runs" in path:
        assert not [query for query in captured.captured_queries if "COUNT(" in query["sql"]]


def test_a_readers_job_list_checks_permissions_once_not_per_job(
    user_with_perms: Callable[..., APIClient], django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    add_jobs(60, runs_per_job=0)
    reader = user_with_perms("view_job", "view_jobrun", username="reader")

    # Loading the reader's permissions is two queries (their own and their groups'), for any size.
    for page_size in (5, 50):
        with django_assert_num_queries(5):
            jobs = results(reader.get("/jobs", {"page_size": page_size}))
        assert {job["parameters"]["password"] for job in jobs} == {"********"}


def test_list_items_are_the_detail_bodies(api: APIClient) -> None:
    job = add_jobs(3, runs_per_job=2)[1]
    run = job.runs.filter(worker__isnull=False).get()

    listed = {item["id"]: item for item in results(api.get("/runs"))}
    assert listed[run.pk] == api.get(f"/runs/{run.pk}").json()
    assert listed[run.pk]["job_name"] == "job 0001" and listed[run.pk]["worker"] == "w:1"
    assert results(api.get("/jobs", {"ordering": "name"}))[1] == api.get(f"/jobs/{job.pk}").json()


# --- Plans: each page is read from the index of its ordering -------------------------------------


def sqlite_unique_index(table: str, columns: list[str]) -> str:
    """Return the name SQLite gave the index of a unique constraint declared in CREATE TABLE."""
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA index_list({table})")
        for _, name, _, origin, _ in cursor.fetchall():
            cursor.execute(f"PRAGMA index_info({name})")
            if origin == "u" and [row[2] for row in cursor.fetchall()] == columns:
                return str(name)
    raise AssertionError(f"no unique index on {table} {columns}")


def assert_read_in_order_from(plan: tuple[list[dict[str, Any]], str], table: str, index: str) -> None:
    """Assert the rows come from `index` in the page's order: no sort of the table's rows.

    A sort of the rows that share the index's first column (PostgreSQL's Incremental Sort,
    SQLite's "RIGHT PART OF ORDER BY") is allowed: the id breaking ties among one job's runs of
    one fire time.
    """
    nodes, text = plan
    if connection.vendor == "postgresql":
        scans = [
            node
            for node in nodes
            if node["Node Type"] in {"Index Scan", "Index Only Scan"} and node.get("Relation Name") == table
        ]
        assert [scan["Index Name"] for scan in scans] == [index], text
        assert not [node for node in nodes if node["Node Type"] == "Sort"], text
    else:
        (line,) = [
            node["detail"] for node in nodes if node["detail"].split(" ")[:2] in (["SCAN", table], ["SEARCH", table])
        ]
        if index.endswith("_pkey"):  # a rowid table is its own primary key index
            assert line == f"SCAN {table}" or "USING INTEGER PRIMARY KEY" in line, text
        else:
            assert f"USING INDEX {index} " in f"{line} " or f"USING COVERING INDEX {index} " in f"{line} ", text
        assert "USE TEMP B-TREE FOR ORDER BY" not in text, text


@pytest.fixture
def planned_history(api: APIClient) -> list[Job]:
    """600 jobs with 6,000 runs, analysed: enough that PostgreSQL reads a page through an index
    rather than sorting the whole table, as it does at any larger size."""
    jobs = add_jobs(600, runs_per_job=10)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return jobs


def job_plans() -> list[tuple[str, str]]:
    return [
        ("/jobs", "jobs_job_pkey"),
        ("/jobs?ordering=-id", "jobs_job_pkey"),
        ("/jobs?ordering=name", "job_name_idx"),
        ("/jobs?ordering=-name", "job_name_idx"),
        ("/jobs?ordering=next_run_at", "job_next_run_idx"),
        # PostgreSQL's index for empty times last going backwards (migration 0006); SQLite reads the other backwards.
        (
            "/jobs?ordering=-next_run_at",
            "job_next_run_desc_idx" if connection.vendor == "postgresql" else "job_next_run_idx",
        ),
        ("/jobs?ordering=next_run_at&next_run_after=2026-06-01T12:00:00Z", "job_next_run_idx"),
        ("/jobs?page=3&page_size=20&ordering=name", "job_name_idx"),
    ]


def run_plans(job: Job) -> list[tuple[str, str]]:
    per_job = "jobrun_one_per_fire"
    if connection.vendor == "sqlite":
        per_job = sqlite_unique_index("jobs_jobrun", ["job_id", "scheduled_for", "attempt"])
    return [
        ("/runs", "jobrun_history_idx"),
        ("/runs?ordering=scheduled_for", "jobrun_history_idx"),
        ("/runs?ordering=-id", "jobs_jobrun_pkey"),
        ("/runs?ordering=id", "jobs_jobrun_pkey"),
        ("/runs?scheduled_after=2026-05-31T12:00:00Z&scheduled_before=2026-06-01T06:00:00Z", "jobrun_history_idx"),
        ("/runs?job_type=data_processing&trigger=schedule", "jobrun_history_idx"),
        ("/runs?status=succeeded&status=queued", "jobrun_history_idx"),
        (f"/runs?job={job.pk}", per_job),
        (f"/jobs/{job.pk}/runs", per_job),
        (f"/jobs/{job.pk}/runs?ordering=scheduled_for&status=succeeded", per_job),
    ]


def test_each_job_ordering_is_read_from_its_index(api: APIClient, planned_history: list[Job], subtests: Any) -> None:
    for path, index in job_plans():
        with subtests.test(path=path):
            with statements() as recorded:
                assert results(api.get(path))
            assert_read_in_order_from(explain(*page_query(recorded, "jobs_job")), "jobs_job", index)


def test_each_run_list_is_read_from_an_index_in_its_order(
    api: APIClient, planned_history: list[Job], subtests: Any
) -> None:
    for path, index in run_plans(planned_history[7]):
        with subtests.test(path=path):
            first = api.get(with_params(path, page_size=4)).json()
            # The second page: the cursor's row comparison is a range of the same index.
            with statements() as recorded:
                assert results(api.get(first["next"]))
            assert_read_in_order_from(explain(*page_query(recorded, "jobs_jobrun")), "jobs_jobrun", index)


@pytest.mark.postgres
def test_the_failed_runs_are_read_from_the_index_of_failures(api: APIClient, planned_history: list[Job]) -> None:
    # One run in twenty fails: PostgreSQL prefers the partial index of failures (and orders its
    # few ties by id); SQLite cannot use a partial index with a bound status.
    with statements() as recorded:
        assert results(api.get("/runs", {"status": "failed"}))
    nodes, text = explain(*page_query(recorded, "jobs_jobrun"))
    assert "jobrun_trouble_idx" in [node.get("Index Name") for node in nodes], text
    assert not [node for node in nodes if node["Node Type"] == "Sort"], text


@pytest.mark.postgres
def test_the_job_count_reads_at_most_the_exact_limit(api: APIClient, planned_history: list[Job]) -> None:
    with statements() as recorded:
        assert api.get("/jobs").json()["count"] == 600
    (count,) = [sql for sql, _ in recorded if "COUNT(" in sql]
    assert f"LIMIT {EXACT_COUNT_LIMIT + 1}" in count


# --- Runs: keyset cursors ------------------------------------------------------------------------


def walk(api: APIClient, path: str, params: dict[str, str | int], *, link: str = "next") -> list[int]:
    """Return the ids of every page, following `link` from the first page `path` answers."""
    seen: list[int] = []
    page = api.get(path, params).json()
    while True:
        seen.extend(run["id"] for run in page["results"])
        if not page[link]:
            return seen
        page = api.get(page[link]).json()


@pytest.mark.parametrize(
    ("ordering", "key"),
    [
        ("-scheduled_for", lambda run: (-run.scheduled_for.timestamp(), -run.pk)),
        ("scheduled_for", lambda run: (run.scheduled_for.timestamp(), run.pk)),
        ("-id", lambda run: -run.pk),
        ("id", lambda run: run.pk),
    ],
)
def test_paging_through_the_runs_shows_each_once_in_order_whatever_the_ties(
    api: APIClient, ordering: str, key: Callable[[JobRun], Any]
) -> None:
    # 70 runs share each fire time: more than a page, where DRF's own cursor would need an offset.
    add_jobs(70, runs_per_job=3)
    expected = [run.pk for run in sorted(JobRun.objects.all(), key=key)]

    assert walk(api, "/runs", {"ordering": ordering, "page_size": 30}) == expected

    last = api.get(f"/runs?ordering={ordering}&page_size=30").json()
    while last["next"]:
        last = api.get(last["next"]).json()
    assert pages_up_to(api, last) == expected


def pages_up_to(api: APIClient, page: dict[str, Any]) -> list[int]:
    """Return the ids from the first row to the end of `page`, read by following `previous`."""
    pages = [[run["id"] for run in page["results"]]]
    while page["previous"]:
        page = api.get(page["previous"]).json()
        pages.insert(0, [run["id"] for run in page["results"]])
    return [pk for ids in pages for pk in ids]


def test_a_run_added_while_paging_neither_repeats_nor_hides_a_row(api: APIClient) -> None:
    job = add_jobs(1, runs_per_job=0)[0]
    for hour in range(6):
        JobRun.objects.create(job=job, scheduled_for=T0 + timedelta(hours=hour), not_before=T0)
    first = api.get("/runs", {"page_size": 3}).json()

    JobRun.objects.create(job=job, scheduled_for=T0 + timedelta(hours=9), not_before=T0)  # newest of all
    second = api.get(first["next"]).json()

    ids = [run["id"] for run in first["results"] + second["results"]]
    assert len(ids) == len(set(ids)) == 6
    assert second["next"] is None


def test_a_single_page_has_no_links(api: APIClient) -> None:
    add_jobs(1, runs_per_job=2)

    page = api.get("/runs").json()

    assert (page["next"], page["previous"], len(page["results"])) == (None, None, 2)


def cursor(tokens: dict[str, str]) -> str:
    return b64encode(urlencode(tokens).encode()).decode()


@pytest.mark.parametrize(
    "value",
    [
        "not base64!",
        b64encode(b"\xff\xfe").decode(),
        cursor({"o": "scheduled_for,id", "p": '["2026-06-01T09:00:00+00:00", 1]'}),  # another ordering's
        cursor({"o": "-scheduled_for,-id", "p": '["2026-06-01T09:00:00+00:00"]'}),  # half a key
        cursor({"o": "-scheduled_for,-id", "p": '["2026-06-01T09:00:00", 1]'}),  # no time zone
        cursor({"o": "-scheduled_for,-id", "p": '["tomorrow", 1]'}),
        cursor({"o": "-scheduled_for,-id", "p": '["2026-06-01T09:00:00+00:00", 99999999999999999999]'}),
        cursor({"o": "-scheduled_for,-id", "p": '["2026-06-01T09:00:00+00:00", true]'}),
        cursor({"o": "-scheduled_for,-id", "p": "not json"}),
    ],
)
def test_a_cursor_this_api_did_not_give_is_a_404(api: APIClient, value: str) -> None:
    response = api.get("/runs", {"cursor": value})

    assert response.status_code == 404
    assert response.json() == {"detail": "Invalid cursor"}


def test_a_cursor_keeps_working_with_another_page_size(api: APIClient) -> None:
    add_jobs(4, runs_per_job=5)
    first = api.get("/runs", {"page_size": 4}).json()
    token = parse_qs(urlsplit(first["next"]).query)["cursor"][0]
    assert json.loads(parse_qs(b64decode(token).decode())["p"][0])[1] == first["results"][-1]["id"]

    rest = api.get("/runs", {"cursor": token, "page_size": 100}).json()
    assert [run["id"] for run in first["results"] + rest["results"]] == walk(api, "/runs", {"page_size": 7})


# --- Jobs: page numbers with a bounded count -----------------------------------------------------


def test_the_job_count_is_exact_up_to_the_limit_and_an_estimate_above(
    api: APIClient, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    add_jobs(60, runs_per_job=0)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    assert api.get("/jobs").json()["count"] == 60

    monkeypatch.setattr(BoundedCountPaginator, "exact_count_limit", 20)
    # Above the limit PostgreSQL asks the planner (EXPLAIN) instead of counting every job.
    with django_assert_num_queries(4 if connection.vendor == "postgresql" else 3):
        page = api.get("/jobs", {"page_size": 25}).json()
    assert page["count"] > 20
    if connection.vendor == "sqlite":
        assert page["count"] == 60  # no statistics to estimate from: counted
    # Links come from reading one row past the page, not from the count.
    assert "page=2" in page["next"]
    last = api.get("/jobs", {"page_size": 25, "page": 3}).json()
    assert (len(last["results"]), last["next"]) == (10, None)
    assert api.get("/jobs", {"page_size": 25, "page": 4}).status_code == 404
    assert api.get("/jobs", {"page_size": 25, "page": 10**30}).status_code == 404


@pytest.mark.parametrize(
    ("ordering", "message"),
    [
        ("-last_run_at", "last_run_at is no longer offered: GET /runs lists the latest runs first"),
        ("created_at", "created_at is no longer offered: ids are given in creation order"),
        ("updated_at", "updated_at is no longer offered"),
        ("name,-next_run_at", "Order by one of id, -id, name, -name, next_run_at, -next_run_at."),
    ],
)
def test_job_orderings_no_index_serves_are_refused_naming_the_parameter(
    api: APIClient, ordering: str, message: str
) -> None:
    response = api.get("/jobs", {"ordering": ordering})

    assert response.status_code == 400
    (refusal,) = response.json()["ordering"]
    assert message in refusal
