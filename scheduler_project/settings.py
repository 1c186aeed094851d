"""Django settings, read from the environment and an optional `.env` beside manage.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .env import (
    ConfigError,
    database_from_url,
    email_from_url,
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_parsed,
    env_str,
    env_timezone,
    load_dotenv_file,
    throttle_rate,
)

BASE_DIR = Path(__file__).resolve().parent.parent

load_dotenv_file(Path(env_str("ENV_FILE", str(BASE_DIR / ".env"))))

DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ConfigError("SECRET_KEY", "is required when DEBUG is false (make run writes one to .env)")
    SECRET_KEY = "django-insecure-local-development-only"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # Not AdminConfig: the admin's modules are loaded by urls.py (admin.autodiscover()), so that
    # `runscheduler`, which serves no URL, does not import them.
    "django.contrib.admin.apps.SimpleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "scheduler_project.urls"
WSGI_APPLICATION = "scheduler_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates", BASE_DIR / "scheduler_project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env_parsed(
        "DATABASE_URL",
        f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        lambda url: database_from_url(url, base_dir=BASE_DIR),
        "database URL",
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_timezone("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# Email: EMAIL_URL (smtp://user:pass@host:port, submission://..., console:) or the usual EMAIL_*.
_email_url = env_str("EMAIL_URL", "")
if _email_url:
    _email = env_parsed("EMAIL_URL", _email_url, email_from_url, "email URL")
    EMAIL_BACKEND = _email["EMAIL_BACKEND"]
    if _email["EMAIL_FILE_PATH"]:
        EMAIL_FILE_PATH = _email["EMAIL_FILE_PATH"]
    EMAIL_HOST = _email["EMAIL_HOST"] or "localhost"
    EMAIL_PORT = _email["EMAIL_PORT"] or 25
    EMAIL_HOST_USER = _email["EMAIL_HOST_USER"] or ""
    EMAIL_HOST_PASSWORD = _email["EMAIL_HOST_PASSWORD"] or ""
    EMAIL_USE_TLS = bool(_email["EMAIL_USE_TLS"])
    EMAIL_USE_SSL = bool(_email["EMAIL_USE_SSL"])
else:
    EMAIL_HOST = env_str("EMAIL_HOST", "")
    # Without a mail server configured, print mail to the console instead of failing on port 25.
    EMAIL_BACKEND = env_str(
        "EMAIL_BACKEND",
        "django.core.mail.backends.smtp.EmailBackend"
        if EMAIL_HOST
        else "django.core.mail.backends.console.EmailBackend",
    )
    EMAIL_HOST = EMAIL_HOST or "localhost"
    EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
    EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ConfigError("EMAIL_USE_TLS", "cannot be true together with EMAIL_USE_SSL")
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 30, minimum=1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "scheduler@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["jobs.api.permissions.ModelPermissions"],
    "DEFAULT_PARSER_CLASSES": [
        "jobs.api.parsers.JSONParser",
        "jobs.api.parsers.FormParser",
        "jobs.api.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "jobs.api.pagination.Pagination",
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "jobs.api.filters.OrderingFilter",
        "jobs.api.filters.SearchFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "jobs.api.schema.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {"run_now": env_parsed("RUN_NOW_THROTTLE", "30/minute", throttle_rate, "rate")},
    "EXCEPTION_HANDLER": "jobs.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DATETIME_FORMAT": "iso-8601",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Job Scheduler API",
    "DESCRIPTION": (
        "Schedule recurring jobs with cron expressions, run them with `manage.py runscheduler`, "
        "and read the history of every run. Authenticate with `Authorization: Token <key>`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Swagger UI would send the schema's URL to validator.swagger.io for a badge; stay offline.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "PREPROCESSING_HOOKS": ["jobs.api.schema.document_paths_without_slash"],
}

JOBS: dict[str, Any] = {
    "MAX_CONCURRENT_JOBS": env_int("MAX_CONCURRENT_JOBS", 5, minimum=1, maximum=1000),
    "RUN_RETENTION_DAYS": env_int("RUN_RETENTION_DAYS", 30, minimum=1),
    "RUN_RETENTION_PER_JOB": env_int("RUN_RETENTION_PER_JOB", 1000, minimum=1),
    "HTTP_ALLOWED_HOSTS": env_list("HTTP_ALLOWED_HOSTS", []),
    "HTTP_HEADER_SECRETS": env_list("HTTP_HEADER_SECRETS", []),
    "HTTP_CA_BUNDLE": env_str("HTTP_CA_BUNDLE", "") or None,
    "BACKUP_DIR": env_str("BACKUP_DIR", str(BASE_DIR / "backups")),
    "EXPORT_DIR": env_str("EXPORT_DIR", str(BASE_DIR / "exports")),
    "ALLOWED_OUTPUT_DIRS": env_list("ALLOWED_OUTPUT_DIRS", []),
}

LOG_LEVEL = env_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")).upper()
LOG_FORMAT = env_choice("LOG_FORMAT", "text", ("text", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "scheduler_project.logging.JsonFormatter"},
    },
    "filters": {"client_error": {"()": "scheduler_project.logging.ClientError"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT},
        "client_errors": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["client_error"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # A request with a bad Host header is the client's error: one warning line, no traceback.
        "django.security.DisallowedHost": {"handlers": ["client_errors"], "propagate": False},
    },
}

# Production hardening; `manage.py check --deploy` is clean when DEBUG is false.
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_CONTENT_TYPE_NOSNIFF = True
