"""http_request against loopback receivers scripted byte for byte: every framing, redirects, TLS, deadlines.

Each receiver answers exactly the bytes a test gives it, so every way a web server frames an
answer (keep-alive, Connection: close, HTTP/1.0 without a length, chunked, bodiless statuses,
interim 1xx answers, broken answers) can be produced precisely, and it counts the requests it
reads, so a test can say the receiver got one delivery. Runs go through the scheduler's runner
(and once through the engine), so what is checked is what an operator sees on the run.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.utils import timezone

from jobs import services
from jobs.conf import problems
from jobs.executors import get_executor
from jobs.executors.base import OutcomeUnknown
from jobs.models import JobRun
from jobs.net import HttpRequestError
from jobs.scheduler import runner
from jobs.scheduler.engine import Engine
from jobs.tests.executors.conftest import FakeDNS, allow, jobs_settings

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("loopback_only", "dns")]

MakeRun = Callable[..., JobRun]
T = TypeVar("T")


# --- a receiver whose answers are scripted byte for byte ---------------------------------------


@dataclass
class Delivery:
    """One request as the receiver read it."""

    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Reply:
    """What the receiver does with one request: send bytes, pause (seconds), then `after`.

    `after` is "close" (close the connection), "keep" (read the next request on it) or "hang"
    (keep it open and say nothing more until the test ends).
    """

    parts: tuple[bytes | float, ...]
    after: str = "close"


def answer(status_line: str, *headers: str, body: bytes = b"") -> bytes:
    """The bytes of a status line, header lines, the blank line and `body`."""
    return "".join(f"{line}\r\n" for line in (status_line, *headers, "")).encode("latin-1") + body


class Receiver:
    """A loopback HTTP(S) receiver that answers each request target with a scripted Reply."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server((host, port))
        self.port: int = self.listener.getsockname()[1]
        self.tls = tls
        self.replies: dict[str, Reply] = {}
        self.deliveries: list[Delivery] = []
        self.stopped = threading.Event()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reply(self, target: str, *parts: bytes | float, after: str = "close") -> None:
        self.replies[target] = Reply(parts, after)

    def url(self, target: str = "/hook", *, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{target}"

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for conn in self._open:
            conn.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self._open.append(conn)
            reader = conn.makefile("rb")
            while (delivery := self._read(reader)) is not None:
                self.deliveries.append(delivery)
                reply = self.replies.get(delivery.target, Reply((answer("HTTP/1.1 404 Not Found"),)))
                for part in reply.parts:
                    if isinstance(part, float):
                        if self.stopped.wait(part):
                            return
                    else:
                        conn.sendall(part)
                if reply.after == "hang":
                    self.stopped.wait()
                if reply.after != "keep":
                    return
        except OSError:
            pass  # clients that give up and hang up are part of the tests
        finally:
            conn.close()

    def _read(self, reader: Any) -> Delivery | None:
        request_line = reader.readline()
        if not request_line:
            return None
        method, target, _ = request_line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", "0")))
        return Delivery(method, target, headers, body)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Start receivers (all allowlisted with 127.0.0.1 and the fake names the tests use)."""
    started: list[Receiver] = []

    def start(**kwargs: Any) -> Receiver:
        started.append(Receiver(**kwargs))
        return started[-1]

    with allow("127.0.0.1", "other.test", "secure.test", "blackhole.test", "slow-dns.test"):
        yield start
    for receiver in started:
        receiver.close()


@pytest.fixture
def receiver(receivers: Callable[..., Receiver]) -> Receiver:
    return receivers()


def run_of(make_run: MakeRun, *, job_timeout: int = 10, **parameters: Any) -> JobRun:
    """A run of an http_request job with these parameters and the job's `timeout_seconds` of `job_timeout`."""
    return make_run("http_request", parameters, timeout_seconds=job_timeout)


def ends_within(seconds: float, work: Callable[[], T]) -> tuple[T, float]:
    """Return what `work` returns and how long it took, or raise what it raised; fail if it is still
    running after `seconds`.

    It runs on a daemon thread so that a wait that ignores the deadline fails the test promptly
    instead of hanging the suite.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test below
            box["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"still running after {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"], elapsed


# --- every framing a web server uses: one delivery, the run succeeds, the result is right --------

OK_CLOSE = answer("HTTP/1.1 200 OK", "Connection: close", "Content-Length: 5", body=b"hello")

FRAMINGS: list[Any] = [
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Content-Length: 5", body=b"hello"),), "keep"), 200, "hello",
                 id="keep-alive with Content-Length"),
    pytest.param("POST", Reply((OK_CLOSE,)), 200, "hello", id="Connection: close"),
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Connection: close", body=b"hello"),)), 200, "hello",
                 id="HTTP/1.1 close with no length"),
    pytest.param("POST", Reply((answer("HTTP/1.0 200 OK", "Content-Type: text/plain", body=b"hello"),)), 200,
                 "hello", id="HTTP/1.0 with no length"),
    pytest.param("POST", Reply((answer("HTTP/1.0 200 OK", "Content-Length: 5", body=b"hello"),)), 200, "hello",
                 id="HTTP/1.0 with Content-Length"),
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Transfer-Encoding: chunked",
                                       body=b"2\r\nhe\r\n3;note=x\r\nllo\r\n0\r\nX-Trailer: 1\r\n\r\n"),), "keep"),
                 200, "hello", id="chunked, kept alive"),
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Connection: close",
                                       body=b"5\r\nhello\r\n0\r\n\r\n"),)), 200, "hello", id="chunked, then close"),
    pytest.param("POST", Reply((answer("HTTP/1.1 204 No Content"),), "keep"), 204, "", id="204 kept alive"),
    pytest.param("POST", Reply((answer("HTTP/1.1 204 No Content", "Connection: close"),)), 204, "",
                 id="204 then close"),
    pytest.param("POST", Reply((answer("HTTP/1.0 204 No Content"),), "hang"), 204, "",
                 id="HTTP/1.0 204, connection left open"),
    pytest.param("GET", Reply((answer("HTTP/1.1 304 Not Modified", "Content-Length: 50"),), "hang"), 304, "",
                 id="304 with a length but no body"),
    pytest.param("GET", Reply((answer("HTTP/1.0 304 Not Modified"),)), 304, "", id="HTTP/1.0 304"),
    pytest.param("HEAD", Reply((answer("HTTP/1.1 200 OK", "Content-Length: 5"),), "keep"), 200, "",
                 id="HEAD kept alive"),
    pytest.param("HEAD", Reply((answer("HTTP/1.1 200 OK", "Content-Length: 5", "Connection: close"),)), 200, "",
                 id="HEAD then close"),
    pytest.param("HEAD", Reply((answer("HTTP/1.0 200 OK"),), "hang"), 200, "",
                 id="HEAD on HTTP/1.0 with no length, connection left open"),
    pytest.param("POST", Reply((0.3, OK_CLOSE)), 200, "hello", id="slow first byte"),
    pytest.param("POST", Reply((answer("HTTP/1.1 102 Processing"), 0.1, answer("HTTP/1.1 103 Early Hints",
                                "Link: </style.css>; rel=preload"), answer("HTTP/1.1 200 OK", "Content-Length: 5",
                                body=b"hello")), "keep"), 200, "hello", id="interim 102 and 103 answers first"),
    pytest.param("POST", Reply((answer("HTTP/1.1 100 Continue"), OK_CLOSE)), 200, "hello",
                 id="an unasked-for 100 Continue first"),
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Content-Type: text/plain; charset=idna",
                                       "Content-Length: 5", body=b"hello"),)), 200, "hello",
                 id="a charset Python cannot decode with"),
    pytest.param("POST", Reply((answer("HTTP/1.1 200 OK", "Content-Type: text/plain; charset*=utf%00'en'x",
                                       "Content-Length: 5", body=b"hello"),)), 200, "hello",
                 id="a charset the email parser cannot read"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "reply", "status", "body"), FRAMINGS)
def test_every_framing_is_one_delivery_and_a_succeeded_run(
    receiver: Receiver, make_run: MakeRun, method: str, reply: Reply, status: int, body: str
) -> None:
    receiver.replies["/hook"] = reply
    run = run_of(make_run, method=method, url=receiver.url(), json={"n": 1}, expected_status=[status])

    outcome, elapsed = ends_within(5, lambda: runner.execute(run))

    assert (outcome.status, outcome.error) == ("succeeded", "")
    assert [(seen.method, seen.target) for seen in receiver.deliveries] == [(method, "/hook")]
    assert (outcome.result["status"], outcome.result["body"], outcome.result["body_truncated"]) == (status, body, False)
    assert elapsed < 3


def test_a_body_read_to_the_close_is_capped(receiver: Receiver, make_run: MakeRun) -> None:
    receiver.reply("/hook", answer("HTTP/1.0 200 OK", body=b"x" * 10_000))

    outcome = runner.execute(run_of(make_run, url=receiver.url()))

    assert outcome.status == "succeeded"
    assert (outcome.result["body"], outcome.result["body_truncated"]) == ("x" * 4096, True)


@pytest.mark.parametrize(
    ("reply", "cause"),
    [
        pytest.param(Reply((answer("HTTP/1.1 200 OK", "Content-Length: 100", body=b"only ten b"),)), "IncompleteRead",
                     id="closes mid-body"),
        pytest.param(Reply((answer("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", body=b"a\r\nonly"),)),
                     "IncompleteRead", id="closes mid-chunk"),
        pytest.param(Reply(()), "RemoteDisconnected", id="closes without answering"),
        pytest.param(Reply((b"HELLO THERE\r\n\r\n",)), "BadStatusLine", id="not HTTP"),
        pytest.param(Reply((answer("HTTP/2.0 200 OK"),)), "UnknownProtocol", id="an unknown protocol version"),
    ],
)  # fmt: skip
def test_a_broken_answer_after_the_request_was_delivered_is_an_unknown_outcome(
    receiver: Receiver, make_run: MakeRun, reply: Reply, cause: str
) -> None:
    receiver.replies["/hook"] = reply
    run = run_of(make_run, url=receiver.url())

    with pytest.raises(OutcomeUnknown, match=cause) as failure:
        get_executor("http_request").execute(run)

    assert isinstance(failure.value, HttpRequestError)
    assert len(receiver.deliveries) == 1


def test_a_redirect_chain_across_every_framing_is_followed(
    receivers: Callable[..., Receiver], make_run: MakeRun, dns: FakeDNS
) -> None:
    dns.add("other.test", "127.0.0.1")
    first, second = receivers(), receivers()
    first.reply("/a", answer("HTTP/1.1 307 Temporary Redirect", "Location: /b", "Content-Length: 0"), after="keep")
    first.reply("/b", answer("HTTP/1.1 308 Permanent Redirect", f"Location: {second.url('/c', host='other.test')}",
                             "Connection: close", "Content-Length: 7", body=b"go to c"))  # fmt: skip
    second.reply("/c", answer("HTTP/1.1 303 See Other", "Location: d/e?x=1", "Transfer-Encoding: chunked",
                              body=b"0\r\n\r\n"), after="keep")  # fmt: skip
    second.reply("/d/e?x=1", answer("HTTP/1.0 302 Found", "Location: ../f", body=b"moved"))
    second.reply("/f", answer("HTTP/1.1 301 Moved Permanently", "Location: /g", "Connection: close"))
    second.reply("/g", answer("HTTP/1.0 200 OK", body=b"arrived"))
    run = run_of(make_run, method="POST", url=first.url("/a"), json={"n": 1})

    outcome = runner.execute(run)

    assert (outcome.status, outcome.error) == ("succeeded", "")
    hops = [(seen.method, seen.target, seen.body) for seen in first.deliveries + second.deliveries]
    assert hops == [
        ("POST", "/a", b'{"n":1}'),
        ("POST", "/b", b'{"n":1}'),
        ("POST", "/c", b'{"n":1}'),
        ("GET", "/d/e?x=1", b""),
        ("GET", "/f", b""),
        ("GET", "/g", b""),
    ]
    assert outcome.result["status"] == 200
    assert outcome.result["body"] == "arrived"
    assert outcome.result["url"] == second.url("/g", host="other.test")
    assert outcome.result["redirects"] == [
        first.url("/b"),
        *(second.url(path, host="other.test") for path in ("/c", "/d/e?x=1", "/f", "/g")),
    ]
    assert dns.lookups == {"other.test": 4}  # the address guard looks every hop up again


def test_one_delivery_and_a_succeeded_row_through_the_engine_with_retries_left(
    receiver: Receiver, make_run: MakeRun
) -> None:
    receiver.reply("/hook", OK_CLOSE)
    now = timezone.now()
    job = services.job_create(
        name="hook",
        cron_expression="0 0 1 1 *",
        job_type="http_request",
        parameters={"url": receiver.url(), "method": "POST", "json": {"n": 1}},
        max_retries=2,
        retry_backoff_seconds=1,
    )
    services.job_trigger(job, now=now)

    outcomes = Engine(max_concurrent=1, clock=lambda: now, heartbeat_seconds=3600).run_once()
    later = now + timedelta(minutes=5)
    again = Engine(max_concurrent=1, clock=lambda: later, heartbeat_seconds=3600).run_once()

    assert [outcome.status for outcome in outcomes] == ["succeeded"]
    assert again == []
    assert list(JobRun.objects.filter(job=job).values_list("attempt", "status")) == [(1, "succeeded")]
    result = JobRun.objects.get(job=job).result
    assert result is not None and result["body"] == "hello"
    assert len(receiver.deliveries) == 1


# --- HTTPS: a certificate authority made in the test, trusted through JOBS["HTTP_CA_BUNDLE"] ------


@dataclass
class Authority:
    """A certificate authority made with openssl, and a server certificate it signed."""

    ca: Path
    cert: Path
    key: Path
    names: list[str] = field(default_factory=list)


def make_authority(directory: Path, *names: str) -> Authority:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, request = directory / "server.pem", directory / "server.key", directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName={','.join(f'DNS:{name}' for name in names)}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", f"/CN=Test CA {directory.name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={names[0]}")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-out", str(cert), "-extfile", str(extensions))  # fmt: skip
    return Authority(ca, cert, key, list(names))


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    try:
        return make_authority(tmp_path_factory.mktemp("tls"), "secure.test")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make test certificates: {exc}")


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    try:
        return make_authority(tmp_path_factory.mktemp("tls-other"), "unrelated.test")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make test certificates: {exc}")


@pytest.fixture
def tls_receiver(
    receivers: Callable[..., Receiver], authority: Authority, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> Receiver:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(authority.cert, authority.key)
    dns.add("secure.test", "127.0.0.1")
    # The system store must not happen to trust the test CA: point it at an empty bundle.
    empty = authority.ca.parent / "empty.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return receivers(tls=context)


def test_https_to_a_ca_trusted_through_the_setting_is_one_delivery(
    tls_receiver: Receiver, authority: Authority, make_run: MakeRun
) -> None:
    tls_receiver.reply("/hook", OK_CLOSE)
    run = run_of(make_run, url=tls_receiver.url(host="secure.test", scheme="https"), json={"n": 1})

    with jobs_settings(HTTP_ALLOWED_HOSTS=["secure.test"], HTTP_CA_BUNDLE=str(authority.ca)):
        outcome = runner.execute(run)

    assert (outcome.status, outcome.error) == ("succeeded", "")
    assert (outcome.result["status"], outcome.result["body"]) == (200, "hello")
    assert [seen.headers["host"] for seen in tls_receiver.deliveries] == [f"secure.test:{tls_receiver.port}"]


def test_the_ca_bundle_adds_to_the_system_store(
    tls_receiver: Receiver, authority: Authority, other_authority: Authority, make_run: MakeRun,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    tls_receiver.reply("/hook", OK_CLOSE)
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.ca))  # the "system" store trusts the receiver's CA
    run = run_of(make_run, url=tls_receiver.url(host="secure.test", scheme="https"))

    with jobs_settings(HTTP_ALLOWED_HOSTS=["secure.test"], HTTP_CA_BUNDLE=str(other_authority.ca)):
        outcome = runner.execute(run)

    assert (outcome.status, outcome.error) == ("succeeded", "")


def test_https_without_the_ca_is_refused_before_anything_is_sent(tls_receiver: Receiver, make_run: MakeRun) -> None:
    run = run_of(make_run, url=tls_receiver.url(host="secure.test", scheme="https"))

    with pytest.raises(HttpRequestError, match="CERTIFICATE_VERIFY_FAILED") as failure:
        get_executor("http_request").execute(run)

    assert not isinstance(failure.value, OutcomeUnknown)
    assert tls_receiver.deliveries == []


def test_an_unreadable_ca_bundle_fails_the_run_naming_the_setting(
    tls_receiver: Receiver, make_run: MakeRun, tmp_path: Path
) -> None:
    not_pem = tmp_path / "bundle.pem"
    not_pem.write_text("not a certificate")
    run = run_of(make_run, url=tls_receiver.url(host="secure.test", scheme="https"))

    with (
        jobs_settings(HTTP_ALLOWED_HOSTS=["secure.test"], HTTP_CA_BUNDLE=str(not_pem)),
        pytest.raises(HttpRequestError, match=re.escape(f"JOBS['HTTP_CA_BUNDLE'] ({not_pem}) cannot be loaded")),
    ):
        get_executor("http_request").execute(run)
    assert tls_receiver.deliveries == []
    # A file that is not there does not get that far: start-up refuses it (jobs.conf).
    missing = tmp_path / "missing.pem"
    with jobs_settings(HTTP_CA_BUNDLE=str(missing)):
        assert problems() == [f"JOBS['HTTP_CA_BUNDLE']: {str(missing)!r} is not a readable file"]


# --- deadlines: the limit covers the whole request, and the run's timeout bounds it too ---------


def test_a_receiver_that_never_answers_times_the_run_out_at_the_jobs_timeout(
    receiver: Receiver, make_run: MakeRun
) -> None:
    receiver.reply("/hook", after="hang")
    run = run_of(make_run, url=receiver.url(), job_timeout=1, timeout_seconds=30)

    outcome, elapsed = ends_within(2, lambda: runner.execute(run))

    assert outcome.status == "timed_out"
    assert "the job's timeout of 1s ran out" in outcome.error
    assert len(receiver.deliveries) == 1
    assert elapsed > 0.9


def test_a_receiver_that_never_answers_fails_the_request_at_its_own_limit(
    receiver: Receiver, make_run: MakeRun
) -> None:
    receiver.reply("/hook", after="hang")
    run = run_of(make_run, url=receiver.url(), job_timeout=30, timeout_seconds=0.5)

    with pytest.raises(OutcomeUnknown, match=r"timed out after 0.5s") as failure:
        ends_within(1.2, lambda: get_executor("http_request").execute(run))

    assert isinstance(failure.value, HttpRequestError)


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param((b"HTTP/1.1 200 OK\r\n", *[0.1, b"X"] * 40), id="headers one byte at a time"),
        pytest.param((answer("HTTP/1.1 200 OK", "Content-Length: 100", "Connection: close"), *[0.1, b"x"] * 40),
                     id="body one byte at a time, then close"),
        pytest.param((answer("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"), *[0.1, b"1\r\nx\r\n"] * 40),
                     id="one chunk at a time"),
        pytest.param((answer("HTTP/1.0 200 OK"), *[0.1, b"x"] * 40), id="HTTP/1.0 body to the close, dripping"),
    ],
)  # fmt: skip
def test_a_dripping_answer_cannot_stretch_the_limit(
    receiver: Receiver, make_run: MakeRun, parts: tuple[bytes | float, ...]
) -> None:
    receiver.reply("/hook", *parts)
    run = run_of(make_run, method="GET", url=receiver.url(), timeout_seconds=0.6)

    with pytest.raises(OutcomeUnknown, match=r"timed out after 0.6s"):
        ends_within(1.3, lambda: get_executor("http_request").execute(run))


@pytest.fixture
def slow_dns(dns: FakeDNS) -> Iterator[Callable[[str, float], None]]:
    """Make names answer only after a delay (getaddrinfo takes no timeout of its own)."""
    released = threading.Event()

    def add(name: str, delay: float) -> None:
        dns.answers[name] = lambda: [] if released.wait(delay) else ["127.0.0.1"]

    yield add
    released.set()


def test_a_slow_dns_answer_counts_against_the_limit(
    receiver: Receiver, make_run: MakeRun, slow_dns: Callable[[str, float], None]
) -> None:
    slow_dns("slow-dns.test", 5)
    run = run_of(make_run, url=receiver.url(host="slow-dns.test"), timeout_seconds=0.5)

    with pytest.raises(HttpRequestError, match=r"timed out after 0.5s") as failure:
        ends_within(1.2, lambda: get_executor("http_request").execute(run))

    assert not isinstance(failure.value, OutcomeUnknown)  # nothing was sent
    assert receiver.deliveries == []


def test_a_slow_dns_answer_counts_against_the_jobs_timeout(
    receiver: Receiver, make_run: MakeRun, slow_dns: Callable[[str, float], None]
) -> None:
    slow_dns("slow-dns.test", 5)
    run = run_of(make_run, url=receiver.url(host="slow-dns.test"), job_timeout=1)

    outcome, elapsed = ends_within(2, lambda: runner.execute(run))

    assert outcome.status == "timed_out"
    assert elapsed < 2


def test_the_limit_covers_dns_and_the_tls_handshake_together(
    receivers: Callable[..., Receiver], make_run: MakeRun, slow_dns: Callable[[str, float], None]
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never says a word of TLS
    slow_dns("slow-dns.test", 0.7)
    run = run_of(make_run, url=f"https://slow-dns.test:{silent.getsockname()[1]}/hook", timeout_seconds=1.0)

    try:
        with pytest.raises(HttpRequestError, match=r"timed out after 1s"):
            ends_within(1.5, lambda: get_executor("http_request").execute(run))
    finally:
        silent.close()


def black_hole(host: str, port: int = 0) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose backlog is full, so that further connection attempts get no answer."""
    listener = socket.socket()
    listener.bind((host, port))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.05)
    return listener, fillers


def test_a_name_with_two_unreachable_addresses_takes_the_limit_not_twice_it(make_run: MakeRun, dns: FakeDNS) -> None:
    holes = [black_hole("127.0.0.1")]
    port = holes[0][0].getsockname()[1]
    try:
        holes.append(black_hole("127.0.0.2", port))
        dns.add("blackhole.test", "127.0.0.1", "127.0.0.2")
        run = run_of(make_run, url=f"http://blackhole.test:{port}/hook", timeout_seconds=0.8)
        with allow("blackhole.test"), pytest.raises(HttpRequestError, match=r"timed out after 0.8s") as failure:
            ends_within(1.3, lambda: get_executor("http_request").execute(run))
    finally:
        for listener, fillers in holes:
            for sock in (listener, *fillers):
                sock.close()

    assert not isinstance(failure.value, OutcomeUnknown)  # nothing was sent
