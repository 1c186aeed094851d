"""Turn every error a client can cause into a 4xx with a readable message, never a 500.

Under the API every error answers JSON in DRF's shape, `{"detail": "..."}` or the refused fields
with their messages: DRF's own errors through `exception_handler`, and what Django decides before
or outside DRF (an unknown URL, a bad Host header, a server error) through the `handler404`,
`handler400`, `handler403` and `handler500` views that scheduler_project/urls.py installs. The
admin, the login pages and the docs keep Django's HTML pages.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    ObjectDoesNotExist,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from jobs.services import JobValidationError

from .parsers import request_too_large

# First path segments whose errors keep Django's HTML pages: people read these in a browser.
HTML_SECTIONS = frozenset({"admin", "api-auth", "docs", "redoc"})


def too_many_fields() -> exceptions.ParseError:
    """Return the 400 for more than DATA_UPLOAD_MAX_NUMBER_FIELDS fields, naming the limit."""
    limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    return exceptions.ParseError(f"Too many fields: at most {limit} in the query string or the body.")


def refused_request(exc: Exception) -> exceptions.APIException | None:
    """Return the DRF error for a request Django refused to read, or None when `exc` is not one."""
    if not isinstance(exc, SuspiciousOperation | BadRequest | MultiPartParserError):
        return None
    if isinstance(exc, RequestDataTooBig):
        return request_too_large()
    if isinstance(exc, TooManyFieldsSent):
        return too_many_fields()
    if isinstance(exc, TooManyFilesSent):
        return exceptions.ParseError("Too many files; this API takes no files.")
    if isinstance(exc, DisallowedHost):
        # Django's message tells how to change ALLOWED_HOSTS: that is for the operator, not the client.
        return exceptions.ParseError("Invalid Host header.")
    if isinstance(exc, MultiPartParserError):
        return exceptions.ParseError(f"Multipart form parse error - {exc}")
    return exceptions.ParseError("Bad request.")


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, JobValidationError):
        exc = exceptions.ValidationError(exc.errors)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, ObjectDoesNotExist):
        # Deleted by someone else between reading and writing it.
        exc = exceptions.NotFound(str(exc))
    elif (refused := refused_request(exc)) is not None:
        if isinstance(exc, SuspiciousOperation):
            # Left to Django, this would log its traceback at ERROR, which suits an attack on the
            # admin but not a client that sent too many fields: one WARNING on the same logger.
            logging.getLogger(f"django.security.{type(exc).__name__}").warning("Refused: %s", exc)
        exc = refused
    return drf_exception_handler(exc, context)


def is_api_path(path: str) -> bool:
    """Tell whether errors on this path answer JSON: anything but the admin, the login and docs pages."""
    section = path.lstrip("/").split("/", 1)[0]
    static = settings.STATIC_URL or ""
    if static.startswith("/") and path.startswith(static):
        return False  # static files are for browsers too
    return section not in HTML_SECTIONS


def _json_error(error: exceptions.APIException) -> JsonResponse:
    return JsonResponse({"detail": str(error.detail)}, status=error.status_code)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Answer an unknown URL: JSON under the API, Django's page elsewhere."""
    if not is_api_path(request.path_info):
        return defaults.page_not_found(request, exception or Exception())
    return _json_error(exceptions.NotFound())


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Answer a request Django refused before any view (a bad Host header, too many fields)."""
    if not is_api_path(request.path_info):
        return defaults.bad_request(request, exception or Exception())
    return _json_error((refused_request(exception) if exception else None) or exceptions.ParseError("Bad request."))


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Answer a PermissionDenied raised outside DRF, which answers its own."""
    if not is_api_path(request.path_info):
        return defaults.permission_denied(request, exception or DjangoPermissionDenied())
    return _json_error(exceptions.PermissionDenied())


def server_error(request: HttpRequest) -> HttpResponse:
    """Answer a bug: the traceback goes to the log, never into the body."""
    if not is_api_path(request.path_info):
        return defaults.server_error(request)
    return _json_error(exceptions.APIException())
