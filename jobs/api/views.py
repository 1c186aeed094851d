"""Thin viewsets: they validate input and hand every write to jobs.services."""

from __future__ import annotations

from typing import Any, cast

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
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

from .filters import JobFilter, JobRunFilter, OrderingFilter
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
RUN_ORDERING_FIELDS = ["id", "scheduled_for", "started_at", "finished_at"]
RUN_ORDERING = ["-scheduled_for", "-id"]
RUN_FILTER_BACKENDS = [DjangoFilterBackend, OrderingFilter]  # runs have no text to search


class RunNowThrottle(ScopedRateThrottle):
    """Throttle run-now per user at the `run_now` rate of DEFAULT_THROTTLE_RATES."""

    @property
    def THROTTLE_RATES(self) -> dict[str, str | None]:  # type: ignore[override]  # DRF's is a plain attribute
        # DRF copies the rates into a class attribute at import; read them per request instead,
        # so a changed REST_FRAMEWORK setting applies without a restart of the test process.
        # The stubs type the rates as numbers; they are strings such as "10/minute".
        return cast("dict[str, str | None]", api_settings.DEFAULT_THROTTLE_RATES)


class JobViewSet(viewsets.ModelViewSet):
    """Jobs: create, list, read, change and delete; run now, pause and resume."""

    queryset = Job.objects.all()
    serializer_class = JobSerializer
    filterset_class = JobFilter
    search_fields = ["name", "description"]
    ordering_fields = ["id", "name", "next_run_at", "last_run_at", "created_at", "updated_at"]
    ordering = ["id"]
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
        queryset=JobRun.objects.select_related("job", "worker"),
        serializer_class=JobRunSerializer,
        filterset_class=JobRunFilter,
        ordering_fields=RUN_ORDERING_FIELDS,
        ordering=RUN_ORDERING,
        filter_backends=RUN_FILTER_BACKENDS,
    )
    def runs(self, request: Request, pk: str | None = None) -> Response:
        job = get_object_or_404(Job.objects.all(), pk=pk)
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset().filter(job=job)))
        return self.get_paginated_response(JobRunSerializer(page, many=True).data)


class JobRunViewSet(viewsets.ReadOnlyModelViewSet):
    """The history of every run, newest first."""

    queryset = JobRun.objects.select_related("job", "worker")
    serializer_class = JobRunSerializer
    filterset_class = JobRunFilter
    filter_backends = RUN_FILTER_BACKENDS
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


class MetricsView(APIView):
    """Prometheus metrics: runs by type and status, durations, start lateness, queue depth."""

    queryset = JobRun.objects.none()  # needs the view_jobrun permission

    @extend_schema(responses={(200, "text/plain"): str}, summary="Prometheus metrics")
    def get(self, request: Request) -> HttpResponse:
        body, content_type = metrics.render()
        return HttpResponse(body, content_type=content_type)
