"""email_notification against a real SMTP server (aiosmtpd on 127.0.0.1) through Django's SMTP backend."""

from __future__ import annotations

import email
import email.policy
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.test import override_settings
from rest_framework import serializers

from jobs import services
from jobs.executors import ExecutorError, get_executor
from jobs.models import Job, JobRun

pytestmark = pytest.mark.django_db

MakeRun = Callable[..., JobRun]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mailbox:
    """An aiosmtpd handler that keeps every envelope it accepts."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def messages(self) -> list[EmailMessage]:
        return [
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
            for envelope in self.envelopes
        ]


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        with override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=controller.port,
            EMAIL_HOST_USER="",
            EMAIL_HOST_PASSWORD="",
            EMAIL_USE_TLS=False,
            EMAIL_USE_SSL=False,
            EMAIL_TIMEOUT=5,
            DEFAULT_FROM_EMAIL="scheduler@example.com",
        ):
            yield mailbox
    finally:
        controller.stop()


def test_mail_arrives_with_headers_envelope_rendered_body_and_html(smtp: Mailbox, make_run: MakeRun) -> None:
    run = make_run(
        "email_notification",
        {
            "recipient": ["ann@example.com", "Bob Example <bob@example.com>"],
            "cc": "carol@example.com",
            "bcc": ["dave@example.com"],
            "reply_to": "help@example.com",
            "from_email": "Reports <reports@example.com>",
            "subject": "{{ job.name }} for {{ run.scheduled_for|date:'Y-m-d H:i' }}",
            "body": "Hello from {{ job.name }}, attempt {{ run.attempt }} of job {{ job.id }}.",
            "html_body": "<p>Hello from <b>{{ job.name }}</b></p>",
        },
        name="Tom & Jerry <weekly>",
    )

    result = get_executor("email_notification").execute(run)

    [envelope] = smtp.envelopes
    assert envelope.mail_from == "reports@example.com"
    assert sorted(envelope.rcpt_tos) == [
        "ann@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ]
    [message] = smtp.messages()
    assert message["To"] == "ann@example.com, Bob Example <bob@example.com>"
    assert message["Cc"] == "carol@example.com"
    assert message["Bcc"] is None
    assert b"dave@example.com" not in envelope.original_content
    assert message["From"] == "Reports <reports@example.com>"
    assert message["Reply-To"] == "help@example.com"
    assert message["Subject"] == "Tom & Jerry <weekly> for 2026-06-01 12:00"
    assert message["X-Scheduler-Job"] == str(run.job_id)
    assert message["Message-ID"] == result["message_id"]
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    assert plain.get_content().strip() == f"Hello from Tom & Jerry <weekly>, attempt 1 of job {run.job_id}."
    assert html.get_content().strip() == "<p>Hello from <b>Tom &amp; Jerry &lt;weekly&gt;</b></p>"
    assert result["sent"] == 1
    assert result["to"] == ["ann@example.com", '"Bob Example" <bob@example.com>']
    assert result["bcc_count"] == 1


def test_dates_render_in_the_jobs_time_zone(smtp: Mailbox, make_run: MakeRun) -> None:
    run = make_run(
        "email_notification",
        {"recipient": "ann@example.com", "subject": "Report for {{ run.scheduled_for|date:'Y-m-d H:i T' }}"},
        timezone="Asia/Tokyo",
        scheduled_for=datetime(2026, 6, 1, 20, 0, tzinfo=UTC),
    )

    get_executor("email_notification").execute(run)

    assert smtp.messages()[0]["Subject"] == "Report for 2026-06-02 05:00 JST"


def test_html_only_mail_gets_a_plain_text_part_from_the_html(smtp: Mailbox, make_run: MakeRun) -> None:
    run = make_run(
        "email_notification",
        {
            "recipient": "ann@example.com",
            "subject": "Hi",
            "html_body": "<h1>Status</h1><p>All green for {{ job.name }}</p>",
        },
        name="Nightly",
    )

    get_executor("email_notification").execute(run)

    plain = smtp.messages()[0].get_body(preferencelist=("plain",))
    assert plain is not None
    assert plain.get_content().strip() == "StatusAll green for Nightly"


def test_a_line_break_in_the_job_name_cannot_break_the_subject_header(smtp: Mailbox, make_run: MakeRun) -> None:
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "Re: {{ job.name }}"})
    Job.objects.filter(pk=run.job_id).update(name="Report\nBcc: eve@evil.test")
    run.refresh_from_db()

    get_executor("email_notification").execute(run)

    [envelope] = smtp.envelopes
    assert envelope.rcpt_tos == ["ann@example.com"]
    assert smtp.messages()[0]["Subject"] == "Re: Report Bcc: eve@evil.test"


def test_templates_cannot_reach_the_database_or_template_files(smtp: Mailbox, make_run: MakeRun) -> None:
    run = make_run(
        "email_notification",
        {"recipient": "ann@example.com", "subject": "x", "body": "[{{ job.runs.all }}][{{ run.job.delete }}]"},
    )

    get_executor("email_notification").execute(run)

    assert smtp.messages()[0].get_body(preferencelist=("plain",)).get_content().strip() == "[][]"  # type: ignore[union-attr]
    assert Job.objects.filter(pk=run.job_id).exists()


def test_an_unreachable_smtp_server_fails_the_run_as_an_ordinary_failure(make_run: MakeRun) -> None:
    run = make_run("email_notification", {"recipient": "ann@example.com", "subject": "Hi"})
    port = free_port()

    with (
        override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=port,
            EMAIL_TIMEOUT=2,
        ),
        pytest.raises(ExecutorError) as failed,
    ):
        get_executor("email_notification").execute(run)

    # Nothing can have been delivered: not an OutcomeUnknown, so a retry is allowed.
    assert type(failed.value) is ExecutorError
    assert f"127.0.0.1:{port}" in str(failed.value) and "nothing was delivered" in str(failed.value)
    assert isinstance(failed.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"subject": "Hi\nBcc: eve@evil.test"}, "subject", "must not contain line breaks (header injection)"),
        ({"subject": "Hi\r\nX-Evil: 1"}, "subject", "must not contain line breaks (header injection)"),
        ({"recipient": "not-an-address"}, "recipient", "Enter a valid email address."),
        ({"recipient": "ann@example.com\nBcc: eve@evil.test"}, "recipient", "line breaks"),
        ({"recipient": "Ann\n <ann@example.com>"}, "recipient", "line breaks"),
        ({"recipient": ["ann@example.com", "nope"]}, "recipient", "Enter a valid email address."),
        ({"recipient": []}, "recipient", "at least 1"),
        ({"cc": "carol@"}, "cc", "Enter a valid email address."),
        ({"bcc": ["eve@evil.test\r\nX: y"]}, "bcc", "line breaks"),
        ({"from_email": "reports@example.com\nBcc: eve@evil.test"}, "from_email", "line breaks"),
        ({"from_email": 'Re"ports <reports@example.com>'}, "from_email", "Enter a valid email address."),
        ({"body": "{% if %}"}, "body", "template error"),
        ({"subject": "{{ job.name|nosuchfilter }}"}, "subject", "template error"),
        ({"body": "{% load static %}"}, "body", "template error"),
        ({"subjcet": "typo"}, "subjcet", "unknown parameter"),
    ],
)
def test_bad_addresses_and_header_injection_are_refused_at_create_time(
    parameters: dict[str, Any], field: str, message: str
) -> None:
    body = {"recipient": "ann@example.com", "subject": "Hi", **parameters}

    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("email_notification").validate_parameters(body)
    detail = refused.value.detail
    assert isinstance(detail, dict) and field in detail
    assert message in str(detail[field])

    with pytest.raises(services.JobValidationError) as not_created:
        services.job_create(name="x", cron_expression="@daily", job_type="email_notification", parameters=body)
    assert field in not_created.value.errors["parameters"]
    assert Job.objects.count() == 0


def test_email_is_not_safe_to_repeat() -> None:
    assert get_executor("email_notification").safe_to_repeat is False
