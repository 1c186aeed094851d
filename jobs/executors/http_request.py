"""http_request: call a webhook, refusing private and metadata addresses unless allowlisted.

The address check runs on the resolved address at send time, for every redirect hop, and the
connection then goes to exactly the address that was checked (the Host header and TLS SNI still
name the host), so a DNS answer that changes between check and connect cannot slip past it.

One deadline bounds the whole request (the lookup, every connection attempt, the TLS handshake,
sending, and reading the status line, headers and body of every hop): the sooner of the
`timeout_seconds` parameter and the run's own timeout. Every wait takes only what is left of
it, so a server that drips its answer a byte at a time cannot stretch it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urljoin, urlsplit

from django.conf import settings
from rest_framework import serializers

from .base import Executor, ExecutorError, OutcomeUnknown, RunTimedOut, seconds_left

if TYPE_CHECKING:
    from jobs.models import JobRun

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BODY_PREVIEW_BYTES = 4096
MAX_JSON_BYTES = 1024 * 1024
USER_AGENT = "job-scheduler/1.0 (http_request job type)"
DEFAULT_PORTS = {"http": 80, "https": 443}

# Headers the executor owns: framing, routing and the idempotency promise.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "idempotency-key",
    }
)
# Dropped when a redirect leaves the origin, as browsers, curl and requests do.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# Header values may be read from these, by name, when the request is sent.
SECRET_SOURCES = {"from_env": "environment variable", "from_setting": "setting"}
_SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
REDACTED = "[redacted]"

# Instance metadata and platform endpoints. Most are link-local or private anyway; some
# (Azure's wire server) are public addresses and need naming.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
        "192.0.0.192",  # Oracle Cloud
    )
)
METADATA_HOSTNAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class HttpRequestError(ExecutorError):
    """The request failed: connection, timeout, redirect or status."""


class BlockedAddress(HttpRequestError):
    """The URL leads to an address that jobs may not reach."""


class AnswerLost(HttpRequestError, OutcomeUnknown):
    """The request may have reached the receiver, but no whole answer came back."""


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


def address_refusal(ip: IPAddress) -> str | None:
    """Return why `ip` may not be reached, or None for an ordinary public address."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address | None] = [ip.ipv4_mapped, ip.sixtofour]
        if ip.teredo:
            embedded.append(ip.teredo[1])
        if ip in NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (reason := address_refusal(inner)):
                return f"{reason} (inside {ip})"
    for flag, reason in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(ip, flag):
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """Return the address a host names literally (including forms like '2130706433' or '0x7f.1'), or None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fx.]+", host) and any(ch.isdigit() for ch in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Allowlist:
    """JOBS["HTTP_ALLOWED_HOSTS"]: host names, '.suffix' for a domain and its subdomains, IPs, or networks."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Any) -> Allowlist:
        """Build from settings; raise ValueError on an entry that cannot be understood."""
        if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
            raise ValueError("must be a list of host names, IP addresses or networks")
        names, suffixes, networks = set(), [], []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"{entry!r} is not a host name, IP address or network")
            value = entry.strip().lower().rstrip(".")
            if value == "*" or value == ".":
                raise ValueError("'*' would switch the address check off; list the hosts instead")
            try:
                networks.append(ipaddress.ip_network(value.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if value.startswith("."):
                suffixes.append(value)
                continue
            if not _HOSTNAME.fullmatch(value):
                raise ValueError(f"{entry!r} is not a host name, IP address or network")
            names.add(value)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @classmethod
    def from_settings(cls) -> Allowlist:
        from jobs.conf import get

        try:
            return cls.parse(get("HTTP_ALLOWED_HOSTS"))
        except ValueError as exc:
            raise HttpRequestError(f"JOBS['HTTP_ALLOWED_HOSTS'] {exc}") from exc

    def allows_host(self, host: str) -> bool:
        return host in self.names or any(host == s[1:] or host.endswith(s) for s in self.suffixes)

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == network.version and ip in network for network in self.networks)


@dataclass(frozen=True)
class Target:
    """A parsed http(s) URL: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str  # the request target: path and query, percent-encoded

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def parse_target(url: str) -> Target:
    """Parse an http(s) URL; raise ValueError with a readable message when it is unusable."""
    if _CONTROL_OR_SPACE.search(url):
        raise ValueError("must not contain spaces, line breaks or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("the scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials; send them in an Authorization header")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("must name a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if literal_ip(host) is None:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{host!r} is not a valid host name") from exc
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name")
    safe = "/%:@!$&'()*+,;=-._~"
    path = quote(parts.path or "/", safe=safe)
    query = quote(parts.query, safe=safe + "?")
    return Target(scheme, host, port, path + (f"?{query}" if query else ""))


def refusal_for_host(host: str, allowlist: Allowlist) -> str | None:
    """Return why a URL's host is refused before any lookup (literal addresses, localhost), or None."""
    if allowlist.allows_host(host):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is a loopback name"
    if host in METADATA_HOSTNAMES:
        return f"{host} is a cloud metadata name"
    ip = literal_ip(host)
    if ip is not None and not allowlist.allows_ip(ip) and (reason := address_refusal(ip)):
        return f"{host} is {reason}"
    return None


def _getaddrinfo(host: str, port: int, deadline: Deadline) -> list[Any]:
    """Look `host` up, waiting no longer than `deadline` allows; raise TimeoutError when it does not answer in time.

    getaddrinfo() takes no timeout and cannot be interrupted, so it runs on a daemon thread that
    is left behind (to end with the system resolver's own timeout) when the deadline comes first.
    """
    answer: list[Any] = []
    failure: list[Exception] = []

    def look_up() -> None:
        try:
            answer.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            failure.append(exc)

    thread = threading.Thread(target=look_up, name=f"http_request lookup of {host}", daemon=True)
    thread.start()
    thread.join(deadline.left())
    if thread.is_alive():
        raise TimeoutError(f"no answer from DNS for {host}")
    if failure:
        raise failure[0]
    return answer


def resolve(target: Target, allowlist: Allowlist, deadline: Deadline) -> list[tuple[int, Any]]:
    """Resolve the host once and check every address; return (family, sockaddr) pairs to connect to."""
    if reason := refusal_for_host(target.host, allowlist):
        raise BlockedAddress(f"refused {target.url}: {reason}; allow it in JOBS['HTTP_ALLOWED_HOSTS'] if intended")
    try:
        infos = _getaddrinfo(target.host, target.port, deadline)
    except socket.gaierror as exc:
        raise HttpRequestError(f"cannot resolve {target.host}: {exc}") from exc
    trusted_name = allowlist.allows_host(target.host)
    addresses: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host = cast(str, sockaddr[0])  # an AF_INET or AF_INET6 address starts with the host string
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if not trusted_name and not allowlist.allows_ip(ip) and (reason := address_refusal(ip)):
            # One bad answer refuses the lot: a name that also points inside is not a public service.
            raise BlockedAddress(
                f"refused {target.url}: {target.host} resolves to {ip}, {reason}; "
                "allow it in JOBS['HTTP_ALLOWED_HOSTS'] if intended"
            )
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    if not addresses:
        raise HttpRequestError(f"{target.host} has no IPv4 or IPv6 address")
    return addresses


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
    from jobs.conf import get

    context = ssl.create_default_context()
    bundle = get("HTTP_CA_BUNDLE")
    if bundle:
        # load_verify_locations adds to the system store; create_default_context(cafile=...) would replace it.
        try:
            context.load_verify_locations(cafile=bundle)
        except (OSError, TypeError, ValueError) as exc:
            raise HttpRequestError(f"JOBS['HTTP_CA_BUNDLE'] ({bundle}) cannot be loaded: {exc}") from exc
    context.sslsocket_class = _DeadlineSSLSocket
    return context


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


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise serializers.ValidationError(f"{value!r} is not a valid header name")
    if value.lower() in RESERVED_HEADERS:
        raise serializers.ValidationError(f"{value} is set by the scheduler and cannot be given")
    return value


def _header_text_problem(value: str) -> str | None:
    """Return why `value` cannot go into a header line, or None."""
    if "\r" in value or "\n" in value or "\x00" in value:
        return "must not contain line breaks (header injection)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "must be Latin-1 text: HTTP header values cannot carry other characters (encode them first)"
    return None


def secret_names() -> frozenset[str]:
    """JOBS["HTTP_HEADER_SECRETS"]: the environment variables and settings that header values may be read from."""
    from jobs.conf import get

    names = get("HTTP_HEADER_SECRETS")
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise HttpRequestError("JOBS['HTTP_HEADER_SECRETS'] must be a list of names")
    return frozenset(name for name in names if isinstance(name, str))


class HeaderValueField(serializers.Field):
    """A header value: text, or {"from_env" | "from_setting": NAME, "prefix": "..."} read when the request is sent.

    A secret then lives on the scheduler (its environment or settings), not in the job's
    parameters, which whoever may view the job can read. Only names an operator listed in
    JOBS["HTTP_HEADER_SECRETS"] may be read: otherwise anyone who may create a job could send
    the scheduler's SECRET_KEY or database password to a URL of their choosing.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(
            "help_text",
            'Text, or {"from_env": NAME} / {"from_setting": NAME} (optionally with "prefix": "Bearer ") '
            "to read the value on the scheduler when the request is sent.",
        )
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str | dict[str, str]:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            data = str(data)  # as the CharField this replaced accepted
        if isinstance(data, str):
            if len(data) > 8192:
                raise serializers.ValidationError("at most 8192 characters")
            if problem := _header_text_problem(data):
                raise serializers.ValidationError(problem)
            return data.strip()
        if not isinstance(data, dict):
            raise serializers.ValidationError('must be text, or an object such as {"from_env": "WEBHOOK_TOKEN"}')
        if unknown := sorted(set(data) - {*SECRET_SOURCES, "prefix"}):
            raise serializers.ValidationError(f"unknown key {unknown[0]!r}: give from_env or from_setting, and prefix")
        sources = [key for key in SECRET_SOURCES if key in data]
        if len(sources) != 1:
            raise serializers.ValidationError("give exactly one of from_env and from_setting")
        source, name = sources[0], data[sources[0]]
        if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
            raise serializers.ValidationError(
                f"{source} must be a name of capital letters, digits and underscores, such as WEBHOOK_TOKEN"
            )
        try:
            allowed = secret_names()
        except HttpRequestError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if name not in allowed:
            # The variable itself need not exist here: the scheduler may run on another host.
            raise serializers.ValidationError(
                f"{name} may not be read: list it in JOBS['HTTP_HEADER_SECRETS'] to let jobs send it"
            )
        prefix = data.get("prefix", "")
        if not isinstance(prefix, str) or len(prefix) > 256:
            raise serializers.ValidationError("prefix must be text of at most 256 characters")
        if problem := _header_text_problem(prefix):
            raise serializers.ValidationError(f"prefix {problem}")
        return {source: name, "prefix": prefix} if prefix else {source: name}

    def to_representation(self, value: Any) -> Any:
        return value


def read_secret(header: str, source: dict[str, str]) -> str:
    """Return the value `source` names for `header`; refuse one that is missing or unsendable, never showing it."""
    key = next(key for key in SECRET_SOURCES if key in source)
    name = source[key]
    where = f"header {header}: the {SECRET_SOURCES[key]} {name}"
    if name not in secret_names():  # the list may have changed since the job was saved
        raise HttpRequestError(f"{where} may not be read: it is not listed in JOBS['HTTP_HEADER_SECRETS']")
    value = os.environ.get(name) if key == "from_env" else getattr(settings, name, None)
    if value is None:
        raise HttpRequestError(f"{where} is not set on this scheduler")
    if not isinstance(value, str):
        raise HttpRequestError(f"{where} is not text")
    value = value.strip()
    if not value:
        raise HttpRequestError(f"{where} is empty")
    if _header_text_problem(value):
        raise HttpRequestError(
            f"{where} holds a line break or a character outside Latin-1, which a header cannot carry"
        )
    return value


def redact(text: str, secrets: Collection[str]) -> str:
    """Return `text` with every secret replaced, for a receiver that echoes what it was sent."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class HeadersField(serializers.DictField):
    child = HeaderValueField()

    def to_internal_value(self, data: Any) -> dict[str, str | dict[str, str]]:
        headers = super().to_internal_value(data)
        if len(headers) > 50:
            raise serializers.ValidationError("at most 50 headers")
        errors: dict[str, Any] = {}
        for name in headers:
            try:
                _header_name(name)
            except serializers.ValidationError as exc:
                errors[name] = exc.detail
        lowered = [name.lower() for name in headers]
        for name in headers:
            if lowered.count(name.lower()) > 1:
                errors[name] = ["given more than once (header names ignore case)"]
        if errors:
            raise serializers.ValidationError(errors)
        return headers


class HttpRequestParameters(serializers.Serializer):
    method = serializers.ChoiceField(choices=METHODS, default="POST", help_text="HTTP method.")
    url = serializers.CharField(max_length=2048, help_text="http:// or https:// URL to call.")
    headers = HeadersField(
        required=False,
        default=dict,
        help_text='Extra request headers, e.g. Authorization; a value may be {"from_env": NAME} to read a secret '
        "on the scheduler (see JOBS['HTTP_HEADER_SECRETS']).",
    )
    json = serializers.JSONField(
        required=False, default=None, allow_null=True, help_text="Request body, sent as JSON (omit for none)."
    )
    timeout_seconds = serializers.FloatField(
        min_value=0.1,
        max_value=600,
        default=30,
        help_text="Limit for the whole request (DNS, connecting, TLS, every redirect, the answer); "
        "the job's own timeout still applies.",
    )
    expected_status = serializers.ListField(
        child=serializers.IntegerField(min_value=100, max_value=599),
        required=False,
        default=list,
        max_length=100,
        help_text="Status codes that count as success; default any 2xx. Anything else fails the run.",
    )
    max_redirects = serializers.IntegerField(
        min_value=0, max_value=10, default=5, help_text="Redirects to follow (each hop is checked); 0 = none."
    )

    def validate_url(self, value: str) -> str:
        try:
            target = parse_target(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        try:
            allowlist = Allowlist.from_settings()
        except HttpRequestError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if reason := refusal_for_host(target.host, allowlist):
            raise serializers.ValidationError(f"refused: {reason}; allow it in JOBS['HTTP_ALLOWED_HOSTS'] if intended")
        return value

    def validate_json(self, value: Any) -> Any:
        if value is not None and len(json.dumps(value).encode()) > MAX_JSON_BYTES:
            raise serializers.ValidationError(f"the JSON body is larger than {MAX_JSON_BYTES} bytes")
        return value


def idempotency_key(run: JobRun) -> str:
    """The same for every attempt of one fire, different for every fire."""
    return f"{run.job_id}-{run.scheduled_for.astimezone(UTC).isoformat()}"


class HttpRequestExecutor(Executor):
    name = "http_request"
    label = "HTTP request (webhook)"
    description = (
        "Call a URL with a JSON body; fails on a connection error, a timeout or an unexpected status, "
        "so retries apply. Private, loopback, link-local and metadata addresses are refused unless "
        "allowlisted in JOBS['HTTP_ALLOWED_HOSTS']."
    )
    parameters_serializer = HttpRequestParameters
    safe_to_repeat = True  # the Idempotency-Key lets the receiver drop a repeat
    parameters_example = {
        "method": "POST",
        "url": "https://hooks.example.com/sync",
        "json": {"source": "scheduler", "full": False},
        "timeout_seconds": 20,
        "expected_status": [200, 202],
    }

    def execute(self, run: JobRun) -> dict[str, Any]:
        params = self.parameters_for(run)
        started = time.monotonic()
        deadline = Deadline.for_run(run, params["timeout_seconds"])
        allowlist = Allowlist.from_settings()
        key = idempotency_key(run)
        headers = {"User-Agent": USER_AGENT, "Idempotency-Key": key}
        secrets: list[str] = []
        credentials = set(CREDENTIAL_HEADERS)
        for name, value in params["headers"].items():
            if name.lower() == "user-agent":
                headers.pop("User-Agent")
            if isinstance(value, dict):
                secret = read_secret(name, value)
                secrets.append(secret)
                credentials.add(name.lower())  # a secret is meant for this origin only
                value = value.get("prefix", "") + secret
            headers[name] = value
        body: bytes | None = None
        if params["json"] is not None:
            body = json.dumps(params["json"], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"

        method = params["method"]
        target = parse_target(params["url"])
        redirects: list[str] = []
        while True:
            response = send(method, target, headers, body, allowlist=allowlist, deadline=deadline)
            if response.status not in REDIRECT_STATUSES or not response.location or params["max_redirects"] == 0:
                break
            if len(redirects) >= params["max_redirects"]:
                raise HttpRequestError(
                    f"more than {params['max_redirects']} redirects; last to {redact(response.location, secrets)}"
                )
            try:
                next_target = parse_target(urljoin(target.url, response.location))
            except ValueError as exc:
                raise HttpRequestError(f"refused redirect to {redact(response.location, secrets)!r}: {exc}") from exc
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                # As browsers do: the follow-up is a GET without the body.
                method = "HEAD" if method == "HEAD" else "GET"
                body = None
                headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
            if next_target.origin != target.origin:
                headers = {name: value for name, value in headers.items() if name.lower() not in credentials}
            target = next_target
            redirects.append(target.url)

        elapsed_ms = round((time.monotonic() - started) * 1000)
        expected = params["expected_status"]
        succeeded = response.status in expected if expected else 200 <= response.status < 300
        text = redact(response.text(), secrets)
        if not succeeded:
            wanted = ", ".join(map(str, expected)) if expected else "2xx"
            raise HttpRequestError(
                f"{method} {redact(target.url, secrets)} answered {response.status} {response.reason} "
                f"(expected {wanted}) after {elapsed_ms} ms: {text[:500]}"
            )
        return {
            "method": method,
            "url": redact(target.url, secrets),
            "status": response.status,
            "reason": response.reason,
            "elapsed_ms": elapsed_ms,
            "redirects": [redact(url, secrets) for url in redirects],
            "idempotency_key": key,
            "content_type": response.content_type,
            "body": text,
            "body_truncated": response.truncated,
        }


def send(
    method: str,
    target: Target,
    headers: dict[str, str],
    body: bytes | None,
    *,
    allowlist: Allowlist,
    deadline: Deadline,
) -> Response:
    """Send one request to `target` (no redirects followed) and read at most BODY_PREVIEW_BYTES of the answer.

    Every wait ends by `deadline`. A network or protocol failure leaves as HttpRequestError
    (AnswerLost once the request may have reached the receiver), or as RunTimedOut when the
    run's own timeout is what ran out; nothing else.
    """
    request = f"{method} {target.url}"
    try:
        addresses = resolve(target, allowlist, deadline)
    except TimeoutError as exc:
        raise deadline.expired(request, sent=False) from exc
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
        connection.request(method, target.path, body=body, headers=headers)
        answer = connection.getresponse()
        return read_answer(answer)
    except TimeoutError as exc:
        raise deadline.expired(request, sent=sent) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: http.client, ssl and email report some malformed input that way.
        error = AnswerLost if sent else HttpRequestError
        raise error(f"{request} failed: {type(exc).__name__}: {exc}") from exc
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
