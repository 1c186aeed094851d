"""Parsers that turn every malformed or oversized body into a 4xx, never a 500.

Each reads at most DATA_UPLOAD_MAX_MEMORY_SIZE bytes: DRF hands parsers the raw stream, so
Django's own body limit never applies, and for multipart Django counts only the non-file fields.
Too many fields raise Django's TooManyFieldsSent, which jobs.api.errors answers with a 400.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http import QueryDict
from django.http.multipartparser import MultiPartParser as DjangoMultiPartParser
from django.http.multipartparser import MultiPartParserError
from django.utils.datastructures import MultiValueDict
from rest_framework import exceptions, status
from rest_framework.parsers import BaseParser, DataAndFiles
from rest_framework.parsers import JSONParser as DRFJSONParser
from rest_framework.utils import json

FILES_REFUSED = "This API takes no files; send this field as text."


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body is too large."
    default_code = "request_too_large"


def request_too_large() -> RequestTooLarge:
    """Return the 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, naming the limit."""
    return RequestTooLarge(f"Request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")


def read_body(stream: IO[bytes] | None) -> bytes:
    """Read the whole body, or refuse it with a 413 past DATA_UPLOAD_MAX_MEMORY_SIZE."""
    if stream is None:
        return b""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    raw = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(raw) > limit:
        raise request_too_large()
    return raw


class JSONParser(DRFJSONParser):
    """DRF's JSON parser, bounded by DATA_UPLOAD_MAX_MEMORY_SIZE and safe against deep nesting."""

    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = read_body(stream)
        try:
            text = codecs.decode(raw, encoding)
            parse_constant = json.strict_constant if self.strict else None
            return json.loads(text, parse_constant=parse_constant)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


class FormParser(BaseParser):
    """DRF's form parser, bounded like the JSON one: 413 past the byte limit, 400 past the field limit."""

    media_type = "application/x-www-form-urlencoded"

    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> QueryDict:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        # Past DATA_UPLOAD_MAX_NUMBER_FIELDS, QueryDict raises TooManyFieldsSent: a 400 in errors.py.
        return QueryDict(read_body(stream), encoding=encoding)


class _RefuseFiles(FileUploadHandler):
    """Skip every file part, remembering its field, so nothing is buffered or written to disk."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[str] = []

    def new_file(self, field_name: str, *args: Any, **kwargs: Any) -> None:
        self.fields.append(field_name)
        raise SkipFile

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        return None

    def file_complete(self, file_size: int) -> None:
        return None


class MultiPartParser(BaseParser):
    """Multipart form fields, bounded like JSON; any file part is refused with a 400 naming its field.

    The API has no field that takes a file, and DRF would otherwise hand an uploaded file to
    a text field (or buffer one nobody reads) before anything looked at it.
    """

    media_type = "multipart/form-data"

    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> DataAndFiles:
        parser_context = parser_context or {}
        request = parser_context["request"]
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = read_body(stream)
        meta = {**request.META, "CONTENT_TYPE": media_type, "CONTENT_LENGTH": str(len(raw))}
        refuse_files = _RefuseFiles()
        try:
            # Too many fields or files raise SuspiciousOperation, which errors.py makes a 400.
            data, _ = DjangoMultiPartParser(meta, io.BytesIO(raw), [refuse_files], encoding).parse()
        except MultiPartParserError as exc:
            raise exceptions.ParseError(f"Multipart form parse error - {exc}") from None
        if refuse_files.fields:
            raise exceptions.ValidationError({field: [FILES_REFUSED] for field in refuse_files.fields})
        return DataAndFiles(data, MultiValueDict())
