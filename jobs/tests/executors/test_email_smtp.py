"""email_notification against SMTP servers that stall or crawl: the run's deadline bounds the whole
conversation, and a failure says whether the mail may have been delivered (real aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.test import override_settings

from jobs import services
from jobs.executors import ExecutorError, get_executor
from jobs.executors.base import OutcomeUnknown, RunTimedOut
from jobs.models import Job, JobRun
from jobs.scheduler import runner
from jobs.scheduler.engine import Engine
from jobs.tests.executors.test_email import free_port

pytestmark = pytest.mark.django_db

MakeRun = Callable[..., JobRun]
PARAMETERS = {"recipient": "ann@example.com", "subject": "Report", "body": "All green."}


class SlowMailbox:
    """An aiosmtpd handler that waits `delay` seconds before answering EHLO, MAIL, RCPT and the message,
    and `stall` more before answering the command named by `stall_in`."""

    def __init__(self, *, delay: float = 0.0, stall_in: str = "", stall: float = 60.0, data_reply: str = "") -> None:
        self.delay = delay
        self.stall_in = stall_in
        self.stall = stall
        self.data_reply = data_reply or "250 Message accepted for delivery"
        self.messages_received = 0  # messages whose whole content reached the server
        self.delivered = 0  # ...and that it accepted

    async def _wait(self, command: str) -> None:
        await asyncio.sleep(self.delay)
        if command == self.stall_in:
            await asyncio.sleep(self.stall)  # cancelled when the controller stops

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        await self._wait("EHLO")
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        await self._wait("MAIL")
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        await self._wait("RCPT")
        if address.startswith("refused@"):
            return "550 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        await self._wait("QUIT")
        return "221 Bye"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages_received += 1
        await self._wait("DATA")
        if self.data_reply.startswith("250"):
            self.delivered += 1
        return self.data_reply


@pytest.fixture
def serve() -> Iterator[Callable[..., SlowMailbox]]:
    """Start an aiosmtpd server with a SlowMailbox and point Django's SMTP backend at it."""
    controllers: list[Controller] = []
    overrides: list[Any] = []

    def start(*, email_timeout: float | None = 5, **behaviour: Any) -> SlowMailbox:
        mailbox = SlowMailbox(**behaviour)
        controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
        controller.start()
        controllers.append(controller)
        override = override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=controller.port,
            EMAIL_HOST_USER="",
            EMAIL_HOST_PASSWORD="",
            EMAIL_USE_TLS=False,
            EMAIL_USE_SSL=False,
            EMAIL_TIMEOUT=email_timeout,
            DEFAULT_FROM_EMAIL="scheduler@example.com",
        )
        override.enable()
        overrides.append(override)
        return mailbox

    yield start
    for override in overrides:
        override.disable()
    for controller in controllers:
        controller.stop()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) but never says a word: no greeting."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = int(listener.getsockname()[1])
        with override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=port,
            EMAIL_USE_TLS=False,
            EMAIL_USE_SSL=False,
            EMAIL_TIMEOUT=5,
        ):
            yield port


def execute_timed(run: JobRun) -> tuple[BaseException | None, float]:
    """Execute the email type for `run`; return what it raised and how long it took."""
    started = time.monotonic()
    try:
        get_executor("email_notification").execute(run)
    except Exception as exc:  # noqa: BLE001 - the tests look at what was raised
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


# -- a stall after the message was sent: it may have been delivered -------------------------------


def test_a_server_stalling_after_the_message_ends_the_run_at_its_deadline(
    serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    mailbox = serve(stall_in="DATA", email_timeout=5)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=2)

    raised, elapsed = execute_timed(run)

    assert isinstance(raised, RunTimedOut)
    assert "may have been delivered" in str(raised)
    assert 1.5 < elapsed < 3
    assert mailbox.messages_received == 1


def test_the_runner_records_a_stall_after_the_message_as_timed_out(
    serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    mailbox = serve(stall_in="DATA", email_timeout=None)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=2)

    started = time.monotonic()
    outcome = runner.execute(run)

    assert time.monotonic() - started < 3
    assert outcome.status == JobRun.Status.TIMED_OUT
    assert "may have been delivered" in outcome.error
    assert mailbox.messages_received == 1


def test_email_timeout_after_the_message_is_an_unknown_outcome(
    serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    mailbox = serve(stall_in="DATA", email_timeout=1)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=30)

    raised, elapsed = execute_timed(run)
    outcome = runner.execute(make_run("email_notification", PARAMETERS, timeout_seconds=30, name="second"))

    assert isinstance(raised, OutcomeUnknown) and not isinstance(raised, RunTimedOut)
    assert "may have been delivered" in str(raised)
    assert 0.8 < elapsed < 2
    assert outcome.status == JobRun.Status.FAILED and outcome.error.startswith("OutcomeUnknown: ")
    assert mailbox.messages_received == 2 and mailbox.delivered == 0


def test_the_engine_does_not_retry_a_mail_that_may_have_been_delivered(
    serve: Callable[..., SlowMailbox], now: datetime
) -> None:
    mailbox = serve(stall_in="DATA", email_timeout=5)
    job = services.job_create(
        now=now - timedelta(seconds=30),
        name="stalled mail",
        cron_expression="* * * * *",
        job_type="email_notification",
        parameters=PARAMETERS,
        timeout_seconds=2,
        max_retries=2,
        retry_backoff_seconds=1,
    )
    engine = Engine(max_concurrent=1, clock=lambda: now, heartbeat_seconds=3600)
    try:
        started = time.monotonic()
        outcomes = engine.run_once()
        elapsed = time.monotonic() - started
    finally:
        engine.stop()

    assert [outcome.status for outcome in outcomes] == [JobRun.Status.TIMED_OUT]
    assert elapsed < 3.5
    assert list(JobRun.objects.filter(job=job).values_list("attempt", "status")) == [(1, "timed_out")]
    assert mailbox.messages_received == 1


# -- a failure before the message was sent: nothing was delivered, a retry is fine -----------------


def test_a_server_that_never_greets_fails_the_run_before_its_deadline(silent_server: int, make_run: MakeRun) -> None:
    run = make_run("email_notification", PARAMETERS, timeout_seconds=2)

    raised, elapsed = execute_timed(run)

    assert type(raised) is ExecutorError
    assert "nothing was delivered" in str(raised)
    assert elapsed < 2


@pytest.mark.parametrize("command", ["EHLO", "MAIL", "RCPT"])
def test_a_stall_before_the_message_is_an_ordinary_failure(
    command: str, serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    mailbox = serve(stall_in=command, email_timeout=5)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=2)

    raised, elapsed = execute_timed(run)

    assert type(raised) is ExecutorError
    assert "nothing was delivered" in str(raised)
    assert elapsed < 2
    assert mailbox.messages_received == 0


def test_the_engine_retries_a_mail_that_was_not_sent(silent_server: int, now: datetime) -> None:
    job = services.job_create(
        now=now - timedelta(seconds=30),
        name="silent server",
        cron_expression="* * * * *",
        job_type="email_notification",
        parameters=PARAMETERS,
        timeout_seconds=2,
        max_retries=2,
        retry_backoff_seconds=1,
    )
    engine = Engine(max_concurrent=1, clock=lambda: now, heartbeat_seconds=3600)
    try:
        outcomes = engine.run_once()
    finally:
        engine.stop()

    assert [outcome.status for outcome in outcomes] == [JobRun.Status.FAILED]
    assert "nothing was delivered" in outcomes[0].error
    assert sorted(JobRun.objects.filter(job=job).values_list("attempt", "status")) == [(1, "failed"), (2, "queued")]


def test_a_server_answering_every_command_slowly_cannot_stretch_the_run(
    serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    # Each answer comes well within EMAIL_TIMEOUT, but together they take longer than the job may.
    mailbox = serve(delay=0.6, email_timeout=1)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=2)

    raised, elapsed = execute_timed(run)

    assert type(raised) is ExecutorError
    assert "nothing was delivered" in str(raised)
    assert elapsed < 2
    assert mailbox.messages_received == 0


def test_a_slow_server_within_the_jobs_time_delivers(serve: Callable[..., SlowMailbox], make_run: MakeRun) -> None:
    mailbox = serve(delay=0.1, email_timeout=1)
    run = make_run("email_notification", PARAMETERS, timeout_seconds=10)

    result = get_executor("email_notification").execute(run)

    assert result["sent"] == 1
    assert mailbox.delivered == 1


@pytest.mark.parametrize(
    ("behaviour", "parameters", "message"),
    [
        ({}, {"recipient": "refused@example.com"}, "refused"),
        ({"data_reply": "554 Transaction failed"}, {}, "554"),
        ({"data_reply": "451 Try again later"}, {}, "451"),
    ],
)
def test_a_server_refusing_the_mail_is_an_ordinary_failure(
    behaviour: dict[str, Any],
    parameters: dict[str, Any],
    message: str,
    serve: Callable[..., SlowMailbox],
    make_run: MakeRun,
) -> None:
    mailbox = serve(**behaviour)
    run = make_run("email_notification", {**PARAMETERS, **parameters})

    raised, _ = execute_timed(run)

    assert type(raised) is ExecutorError
    assert message in str(raised) and "nothing was delivered" in str(raised)
    assert mailbox.delivered == 0


def test_other_mail_backends_are_called_as_they_are(make_run: MakeRun, mailoutbox: list[Any]) -> None:
    run = make_run("email_notification", PARAMETERS, timeout_seconds=1)

    result = get_executor("email_notification").execute(run)

    assert result["sent"] == 1
    assert [message.subject for message in mailoutbox] == ["Report"]
    assert Job.objects.filter(pk=run.job_id).exists()


def test_a_server_stalling_on_quit_after_accepting_the_mail_is_a_success(
    serve: Callable[..., SlowMailbox], make_run: MakeRun
) -> None:
    mailbox = serve(stall_in="QUIT")
    run = make_run("email_notification", PARAMETERS, timeout_seconds=10)
    started = time.monotonic()
    outcome = runner.execute(run)
    assert outcome.status == "succeeded", outcome.error
    assert time.monotonic() - started < 3  # the goodbye got a moment, not the run's 10 s
    assert mailbox.delivered == 1
