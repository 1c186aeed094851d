"""http_request: call a webhook, refusing private and metadata addresses unless allowlisted.

The address check runs on the resolved address at send time, for every redirect hop, and the
connection then goes to exactly the address that was checked (the Host header and TLS SNI still
name the host), so a DNS answer that changes between check and connect cannot slip past it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urljoin, urlsplit

from rest_framework import serializers

from .base import Executor, ExecutorError

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


def resolve(target: Target, allowlist: Allowlist) -> list[tuple[int, Any]]:
    """Resolve the host once and check every address; return (family, sockaddr) pairs to connect to."""
    if reason := refusal_for_host(target.host, allowlist):
        raise BlockedAddress(f"refused {target.url}: {reason}; allow it in JOBS['HTTP_ALLOWED_HOSTS'] if intended")
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
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


def _connect(addresses: list[tuple[int, Any]], timeout: float | None) -> socket.socket:
    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand, never to a fresh DNS answer."""

    def __init__(self, host: str, port: int, *, addresses: list[tuple[int, Any]], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; certificate and SNI still use the host name."""

    def __init__(self, host: str, port: int, *, addresses: list[tuple[int, Any]], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._addresses = addresses

    def connect(self) -> None:
        sock = _connect(self._addresses, self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        except BaseException:
            sock.close()
            raise


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
        except LookupError:
            return self.body.decode("utf-8", "replace")


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise serializers.ValidationError(f"{value!r} is not a valid header name")
    if value.lower() in RESERVED_HEADERS:
        raise serializers.ValidationError(f"{value} is set by the scheduler and cannot be given")
    return value


class HeadersField(serializers.DictField):
    child = serializers.CharField(allow_blank=True, max_length=8192, trim_whitespace=False)

    def to_internal_value(self, data: Any) -> dict[str, str]:
        headers = super().to_internal_value(data)
        if len(headers) > 50:
            raise serializers.ValidationError("at most 50 headers")
        errors: dict[str, Any] = {}
        for name, value in headers.items():
            try:
                _header_name(name)
                if "\r" in value or "\n" in value or "\x00" in value:
                    raise serializers.ValidationError("must not contain line breaks (header injection)")
            except serializers.ValidationError as exc:
                errors[name] = exc.detail
        lowered = [name.lower() for name in headers]
        for name in headers:
            if lowered.count(name.lower()) > 1:
                errors[name] = ["given more than once (header names ignore case)"]
        if errors:
            raise serializers.ValidationError(errors)
        return {name: value.strip() for name, value in headers.items()}


class HttpRequestParameters(serializers.Serializer):
    method = serializers.ChoiceField(choices=METHODS, default="POST", help_text="HTTP method.")
    url = serializers.CharField(max_length=2048, help_text="http:// or https:// URL to call.")
    headers = HeadersField(required=False, default=dict, help_text="Extra request headers, e.g. Authorization.")
    json = serializers.JSONField(
        required=False, default=None, allow_null=True, help_text="Request body, sent as JSON (omit for none)."
    )
    timeout_seconds = serializers.FloatField(
        min_value=0.1, max_value=600, default=30, help_text="Limit for the whole request, redirects included."
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

    def execute(self, run: JobRun) -> dict[str, Any]:
        params = self.parameters_for(run)
        allowlist = Allowlist.from_settings()
        key = idempotency_key(run)
        headers = {"User-Agent": USER_AGENT, "Idempotency-Key": key}
        for name, value in params["headers"].items():
            if name.lower() == "user-agent":
                headers.pop("User-Agent")
            headers[name] = value
        body: bytes | None = None
        if params["json"] is not None:
            body = json.dumps(params["json"], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"

        method = params["method"]
        target = parse_target(params["url"])
        timeout = params["timeout_seconds"]
        started = time.monotonic()
        deadline = started + timeout
        redirects: list[str] = []
        while True:
            response = send(method, target, headers, body, allowlist=allowlist, deadline=deadline, timeout=timeout)
            if response.status not in REDIRECT_STATUSES or not response.location or params["max_redirects"] == 0:
                break
            if len(redirects) >= params["max_redirects"]:
                raise HttpRequestError(f"more than {params['max_redirects']} redirects; last to {response.location}")
            try:
                next_target = parse_target(urljoin(target.url, response.location))
            except ValueError as exc:
                raise HttpRequestError(f"refused redirect to {response.location!r}: {exc}") from exc
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                # As browsers do: the follow-up is a GET without the body.
                method = "HEAD" if method == "HEAD" else "GET"
                body = None
                headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
            if next_target.origin != target.origin:
                headers = {name: value for name, value in headers.items() if name.lower() not in CREDENTIAL_HEADERS}
            target = next_target
            redirects.append(target.url)

        elapsed_ms = round((time.monotonic() - started) * 1000)
        expected = params["expected_status"]
        succeeded = response.status in expected if expected else 200 <= response.status < 300
        if not succeeded:
            wanted = ", ".join(map(str, expected)) if expected else "2xx"
            raise HttpRequestError(
                f"{method} {target.url} answered {response.status} {response.reason} (expected {wanted}) "
                f"after {elapsed_ms} ms: {response.text()[:500]}"
            )
        return {
            "method": method,
            "url": target.url,
            "status": response.status,
            "reason": response.reason,
            "elapsed_ms": elapsed_ms,
            "redirects": redirects,
            "idempotency_key": key,
            "content_type": response.content_type,
            "body": response.text(),
            "body_truncated": response.truncated,
        }


def send(
    method: str,
    target: Target,
    headers: dict[str, str],
    body: bytes | None,
    *,
    allowlist: Allowlist,
    deadline: float,
    timeout: float,
) -> Response:
    """Send one request to `target` (no redirects followed) and read at most BODY_PREVIEW_BYTES of the answer."""
    addresses = resolve(target, allowlist)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HttpRequestError(f"{method} {target.url} timed out after {timeout:g}s")
        return left

    connection_class = PinnedHTTPSConnection if target.scheme == "https" else PinnedHTTPConnection
    connection = connection_class(target.host, target.port, addresses=addresses, timeout=remaining())
    try:
        connection.request(method, target.path, body=body, headers=headers)
        assert connection.sock is not None
        connection.sock.settimeout(remaining())
        answer = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        truncated = False
        while method != "HEAD":
            connection.sock.settimeout(remaining())
            chunk = answer.read1(BODY_PREVIEW_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > BODY_PREVIEW_BYTES:
                truncated = True
                break
        content = b"".join(chunks)[:BODY_PREVIEW_BYTES]
        return Response(
            status=answer.status,
            reason=answer.reason,
            location=answer.getheader("Location"),
            content_type=answer.getheader("Content-Type", ""),
            body=content,
            truncated=truncated,
            charset=answer.headers.get_content_charset() or "utf-8",
        )
    except TimeoutError as exc:
        raise HttpRequestError(f"{method} {target.url} timed out after {timeout:g}s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise HttpRequestError(f"{method} {target.url} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
