"""Test-wide environment, loaded as a pytest plugin (-p) before Django reads its settings."""

import os

# Tests must not depend on a developer's .env, nor on HTTPS in front of the test client.
os.environ["ENV_FILE"] = os.devnull
os.environ.setdefault("SECRET_KEY", "tests-only-not-secret")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("SESSION_COOKIE_SECURE", "false")
os.environ.setdefault("CSRF_COOKIE_SECURE", "false")
os.environ.setdefault("SECURE_HSTS_SECONDS", "0")
