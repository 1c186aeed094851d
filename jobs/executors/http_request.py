"""http_request: call a webhook, refusing private and metadata addresses unless allowlisted.

The job type: its parameters (headers, secrets read on the scheduler, the JSON body) and its
result. The address guard is `jobs.net.guard`; the pinned connections, the redirects and the
deadline that bounds the whole request are `jobs.net.client`.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC
from typing import TYPE_CHECKING, Any

from django.conf import settings
from rest_framework import serializers

from jobs.net import HttpRequestError
from jobs.net.client import CREDENTIAL_HEADERS, Deadline, Request, fetch, redact
from jobs.net.guard import Allowlist, parse_target, refusal_for_host

from .base import Executor

if TYPE_CHECKING:
    from jobs.models import JobRun

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_JSON_BYTES = 1024 * 1024
USER_AGENT = "job-scheduler/1.0 (http_request job type)"

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
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Header values may be read from these, by name, when the request is sent.
SECRET_SOURCES = {"from_env": "environment variable", "from_setting": "setting"}
_SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


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
    from jobs.conf import config

    names = config().http_header_secrets
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

        exchange = fetch(
            Request(params["method"], parse_target(params["url"]), headers, body),
            allowlist=allowlist,
            deadline=deadline,
            max_redirects=params["max_redirects"],
            credentials=credentials,
            secrets=secrets,
        )
        method, target, response = exchange.request.method, exchange.request.target, exchange.response

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
            "redirects": [redact(url, secrets) for url in exchange.redirects],
            "idempotency_key": key,
            "content_type": response.content_type,
            "body": text,
            "body_truncated": response.truncated,
        }
