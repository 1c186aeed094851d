"""Turn every error a client can cause into a 4xx with a readable message, never a 500."""

from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from jobs.services import JobValidationError


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, JobValidationError):
        exc = exceptions.ValidationError(exc.errors)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, ObjectDoesNotExist):
        # Deleted by someone else between reading and writing it.
        exc = exceptions.NotFound(str(exc))
    return drf_exception_handler(exc, context)
