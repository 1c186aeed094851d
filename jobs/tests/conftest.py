"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from django.conf import settings

    vendor = "postgresql" if "postgresql" in settings.DATABASES["default"]["ENGINE"] else "sqlite"
    for item in items:
        if "postgres" in item.keywords and vendor != "postgresql":
            item.add_marker(pytest.mark.skip(reason="needs PostgreSQL (run with DATABASE_URL=postgres://...)"))
        if "sqlite" in item.keywords and vendor != "sqlite":
            item.add_marker(pytest.mark.skip(reason="SQLite-only test"))


@pytest.fixture
def vendor() -> str:
    return connection.vendor


@pytest.fixture
def now() -> datetime:
    """A fixed instant to pass into services and the engine."""
    return datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def admin_user(db: None) -> User:
    return User.objects.create_superuser("admin", "admin@example.com", "admin-password-123")


@pytest.fixture
def api(admin_user: User) -> APIClient:
    """An API client authenticated with a superuser's token."""
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=admin_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def user_with_perms(db: None) -> Callable[..., APIClient]:
    """Return a token-authenticated client for a user holding exactly the given codenames."""

    def make(*codenames: str, username: str = "limited") -> APIClient:
        user = User.objects.create_user(username, password="x-password-123")
        user.user_permissions.set(Permission.objects.filter(codename__in=codenames, content_type__app_label="jobs"))
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
        return client

    return make


@pytest.fixture
def job_data() -> Callable[..., dict[str, Any]]:
    """The seed's email job body, with overrides."""

    def make(**overrides: Any) -> dict[str, Any]:
        return {
            "name": "Daily reminder",
            "cron_expression": "0 9 * * *",
            "job_type": "email_notification",
            "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
            **overrides,
        }

    return make
