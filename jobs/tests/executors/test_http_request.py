"""http_request against a real local HTTP(S) server, and its address guard.

No test here may send a packet beyond loopback, even if the guard under test were broken: the
`loopback_only` fixture (conftest) fails the test on any connection to a non-loopback address,
and host names resolve only through a fake table (DNS cannot run here).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from rest_framework import serializers

from jobs import services
from jobs.executors import get_executor
from jobs.models import Job, JobRun
from jobs.net import BlockedAddress, HttpRequestError
from jobs.net.guard import address_refusal
from jobs.scheduler import runner
from jobs.tests.executors.conftest import FakeDNS, allow, jobs_settings

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("loopback_only", "dns")]

MakeRun = Callable[..., JobRun]


# --- a real local server -----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: Message
    body: bytes


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def handle_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(Seen(self.command, self.path, self.headers, body))
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if parts.path.startswith("/status/"):
            self.reply(int(parts.path.rsplit("/", 1)[1]), b"status body")
        elif parts.path == "/slow":
            self.server.release.wait(5)
            self.reply(200, b"late")
        elif parts.path == "/echo-headers":
            echo = json.dumps(dict(self.headers.items())).encode()
            self.reply(int(query.get("status", "200")), echo, "application/json")
        elif parts.path == "/big":
            self.reply(200, b"x" * 10_000, "text/plain; charset=utf-8")
        elif parts.path == "/redirect":
            self.send_response(int(query.get("code", "302")))
            self.send_header("Location", query["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.reply(200, json.dumps({"ok": True, "path": self.path}).encode(), "application/json")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    def reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[Seen] = []
        self.release = threading.Event()
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]

    def url(self, path: str = "/echo", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and hang up are part of the tests


def serve(tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    server = LocalServer(tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


@pytest.fixture
def local(server: LocalServer) -> Iterator[LocalServer]:
    """The local server, with 127.0.0.1 allowlisted."""
    with allow("127.0.0.1", "other.test"):
        yield server


def call(make_run: MakeRun, **parameters: Any) -> dict[str, Any]:
    return get_executor("http_request").execute(make_run("http_request", parameters))


# --- requests and answers ----------------------------------------------------------------------


def test_method_json_body_headers_and_idempotency_key_arrive(local: LocalServer, make_run: MakeRun) -> None:
    run = make_run(
        "http_request",
        {
            "method": "POST",
            "url": local.url("/hook?source=cron"),
            "headers": {"Authorization": "Bearer s3cret", "X-Custom": "yes"},
            "json": {"event": "nightly", "items": [1, 2, "drei"]},
        },
    )

    result = get_executor("http_request").execute(run)

    [seen] = local.seen
    assert seen.method == "POST"
    assert seen.path == "/hook?source=cron"
    assert json.loads(seen.body) == {"event": "nightly", "items": [1, 2, "drei"]}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["Authorization"] == "Bearer s3cret"
    assert seen.headers["X-Custom"] == "yes"
    assert seen.headers["Idempotency-Key"] == f"{run.job_id}-2026-06-01T12:00:00+00:00"
    assert seen.headers["User-Agent"].startswith("job-scheduler/")
    assert seen.headers["Host"] == f"127.0.0.1:{local.port}"
    assert result["status"] == 200
    assert json.loads(result["body"]) == {"ok": True, "path": "/hook?source=cron"}
    assert result["body_truncated"] is False
    assert result["idempotency_key"] == f"{run.job_id}-2026-06-01T12:00:00+00:00"
    assert isinstance(result["elapsed_ms"], int)


def test_idempotency_key_is_stable_across_retries_of_one_fire(local: LocalServer, make_run: MakeRun) -> None:
    run = make_run("http_request", {"url": local.url()})
    retry = JobRun.objects.create(job=run.job, scheduled_for=run.scheduled_for, not_before=run.not_before, attempt=2)
    next_fire = JobRun.objects.create(
        job=run.job, scheduled_for=run.scheduled_for + timedelta(hours=1), not_before=run.not_before
    )
    executor = get_executor("http_request")

    for each in (run, retry, next_fire):
        executor.execute(each)

    keys = [seen.headers["Idempotency-Key"] for seen in local.seen]
    assert keys[0] == keys[1] != keys[2]
    assert keys[2] == f"{run.job_id}-2026-06-01T13:00:00+00:00"


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_each_method_is_sent_as_given(local: LocalServer, make_run: MakeRun, method: str) -> None:
    result = call(make_run, method=method, url=local.url())

    assert [seen.method for seen in local.seen] == [method]
    assert result["status"] == 200
    assert result["body"] == ("" if method == "HEAD" else json.dumps({"ok": True, "path": "/echo"}))


def test_a_custom_user_agent_replaces_the_default(local: LocalServer, make_run: MakeRun) -> None:
    call(make_run, url=local.url(), headers={"user-agent": "acme-sync/2"})

    assert local.seen[0].headers.get_all("User-Agent") == ["acme-sync/2"]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_answer_fails_the_run(local: LocalServer, make_run: MakeRun, status: int) -> None:
    with pytest.raises(HttpRequestError, match=rf"answered {status} .*expected 2xx.*status body"):
        call(make_run, url=local.url(f"/status/{status}"))


def test_an_unexpected_status_fails_and_an_expected_one_passes(local: LocalServer, make_run: MakeRun) -> None:
    with pytest.raises(HttpRequestError, match="answered 404"):
        call(make_run, url=local.url("/status/404"))
    with pytest.raises(HttpRequestError, match=r"answered 200 OK \(expected 201, 202\)"):
        call(make_run, url=local.url(), expected_status=[201, 202])

    assert call(make_run, url=local.url("/status/404"), expected_status=[404])["status"] == 404


def test_a_timeout_fails_the_run_promptly(local: LocalServer, make_run: MakeRun) -> None:
    started = time.monotonic()

    with pytest.raises(HttpRequestError, match=r"timed out after 0.3s"):
        call(make_run, url=local.url("/slow"), timeout_seconds=0.3)
    assert time.monotonic() - started < 2


def test_a_refused_connection_fails_the_run(make_run: MakeRun) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with allow("127.0.0.1"), pytest.raises(HttpRequestError, match="ConnectionRefusedError"):
        call(make_run, url=f"http://127.0.0.1:{port}/")


def test_the_response_body_in_the_result_is_capped(local: LocalServer, make_run: MakeRun) -> None:
    result = call(make_run, method="GET", url=local.url("/big"))

    assert result["body"] == "x" * 4096
    assert result["body_truncated"] is True
    assert result["content_type"] == "text/plain; charset=utf-8"


# --- redirects ---------------------------------------------------------------------------------


def redirect(server: LocalServer, to: str, code: int = 302, host: str = "127.0.0.1") -> str:
    return server.url(f"/redirect?code={code}&to={quote(to, safe='')}", host=host)


def test_redirects_are_followed_and_recorded(local: LocalServer, make_run: MakeRun) -> None:
    final = local.url("/final")
    result = call(make_run, method="GET", url=redirect(local, redirect(local, final, 301), 302))

    assert [seen.path.split("?")[0] for seen in local.seen] == ["/redirect", "/redirect", "/final"]
    assert result["url"] == final
    assert len(result["redirects"]) == 2
    assert result["status"] == 200


@pytest.mark.parametrize(
    ("code", "method", "body"),
    [(303, "GET", b""), (302, "GET", b""), (307, "POST", b'{"a":1}'), (308, "POST", b'{"a":1}')],
)
def test_redirected_posts_follow_browser_rules(
    local: LocalServer, make_run: MakeRun, code: int, method: str, body: bytes
) -> None:
    call(make_run, method="POST", url=redirect(local, local.url("/next"), code), json={"a": 1})

    follow = local.seen[1]
    assert (follow.method, follow.body) == (method, body)
    assert follow.headers["Idempotency-Key"] == local.seen[0].headers["Idempotency-Key"]


def test_credentials_are_not_sent_to_another_origin(local: LocalServer, make_run: MakeRun, dns: FakeDNS) -> None:
    dns.add("other.test", "127.0.0.1")
    same = redirect(local, local.url("/same"))
    call(make_run, method="GET", url=redirect(local, same), headers={"Authorization": "Bearer s3cret"})
    call(
        make_run,
        method="GET",
        url=redirect(local, local.url("/other", host="other.test")),
        headers={"Authorization": "Bearer s3cret", "Cookie": "a=b", "X-Kept": "1"},
    )

    assert local.seen[2].headers["Authorization"] == "Bearer s3cret"
    elsewhere = local.seen[4]
    assert elsewhere.headers["Host"] == f"other.test:{local.port}"
    assert elsewhere.headers["Authorization"] is None
    assert elsewhere.headers["Cookie"] is None
    assert elsewhere.headers["X-Kept"] == "1"


def test_too_many_redirects_fail(local: LocalServer, make_run: MakeRun) -> None:
    url = local.url("/final")
    for _ in range(3):
        url = redirect(local, url)

    with pytest.raises(HttpRequestError, match="more than 2 redirects"):
        call(make_run, method="GET", url=url, max_redirects=2)
    assert len(local.seen) == 3


def test_with_no_redirects_allowed_a_redirect_is_an_unexpected_status(local: LocalServer, make_run: MakeRun) -> None:
    with pytest.raises(HttpRequestError, match="answered 302"):
        call(make_run, method="GET", url=redirect(local, local.url()), max_redirects=0)
    assert len(local.seen) == 1


# --- the address guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/", "a loopback address"),
        ("http://127.1:8080/", "a loopback address"),
        ("http://2130706433/", "a loopback address"),
        ("http://0x7f.0.0.1/", "a loopback address"),
        ("http://10.0.0.1/hook", "a private address"),
        ("http://192.168.1.10/", "a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
        ("http://168.63.129.16/", "a cloud metadata address"),
        ("http://[fd00:ec2::254]/", "a cloud metadata address"),
        ("http://[::1]:8000/", "a loopback address"),
        ("http://[::ffff:10.0.0.1]/", "a private address (inside ::ffff:a00:1)"),
        ("http://0.0.0.0/", "an unspecified address"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://100.64.0.1/", "not a public address"),
        ("http://localhost:8000/", "localhost is a loopback name"),
        ("http://api.localhost/", "a loopback name"),
        ("http://metadata.google.internal/computeMetadata/v1/", "a cloud metadata name"),
        ("ftp://example.com/", "the scheme must be http or https"),
        ("file:///etc/passwd", "the scheme must be http or https"),
        ("http://user:pw@example.com/", "must not contain credentials"),
        ("http://example.com/a b", "must not contain spaces"),
        ("http://example.com\r\nX-Evil: 1/", "must not contain spaces, line breaks"),
        ("http:///path", "must name a host"),
        ("http://example.com:99999/", "invalid port"),
        ("http://exa$mple.com/", "is not a valid host name"),
    ],
)
def test_urls_to_blocked_or_unusable_addresses_are_refused_at_create_time(url: str, message: str) -> None:
    with pytest.raises(services.JobValidationError) as refused:
        services.job_create(
            name="x", cron_expression="@daily", job_type="http_request", parameters={"url": url}, enabled=False
        )

    assert message in " ".join(refused.value.errors["parameters"]["url"])
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"method": "TRACE"}, "method", "not a valid choice"),
        ({"headers": {"X-Evil": "a\r\nHost: evil"}}, "headers", "line breaks"),
        ({"headers": {"Bad Name": "x"}}, "headers", "is not a valid header name"),
        ({"headers": {"X-A\n": "x"}}, "headers", "is not a valid header name"),
        ({"headers": {"Host": "evil.test"}}, "headers", "set by the scheduler"),
        ({"headers": {"Idempotency-Key": "mine"}}, "headers", "set by the scheduler"),
        ({"headers": {"X-A": "1", "x-a": "2"}}, "headers", "more than once"),
        ({"timeout_seconds": 0}, "timeout_seconds", "greater than or equal to 0.1"),
        ({"expected_status": [99]}, "expected_status", "greater than or equal to 100"),
        ({"max_redirects": 11}, "max_redirects", "less than or equal to 10"),
        ({"body": "x"}, "body", "unknown parameter"),
    ],
)
def test_bad_request_parameters_are_refused(parameters: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("http_request").validate_parameters({"url": "https://hooks.example.com/x", **parameters})

    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert message in str(detail[field])


@pytest.mark.parametrize(
    ("host", "answers", "message"),
    [
        ("internal.test", ["10.0.0.1"], "internal.test resolves to 10.0.0.1, a private address"),
        ("loopback.test", ["127.0.0.1"], "resolves to 127.0.0.1, a loopback address"),
        ("metadata.test", ["169.254.169.254"], "resolves to 169.254.169.254, a cloud metadata address"),
        ("aws6.test", ["fd00:ec2::254"], "a cloud metadata address"),
        ("v6.test", ["::1"], "resolves to ::1, a loopback address"),
        ("mapped.test", ["::ffff:169.254.169.254"], "a cloud metadata address"),
        ("mixed.test", ["93.184.216.34", "10.1.2.3"], "resolves to 10.1.2.3, a private address"),
    ],
)
def test_names_resolving_to_blocked_addresses_are_refused_at_send_time(
    make_run: MakeRun, dns: FakeDNS, host: str, answers: list[str], message: str
) -> None:
    dns.add(host, *answers)
    run = make_run("http_request", {"url": f"http://{host}/hook"})  # a name passes create-time checks

    with pytest.raises(BlockedAddress, match=message):
        get_executor("http_request").execute(run)
    assert dns.lookups == {host: 1}


@pytest.mark.parametrize(
    "to",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::1]:1/",
        "http://internal.test/",
        "http://localhost/",
    ],
)
def test_a_redirect_from_an_allowed_host_to_a_blocked_address_is_refused(
    local: LocalServer, make_run: MakeRun, dns: FakeDNS, to: str
) -> None:
    dns.add("internal.test", "10.0.0.1")

    with pytest.raises(BlockedAddress, match="refused"):
        call(make_run, method="GET", url=redirect(local, to))
    assert len(local.seen) == 1


def test_connects_to_the_checked_address_so_dns_rebinding_cannot_slip_through(
    server: LocalServer, make_run: MakeRun, dns: FakeDNS
) -> None:
    answers = iter([["127.0.0.1"]])
    dns.answers["rebind.test"] = lambda: next(answers, ["10.0.0.1"])  # a second lookup would go inside

    with allow("127.0.0.1"):
        result = call(make_run, method="GET", url=server.url(host="rebind.test"))

    assert result["status"] == 200
    assert server.seen[0].headers["Host"] == f"rebind.test:{server.port}"
    assert dns.lookups == {"rebind.test": 1}


@pytest.mark.parametrize(
    ("allowed", "url"),
    [
        (["127.0.0.1"], "http://127.0.0.1:{port}/"),
        (["127.0.0.0/8"], "http://127.0.0.1:{port}/"),
        (["service.internal"], "http://service.internal:{port}/"),
        ([".internal"], "http://service.internal:{port}/"),
    ],
)
def test_allowlisted_hosts_ips_and_networks_may_be_reached(
    server: LocalServer, make_run: MakeRun, dns: FakeDNS, allowed: list[str], url: str
) -> None:
    dns.add("service.internal", "127.0.0.1")

    with allow(*allowed):
        assert call(make_run, method="GET", url=url.format(port=server.port))["status"] == 200


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        ("93.184.216.34", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "a loopback address"),
        ("10.255.255.255", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.0.1", "a private address"),
        ("169.254.1.1", "a link-local address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.170.2", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("168.63.129.16", "a cloud metadata address"),
        ("192.0.0.192", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("::1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a private address"),
        ("ff02::1", "a multicast address"),
        ("240.0.0.1", "a private address"),
        ("100.64.0.1", "not a public address"),
        ("::ffff:127.0.0.1", "a loopback address (inside ::ffff:7f00:1)"),
        ("2002:a00:1::", "a private address (inside 2002:a00:1::)"),
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address (inside 64:ff9b::a9fe:a9fe)"),
    ],
)
def test_address_refusal(address: str, refusal: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == refusal


def test_a_wildcard_allowlist_stops_start_up() -> None:
    with allow("*"), pytest.raises(SystemCheckError, match="would switch the address check off"):
        call_command("check")


def test_http_request_is_safe_to_repeat() -> None:
    assert get_executor("http_request").safe_to_repeat is True


# --- HTTPS: certificate and SNI for the host name, connection to the checked address ------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=secure.test",
             "-addext", "subjectAltName=DNS:secure.test"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, dns: FakeDNS) -> Iterator[LocalServer]:
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate, as a CA bundle would
    dns.add("secure.test", "127.0.0.1")
    dns.add("wrong.test", "127.0.0.1")
    with allow("secure.test", "wrong.test"):
        yield from serve(context)


def test_https_verifies_the_certificate_for_the_host_name(tls_server: LocalServer, make_run: MakeRun) -> None:
    result = call(make_run, method="GET", url=tls_server.url(host="secure.test", scheme="https"))

    assert result["status"] == 200
    assert tls_server.seen[0].headers["Host"] == f"secure.test:{tls_server.port}"


def test_https_refuses_a_certificate_for_another_name(tls_server: LocalServer, make_run: MakeRun) -> None:
    with pytest.raises(HttpRequestError, match="CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError"):
        call(make_run, method="GET", url=tls_server.url(host="wrong.test", scheme="https"))
    assert tls_server.seen == []


def test_a_5xx_answer_is_retried_by_the_scheduler_with_the_same_idempotency_key(local: LocalServer) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from jobs import services
    from jobs.models import JobRun
    from jobs.scheduler.engine import Engine

    now = timezone.now()
    job = services.job_create(
        name="hook",
        cron_expression="0 0 1 1 *",
        job_type="http_request",
        parameters={"url": local.url("/status/503"), "method": "POST"},
        max_retries=1,
        retry_backoff_seconds=1,
    )
    services.job_trigger(job, now=now)
    first = Engine(max_concurrent=1, clock=lambda: now, heartbeat_seconds=3600).run_once()
    assert [outcome.status for outcome in first] == ["failed"]
    retry = JobRun.objects.get(job=job, attempt=2)
    assert (retry.status, retry.trigger) == ("queued", "retry")
    later = now + timedelta(seconds=5)
    second = Engine(max_concurrent=1, clock=lambda: later, heartbeat_seconds=3600).run_once()
    assert [(outcome.run.attempt, outcome.status) for outcome in second] == [(2, "failed")]
    keys = [seen.headers["Idempotency-Key"] for seen in local.seen]
    assert len(keys) == 2 and keys[0] == keys[1]


# --- header values read on the scheduler, never stored in the job ------------------------------

SECRET = "s3cret-token-4711"


@pytest.mark.parametrize(
    ("source", "set_it"),
    [
        ({"from_env": "ACME_TOKEN"}, lambda monkeypatch: monkeypatch.setenv("ACME_TOKEN", f" {SECRET}\n")),
        (
            {"from_setting": "ACME_TOKEN"},
            lambda monkeypatch: monkeypatch.setattr(settings, "ACME_TOKEN", SECRET, raising=False),
        ),
    ],
    ids=["environment", "setting"],
)
def test_a_header_value_read_on_the_scheduler_is_sent_but_never_stored_or_recorded(
    local: LocalServer, make_run: MakeRun, monkeypatch: pytest.MonkeyPatch, source: dict[str, str], set_it: Any
) -> None:
    set_it(monkeypatch)
    with jobs_settings(HTTP_ALLOWED_HOSTS=["127.0.0.1"], HTTP_HEADER_SECRETS=["ACME_TOKEN"]):
        run = make_run(
            "http_request",
            {"url": local.url("/echo-headers"), "headers": {"Authorization": {**source, "prefix": "Bearer "}}},
        )
        outcome = runner.execute(run)

    assert outcome.status == "succeeded"
    assert local.seen[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(Job.objects.get(pk=run.job_id).parameters)
    # The receiver echoed the headers back; the recorded body does not repeat the secret.
    assert SECRET not in json.dumps(outcome.result)
    assert json.loads(outcome.result["body"])["Authorization"] == "Bearer [redacted]"


def test_a_header_read_on_the_scheduler_is_not_sent_to_another_origin(
    local: LocalServer, make_run: MakeRun, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns.add("other.test", "127.0.0.1")
    monkeypatch.setenv("ACME_TOKEN", SECRET)
    with jobs_settings(HTTP_ALLOWED_HOSTS=["127.0.0.1", "other.test"], HTTP_HEADER_SECRETS=["ACME_TOKEN"]):
        run = make_run(
            "http_request",
            {
                "method": "GET",
                "url": redirect(local, redirect(local, local.url("/other", host="other.test"))),
                "headers": {"X-Api-Key": {"from_env": "ACME_TOKEN"}, "X-Plain": "kept"},
            },
        )
        assert runner.execute(run).status == "succeeded"

    same_origin, other_origin = local.seen[1], local.seen[2]
    assert same_origin.headers["X-Api-Key"] == SECRET
    assert other_origin.headers["X-Api-Key"] is None
    assert other_origin.headers["X-Plain"] == "kept"


def test_a_secret_echoed_into_a_failure_is_not_recorded(
    local: LocalServer, make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TOKEN", SECRET)
    with jobs_settings(HTTP_ALLOWED_HOSTS=["127.0.0.1"], HTTP_HEADER_SECRETS=["ACME_TOKEN"]):
        run = make_run(
            "http_request",
            {"url": local.url("/echo-headers?status=500"), "headers": {"X-Token": {"from_env": "ACME_TOKEN"}}},
        )
        outcome = runner.execute(run)

    assert outcome.status == "failed"
    assert "answered 500" in outcome.error
    assert SECRET not in outcome.error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "the environment variable ACME_TOKEN is not set on this scheduler"),
        ("   ", "the environment variable ACME_TOKEN is empty"),
        (
            f"{SECRET}\r\nX-Evil: 1",
            "the environment variable ACME_TOKEN holds a line break or a character outside Latin-1",
        ),
        (f"{SECRET}\u2603", "the environment variable ACME_TOKEN holds a line break or a character outside Latin-1"),
    ],
    ids=["missing", "empty", "line break", "not Latin-1"],
)
def test_a_missing_or_unsendable_secret_fails_the_run_naming_it_and_sends_nothing(
    local: LocalServer,
    make_run: MakeRun,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str | None,
    message: str,
) -> None:
    with jobs_settings(HTTP_ALLOWED_HOSTS=["127.0.0.1"], HTTP_HEADER_SECRETS=["ACME_TOKEN"]):
        # Saving needs only the name: the scheduler may run elsewhere, with its own environment.
        run = make_run("http_request", {"url": local.url(), "headers": {"X-Token": {"from_env": "ACME_TOKEN"}}})
        if value is not None:
            monkeypatch.setenv("ACME_TOKEN", value)
        outcome = runner.execute(run)

    assert outcome.status == "failed"
    assert f"HttpRequestError: header X-Token: {message}" in outcome.error
    assert SECRET not in outcome.error
    assert SECRET not in caplog.text
    assert local.seen == []


def test_a_name_taken_off_the_list_after_saving_is_not_read(
    local: LocalServer, make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TOKEN", SECRET)
    with jobs_settings(HTTP_HEADER_SECRETS=["ACME_TOKEN"]):
        run = make_run("http_request", {"url": local.url(), "headers": {"X-Token": {"from_env": "ACME_TOKEN"}}})

    outcome = runner.execute(run)

    assert outcome.status == "failed"
    assert "ACME_TOKEN may not be read" in outcome.error
    assert local.seen == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"from_env": "acme_token"}, "must be a name of capital letters, digits and underscores"),
        ({"from_env": "1TOKEN"}, "must be a name of capital letters"),
        ({"from_env": "SECRET_KEY"}, "SECRET_KEY may not be read: list it in JOBS['HTTP_HEADER_SECRETS']"),
        ({"from_setting": "DATABASES"}, "DATABASES may not be read"),
        ({"from_env": "ACME_TOKEN", "from_setting": "ACME_TOKEN"}, "exactly one of from_env and from_setting"),
        ({"prefix": "Bearer "}, "exactly one of from_env and from_setting"),
        ({"from_env": "ACME_TOKEN", "default": "x"}, "unknown key 'default'"),
        ({"from_env": "ACME_TOKEN", "prefix": "Bearer\r\n"}, "prefix must not contain line breaks"),
        ({"from_env": "ACME_TOKEN", "prefix": 7}, "prefix must be text"),
        (["ACME_TOKEN"], "must be text, or an object"),
        ("Bearer \u2603", "must be Latin-1 text"),
    ],
)
def test_bad_header_values_are_refused_at_create_time(value: Any, message: str) -> None:
    with (
        jobs_settings(HTTP_HEADER_SECRETS=["ACME_TOKEN"]),
        pytest.raises(serializers.ValidationError) as refused,
    ):
        get_executor("http_request").validate_parameters(
            {"url": "https://hooks.example.com/x", "headers": {"X-Token": value}}
        )

    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert message in str(detail["headers"])


def test_plain_header_values_are_kept_as_text() -> None:
    cleaned = get_executor("http_request").validate_parameters(
        {"url": "https://hooks.example.com/x", "headers": {"X-Count": 5, "X-Name": "  café  "}}
    )

    assert cleaned["headers"] == {"X-Count": "5", "X-Name": "café"}
