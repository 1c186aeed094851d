"""Test-wide environment, loaded as a pytest plugin (-p) before Django reads its settings."""

import os
from collections.abc import Iterator

import pytest

# Tests must not depend on a developer's .env, nor on HTTPS in front of the test client.
os.environ["ENV_FILE"] = os.devnull
os.environ.setdefault("SECRET_KEY", "tests-only-not-secret")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("SESSION_COOKIE_SECURE", "false")
os.environ.setdefault("CSRF_COOKIE_SECURE", "false")
os.environ.setdefault("SECURE_HSTS_SECONDS", "0")


def pytest_configure(config: pytest.Config) -> None:
    # WhiteNoise warns on every request that STATIC_ROOT is missing until `collectstatic` has run;
    # the tests that need static files collect them into a temporary directory.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning:django.core.handlers.base")


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing() -> Iterator[None]:
    """Hash test users' passwords cheaply: PBKDF2 costs over half a second per user created."""
    from django.test.utils import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield
