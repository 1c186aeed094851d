"""Jobs, their runs (the history and the queue in one table) and the scheduler processes."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q


def default_timezone() -> str:
    return str(settings.TIME_ZONE)


def policy_field(default: models.TextChoices, *, help_text: str) -> models.CharField[str, str]:
    """Return the field for a job policy: one of the choices `default` belongs to."""
    return models.CharField(max_length=16, choices=type(default).choices, default=default, help_text=help_text)


class JobQuerySet(models.QuerySet["Job"]):
    def due(self, now: datetime) -> JobQuerySet:
        """Enabled jobs whose next fire time has come."""
        return self.filter(enabled=True, next_run_at__lte=now)

    def enabled(self) -> JobQuerySet:
        return self.filter(enabled=True)


class Job(models.Model):
    class MisfirePolicy(models.TextChoices):
        RUN_ONCE = "run_once", "Run once to catch up"
        SKIP = "skip", "Skip missed fires"

    class OverlapPolicy(models.TextChoices):
        FORBID = "forbid", "Skip a fire while the previous run is active"
        ALLOW = "allow", "Allow runs to overlap"

    name = models.CharField(max_length=200, help_text="A name people recognise, e.g. 'Daily report'.")
    description = models.TextField(blank=True, default="", max_length=10_000, help_text="What the job is for.")
    cron_expression = models.CharField(
        max_length=200,
        help_text=(
            "Five fields (minute hour day-of-month month day-of-week), an optional leading "
            "seconds field, or a macro such as @daily. Example: '0 9 * * MON'."
        ),
    )
    timezone = models.CharField(
        max_length=64,
        default=default_timezone,
        help_text="IANA time zone the schedule is read in, e.g. Europe/Berlin.",
    )
    job_type = models.CharField(max_length=100, help_text="Which executor runs the job; see /job-types.")
    parameters = models.JSONField(default=dict, blank=True, help_text="Settings for the job type.")
    enabled = models.BooleanField(default=True, help_text="Disabled jobs never fire.")
    misfire_policy = policy_field(
        MisfirePolicy.RUN_ONCE,
        help_text="What to do with fires missed while no scheduler ran (or that started too late).",
    )
    misfire_grace_seconds = models.PositiveIntegerField(
        default=60,
        validators=[MaxValueValidator(7 * 24 * 3600)],
        help_text="A fire started later than this after its time counts as missed.",
    )
    overlap_policy = policy_field(
        OverlapPolicy.FORBID, help_text="Whether a fire may start while an earlier run of the job is still active."
    )
    max_retries = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(20)],
        help_text="Extra attempts after a failure (0 = none).",
    )
    retry_backoff_seconds = models.PositiveIntegerField(
        default=30,
        validators=[MinValueValidator(1), MaxValueValidator(24 * 3600)],
        help_text="Delay before the first retry; doubled for each further attempt, with jitter.",
    )
    timeout_seconds = models.PositiveIntegerField(
        default=3600,
        validators=[MinValueValidator(1), MaxValueValidator(7 * 24 * 3600)],
        help_text="A run taking longer than this is recorded as timed out and its slot freed.",
    )
    next_run_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="Next fire time, in UTC. Empty when disabled."
    )
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_run_status = models.CharField(max_length=16, blank=True, default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        permissions = [
            # A backup holds every secret in the database: scheduling one needs more than add_job.
            ("schedule_database_backup", "Can schedule database backups"),
        ]
        indexes = [
            # The scheduler's only scan: enabled jobs by due time. Its cost does not grow with
            # the jobs that are not due.
            models.Index(fields=["next_run_at"], condition=Q(enabled=True), name="job_due_idx"),
            # The disabled jobs, for /metrics' count: usually few, and untouched by fires.
            models.Index(fields=["id"], condition=Q(enabled=False), name="job_disabled_idx"),
            models.Index(fields=["job_type"], name="job_type_idx"),
            # One per ordering the API offers besides the id (jobs.api.views.JobViewSet): (field,
            # id) read forwards or backwards is a page in either direction, without sorting every
            # job. On PostgreSQL, `-next_run_at` (empty last) has an index of its own, made in
            # migration 0006 only there. Each costs an entry at every fire (the fire's UPDATE is
            # never HOT: `next_run_at` is indexed), so the API offers few orderings; none is on
            # `last_run_at`, whose index would also make the UPDATE at every finish touch every
            # index of the job (the migration has the measurement).
            models.Index(fields=["name", "id"], name="job_name_idx"),
            models.Index(fields=["next_run_at", "id"], name="job_next_run_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(enabled=True) | Q(next_run_at__isnull=True), name="job_disabled_has_no_next_run"
            ),
            models.CheckConstraint(
                condition=Q(misfire_policy__in=["run_once", "skip"]), name="job_misfire_policy_valid"
            ),
            models.CheckConstraint(
                condition=Q(overlap_policy__in=["forbid", "allow"]), name="job_overlap_policy_valid"
            ),
            models.CheckConstraint(condition=Q(timeout_seconds__gte=1), name="job_timeout_positive"),
            models.CheckConstraint(condition=Q(retry_backoff_seconds__gte=1), name="job_backoff_positive"),
        ]

    def __str__(self) -> str:
        return self.name


def heartbeat_cutoff(now: datetime, lost_after: float) -> datetime:
    """The liveness rule: a scheduler not stopped whose last heartbeat is at or after this time is
    alive; one with an older heartbeat is stale (presumed dead once the evidence agrees, see
    jobs.scheduler.liveness). `now` and the heartbeats are the database's clock."""
    return now - timedelta(seconds=lost_after)


class SchedulerProcessQuerySet(models.QuerySet["SchedulerProcess"]):
    def alive(self, now: datetime, lost_after: float) -> SchedulerProcessQuerySet:
        return self.filter(stopped_at__isnull=True, last_heartbeat_at__gte=heartbeat_cutoff(now, lost_after))

    def stale(self, now: datetime, lost_after: float) -> SchedulerProcessQuerySet:
        return self.filter(stopped_at__isnull=True, last_heartbeat_at__lt=heartbeat_cutoff(now, lost_after))


class SchedulerProcess(models.Model):
    """One running (or stopped) `manage.py runscheduler`."""

    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    max_concurrent = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    last_heartbeat_at = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    objects = SchedulerProcessQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        verbose_name_plural = "scheduler processes"

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"

    def is_alive(self, now: datetime, lost_after: float) -> bool:
        return self.stopped_at is None and self.last_heartbeat_at >= heartbeat_cutoff(now, lost_after)


class JobRunQuerySet(models.QuerySet["JobRun"]):
    def queued(self) -> JobRunQuerySet:
        return self.filter(status=JobRun.Status.QUEUED)

    def ready(self, now: datetime) -> JobRunQuerySet:
        """Queued runs whose earliest start has come, oldest first."""
        return self.queued().filter(not_before__lte=now).order_by("not_before", "id")

    def running(self) -> JobRunQuerySet:
        return self.filter(status=JobRun.Status.RUNNING)

    def active(self) -> JobRunQuerySet:
        return self.filter(status__in=JobRun.ACTIVE)

    def lingering(self) -> JobRunQuerySet:
        """Timed-out runs whose code still runs on a thread of their scheduler."""
        return self.filter(status=JobRun.Status.TIMED_OUT, finished_at__isnull=True)


class JobRun(models.Model):
    """One attempt at running a job: the run history and the queue in one table."""

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule"
        MANUAL = "manual"
        RETRY = "retry"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        TIMED_OUT = "timed_out"
        SKIPPED = "skipped"
        LOST = "lost"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.SKIPPED, Status.LOST)

    # No index of its own: jobrun_one_per_fire (job, scheduled_for, attempt) leads with it, and on
    # PostgreSQL every index that is not partial gets an entry at each update of a run.
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="runs", db_index=False)
    scheduled_for = models.DateTimeField(help_text="The fire time, or the request time of a manual run.")
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.SCHEDULE)
    attempt = models.PositiveSmallIntegerField(default=1)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    not_before = models.DateTimeField(help_text="Earliest start (later than scheduled_for for retries).")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Indexed only while running (jobrun_running_idx): that is when the engine looks runs up by
    # their scheduler, and a run is updated twice while it goes from queued to finished.
    worker = models.ForeignKey(
        SchedulerProcess, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs", db_index=False
    )
    missed_fires = models.PositiveIntegerField(default=0, help_text="Fires folded into this one by the misfire policy.")
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    skip_reason = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    # Not stored: time.monotonic() by which the run must end, set by the runner before the
    # executor starts (see jobs.executors.base.seconds_left).
    deadline: float | None = None

    objects = JobRunQuerySet.as_manager()

    class Meta:
        ordering = ["-scheduled_for", "-id"]
        constraints = [
            # A fire cannot happen twice, whatever the scheduler processes do.
            models.UniqueConstraint(fields=["job", "scheduled_for", "attempt"], name="jobrun_one_per_fire"),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "succeeded", "failed", "timed_out", "skipped", "lost"]),
                name="jobrun_status_valid",
            ),
            models.CheckConstraint(
                condition=Q(trigger__in=["schedule", "manual", "retry"]), name="jobrun_trigger_valid"
            ),
            models.CheckConstraint(condition=Q(attempt__gte=1), name="jobrun_attempt_positive"),
        ]
        # Partial indexes, so that a run's updates on the hot path (queued -> running ->
        # succeeded) touch as few index entries as possible: each index here serves one question.
        indexes = [
            # The queue: the oldest ready runs (claiming).
            models.Index(fields=["not_before", "id"], condition=Q(status="queued"), name="jobrun_queue_idx"),
            # The runs a scheduler holds (write-back fence, crash recovery).
            models.Index(fields=["worker"], condition=Q(status="running"), name="jobrun_running_idx"),
            # Whether a job has a queued or running run (the overlap policy, at every fire).
            models.Index(fields=["job"], condition=Q(status__in=["queued", "running"]), name="jobrun_active_idx"),
            # Timed-out runs whose thread still runs (they count as running for the overlap policy).
            models.Index(
                fields=["job"], condition=Q(status="timed_out", finished_at__isnull=True), name="jobrun_lingering_idx"
            ),
            # The recent runs that went wrong, for people browsing failures (PostgreSQL; SQLite
            # does not use a partial index for the ORM's bound parameters).
            models.Index(
                fields=["-scheduled_for"],
                condition=Q(status__in=["failed", "timed_out", "lost"]),
                name="jobrun_trouble_idx",
            ),
            # The history, newest first (GET /runs and its keyset cursor). The one index here that
            # is not partial: every run is in the history. Its columns are written once, at
            # insert; on PostgreSQL a claim or a finish (never a HOT update: `status` is in the
            # conditions above) still adds an entry, as to the primary key and
            # jobrun_one_per_fire, which also serves each job's history. Measured in migration 0006.
            models.Index(fields=["-scheduled_for", "-id"], name="jobrun_history_idx"),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of job {self.job_id} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def lateness_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.started_at - self.scheduled_for).total_seconds()


# The histograms' upper bounds in seconds (Prometheus' `le`), for run durations and start lateness.
TIMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
TIMINGS = ("duration", "lateness")


def timing_columns(measure: str) -> dict[float, str]:
    """RunCount's field of each bucket of `measure`, by upper bound: `duration_le_0_005`, ..."""
    return {bound: f"{measure}_le_{f'{bound:g}'.replace('.', '_')}" for bound in TIMING_BUCKETS}


def timing_db_column(field: str) -> str:
    """The short column name of a bucket field (`duration_le_0_005` is `d_0_005`): the store's
    statement that counts a batch of runs names each column three times, and on SQLite Django
    rewrites the statement's placeholders at every call, at a cost that grows with its length."""
    measure, _, bound = field.partition("_le_")
    return f"{measure[0]}_{bound}"


class RunCount(models.Model):
    """Runs finished, by job type and status: counters that only go up, for /metrics.

    The scheduler's store adds to them wherever it finishes runs (written back, lost, skipped),
    in the same statement or transaction, so a count cannot be lost or doubled; pruning old runs
    leaves them alone. Concurrent writers spread over `shard` rows (PostgreSQL: by backend), so
    that the schedulers' commits do not queue on one counter row; readers add the shards up.

    Runs written back by the scheduler that ran them are also timed: for `duration` (finished
    minus started; a run timed out whose code still runs has none yet) and `lateness` (started
    minus fired, 0 when a clock ran ahead) each row has `<measure>_count` (the runs measured),
    `<measure>_sum` (their seconds) and one cumulative column per bucket (the runs measured
    within its bound; see timing_columns). Lost and skipped runs are counted but not timed.
    """

    job_type = models.CharField(max_length=100)
    status = models.CharField(max_length=16)
    shard = models.PositiveSmallIntegerField(default=0)
    total = models.BigIntegerField(default=0)
    # Defaults in the database too: the store's INSERTs of untimed runs leave these out.
    duration_count = models.BigIntegerField(db_default=0)
    duration_sum = models.FloatField(db_default=0.0)
    lateness_count = models.BigIntegerField(db_default=0)
    lateness_sum = models.FloatField(db_default=0.0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job_type", "status", "shard"], name="runcount_one_per_shard"),
        ]

    def __str__(self) -> str:
        return f"{self.job_type} {self.status}: {self.total}"


# One column per bucket: written out, they would be 32 lines that must match TIMING_BUCKETS.
for _measure in TIMINGS:
    for _column in timing_columns(_measure).values():
        RunCount.add_to_class(_column, models.BigIntegerField(db_default=0, db_column=timing_db_column(_column)))
