"""email_notification templates: an allow-list of tags and filters checked at create time, bounded
rendering (size and time) at run time, and headers that template output cannot break."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.core import mail
from rest_framework import serializers

from jobs import services
from jobs.executors import ExecutorError, get_executor
from jobs.executors.email import render
from jobs.models import Job, JobRun

pytestmark = pytest.mark.django_db

MakeRun = Callable[..., JobRun]

CONTEXT: dict[str, Any] = {
    "job": {"id": 7, "name": "Nightly <b>", "description": "", "timezone": "UTC"},
    "run": {"id": 3, "attempt": 2, "scheduled_for": datetime(2026, 6, 1, 12, 0, tzinfo=UTC), "missed_fires": 0},
}


def refusal(parameters: dict[str, Any]) -> str:
    """Return the create-time error of the email type for these parameters, as one string."""
    body = {"recipient": "ann@example.com", "subject": "Hi", **parameters}
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("email_notification").validate_parameters(body)
    detail = refused.value.detail
    assert isinstance(detail, dict)
    [(field, errors)] = detail.items()
    assert field in parameters
    return str(errors[0])  # type: ignore[index]


def in_a_minute() -> float:
    return time.monotonic() + 60


# -- what templates may use --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ job.name }} #{{ run.id }}", "Nightly <b> #3"),
        ("{% if run.attempt > 1 %}retry {{ run.attempt }}{% else %}first{% endif %}", "retry 2"),
        ("{% for key, value in run.items %}{% if key == 'id' %}{{ value }}{% endif %}{% endfor %}", "3"),
        ("{% for c in 'ab' %}{{ forloop.counter }}{{ c }}{% empty %}none{% endfor %}", "1a2b"),
        ("{% with n=job.name|lower %}{{ n|truncatechars:5 }}{% endwith %}", "nigh…"),
        ("{{ run.scheduled_for|date:'Y-m-d H:i' }}", "2026-06-01 12:00"),
        ("{{ run.attempt|add:1 }} attempt{{ run.attempt|pluralize }}", "3 attempts"),
        ("{% firstof job.description 'no description' %}", "no description"),
        ("{% filter upper %}{{ job.name|cut:' ' }}{% endfilter %}", "NIGHTLY<B>"),
        ("{% spaceless %}<p> <b>x</b> </p>{% endspaceless %}", "<p><b>x</b></p>"),
        ("{% verbatim %}{{ job.name }}{% endverbatim %}", "{{ job.name }}"),
        ("{% templatetag openvariable %}", "{{"),
        ("{% comment %}{% include 'x.html' %}{% endcomment %}ok", "ok"),
        ("{% for c in 'abc' %}{% cycle 'x' 'y' %}{% endfor %}", "xyx"),
        ("{{ job.missing|default:'-' }} {{ job.name|slugify }} {{ job.name|length }}", "- nightly-b 11"),
        ("{% widthratio run.attempt 4 100 %}%", "50%"),
    ],
)
def test_allowed_tags_and_filters_render(source: str, expected: str) -> None:
    assert render(source, CONTEXT, part="body", deadline=in_a_minute()) == expected


def test_html_parts_escape_variables() -> None:
    assert render("<p>{{ job.name }}</p>", CONTEXT, part="html body", html=True, deadline=in_a_minute()) == (
        "<p>Nightly &lt;b&gt;</p>"
    )


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ('{% include "admin/base.html" %}', "include"),
        ('{% extends "admin/base.html" %}', "extends"),
        ("{% block content %}{% endblock %}", "block"),
        ("{% load static %}", "load"),
        ("{% debug %}", "debug"),
        ("{% lorem 999999 w %}", "lorem"),
        ("{% url 'admin:index' %}", "url"),
        ("{% csrf_token %}", "csrf_token"),
        ("{% querystring %}", "querystring"),
        ("{% regroup x by y as z %}", "regroup"),
        ("{% if 1 %}{% include 'x.html' %}{% endif %}", "include"),
    ],
)
def test_tags_outside_the_allow_list_are_refused_at_create_time(source: str, name: str) -> None:
    message = refusal({"body": source})

    assert f"{{% {name} %}}" in message
    assert "allowed tags: autoescape, comment, cycle, filter, firstof, for, if" in message


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("{{ job.name|center:99999999 }}", "center"),
        ("{{ job.name|ljust:99999999 }}", "ljust"),
        ("{{ job.name|rjust:99999999 }}", "rjust"),
        ("{{ run.id|stringformat:'099999999d' }}", "stringformat"),
        ("{{ run.id|floatformat:999999 }}", "floatformat"),
        ("{% for c in job.name|make_list %}{% endfor %}", "make_list"),
        ("{{ job.name|join:job.name }}", "join"),
        ("{{ job|pprint }}", "pprint"),
        ("{{ job.description|urlize }}", "urlize"),
        ("{{ job.name|addslashes|addslashes }}", "addslashes"),
        ("{% filter center:99999 %}x{% endfilter %}", "center"),
        ("{% if job.name|dictsort:'x' %}{% endif %}", "dictsort"),
    ],
)
def test_filters_outside_the_allow_list_are_refused_at_create_time(source: str, name: str) -> None:
    message = refusal({"body": source})

    assert f"'{name}'" in message
    assert "allowed filters: add, capfirst, cut, date, default," in message


@pytest.mark.parametrize("field", ["subject", "body", "html_body"])
def test_every_template_is_checked(field: str) -> None:
    assert "{% include %}" in refusal({field: '{% include "admin/base.html" %}'})


def test_a_refused_template_creates_no_job() -> None:
    parameters = {"recipient": "ann@example.com", "subject": "Hi", "body": '{% include "admin/base.html" %}'}

    with pytest.raises(services.JobValidationError) as not_created:
        services.job_create(name="x", cron_expression="@daily", job_type="email_notification", parameters=parameters)

    assert "body" in not_created.value.errors["parameters"]
    assert Job.objects.count() == 0


def test_a_template_nested_too_deeply_is_refused_not_crashed() -> None:
    message = refusal({"body": "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000})

    assert "nested too deeply" in message


# -- bounded rendering -------------------------------------------------------------------------

# The body: three nested loops over a 300-character string, about 1 KB of template, render
# 300**3 = 27 million characters.
LETTERS = "x" * 300
NESTED_LOOPS = (
    f"{{% for a in '{LETTERS}' %}}{{% for b in '{LETTERS}' %}}{{% for c in '{LETTERS}' %}}"
    "{{ c }}{% endfor %}{% endfor %}{% endfor %}"
)


def test_three_nested_loops_stop_at_the_loop_cap_quickly(make_run: MakeRun) -> None:
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "Hi", "body": NESTED_LOOPS})

    started = time.monotonic()
    with pytest.raises(ExecutorError, match=r"the loops of the body ran more than 100,000 times"):
        get_executor("email_notification").execute(run)

    assert time.monotonic() - started < 2
    assert mail.outbox == []


def test_loops_that_write_nothing_stop_at_the_time_cap() -> None:
    silent = NESTED_LOOPS.replace("{{ c }}", "")

    started = time.monotonic()
    with pytest.raises(ExecutorError, match=r"rendering the body took longer than 0\.3s"):
        render(silent, CONTEXT, part="body", deadline=time.monotonic() + 0.3, max_passes=10**9)

    assert time.monotonic() - started < 1


def test_a_run_with_little_time_left_stops_rendering_in_time(make_run: MakeRun) -> None:
    # 90,000 passes (under the loop cap), each counting the words of a long description.
    slow = (
        f"{{% for a in '{LETTERS}' %}}{{% for b in '{LETTERS}' %}}"
        "{{ job.description|title|wordcount }}{% endfor %}{% endfor %}"
    )
    run = make_run(
        "email_notification",
        {"recipient": "ann@example.com", "subject": "Hi", "body": slow},
        description="word " * 2000,
        timeout_seconds=1,
    )

    started = time.monotonic()
    with pytest.raises(ExecutorError, match=r"rendering the body took longer than 0\.[78]s"):
        get_executor("email_notification").execute(run)

    assert time.monotonic() - started < 1
    assert mail.outbox == []


def test_doubling_a_variable_with_with_stops_at_the_size_cap(make_run: MakeRun) -> None:
    doubling = "{% with a=job.name %}" + "{% with a=a|add:a %}" * 24 + "{{ a|length }}" + "{% endwith %}" * 25
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "Hi", "body": doubling}, name="x")

    with pytest.raises(ExecutorError, match=r"the rendered body is larger than 1,000,000 characters"):
        get_executor("email_notification").execute(run)

    assert mail.outbox == []


@pytest.mark.parametrize(("field", "part"), [("subject", "subject"), ("html_body", "html body")])
def test_every_part_is_capped(field: str, part: str, make_run: MakeRun) -> None:
    # Short enough for a subject (998 characters): 300 * 300 times a 12-character name.
    loops = f"{{% for a in '{LETTERS}' %}}{{% for b in '{LETTERS}' %}}{{{{ job.name }}}}{{% endfor %}}{{% endfor %}}"
    run = make_run(
        "email_notification", {"recipient": "ann@example.com", "subject": "Hi", field: loops}, name="twelve chars"
    )

    with pytest.raises(ExecutorError, match=rf"the rendered {part} is larger than 1,000,000 characters"):
        get_executor("email_notification").execute(run)

    assert mail.outbox == []


def test_a_large_but_bounded_mail_is_sent(make_run: MakeRun) -> None:
    body = f"{{% for a in '{LETTERS}' %}}{{% for b in '{LETTERS}' %}}{{{{ b }}}}{{% endfor %}}{{% endfor %}}"
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "Hi", "body": body})

    get_executor("email_notification").execute(run)

    assert len(mail.outbox[0].body) == 300 * 300


# -- headers and dates -------------------------------------------------------------------------


def test_control_characters_from_job_fields_do_not_reach_the_subject(make_run: MakeRun) -> None:
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "{{ job.name }}"})
    Job.objects.filter(pk=run.job_id).update(name="Report\x1b[31m\x08\x7f\u2028done\x85!")
    run.refresh_from_db()

    get_executor("email_notification").execute(run)

    assert mail.outbox[0].subject == "Report [31m done !"


def test_a_long_rendered_subject_keeps_every_header_line_within_998_characters(make_run: MakeRun) -> None:
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "{{ job.description }}"})
    Job.objects.filter(pk=run.job_id).update(description="x" * 5000)
    run.refresh_from_db()

    get_executor("email_notification").execute(run)

    raw = mail.outbox[0].message().as_bytes(linesep="\r\n")
    headers = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in headers.split(b"\r\n")) <= 998
    assert mail.outbox[0].subject == "x" * 989


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ run.scheduled_for|date:'Y-m-d H:i T' }}", "2026-06-02 05:00 JST"),
        ("{{ run.scheduled_for|time:'H:i' }}", "05:00"),
        ("{{ run.scheduled_for }}", "June 2, 2026, 5 a.m."),
        ("{% now 'e' %}", "JST"),
    ],
)
def test_dates_read_in_the_jobs_time_zone(source: str, expected: str, make_run: MakeRun) -> None:
    run = make_run(
        "email_notification",
        {"recipient": "ann@example.com", "subject": "x", "body": source},
        timezone="Asia/Tokyo",
        scheduled_for=datetime(2026, 6, 1, 20, 0, tzinfo=UTC),
    )

    get_executor("email_notification").execute(run)

    assert mail.outbox[0].body == expected
