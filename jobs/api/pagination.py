"""Pagination: page numbers with a bounded count for jobs, keyset cursors for the run history.

The run history grows without a bound worth counting (retention allows 1,000 runs per job), so
its lists never count and never skip rows with OFFSET: each page continues from the last row of
the one before, through the index that matches the ordering. Jobs keep the seed's page numbers
and `count`, which is exact up to EXACT_COUNT_LIMIT and the planner's estimate above it.
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple, cast
from urllib import parse

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.paginator import EmptyPage, Page
from django.core.paginator import Paginator as DjangoPaginator
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import BooleanField, F, Func, Model, QuerySet, Value
from django.db.models.sql.compiler import SQLCompiler
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination, PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from jobs.counting import EXACT_COUNT_LIMIT, bounded_count

MAX_ID = 2**63 - 1


class LookaheadPage(Page):
    """A page that knows whether another follows from the row read past its end, not from a count."""

    def __init__(self, object_list: Sequence[Any], number: int, paginator: DjangoPaginator, *, has_next: bool) -> None:
        super().__init__(object_list, number, paginator)
        self._has_next = has_next

    def has_next(self) -> bool:
        return self._has_next

    def next_page_number(self) -> int:
        return self.number + 1  # not checked against the count, which may be an estimate, or stale

    def previous_page_number(self) -> int:
        return self.number - 1


class BoundedCountPaginator(DjangoPaginator):
    """Count at most EXACT_COUNT_LIMIT + 1 rows; estimate beyond that (on PostgreSQL).

    A full COUNT(*) reads every matching row at every page; this one reads at most the limit, and
    above it asks the planner (EXPLAIN), whose estimate costs the same at any table size. SQLite
    keeps no statistics to estimate from, and serves tables small enough to count.
    """

    exact_count_limit = EXACT_COUNT_LIMIT
    estimated = False

    @cached_property
    def count(self) -> int:
        counted, self.estimated = bounded_count(cast("QuerySet[Any]", self.object_list), self.exact_count_limit)
        return counted

    def validate_number(self, number: Any) -> int:
        """Refuse a page past the last when the count is exact; an estimate cannot say where the last is."""
        if self.count > self.exact_count_limit and self.estimated:
            try:
                value = int(number)
            except (TypeError, ValueError):
                value = 0
            if 1 <= value <= MAX_ID // self.per_page:
                return value
        return super().validate_number(number)

    def page(self, number: Any) -> LookaheadPage:
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        rows = list(self.object_list[bottom : bottom + self.per_page + 1])
        if not rows and number > 1:
            raise EmptyPage(self.error_messages["no_results"])
        return LookaheadPage(rows[: self.per_page], number, self, has_next=len(rows) > self.per_page)


class Pagination(PageNumberPagination):
    """Job lists: the seed's `count`, `next`, `previous` and `results`, with a bounded count."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
    django_paginator_class = BoundedCountPaginator

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        response = super().get_paginated_response_schema(schema)
        response["properties"]["count"]["description"] = (
            f"How many match: exact up to {EXACT_COUNT_LIMIT:,}; above that, PostgreSQL's estimate."
        )
        return response


class RowComparison(Func):
    """`(a, b) < (x, y)`: a row comparison, which PostgreSQL and SQLite both answer as one range of
    an index on (a, b). Django's own tuple lookups expand into ORs on SQLite, which no index serves."""

    output_field = BooleanField()
    conditional = True

    def __init__(self, columns: Sequence[str], operator: str, values: Sequence[Any]) -> None:
        assert operator in {"<", ">"} and len(columns) == len(values)
        self.operator = operator
        super().__init__(*(F(column) for column in columns), *(Value(value) for value in values))

    def as_sql(
        self,
        compiler: SQLCompiler,
        connection: BaseDatabaseWrapper,
        function: str | None = None,
        template: str | None = None,
        arg_joiner: str | None = None,
        **extra_context: Any,
    ) -> tuple[str, list[Any]]:
        half = len(self.source_expressions) // 2
        compiled = [compiler.compile(expression) for expression in self.source_expressions]
        params = [param for _, expression_params in compiled for param in expression_params]
        left = ", ".join(sql for sql, _ in compiled[:half])
        right = ", ".join(sql for sql, _ in compiled[half:])
        return f"({left}) {self.operator} ({right})", params


class KeysetCursor(NamedTuple):
    reverse: bool  # the page before `position` rather than after it
    position: list[Any] | None  # the key of the row the page starts from; None: from the start (or end)


class KeysetPagination(CursorPagination):
    """Cursor pagination over (field, id): each page starts after the last row of the one before.

    DRF's CursorPagination positions on the first field only and counts rows sharing it with an
    offset; a thousand jobs firing in the same second share their `scheduled_for`, which would make
    that offset grow past its cut-off and pages repeat. Here the cursor holds the whole key, so a
    page is one range of the index whatever the ties. The view's ordering filter supplies the key
    (`get_ordering`), each term in the same direction. The cursor names its ordering, so a cursor
    used with another is refused rather than read as a position it is not.
    """

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
    ordering = "-id"
    cursor_query_description = "Where the page starts: the cursor of a `next` or `previous` link."

    def paginate_queryset(self, queryset: QuerySet[Any], request: Request, view: Any = None) -> list[Any] | None:
        self.request = request
        self.url = request.build_absolute_uri()
        self.keyset = self.get_ordering(request, queryset, view)
        self.key = [term.lstrip("-") for term in self.keyset]
        self.model = queryset.model
        size = self.get_page_size(request) or KeysetPagination.page_size
        reverse, position = self.read_cursor(request) or KeysetCursor(reverse=False, position=None)

        forwards = self.keyset[0].startswith("-") == reverse  # whether the index is read in ascending order
        queryset = queryset.order_by(*(F(name).asc() if forwards else F(name).desc() for name in self.key))
        if position is not None:
            queryset = queryset.filter(RowComparison(self.key, ">" if forwards else "<", position))
        rows = list(queryset[: size + 1])
        page = rows[:size]
        more = len(rows) > size
        if reverse:
            page.reverse()
        self.page = page
        # Moving back from a position, the rows from it onwards follow; moving on, the rows before it precede.
        self.has_next, self.has_previous = (position is not None, more) if reverse else (more, position is not None)
        self.display_page_controls = self.has_next or self.has_previous
        return page

    def get_next_link(self) -> str | None:
        if not self.has_next or self.page is None:
            return None
        # An empty page after moving back means nothing precedes: the first page follows.
        return self.link(reverse=False, row=self.page[-1] if self.page else None)

    def get_previous_link(self) -> str | None:
        if not self.has_previous or self.page is None:
            return None
        # An empty page after moving on means nothing follows: the last page precedes.
        return self.link(reverse=True, row=self.page[0] if self.page else None)

    def link(self, *, reverse: bool, row: Model | None) -> str:
        tokens = {"o": ",".join(self.keyset)}
        if reverse:
            tokens["r"] = "1"
        if row is not None:
            tokens["p"] = json.dumps([encode_value(getattr(row, name)) for name in self.key])
        encoded = b64encode(parse.urlencode(tokens).encode("ascii")).decode("ascii")
        return replace_query_param(self.url, self.cursor_query_param, encoded)

    def read_cursor(self, request: Request) -> KeysetCursor | None:
        """Return the request's cursor; 404 for one this list did not give."""
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        try:
            tokens = parse.parse_qs(b64decode(encoded.encode("ascii"), validate=True).decode("ascii"))
            if tokens.get("o", [""])[0] != ",".join(self.keyset):
                raise ValueError("a cursor of another ordering")
            raw = tokens.get("p")
            position = None if raw is None else self.decode_position(json.loads(raw[0]))
        except (ValueError, TypeError, OverflowError, UnicodeError, DjangoValidationError) as exc:
            raise NotFound(self.invalid_cursor_message) from exc
        return KeysetCursor(reverse=tokens.get("r", ["0"])[0] == "1", position=position)

    def decode_position(self, values: Any) -> list[Any]:
        """Return the key values of a cursor's position, each as its field's type and in range."""
        if not isinstance(values, list) or len(values) != len(self.key):
            raise ValueError("a position of another key")
        decoded = []
        for name, value in zip(self.key, values, strict=True):
            python = self.model._meta.get_field(name).to_python(value)  # type: ignore[union-attr]  # a concrete field
            if isinstance(python, datetime):
                if python.tzinfo is None or not isinstance(value, str):
                    raise ValueError("a naive or non-text time")
                python = python.astimezone(UTC)  # OverflowError past year 9999 or before year 1
            elif isinstance(python, int):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= python <= MAX_ID:
                    raise ValueError("an id out of range")
            else:
                raise ValueError(f"no keyset on {name}")
            decoded.append(python)
        return decoded

    def get_paginated_response(self, data: Any) -> Response:
        return Response({"next": self.get_next_link(), "previous": self.get_previous_link(), "results": data})

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        response = super().get_paginated_response_schema(schema)
        response["required"] = ["next", "previous", "results"]
        for name, direction in (("next", "after"), ("previous", "before")):
            response["properties"][name]["description"] = f"The page {direction} this one, or null if there is none."
        return response


def encode_value(value: Any) -> Any:
    """Return a key value as JSON: times in ISO 8601 with their offset."""
    return value.isoformat() if isinstance(value, datetime) else value
