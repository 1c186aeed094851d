"""The README and docs/: their examples work, their links resolve, and the README stays short."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from jobs.models import Job

BASE_DIR = Path(settings.BASE_DIR)
README = BASE_DIR / "README.md"
PAGES = [README, *sorted((BASE_DIR / "docs").glob("*.md"))]
SAMPLES = BASE_DIR / "jobs" / "tests" / "executors"
README_MAX_LINES = 230
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.DOTALL | re.MULTILINE)


def code_blocks(language: str) -> list[str]:
    """Return the fenced blocks of one language from the README and every docs/ page."""
    return [body for page in PAGES for lang, body in FENCE.findall(page.read_text()) if lang == language]


def curl_commands(block: str) -> list[list[str]]:
    """Split a shell block into its `curl` commands, each read as a shell would."""
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    starts = [i for i, word in enumerate(words) if word == "curl"]
    return [words[start:end] for start, end in zip(starts, [*starts[1:], len(words)], strict=True)]


# --- the examples are the tested files and create their jobs -------------------------------------


def test_the_documented_examples_are_the_tested_files() -> None:
    python = code_blocks("python")

    assert (SAMPLES / "sample_executor.py").read_text() in python
    assert (SAMPLES / "sample_processors.py").read_text() in python


def curl_bodies() -> list[dict[str, Any]]:
    """Return the JSON bodies of the documented `curl -X POST .../jobs` commands, read as a shell would."""
    bodies = []
    for block in code_blocks("sh"):
        argv = shlex.split(block.replace("\\\n", " "))
        assert argv[:4] == ["curl", "-X", "POST", "http://127.0.0.1:8000/jobs"], argv
        assert argv[4:6] == ["-H", "Authorization: Token $TOKEN"]
        assert argv[6:8] == ["-H", "Content-Type: application/json"]
        assert argv[8] == "-d" and len(argv) == 10, argv
        bodies.append(json.loads(argv[9]))
    return bodies


@pytest.mark.django_db
def test_every_documented_curl_example_creates_its_job(api: APIClient) -> None:
    bodies = curl_bodies()
    assert len(bodies) >= 3
    assert {body["job_type"] for body in bodies} == {"email_notification", "data_processing", "http_request"}

    for body in bodies:
        response = api.post("/jobs", body, format="json")
        assert response.status_code == 201, (body, response.json())

    assert Job.objects.count() == len(bodies)


def seed_commands() -> list[list[str]]:
    """Return the `curl` commands of the README block that creates the seed's "Daily reminder"."""
    blocks = [body for lang, body in FENCE.findall(README.read_text()) if lang == "bash" and "Daily reminder" in body]
    assert len(blocks) == 1, blocks
    return curl_commands(blocks[0])


@pytest.mark.django_db
def test_the_readme_seed_example_creates_lists_and_reads_its_job(
    api: APIClient, job_data: Callable[..., dict[str, Any]]
) -> None:
    post, list_jobs, read_job = seed_commands()
    for argv in (post, list_jobs, read_job):
        assert argv[argv.index("-H") + 1] == "Authorization: Token $TOKEN", argv
    assert post[:4] == ["curl", "-X", "POST", "http://127.0.0.1:8000/jobs"], post
    assert "Content-Type: application/json" in post
    body = json.loads(post[post.index("-d") + 1])
    assert body == job_data()

    created = api.post(urlsplit(post[3]).path, body, format="json")
    assert created.status_code == 201, created.json()
    assert Job.objects.get().name == "Daily reminder"

    listed = api.get(urlsplit(list_jobs[1]).path)
    assert listed.status_code == 200
    assert [job["name"] for job in listed.json()["results"]] == ["Daily reminder"]

    # The README reads job 1, the first job of a fresh database; here the id may differ.
    path = urlsplit(read_job[1]).path
    assert path == "/jobs/1"
    read = api.get(path.replace("1", str(created.json()["id"])))
    assert read.status_code == 200
    assert read.json()["cron_expression"] == "0 9 * * *"


# --- the README stays short, and every link resolves ---------------------------------------------


def test_the_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())

    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def slug(heading: str) -> str:
    """Return GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Return the anchors of a page's headings, numbered as GitHub numbers repeated ones."""
    text = FENCE.sub("", page.read_text())
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        base = slug(heading)
        anchor, n = base, 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def relative_links(page: Path) -> list[str]:
    """Return the targets of a page's Markdown links, leaving out code and absolute URLs."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Quick start", "quick-start"),
        ("`email_notification`", "email_notification"),
        ("What survives which fault", "what-survives-which-fault"),
        ("Run now, pause and resume", "run-now-pause-and-resume"),
        ("Soak: 30 minutes of faults", "soak-30-minutes-of-faults"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_the_docs_pages_exist() -> None:
    names = {page.name for page in PAGES}

    assert {"api.md", "job-types.md", "operations.md", "extending.md", "performance.md"} <= names


def broken_links(page: Path) -> list[str]:
    """Return the relative links of a page that lead to no file, or to no heading of that file."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(BASE_DIR).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_reports_what_does_not_resolve(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n"
        "[fine](other.md#its-part) [fine](#a-page) [web](https://example.com/x#y) `[code](gone.md)`\n"
        "[gone](gone.md) [bad anchor](other.md#nowhere) [bad here](#nowhere)\n"
        "```bash\n[in a block](gone-too.md)\n```\n"
    )

    assert broken_links(page) == [
        "gone.md: no such file",
        "other.md#nowhere: no heading with that anchor",
        "#nowhere: no heading with that anchor",
    ]
