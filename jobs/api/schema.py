"""The OpenAPI schema: drf-spectacular's, plus every error answer and real examples."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import ComponentRegistry, ResolvedComponent, build_examples_list
from drf_spectacular.utils import OpenApiExample
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import AllowAny
from rest_framework.settings import api_settings

from .errors import too_many_fields
from .parsers import request_too_large

Endpoint = tuple[str, str, str, Any]

ERROR_SCHEMA = {
    "type": "object",
    "description": "What went wrong, in one sentence.",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "description": (
        "Each refused field with its messages (an object of fields for `parameters`), "
        "`non_field_errors` for a rule spanning fields, or `detail` when the request could not be read."
    ),
    "properties": {
        "detail": {"type": "string"},
        "non_field_errors": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "object", "additionalProperties": True}]
    },
}

# Per status: a summary, a description and an example body in DRF's own words.
ERRORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "400": (
        "Bad input",
        "Bad input: each refused field is named with its messages; `detail` says why a request "
        "could not be read (malformed JSON, too many fields, a bad Host header).",
        {"cron_expression": ["minute: 60 is out of range 0-59"]},
    ),
    "401": (
        "Not authenticated",
        "No credentials, or a token that is not valid: send `Authorization: Token <key>`.",
        {"detail": "Authentication credentials were not provided."},
    ),
    "403": (
        "Not permitted",
        "The user lacks the permission this needs (or, logged in by session, the CSRF token).",
        {"detail": "You do not have permission to perform this action."},
    ),
    "404": ("Not found", "", {"detail": "Not found."}),  # description and example per operation
    "406": (
        "Not acceptable",
        "The Accept header names no format this answers (JSON, or HTML for the browsable API).",
        {"detail": "Could not satisfy the request Accept header."},
    ),
    "413": (
        "Body too large",
        "The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB by default).",
        {},  # computed from DATA_UPLOAD_MAX_MEMORY_SIZE
    ),
    "415": (
        "Unsupported body",
        "The body is not JSON, form-encoded or multipart form data.",
        {"detail": 'Unsupported media type "text/csv" in request.'},
    ),
    "429": (
        "Throttled",
        "Too many requests of this kind; the Retry-After header says when to try again.",
        {"detail": "Request was throttled. Expected available in 42 seconds."},
    ),
}
SEED_EMAIL_JOB = {
    "name": "Daily reminder",
    "cron_expression": "0 9 * * *",
    "job_type": "email_notification",
    "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
}
JOB_REQUEST_EXAMPLES = [
    OpenApiExample(
        "DailyReminder", summary="Daily reminder (the seed's email job)", value=SEED_EMAIL_JOB, request_only=True
    ),
    OpenApiExample(
        "WeeklyBackup",
        summary="Weekly backup (a data_processing job)",
        description="A compressed database backup every Monday at 02:00, keeping the last four.",
        value={
            "name": "Weekly backup",
            "cron_expression": "0 2 * * 1",
            "job_type": "data_processing",
            "parameters": {"dataset": "database_backup", "keep": 4},
        },
        request_only=True,
    ),
]
JOB_CREATE_EXAMPLES = [
    *JOB_REQUEST_EXAMPLES,
    OpenApiExample(
        "DailyReminderCreated",
        summary="Daily reminder",
        value={
            "id": 1,
            **SEED_EMAIL_JOB,
            "description": "",
            "schedule_description": "At 09:00",
            "timezone": "UTC",
            "enabled": True,
            "misfire_policy": "run_once",
            "misfire_grace_seconds": 60,
            "overlap_policy": "forbid",
            "max_retries": 0,
            "retry_backoff_seconds": 30,
            "timeout_seconds": 3600,
            "next_run_at": "2026-06-02T09:00:00Z",
            "last_run_at": None,
            "last_run_status": "",
            "created_at": "2026-06-01T12:00:00.000000Z",
            "updated_at": "2026-06-01T12:00:00.000000Z",
        },
        response_only=True,
        status_codes=["201"],
    ),
    OpenApiExample(
        "UnknownDataset",
        summary="The seed's data job: no such dataset",
        description="The seed's hourly data sync names the dataset `user_events`, which no installed app provides.",
        value={
            "parameters": {"dataset": ["unknown dataset 'user_events'; known datasets: database_backup, model_export"]}
        },
        response_only=True,
        status_codes=["400"],
    ),
]
NOT_FOUND_REASONS = {
    "path": "no object has this id",
    "page": "the page is past the last one",
    "cursor": "the cursor is not one this list gave",
    "format": "the `format` query parameter names no format this answers",
}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def document_paths_without_slash(endpoints: list[Endpoint], **kwargs: Any) -> list[Endpoint]:
    """Document each route once, as `/jobs/{id}`, though it also answers with a trailing slash."""
    seen: set[tuple[str, str]] = set()
    result = []
    for path, path_regex, method, callback in endpoints:
        path = path.rstrip("/") or "/"
        if (path, method) in seen:
            continue
        seen.add((path, method))
        result.append((path, path_regex, method, callback))
    return result


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's schema, with the error answers each operation can give.

    The statuses follow from the view: its permissions (401, 403), its path parameters,
    pagination and `format` parameter (404), its content negotiation (406), a body (413, 415) and
    its throttles (429). Every operation can answer 400: a request can always carry too many
    query fields.
    """

    def get_operation(
        self, path: str, path_regex: str, path_prefix: str, method: str, registry: ComponentRegistry
    ) -> dict[str, Any] | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        responses = operation["responses"]
        for status in self.error_statuses(operation):
            if status not in responses:
                responses[status] = self.error_response(status, operation)
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def error_statuses(self, operation: dict[str, Any]) -> list[str]:
        """Return the 4xx statuses this operation can answer."""
        statuses = ["400"]
        if not all(isinstance(permission, AllowAny) for permission in self.view.get_permissions()):
            statuses += ["401", "403"]
        if self.not_found_reasons(operation):
            statuses.append("404")
        if isinstance(self.view.get_content_negotiator(), DefaultContentNegotiation):
            statuses.append("406")
        if self.method in BODY_METHODS:
            # Even a body-less action reads the body when a session login checks its CSRF token.
            statuses += ["413", "415"]
        if self.view.get_throttles():
            statuses.append("429")
        return statuses

    def error_response(self, status: str, operation: dict[str, Any]) -> dict[str, Any]:
        """Return the response object for a 4xx, with DRF's message as the example unless the view gave one."""
        summary, description, generic = ERRORS[status]
        if status == "400" and self.method not in BODY_METHODS:
            generic = {"detail": str(too_many_fields().detail)}  # names this server's limit
        if status == "413":
            generic = {"detail": str(request_too_large().detail)}  # names this server's limit
        if status == "404":
            reasons = self.not_found_reasons(operation)
            description = "; ".join(NOT_FOUND_REASONS[reason] for reason in reasons).capitalize() + "."
            queryset = getattr(type(self.view), "queryset", None)  # the class's: an action may list another model
            if reasons[0] == "path" and queryset is not None:
                generic = {"detail": f"No {queryset.model.__name__} matches the given query."}
            elif reasons[0] == "page":
                generic = {"detail": "Invalid page."}
            elif reasons[0] == "cursor":
                generic = {"detail": "Invalid cursor"}
        examples = [
            example
            for example in self.get_examples()
            if not example.request_only and status in map(str, example.status_codes or ())
        ]
        examples.append(OpenApiExample(f"Error{status}", value=generic, summary=summary))
        name = "ValidationError" if status == "400" else "Error"
        component = ResolvedComponent(
            name=name,
            type=ResolvedComponent.SCHEMA,
            object=name,
            schema=VALIDATION_ERROR_SCHEMA if status == "400" else ERROR_SCHEMA,
        )
        self.registry.register_on_missing(component)
        return {
            "description": description,
            "content": {"application/json": {"schema": component.ref, "examples": build_examples_list(examples)}},
        }

    def not_found_reasons(self, operation: dict[str, Any]) -> list[str]:
        """Return why this operation can answer 404: an unknown id, a page past the last, a cursor
        this API did not give, a bad `format`."""
        parameters = {(parameter["in"], parameter["name"]) for parameter in operation.get("parameters", [])}
        paginator = getattr(self.view, "paginator", None)
        checks = {
            "path": any(place == "path" for place, _ in parameters),
            "page": ("query", getattr(paginator, "page_query_param", None)) in parameters,
            "cursor": ("query", getattr(paginator, "cursor_query_param", None)) in parameters,
            "format": ("query", api_settings.URL_FORMAT_OVERRIDE) in parameters,
        }
        return [reason for reason, applies in checks.items() if applies]
