"""The admin, the main screen for people: jobs with their schedules and runs, the run history, the schedulers.

Thin on purpose: every write goes through jobs.services, every fire time through jobs.schedule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.forms import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import truncatechars
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from . import schedule, services
from .conf import config
from .executors import all_executors
from .forms import JobAdminForm
from .models import Job, JobRun, SchedulerProcess
from .secrets import mask_secrets

RECENT_RUNS = 20
PREVIEW_COUNT = 5

_BADGE_COLOURS = {
    JobRun.Status.SUCCEEDED: "green",
    JobRun.Status.FAILED: "red",
    JobRun.Status.TIMED_OUT: "red",
    JobRun.Status.LOST: "red",
    JobRun.Status.SKIPPED: "grey",
    JobRun.Status.RUNNING: "blue",
    JobRun.Status.QUEUED: "blue",
}


def status_badge(status: str) -> str:
    """Return a coloured badge for a run status, or a dash when there is none."""
    if not status:
        return "—"
    label = JobRun.Status(status).label if status in JobRun.Status.values else status
    colour = _BADGE_COLOURS.get(status, "grey")  # type: ignore[call-overload]
    return format_html('<span class="jobs-badge jobs-badge--{}" title="{}">{}</span>', colour, status, label)


def seconds(value: float | None) -> str:
    """Format a duration for people: 0.35 s, 12.4 s, 3 min 5 s."""
    if value is None:
        return "—"
    if abs(value) < 60:
        return f"{value:.2f} s" if abs(value) < 10 else f"{value:.1f} s"
    minutes, rest = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def error_excerpt(error: str, length: int = 80) -> str:
    """Return the first line of an error, shortened; the traceback stays on the run's page."""
    return truncatechars(error.strip().splitlines()[0], length) if error.strip() else ""


def utc(value: datetime | None, *, since: datetime | None = None) -> str:
    """Format an instant to the second in UTC (as logs and the API show it).

    The date is left out when it is the same as `since`'s, which keeps run tables narrow.
    """
    if value is None:
        return "—"
    value = value.astimezone(UTC)
    same_day = since is not None and since.astimezone(UTC).date() == value.date()
    return format_html('<span class="jobs-instant">{}</span>', f"{value:{'' if same_day else '%Y-%m-%d '}%H:%M:%S} UTC")


def column(attribute: str, description: str, show: Callable[[Any], str], *, ordering: str | None = None) -> Any:
    """Return a column (or read-only field) showing an object's `attribute` with `show`."""

    @admin.display(description=description, ordering=ordering)
    def shown(self: admin.ModelAdmin, obj: Any) -> str:
        return show(getattr(obj, attribute))

    return shown


def bulk_action(description: str, service: Callable[[Job], object], done: str, **only: Any) -> Any:
    """Return an action applying `service` to each selected job matching `only`, then saying `done` of them."""

    @admin.action(description=description, permissions=["change"])
    def action(self: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        jobs = list(queryset.filter(**only))
        for job in jobs:
            service(job)
        self.message_user(request, done.format(jobs=_jobs(len(jobs))), messages.SUCCESS)

    return action


class JobTypeFilter(admin.SimpleListFilter):
    title = "type"
    parameter_name = "job_type"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, executor.label or name) for name, executor in sorted(all_executors().items())]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        return queryset.filter(job_type=self.value()) if self.value() else queryset


class LastStatusFilter(admin.SimpleListFilter):
    title = "last status"
    parameter_name = "last_run_status"
    NEVER = "never"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [*JobRun.Status.choices, (self.NEVER, "Never run")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        if self.value() == self.NEVER:
            return queryset.filter(last_run_status="")
        return queryset.filter(last_run_status=self.value()) if self.value() else queryset


class RunColumns:
    """Columns shared by the runs list and the job page's recent runs."""

    badge = column("status", "status", status_badge, ordering="status")

    @admin.display(description="trigger", ordering="trigger")
    def trigger_attempt(self, run: JobRun) -> str:
        return format_html('{}<div class="jobs-quiet">attempt {}</div>', run.get_trigger_display(), run.attempt)

    scheduled = column("scheduled_for", "scheduled for", utc, ordering="scheduled_for")

    @admin.display(description="started", ordering="started_at")
    def started(self, run: JobRun) -> str:
        if run.started_at is None:
            return "—"
        return format_html(
            '{}<div class="jobs-quiet">{} late</div>',
            utc(run.started_at, since=run.scheduled_for),
            seconds(run.lateness_seconds),
        )

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, run: JobRun) -> str:
        return utc(run.finished_at, since=run.started_at)

    duration = column("duration_seconds", "duration", seconds)

    @admin.display(description="error")
    def error_short(self, run: JobRun) -> str:
        return error_excerpt(run.error or run.skip_reason)


class RecentRunsFormSet(BaseInlineFormSet):
    def get_queryset(self) -> QuerySet[JobRun]:
        # Sliced here rather than in the inline's get_queryset, because the formset filters it by job first.
        if not hasattr(self, "_queryset"):
            self._queryset = super().get_queryset().select_related("worker")[:RECENT_RUNS]
        return self._queryset


class RecentRunsInline(RunColumns, admin.TabularInline):
    model = JobRun
    formset = RecentRunsFormSet
    verbose_name = "run"
    verbose_name_plural = f"Recent runs (newest {RECENT_RUNS})"
    fields = readonly_fields = (
        "badge",
        "trigger_attempt",
        "scheduled",
        "started",
        "finished",
        "duration",
        "worker",
        "error_short",
    )
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    form = JobAdminForm
    list_display = ("name", "job_type", "schedule", "enabled", "next_run", "last_run", "last_status")
    list_filter = (JobTypeFilter, "enabled", LastStatusFilter, "timezone")
    search_fields = ("name", "description")
    actions = ("run_now", "pause", "resume")
    readonly_fields = ("schedule_preview", "next_run_at", "last_run_at", "last_status", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "description", "job_type", "parameters", "enabled")}),
        ("Schedule", {"fields": ("cron_expression", "timezone", "schedule_preview")}),
        (
            "Policies",
            {
                "fields": (
                    ("misfire_policy", "misfire_grace_seconds"),
                    "overlap_policy",
                    ("max_retries", "retry_backoff_seconds"),
                    "timeout_seconds",
                )
            },
        ),
        ("State", {"fields": ("next_run_at", "last_run_at", "last_status", ("created_at", "updated_at"))}),
    )
    inlines = (RecentRunsInline,)

    class Media:
        css = {"all": ("jobs/admin.css",)}
        js = ("jobs/job_form.js",)

    def get_inlines(self, request: HttpRequest, obj: Job | None) -> tuple[type[admin.options.InlineModelAdmin], ...]:
        return self.inlines if obj is not None else ()

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change, **kwargs)
        return type(form.__name__, (form,), {"user": request.user})

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Job | None:
        job = super().get_object(request, object_id, from_field)
        if job is not None and not self.has_change_permission(request, job):
            # Shown read-only: who may not change the job does not need its credentials.
            job.parameters = mask_secrets(job.parameters)
        return job

    # --- columns and read-only fields ---

    @admin.display(description="schedule", ordering="cron_expression")
    def schedule(self, job: Job) -> str:
        return format_html(
            '<code class="jobs-cron">{}</code><div class="jobs-description">{}</div><div class="jobs-quiet">{}</div>',
            job.cron_expression,
            _description(job.cron_expression),
            job.timezone,
        )

    @admin.display(description="next run", ordering="next_run_at")
    def next_run(self, job: Job) -> str:
        return _instant(job.next_run_at, job.timezone)

    @admin.display(description="last run", ordering="last_run_at")
    def last_run(self, job: Job) -> str:
        return _instant(job.last_run_at, job.timezone)

    last_status = column("last_run_status", "last status", status_badge, ordering="last_run_status")

    @admin.display(description="next fire times")
    def schedule_preview(self, job: Job) -> str:
        if job.pk is None:
            return "Shown once the job is saved."
        try:
            times = schedule.fire_times(job.cron_expression, job.timezone, timezone.now(), PREVIEW_COUNT)
            zone = schedule.zone(job.timezone)
        except schedule.CronError as exc:
            return f"Cannot compute the schedule: {exc}"
        note = "" if job.enabled else "Paused: the job would fire at these times if resumed."
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td></tr>",
            (
                (f"{instant:%a %Y-%m-%d %H:%M:%S} UTC", f"{instant.astimezone(zone):%a %Y-%m-%d %H:%M:%S %Z}")
                for instant in times
            ),
        )
        if not times:
            rows = format_html('<tr><td colspan="2">{}</td></tr>', "It never fires again.")
        return format_html(
            '<div class="jobs-description">{} <span class="jobs-quiet">({})</span></div>'
            '<div class="help">{}</div>'
            '<table class="jobs-fire-times"><thead><tr><th scope="col">UTC</th><th scope="col">{}</th></tr></thead>'
            "<tbody>{}</tbody></table>",
            _description(job.cron_expression),
            job.timezone,
            note,
            job.timezone,
            rows,
        )

    # --- saving through the services ---

    def save_model(self, request: HttpRequest, obj: Job, form: JobAdminForm, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in form.Meta.fields if name in form.cleaned_data}
        if change:
            services.job_update(obj, **fields)
        else:
            _copy_saved(services.job_create(**fields), into=obj)

    def delete_model(self, request: HttpRequest, obj: Job) -> None:
        services.job_delete(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        for job in queryset:
            services.job_delete(job)

    # --- run now, pause, resume: bulk actions ---

    run_now = bulk_action("Run now (queue a manual run)", services.job_trigger, "Queued a manual run for {jobs}.")
    pause = bulk_action("Pause (stop firing)", services.job_pause, "Paused {jobs}.", enabled=True)
    resume = bulk_action("Resume (fire from now on)", services.job_resume, "Resumed {jobs}.", enabled=False)

    # --- run now, pause, resume: buttons on the change page ---

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name

        def wrap(view: Any) -> Any:
            # admin_view: staff login and CSRF protection; require_POST: buttons only change state on POST.
            return self.admin_site.admin_view(require_POST(view))

        return [
            path("<path:object_id>/run/", wrap(self.run_now_view), name="{}_{}_run".format(*info)),
            path("<path:object_id>/pause/", wrap(self.pause_view), name="{}_{}_pause".format(*info)),
            path("<path:object_id>/resume/", wrap(self.resume_view), name="{}_{}_resume".format(*info)),
            *super().get_urls(),
        ]

    def _job_for_button(self, request: HttpRequest, object_id: str) -> Job:
        if not self.has_change_permission(request):
            raise PermissionDenied
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404(f"No job with id {object_id!r}.")
        if not self.has_change_permission(request, job):
            raise PermissionDenied
        return job

    def _back_to(self, job: Job) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:jobs_job_change", args=[job.pk], current_app=self.admin_site.name))

    def run_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_for_button(request, object_id)
        run = services.job_trigger(job)
        link = reverse("admin:jobs_jobrun_change", args=[run.pk], current_app=self.admin_site.name)
        self.message_user(
            request, format_html('Queued <a href="{}">run {}</a> of “{}”.', link, run.pk, job.name), messages.SUCCESS
        )
        return self._back_to(job)

    def pause_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_for_button(request, object_id)
        services.job_pause(job)
        self.message_user(request, f"Paused “{job.name}”: it will not fire until resumed.", messages.SUCCESS)
        return self._back_to(job)

    def resume_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_for_button(request, object_id)
        services.job_resume(job)
        self.message_user(request, f"Resumed “{job.name}”: next fire {_when(job)}.", messages.SUCCESS)
        return self._back_to(job)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        runs_url = reverse("admin:jobs_jobrun_changelist", current_app=self.admin_site.name)
        query = urlencode({"job__id__exact": unquote(object_id)})
        extra_context = {**(extra_context or {}), "runs_url": f"{runs_url}?{query}"}
        return super().change_view(request, object_id, form_url, extra_context)


@admin.register(JobRun)
class JobRunAdmin(RunColumns, admin.ModelAdmin):
    list_display = (
        "scheduled",
        "job_link",
        "badge",
        "trigger_attempt",
        "started",
        "duration",
        "worker",
        "error_short",
    )
    list_display_links = ("scheduled",)
    list_filter = ("status", "trigger", ("job__job_type", admin.AllValuesFieldListFilter), "job")
    list_select_related = ("job", "worker")
    search_fields = ("job__name", "error", "skip_reason")
    date_hierarchy = "scheduled_for"
    fields = (
        "job",
        "badge",
        "trigger",
        "attempt",
        "missed_fires",
        "scheduled_for",
        "not_before",
        "started_at",
        "finished_at",
        "duration",
        "lateness",
        "worker",
        "skip_reason",
        "result_pretty",
        "error_pre",
        "created_at",
    )
    readonly_fields = fields

    class Media:
        css = {"all": ("jobs/admin.css",)}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: JobRun | None = None) -> bool:
        return False

    @admin.display(description="job", ordering="job__name")
    def job_link(self, run: JobRun) -> str:
        url = reverse("admin:jobs_job_change", args=[run.job_id], current_app=self.admin_site.name)
        return format_html('<a href="{}">{}</a>', url, run.job.name)

    lateness = column("lateness_seconds", "lateness", seconds)

    @admin.display(description="result")
    def result_pretty(self, run: JobRun) -> str:
        if run.result is None:
            return "—"
        return format_html('<pre class="jobs-pre">{}</pre>', json.dumps(run.result, indent=2, ensure_ascii=False))

    @admin.display(description="error")
    def error_pre(self, run: JobRun) -> str:
        return format_html('<pre class="jobs-pre">{}</pre>', run.error) if run.error else "—"


@admin.register(SchedulerProcess)
class SchedulerProcessAdmin(admin.ModelAdmin):
    list_display = (
        "hostname",
        "pid",
        "alive",
        "last_heartbeat",
        "heartbeat_age",
        "started",
        "stopped",
        "max_concurrent",
    )
    list_display_links = ("hostname",)
    search_fields = ("hostname",)
    readonly_fields = ("hostname", "pid", "max_concurrent", "started_at", "last_heartbeat_at", "stopped_at", "alive")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SchedulerProcess | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SchedulerProcess | None = None) -> bool:
        # A live process keeps heartbeating into its row; rows are the scheduler's own to write.
        return False

    last_heartbeat = column("last_heartbeat_at", "last heartbeat", utc, ordering="last_heartbeat_at")
    started = column("started_at", "started", utc, ordering="started_at")
    stopped = column("stopped_at", "stopped", utc, ordering="stopped_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[SchedulerProcess]:
        # Heartbeats are written by the database's clock (jobs.scheduler.clock): aged by it too,
        # not by this web host's.
        return super().get_queryset(request).annotate(database_now=Now())

    @staticmethod
    def _now(process: SchedulerProcess) -> datetime:
        return getattr(process, "database_now", None) or timezone.now()

    @admin.display(boolean=True, description="alive")
    def alive(self, process: SchedulerProcess) -> bool:
        return process.is_alive(self._now(process), config().lost_after_seconds)

    @admin.display(description="heartbeat age", ordering="-last_heartbeat_at")
    def heartbeat_age(self, process: SchedulerProcess) -> str:
        return seconds((self._now(process) - process.last_heartbeat_at).total_seconds())


def _description(expression: str) -> str:
    try:
        return schedule.describe(expression)
    except schedule.CronError as exc:
        return f"invalid: {exc}"


def _instant(value: datetime | None, zone_name: str) -> str:
    """Show an instant in UTC with the job's local time under it, so neither has to be worked out."""
    if value is None:
        return "—"
    try:
        local = value.astimezone(schedule.zone(zone_name))
    except schedule.CronError:
        local = None
    return format_html(
        '<span class="jobs-instant">{}</span><div class="jobs-quiet">{}</div>',
        f"{value.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
        f"{local:%a %H:%M %Z}" if local else "",
    )


def _jobs(count: int) -> str:
    return f"{count} job{'' if count == 1 else 's'}"


def _when(job: Job) -> str:
    return f"{job.next_run_at:%Y-%m-%d %H:%M:%S} UTC" if job.next_run_at else "never"


def _copy_saved(job: Job, *, into: Job) -> None:
    """Make the admin's unsaved instance the row the service created, so the admin logs and links it."""
    for field in Job._meta.concrete_fields:
        setattr(into, field.attname, getattr(job, field.attname))
    into._state.adding = False
    into._state.db = job._state.db
