"""The pinned-connection HTTP client: one request, or a chain of redirects, within one deadline.

One deadline bounds the whole request (the lookup, every connection attempt, the TLS handshake,
sending, and reading the status line, headers and body of every hop): the sooner of the
request's own limit and the run's timeout. Every wait takes only what is left of it, so a
server that drips its answer a byte at a time cannot stretch it.
"""

from __future__ import annotations

import http.client
import math
import socket
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urljoin

from jobs.executors.base import ExecutorError, RunTimedOut, seconds_left

from . import AnswerLost, HttpRequestError
from .guard import Allowlist, Target, parse_target, resolve

if TYPE_CHECKING:
    from jobs.models import JobRun

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BODY_PREVIEW_BYTES = 4096
# Dropped when a redirect leaves the origin, as browsers, curl and requests do.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
REDACTED = "[redacted]"


@dataclass(frozen=True)
class Deadline:
    """When a request must be over: at its `timeout_seconds` or at its run's timeout, whichever is sooner."""

    at: float  # a time.monotonic() value
    limit: float  # the request's timeout_seconds
    run_timeout: int | None = None  # the job's timeout_seconds, when that is the sooner

    @classmethod
    def for_run(cls, run: JobRun, limit: float) -> Deadline:
        """Return the deadline of a request of `run`; raise RunTimedOut if the run has no time left."""
        now = time.monotonic()
        run_left = seconds_left(run)
        if run_left < limit:
            return cls(now + run_left, limit, run.job.timeout_seconds)
        return cls(now + limit, limit)

    def left(self) -> float:
        """Return the seconds left; raise TimeoutError when none are (send() says which limit it was)."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline has passed")
        return left

    def expired(self, request: str, *, sent: bool) -> ExecutorError:
        """Return the error for `request` running out of time, before or after it was sent."""
        if self.run_timeout is not None:
            when = "before an answer came" if sent else "before it was sent"
            return RunTimedOut(f"{request}: the job's timeout of {self.run_timeout}s ran out {when}")
        message = f"{request} timed out after {self.limit:g}s"
        return AnswerLost(message) if sent else HttpRequestError(message)


@dataclass(frozen=True)
class Request:
    """One request to send: a method, where to, its headers and its body."""

    method: str
    target: Target
    headers: dict[str, str]
    body: bytes | None = None


@dataclass
class Response:
    status: int
    reason: str
    location: str | None
    content_type: str
    body: bytes
    truncated: bool
    charset: str = "utf-8"

    def text(self) -> str:
        try:
            return self.body.decode(self.charset, "replace")
        except (LookupError, ValueError):  # a charset Python does not know, or one that cannot decode (idna)
            return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Exchange:
    """Where a request ended: the last request sent, its answer, and the URLs that redirects led to."""

    request: Request
    response: Response
    redirects: list[str]


def redact(text: str, secrets: Collection[str]) -> str:
    """Return `text` with every secret replaced, for a receiver that echoes what it was sent."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def fetch(
    request: Request,
    *,
    allowlist: Allowlist,
    deadline: Deadline,
    max_redirects: int,
    credentials: Collection[str] = CREDENTIAL_HEADERS,
    secrets: Collection[str] = (),
) -> Exchange:
    """Send `request` and follow at most `max_redirects` redirects (0: none), each hop checked by send().

    Headers named in `credentials` (lower case) are dropped once a redirect leaves the origin;
    `secrets` are redacted from the locations that errors quote.
    """
    redirects: list[str] = []
    while True:
        response = send(request, allowlist=allowlist, deadline=deadline)
        if response.status not in REDIRECT_STATUSES or not response.location or max_redirects == 0:
            break
        if len(redirects) >= max_redirects:
            raise HttpRequestError(f"more than {max_redirects} redirects; last to {redact(response.location, secrets)}")
        try:
            target = parse_target(urljoin(request.target.url, response.location))
        except ValueError as exc:
            raise HttpRequestError(f"refused redirect to {redact(response.location, secrets)!r}: {exc}") from exc
        method, headers, body = request.method, request.headers, request.body
        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
            # As browsers do: the follow-up is a GET without the body.
            method = "HEAD" if method == "HEAD" else "GET"
            body = None
            headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
        if target.origin != request.target.origin:
            headers = {name: value for name, value in headers.items() if name.lower() not in credentials}
        request = Request(method, target, headers, body)
        redirects.append(target.url)
    return Exchange(request, response, redirects)


def send(request: Request, *, allowlist: Allowlist, deadline: Deadline) -> Response:
    """Send one request (no redirects followed) and read at most BODY_PREVIEW_BYTES of the answer.

    Every wait ends by `deadline`. A network or protocol failure leaves as HttpRequestError
    (AnswerLost once the request may have reached the receiver), or as RunTimedOut when the
    run's own timeout is what ran out; nothing else.
    """
    method, target = request.method, request.target
    described = f"{method} {target.url}"
    try:
        addresses = resolve(target, allowlist, deadline)
    except TimeoutError as exc:
        raise deadline.expired(described, sent=False) from exc
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = PinnedHTTPSConnection(
            target.host, target.port, addresses=addresses, deadline=deadline, context=tls_context()
        )
    else:
        connection = PinnedHTTPConnection(target.host, target.port, addresses=addresses, deadline=deadline)
    sent = False
    answer: http.client.HTTPResponse | None = None
    try:
        connection.connect()
        sent = True  # from here on, the receiver may have the request whatever fails next
        connection.request(method, target.path, body=request.body, headers=request.headers)
        answer = connection.getresponse()
        return read_answer(answer)
    except TimeoutError as exc:
        raise deadline.expired(described, sent=sent) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: http.client, ssl and email report some malformed input that way.
        error = AnswerLost if sent else HttpRequestError
        raise error(f"{described} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        # The answer holds the socket once http.client has let go of it (a closing answer).
        if answer is not None:
            answer.close()
        connection.close()


def read_answer(answer: http.client.HTTPResponse) -> Response:
    """Read an answer's body, however it is framed, up to BODY_PREVIEW_BYTES (and one byte to tell if there was more).

    http.client frames it (a length, chunks, or up to the close; none for HEAD, 1xx, 204 and
    304); the sockets bound each read by the request's deadline.
    """
    announced = answer.length  # the Content-Length, or None for chunks or a body ending at the close
    chunks: list[bytes] = []
    size = 0
    truncated = False
    while True:
        chunk = answer.read1(BODY_PREVIEW_BYTES + 1 - size)
        if not chunk:
            if announced is not None and size < announced:
                # http.client ends a body cut short by a close quietly; what was announced did not arrive.
                raise http.client.IncompleteRead(b"".join(chunks), announced - size)
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > BODY_PREVIEW_BYTES:
            truncated = True
            break
    try:
        charset = answer.headers.get_content_charset() or "utf-8"
    except ValueError:  # a charset parameter the email parser cannot decode
        charset = "utf-8"
    return Response(
        status=answer.status,
        reason=answer.reason,
        location=answer.getheader("Location"),
        content_type=answer.getheader("Content-Type", ""),
        body=b"".join(chunks)[:BODY_PREVIEW_BYTES],
        truncated=truncated,
        charset=charset,
    )


# mypy sees the mixin below as a socket, so that its super() calls are checked; at run time
# it is a plain mixin, put in front of socket.socket or ssl.SSLSocket.
if TYPE_CHECKING:
    _SocketBase = socket.socket
else:
    _SocketBase = object


class _DeadlineIO(_SocketBase):
    """Give every send and receive only the time left before `deadline`, not a fresh timeout each.

    http.client reads a status or header line with as many receives as the server takes to send
    it, and ssl sends a body in pieces, so a per-call timeout would let a server that drips a
    byte at a time hold the request (and the run's thread) for as long as it likes.
    """

    deadline: float = math.inf  # a time.monotonic() value

    def _bound(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline has passed")
        self.settimeout(None if left == math.inf else left)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._bound()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._bound()
        return super().recv_into(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._bound()
        return super().send(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._bound()
        super().sendall(*args, **kwargs)


class _DeadlineSocket(_DeadlineIO, socket.socket):
    """A TCP socket whose every wait ends by its deadline."""


class _DeadlineSSLSocket(_DeadlineIO, ssl.SSLSocket):
    """A TLS socket whose every wait ends by its deadline (the handshake by the timeout set before it)."""


def _connect(addresses: list[tuple[int, Any]], deadline: Deadline) -> _DeadlineSocket:
    """Connect to the first address that accepts; all attempts share the deadline, none gets a fresh one."""
    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = deadline.at
        try:
            sock.settimeout(deadline.left())
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise  # the deadline has come: a next address would get no time at all
            error = exc
        except BaseException:
            sock.close()
            raise
    assert error is not None
    raise error


class FinalResponse(http.client.HTTPResponse):
    """A response that passes over interim answers (102 Processing, 103 Early Hints) to the final one.

    http.client skips only 100 Continue; it would take any other 1xx for the answer and leave
    the real one unread. Its private `_read_status` is the one place to step in.
    """

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            # 100 is skipped by http.client itself; 101 (switching protocols) is an answer, never asked for.
            if not 100 < status < 200 or status == 101:
                return version, status, reason
            # Skip the interim answer's header lines, within http.client's own limits.
            for _ in range(100 + 1):
                line = self.fp.readline(65536 + 1)
                if len(line) > 65536:
                    raise http.client.LineTooLong("header line")
                if line in (b"\r\n", b"\n", b""):
                    break
            else:
                raise http.client.HTTPException("an interim answer has more than 100 headers")


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand, never to a fresh DNS answer."""

    response_class = FinalResponse

    def __init__(self, host: str, port: int, *, addresses: list[tuple[int, Any]], deadline: Deadline) -> None:
        super().__init__(host, port)
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self._deadline)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; certificate and SNI still use the host name."""

    response_class = FinalResponse

    def __init__(
        self,
        host: str,
        port: int,
        *,
        addresses: list[tuple[int, Any]],
        deadline: Deadline,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, context=context)
        self._addresses = addresses
        self._deadline = deadline
        self._tls = context

    def connect(self) -> None:
        sock = _connect(self._addresses, self._deadline)
        try:
            sock.settimeout(self._deadline.left())  # the handshake waits at most for what is left
            tls = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        cast(_DeadlineSSLSocket, tls).deadline = self._deadline.at
        self.sock = tls


def tls_context() -> ssl.SSLContext:
    """Return a context trusting the system's certificate authorities and those in JOBS["HTTP_CA_BUNDLE"]."""
    from jobs.conf import config

    context = ssl.create_default_context()
    bundle = config().http_ca_bundle
    if bundle:
        # load_verify_locations adds to the system store; create_default_context(cafile=...) would replace it.
        try:
            context.load_verify_locations(cafile=bundle)
        except (OSError, TypeError, ValueError) as exc:
            raise HttpRequestError(f"JOBS['HTTP_CA_BUNDLE'] ({bundle}) cannot be loaded: {exc}") from exc
    context.sslsocket_class = _DeadlineSSLSocket
    return context
