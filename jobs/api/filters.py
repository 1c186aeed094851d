"""Query-string filters for the job and run lists."""

from datetime import UTC
from typing import Any

import django_filters
from django import forms
from django.db.models import F, Model, QuerySet
from rest_framework import filters
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

from jobs.models import Job, JobRun

MAX_ID = 2**63 - 1
# Each search word is one more LIKE over every searched column: bound the work a query can ask for.
MAX_SEARCH_TERMS = 10
MAX_SEARCH_CHARS = 200


class IdFilter(django_filters.NumberFilter):
    """A whole-number id; anything else, or out of the database's range, is a 400, not a 500."""

    field_class = forms.IntegerField

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


class StrictBooleanField(forms.Field):
    """true/false (or 1/0, yes/no); anything else is an error rather than silently no filter."""

    def to_python(self, value: Any) -> bool | None:
        if value in (None, ""):
            return None
        lowered = str(value).strip().lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        raise forms.ValidationError(f"{value!r} is not a boolean (use true or false)")


class BooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class UtcIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 instant in UTC: PostgreSQL refuses offsets past 15:59, which Python accepts."""

    def to_python(self, value: Any) -> Any:
        result = super().to_python(value)
        if result is None:
            return None
        try:
            return result.astimezone(UTC)
        except OverflowError as exc:
            raise forms.ValidationError("is out of range", code="invalid") from exc


class IsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


def declared_only(model: type[Model]) -> type:
    """Return the Meta of a FilterSet over `model` that generates no filters: all are declared, in their order."""
    return type("Meta", (), {"model": model, "fields": []})


def date_range(field_name: str) -> tuple[IsoDateTimeFilter, IsoDateTimeFilter]:
    """Return the (after, before) filters of a timestamp field: at or after, and strictly before."""
    return (
        IsoDateTimeFilter(field_name=field_name, lookup_expr="gte"),
        IsoDateTimeFilter(field_name=field_name, lookup_expr="lt"),
    )


class JobFilter(django_filters.FilterSet):
    job_type = django_filters.CharFilter(help_text="Only jobs of this type.")
    enabled = BooleanFilter(help_text="true or false.")
    last_run_status = django_filters.ChoiceFilter(choices=JobRun.Status.choices)
    next_run_after, next_run_before = date_range("next_run_at")
    created_after, created_before = date_range("created_at")

    Meta = declared_only(Job)


class JobRunFilter(django_filters.FilterSet):
    job = IdFilter(field_name="job_id", help_text="Only runs of this job id.")
    status = django_filters.MultipleChoiceFilter(choices=JobRun.Status.choices)
    trigger = django_filters.ChoiceFilter(choices=JobRun.Trigger.choices)
    job_type = django_filters.CharFilter(field_name="job__job_type")
    scheduled_after, scheduled_before = date_range("scheduled_for")
    started_after, started_before = date_range("started_at")

    Meta = declared_only(JobRun)


class SearchFilter(filters.SearchFilter):
    """DRF's search filter, whose errors name the `search` parameter."""

    def get_search_terms(self, request: Request) -> list[str]:
        if len(request.query_params.get(self.search_param, "")) > MAX_SEARCH_CHARS:
            raise ValidationError({self.search_param: [f"at most {MAX_SEARCH_CHARS} characters"]})
        try:
            terms = super().get_search_terms(request)
        except ValidationError as exc:
            raise ValidationError({self.search_param: exc.detail}) from exc
        if len(terms) > MAX_SEARCH_TERMS:
            raise ValidationError({self.search_param: [f"at most {MAX_SEARCH_TERMS} words"]})
        return terms


class OrderingFilter(filters.OrderingFilter):
    """DRF's ordering, with empty timestamps last in both directions and the id to break ties.

    SQLite sorts NULL first and PostgreSQL last, so without this `?ordering=-next_run_at` would
    answer differently on the two; the id tie-break keeps pages from repeating or losing rows.
    """

    def filter_queryset(self, request: Request, queryset: QuerySet[Any], view: Any) -> QuerySet[Any]:
        ordering = self.get_ordering(request, queryset, view)
        if not ordering:
            return queryset
        names = [name.lstrip("-") for name in ordering]
        expressions = [
            F(name[1:]).desc(nulls_last=True) if name.startswith("-") else F(name).asc(nulls_last=True)
            for name in ordering
        ]
        if "id" not in names and "pk" not in names:
            expressions.append(F("id").asc())
        return queryset.order_by(*expressions)
