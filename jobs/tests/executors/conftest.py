"""Jobs and runs built with the services and the ORM, as the scheduler would hand them to an executor.

The http_request tests also share a network guard and a fake DNS from here (modules opt in with
`pytest.mark.usefixtures("loopback_only", "dns")`): no packet may leave loopback, even if the
address guard under test were broken, and host names resolve only through a fake table.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from jobs import services
from jobs.models import JobRun

FIRE = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def make_run() -> Callable[..., JobRun]:
    """Create a disabled job (validated like any other) and one queued run of it."""

    def make(
        job_type: str, parameters: dict[str, Any], *, scheduled_for: datetime = FIRE, attempt: int = 1, **fields: Any
    ) -> JobRun:
        fields.setdefault("name", f"{job_type} test")
        job = services.job_create(
            cron_expression="0 * * * *", job_type=job_type, parameters=parameters, enabled=False, **fields
        )
        return JobRun.objects.create(job=job, scheduled_for=scheduled_for, not_before=scheduled_for, attempt=attempt)

    return make


# --- the network guard and a fake DNS, for the http_request tests ------------------------------


class NonLoopbackConnection(BaseException):
    """Raised (past every `except Exception`) when code under test tries to leave loopback."""


def _loopback(host: Any) -> bool:
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail the test on any TCP/UDP connection to a non-loopback address; nothing is sent."""
    violations: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not _loopback(address[0]):
            violations.append(address)
            raise NonLoopbackConnection(f"connection to {address!r} attempted; only loopback is allowed")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if address[0] != "localhost":
            check(address)
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield violations
    assert violations == [], f"non-loopback connections were attempted: {violations}"


@dataclass
class FakeDNS:
    """Host names the tests resolve, instead of DNS; literal addresses resolve as usual."""

    answers: dict[str, Callable[[], list[str]]]
    lookups: dict[str, int]

    def add(self, host: str, *addresses: str) -> None:
        self.answers[host] = lambda: list(addresses)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS({}, {})
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in fake.answers:
            fake.lookups[name] = fake.lookups.get(name, 0) + 1
            port_number = int(port or 0)
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port_number, 0, 0))
                if ":" in ip
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port_number))
                for ip in fake.answers[name]()
            ]
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"no DNS in tests for {name!r}") from None
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


def jobs_settings(**overrides: Any) -> override_settings:
    """Override some JOBS settings, keeping the others."""
    return override_settings(JOBS={**settings.JOBS, **overrides})


def allow(*hosts: str) -> override_settings:
    return jobs_settings(HTTP_ALLOWED_HOSTS=list(hosts))
