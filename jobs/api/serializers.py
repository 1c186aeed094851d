"""Request and response shapes of the REST API."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from jobs import schedule, services
from jobs.executors import job_type_names
from jobs.forms import POLICY_FIELDS
from jobs.models import Job, JobRun, SchedulerProcess, default_timezone
from jobs.secrets import mask_secrets

PREVIEW_YEARS = (1900, 9000)


@lru_cache(maxsize=1024)
def describe(expression: str) -> str:
    """Return schedule.describe(expression), computed once per expression.

    cron-descriptor reloads its translations for every description (about 0.4 ms); a list of 50
    jobs, which share few schedules, would spend most of its time there.
    """
    return schedule.describe(expression)


class JobTypeField(serializers.ChoiceField):
    """The registered job types as choices; an unknown one is reported by `services.job_clean`
    with the other fields' problems, rather than stopping validation on its own."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str) or not data:
            self.fail("invalid_choice", input=data)
        return data


class JobSerializer(serializers.ModelSerializer):
    schedule_description = serializers.SerializerMethodField(help_text="The schedule in plain words.")
    parameters = serializers.JSONField(
        required=False, help_text="Settings for the job type; GET /job-types shows each type's schema."
    )

    class Meta:
        model = Job
        fields = [
            "id",
            "name",
            "description",
            "cron_expression",
            "schedule_description",
            "timezone",
            "job_type",
            "parameters",
            "enabled",
            *POLICY_FIELDS,
            "next_run_at",
            "last_run_at",
            "last_run_status",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["next_run_at", "last_run_at", "last_run_status", "created_at", "updated_at"]
        # What the browsable API's form starts with: the model's defaults (an unticked box
        # would otherwise create a disabled job).
        extra_kwargs = {"enabled": {"initial": True}, "timezone": {"initial": default_timezone}}

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # A choice (a select in the browsable API, an enum in the schema) of the registered types.
        fields["job_type"] = JobTypeField(choices=job_type_names(), help_text=Job._meta.get_field("job_type").help_text)
        return fields

    def to_representation(self, instance: Job) -> dict[str, Any]:
        data = super().to_representation(instance)
        if self._masks_secrets:
            # Who may read a job but not change it does not need its credentials.
            data["parameters"] = mask_secrets(data["parameters"])
        return data

    @cached_property
    def _masks_secrets(self) -> bool:
        """Whether the acting user may read but not change jobs: asked once per list, not per job."""
        user = self._acting_user()
        return user is not None and not user.has_perm("jobs.change_job")

    def get_schedule_description(self, job: Job) -> str:
        return describe(job.cron_expression)

    def validate_parameters(self, value: Any) -> Any:
        if value is None:
            return {}
        problem = services.parameters_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value

    def _acting_user(self) -> Any:
        request = self.context.get("request")
        return getattr(request, "user", None)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        def current(name: str, default: Any) -> Any:
            if name in attrs:
                return attrs[name]
            return getattr(self.instance, name) if self.instance is not None else default

        try:
            cleaned = services.job_clean(
                cron_expression=current("cron_expression", ""),
                timezone=current("timezone", Job._meta.get_field("timezone").get_default()),
                job_type=current("job_type", ""),
                parameters=current("parameters", {}),
                user=self._acting_user(),
            )
        except services.JobValidationError as exc:
            raise serializers.ValidationError(exc.errors) from exc
        return {**attrs, **{key: value for key, value in cleaned.items() if key in attrs}}


class JobRunSerializer(serializers.ModelSerializer):
    job_name = serializers.CharField(source="job.name", read_only=True)
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)
    lateness_seconds = serializers.FloatField(
        read_only=True, allow_null=True, help_text="How long after scheduled_for the run started."
    )
    worker: serializers.StringRelatedField[SchedulerProcess] = serializers.StringRelatedField(
        read_only=True, help_text="host:pid of the scheduler that ran it."
    )

    class Meta:
        model = JobRun
        fields = [
            "id",
            "job",
            "job_name",
            "scheduled_for",
            "trigger",
            "attempt",
            "status",
            "not_before",
            "started_at",
            "finished_at",
            "duration_seconds",
            "lateness_seconds",
            "worker",
            "missed_fires",
            "result",
            "error",
            "skip_reason",
            "created_at",
        ]
        read_only_fields = fields


class SchedulerProcessSerializer(serializers.ModelSerializer):
    class Meta:
        model = SchedulerProcess
        fields = ["id", "hostname", "pid", "max_concurrent", "started_at", "last_heartbeat_at", "stopped_at"]


class CronPreviewQuerySerializer(serializers.Serializer):
    expression = serializers.CharField(help_text="Cron expression, e.g. '0 9 * * MON'.")
    timezone = serializers.CharField(required=False, help_text="IANA time zone; default TIME_ZONE.")
    count = serializers.IntegerField(required=False, default=5, min_value=1, max_value=schedule.MAX_PREVIEW)
    after = serializers.DateTimeField(required=False, help_text="ISO 8601 instant; default now.")

    def validate_expression(self, value: str) -> str:
        try:
            return schedule.validate_cron(value)
        except schedule.CronError as exc:
            raise serializers.ValidationError(str(exc)) from exc

    def validate_timezone(self, value: str) -> str:
        try:
            return schedule.validate_timezone(value)
        except schedule.CronError as exc:
            raise serializers.ValidationError(str(exc)) from exc

    def validate_after(self, value: datetime) -> datetime:
        # Calendar maths near year 9999 overflows Python's datetime; no schedule needs it.
        if not PREVIEW_YEARS[0] <= value.year <= PREVIEW_YEARS[1]:
            raise serializers.ValidationError(f"must be between the years {PREVIEW_YEARS[0]} and {PREVIEW_YEARS[1]}")
        return value


class FireTimeSerializer(serializers.Serializer):
    utc = serializers.DateTimeField()
    local = serializers.CharField(help_text="The same instant in the schedule's time zone, with its offset.")


class CronPreviewSerializer(serializers.Serializer):
    expression = serializers.CharField()
    timezone = serializers.CharField()
    description = serializers.CharField()
    fixed_time = serializers.BooleanField(
        help_text="Fixed-time schedules run once when a daylight-saving change skips or repeats their time."
    )
    fire_times = FireTimeSerializer(many=True)


@extend_schema_field({"type": "object", "additionalProperties": True})
class JsonSchemaField(serializers.DictField):
    pass


class JobTypeSerializer(serializers.Serializer):
    name = serializers.CharField()
    # DRF's metaclass moves declared fields off the class, so this does not replace Field.label.
    label = serializers.CharField()  # type: ignore[assignment]
    description = serializers.CharField()
    safe_to_repeat = serializers.BooleanField(help_text="Whether a run lost in a crash is retried.")
    parameters_schema = JsonSchemaField(help_text="JSON Schema of the job type's parameters.")
