"""Query-string filters for the job and run lists."""

from datetime import UTC
from typing import Any

import django_filters
from django import forms
from django.db.models import Exists, F, Field, Model, OuterRef, QuerySet
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
    # No DISTINCT (django-filter's default for lists): one column's IN cannot repeat a row, and
    # DISTINCT would sort every matching run instead of reading the first page from an index.
    status = django_filters.MultipleChoiceFilter(choices=JobRun.Status.choices, distinct=False)
    trigger = django_filters.ChoiceFilter(choices=JobRun.Trigger.choices)
    job_type = django_filters.CharFilter(method="filter_job_type", help_text="Only runs of jobs of this type.")
    scheduled_after, scheduled_before = date_range("scheduled_for")
    started_after, started_before = date_range("started_at")

    Meta = declared_only(JobRun)

    def filter_job_type(self, queryset: QuerySet[JobRun], name: str, value: str) -> QuerySet[JobRun]:
        # EXISTS rather than a join or IN: SQLite, which keeps no statistics, would otherwise
        # start from the jobs of the type and sort all their runs, instead of reading the history
        # in order and keeping the runs whose job is of the type.
        return queryset.filter(Exists(Job.objects.filter(pk=OuterRef("job_id"), job_type=value)))


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
    """DRF's ordering by one field, with empty timestamps last and the id after it in the same direction.

    SQLite sorts NULL first and PostgreSQL last, so without this `?ordering=-next_run_at` would
    answer differently on the two; the id keeps pages from repeating or losing rows. Both
    directions of (field, id) are one index read forwards or backwards (see Job.Meta.indexes), so
    orderings combine no fields: a combination no index serves is a 400, and so is a field the
    list used to offer (the view's `withdrawn_ordering_fields`, with what to use instead). Other
    names are ignored, as DRF does.
    """

    def get_ordering(self, request: Request, queryset: QuerySet[Any], view: Any) -> list[str]:
        withdrawn: dict[str, str] = getattr(view, "withdrawn_ordering_fields", {})
        for term in request.query_params.get(self.ordering_param, "").split(","):
            name = term.strip().lstrip("-")
            if name in withdrawn:
                message = f"{name} is no longer offered: {withdrawn[name]} {one_field_message(view)}"
                raise ValidationError({self.ordering_param: [message]})
        ordering = super().get_ordering(request, queryset, view) or []
        if len(ordering) > 1:
            raise ValidationError({self.ordering_param: [one_field_message(view)]})
        return list(ordering)

    def filter_queryset(self, request: Request, queryset: QuerySet[Any], view: Any) -> QuerySet[Any]:
        ordering = self.get_ordering(request, queryset, view)
        if not ordering:
            return queryset
        return queryset.order_by(*with_id(ordering[0], model=queryset.model))

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        withdrawn = ", ".join(f"`{name}`" for name in getattr(view, "withdrawn_ordering_fields", {}))
        unknown = f"No longer offered, a 400: {withdrawn}. Other names are ignored." if withdrawn else ""
        return [ordering_parameter(self.ordering_param, view, unknown or "Other names are ignored.")]


class KeysetOrderingFilter(OrderingFilter):
    """One of the view's `ordering_fields`, then the id, for keyset pagination (see KeysetPagination).

    Anything else is a 400 naming the parameter: the cursor holds the values of exactly this key.
    """

    def get_ordering(self, request: Request, queryset: QuerySet[Any], view: Any) -> list[str]:
        terms = [term.strip() for term in request.query_params.get(self.ordering_param, "").split(",") if term.strip()]
        if not terms:
            return with_id(view.ordering[0])
        if len(terms) > 1 or terms[0].lstrip("-") not in view.ordering_fields:
            raise ValidationError({self.ordering_param: [one_field_message(view)]})
        return with_id(terms[0])

    def filter_queryset(self, request: Request, queryset: QuerySet[Any], view: Any) -> QuerySet[Any]:
        return queryset.order_by(*self.get_ordering(request, queryset, view))

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [ordering_parameter(self.ordering_param, view, "Anything else is a 400.")]


def with_id(term: str, *, model: type[Model] | None = None) -> list[Any]:
    """Return the ordering by `term` then the id, both in the direction of `term` (`-` for descending).

    With `model`, a nullable field's empty values come last. Only those: PostgreSQL matches an
    index to NULLS LAST only when the index was built so, whether or not the column holds NULLs.
    """
    descending, name = term.startswith("-"), term.lstrip("-")
    if name in {"id", "pk"}:
        return [term]
    field = None if model is None else model._meta.get_field(name)
    if not (isinstance(field, Field) and field.null):
        return [term, "-id" if descending else "id"]
    column = F(name).desc(nulls_last=True) if descending else F(name).asc(nulls_last=True)
    return [column, F("id").desc() if descending else F("id").asc()]


def ordering_choices(view: Any) -> list[str]:
    return [choice for name in view.ordering_fields for choice in (name, f"-{name}")]


def one_field_message(view: Any) -> str:
    return f"Order by one of {', '.join(ordering_choices(view))}."


def ordering_parameter(name: str, view: Any, unknown: str) -> dict[str, Any]:
    """Return the OpenAPI parameter of the view's ordering: its choices, as an enum."""
    model = view.get_queryset().model
    nullable = [field for field in view.ordering_fields if getattr(model._meta.get_field(field), "null", False)]
    names = ", ".join(f"`{field}`" for field in nullable)
    empty_last = f" Empty values of {names} come last in both directions." if nullable else ""
    return {
        "name": name,
        "required": False,
        "in": "query",
        "description": (
            f"One field, `-` first for descending, the id breaking ties in the same direction; "
            f"default `{view.ordering[0]}`.{empty_last} {unknown}"
        ),
        "schema": {"type": "string", "enum": ordering_choices(view)},
    }
