"""Thin viewsets: they validate input and hand every write to jobs.services."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from django.contrib.staticfiles import finders
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerView
from prometheus_client import CollectorRegistry
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from jobs import metrics, schedule, services
from jobs.executors import all_executors
from jobs.health import health_report
from jobs.models import Job, JobRun

from .filters import JobFilter, JobRunFilter, KeysetOrderingFilter
from .pagination import KeysetPagination
from .schema import JOB_CREATE_EXAMPLES, JOB_REQUEST_EXAMPLES
from .serializers import (
    CronPreviewQuerySerializer,
    CronPreviewSerializer,
    JobRunSerializer,
    JobSerializer,
    JobTypeSerializer,
)

# Any run of digits: Django answers an out-of-range id with "does not exist", so a huge id is a
# JSON 404 like any other unknown id rather than an HTML page from the URL resolver.
ID_PATTERN = r"[0-9]+"
# Each ordering is read from an index on (field, id): started_at and finished_at change while a run
# runs, so a cursor over them would skip or repeat runs, and an index on them would cost the
# scheduler an index entry at every claim and finish (see JobRun.Meta.indexes).
RUN_ORDERING_FIELDS = ["scheduled_for", "id"]
RUN_ORDERING = ["-scheduled_for"]
RUN_FILTER_BACKENDS = [DjangoFilterBackend, KeysetOrderingFilter]  # runs have no text to search


def run_list_queryset() -> QuerySet[JobRun]:
    """Return the runs with the job's name and the scheduler's host and pid, in the same query.

    Only those columns of the job and the scheduler: a job's parameters and description would be
    read and decoded for every run listed, to show its name.
    """
    run_fields = [field.attname for field in JobRun._meta.concrete_fields]
    return JobRun.objects.select_related("job", "worker").only(
        *run_fields, "job__name", "worker__hostname", "worker__pid"
    )


class RunNowThrottle(ScopedRateThrottle):
    """Throttle run-now per user at the `run_now` rate of DEFAULT_THROTTLE_RATES."""

    @property
    def THROTTLE_RATES(self) -> dict[str, str | None]:  # type: ignore[override]  # DRF's is a plain attribute
        # DRF copies the rates into a class attribute at import; read them per request instead,
        # so a changed REST_FRAMEWORK setting applies without a restart of the test process.
        # The stubs type the rates as numbers; they are strings such as "10/minute".
        return cast("dict[str, str | None]", api_settings.DEFAULT_THROTTLE_RATES)


@extend_schema_view(
    create=extend_schema(examples=JOB_CREATE_EXAMPLES),
    update=extend_schema(examples=JOB_REQUEST_EXAMPLES),
)
class JobViewSet(viewsets.ModelViewSet):
    """Jobs: create, list, read, change and delete; run now, pause and resume."""

    queryset = Job.objects.all()
    serializer_class = JobSerializer
    filterset_class = JobFilter
    search_fields = ["name", "description"]
    # Each served by an index (Job.Meta.indexes), which costs the scheduler an entry at every fire.
    ordering_fields = ["id", "name", "next_run_at"]
    ordering = ["id"]
    withdrawn_ordering_fields = {
        "created_at": "ids are given in creation order, so order by id.",
        "updated_at": "an index on it would cost the scheduler at every fire.",
        "last_run_at": "GET /runs lists the latest runs first, with their jobs.",
    }
    lookup_value_regex = ID_PATTERN
    throttle_scope = "run_now"

    def get_throttles(self) -> list[Any]:
        return [RunNowThrottle()] if self.action == "run" else []

    def perform_create(self, serializer: BaseSerializer) -> None:
        serializer.instance = services.job_create(**serializer.validated_data)

    def perform_update(self, serializer: BaseSerializer) -> None:
        job = cast(Job, serializer.instance)  # an update always has the instance it changes
        serializer.instance = services.job_update(job, **serializer.validated_data)

    def perform_destroy(self, instance: Job) -> None:
        services.job_delete(instance)

    @extend_schema(request=None, responses={202: JobRunSerializer}, summary="Run the job now")
    @action(detail=True, methods=["post"])
    def run(self, request: Request, pk: str | None = None) -> Response:
        run = services.job_trigger(self.get_object())
        return Response(JobRunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses=JobSerializer, summary="Disable the job")
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        return Response(JobSerializer(services.job_pause(self.get_object())).data)

    @extend_schema(request=None, responses=JobSerializer, summary="Enable the job from now on")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        return Response(JobSerializer(services.job_resume(self.get_object())).data)

    @extend_schema(responses=JobRunSerializer(many=True), summary="The job's runs, newest first")
    @action(
        detail=True,
        methods=["get"],
        # The action lists runs: reading them needs the run view permission, as /runs does.
        queryset=run_list_queryset(),
        serializer_class=JobRunSerializer,
        filterset_class=JobRunFilter,
        ordering_fields=RUN_ORDERING_FIELDS,
        ordering=RUN_ORDERING,
        filter_backends=RUN_FILTER_BACKENDS,
        pagination_class=KeysetPagination,
    )
    def runs(self, request: Request, pk: str | None = None) -> Response:
        job = get_object_or_404(Job.objects.only("id"), pk=pk)
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset().filter(job=job)))
        return self.get_paginated_response(JobRunSerializer(page, many=True).data)


class JobRunViewSet(viewsets.ReadOnlyModelViewSet):
    """The history of every run, newest first."""

    queryset = run_list_queryset()
    serializer_class = JobRunSerializer
    filterset_class = JobRunFilter
    filter_backends = RUN_FILTER_BACKENDS
    pagination_class = KeysetPagination
    ordering_fields = RUN_ORDERING_FIELDS
    ordering = RUN_ORDERING
    lookup_value_regex = ID_PATTERN


class JobTypesView(APIView):
    """The job types this server can run, with the JSON Schema of their parameters."""

    queryset = Job.objects.none()  # job types are readable by whoever may view jobs

    @extend_schema(responses=JobTypeSerializer(many=True))
    def get(self, request: Request) -> Response:
        types = [
            {
                "name": name,
                "label": executor.label or name,
                "description": executor.description,
                "safe_to_repeat": executor.safe_to_repeat,
                "parameters_schema": executor.parameters_schema(),
            }
            for name, executor in sorted(all_executors().items())
        ]
        return Response(JobTypeSerializer(types, many=True).data)


class CronPreviewView(APIView):
    """The next fire times of a cron expression, computed exactly as the scheduler will."""

    queryset = Job.objects.none()

    @extend_schema(parameters=[CronPreviewQuerySerializer], responses=CronPreviewSerializer)
    def get(self, request: Request) -> Response:
        query = CronPreviewQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        expression = query.validated_data["expression"]
        zone_name = query.validated_data.get("timezone") or Job._meta.get_field("timezone").get_default()
        after = query.validated_data.get("after") or timezone.now()
        times = schedule.fire_times(expression, zone_name, after, query.validated_data["count"])
        tz = schedule.zone(zone_name)
        return Response(
            CronPreviewSerializer(
                {
                    "expression": expression,
                    "timezone": zone_name,
                    "description": schedule.describe(expression),
                    "fixed_time": schedule.parse(expression).fixed_time,
                    "fire_times": [{"utc": t, "local": t.astimezone(tz).isoformat()} for t in times],
                }
            ).data
        )


class HealthView(APIView):
    """200 when the database answers and a scheduler has heartbeaten recently, else 503."""

    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(
        responses={200: dict, 503: dict},
        parameters=[OpenApiParameter("scheduler", bool, description="Set false to ignore schedulers.")],
    )
    def get(self, request: Request) -> Response:
        require_scheduler = request.query_params.get("scheduler", "true").lower() != "false"
        report = health_report(require_scheduler=require_scheduler)
        return Response(report, status=200 if report["status"] == "ok" else 503)


class MetricsRenderer(BaseRenderer):
    """Render the metrics registry with `exposition`, in the subclass's format."""

    charset = "utf-8"
    exposition: Callable[[CollectorRegistry], bytes]

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return self.exposition(data)


class PrometheusTextRenderer(MetricsRenderer):
    """The Prometheus text format 0.0.4, which every Prometheus-compatible scraper reads."""

    media_type = "text/plain; version=0.0.4"
    format = "prometheus"
    exposition = staticmethod(metrics.render_text)


class OpenMetricsRenderer(MetricsRenderer):
    """OpenMetrics 1.0.0, for scrapers that ask for it."""

    media_type = "application/openmetrics-text; version=1.0.0"
    format = "openmetrics"
    exposition = staticmethod(metrics.render_openmetrics)


class MetricsNegotiation(BaseContentNegotiation):
    """Prefer what the Accept header prefers (q-values included); answer the text format otherwise.

    An exporter answers whatever a scraper accepts rather than 406, as prometheus_client does;
    DRF's own negotiation ignores q-values, so it would answer Prometheus 3 in a format it ranks last.
    `?format=openmetrics` or `?format=prometheus` choose as in the rest of the API.
    """

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return None  # GET only: there is no body to parse

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        by_type = {renderer.media_type: renderer for renderer in renderers}
        override = api_settings.URL_FORMAT_OVERRIDE
        chosen = format_suffix or (request.query_params.get(override) if override else None)
        if chosen:
            for renderer in by_type.values():
                if renderer.format == chosen:
                    return renderer, renderer.media_type
            raise Http404(f"No metrics format {chosen!r}.")
        # The text format is listed first, so that */* and a missing Accept header choose it.
        preferred = request._request.get_preferred_type(list(by_type)) or next(iter(by_type))
        return by_type[preferred], preferred


class MetricsView(APIView):
    """Prometheus metrics: runs by type and status, durations, start lateness, queue depth."""

    queryset = JobRun.objects.none()  # needs the view_jobrun permission
    renderer_classes = [PrometheusTextRenderer, OpenMetricsRenderer]
    content_negotiation_class = MetricsNegotiation

    @extend_schema(
        summary="Prometheus metrics",
        description=(
            "The Prometheus text format 0.0.4, or OpenMetrics 1.0.0 when the Accept header prefers "
            "`application/openmetrics-text`; any other Accept header gets the text format."
        ),
        responses={
            (200, PrometheusTextRenderer.media_type): OpenApiTypes.STR,
            (200, OpenMetricsRenderer.media_type): OpenApiTypes.STR,
        },
    )
    def get(self, request: Request) -> Response:
        return Response(metrics.registry())

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        if not isinstance(getattr(response, "data", None), CollectorRegistry):
            # Errors (and OPTIONS) answer JSON like the rest of the API, whatever the Accept header.
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


# The docs pages load only what this server serves. The bundled ReDoc still asks cdn.redoc.ly for
# a logo, which this policy makes the browser refuse before any request leaves, as it would refuse
# any other outside address a future bundle might add. The pages' own inline scripts and styles,
# ReDoc's search worker (a blob: URL) and Swagger UI's data: icons are allowed.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
    ]
)


class OfflineDocsView(APIView):
    """Add the docs' content security policy to whatever the docs view answers."""

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return response


class SwaggerView(OfflineDocsView, SpectacularSwaggerView):
    """Swagger UI from the bundled assets, loading nothing from other hosts."""


class RedocView(OfflineDocsView, SpectacularRedocView):
    """ReDoc from the bundled assets (without its web fonts), loading nothing from other hosts."""

    template_name = "api/redoc.html"

    @staticmethod
    def _redoc_standalone() -> str:
        return reverse("redoc-bundle")


# The bundle's one outside address: the "API docs by Redocly" logo. An empty image in its place
# means the browser never even tries to reach cdn.redoc.ly.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciLz4="


@functools.cache
def _offline_redoc_bundle() -> bytes:
    found = finders.find("drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js")
    assert isinstance(found, str), "drf-spectacular-sidecar is installed (requirements.txt)"
    return Path(found).read_bytes().replace(REDOC_LOGO, EMPTY_SVG)


def redoc_bundle(request: HttpRequest) -> HttpResponse:
    """The bundled ReDoc script without its outside logo."""
    response = HttpResponse(_offline_redoc_bundle(), content_type="application/javascript; charset=utf-8")
    response["Cache-Control"] = "public, max-age=86400"
    return response
