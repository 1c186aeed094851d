"""The address guard: which URLs and addresses a job's request may reach, unless allowlisted.

The address check runs on the resolved address at send time, for every redirect hop, and the
connection then goes to exactly the address that was checked (the Host header and TLS SNI still
name the host), so a DNS answer that changes between check and connect cannot slip past it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

from . import BlockedAddress, HttpRequestError

if TYPE_CHECKING:
    from .client import Deadline

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
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
        from jobs.conf import config

        try:
            return cls.parse(config().http_allowed_hosts)
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
