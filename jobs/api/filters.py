import django_filters

from jobs.models import Job, JobRun


class JobFilter(django_filters.FilterSet):
    job_type = django_filters.CharFilter(help_text="Only jobs of this type.")
    enabled = django_filters.BooleanFilter()
    last_run_status = django_filters.ChoiceFilter(choices=JobRun.Status.choices)
    next_run_after = django_filters.IsoDateTimeFilter(field_name="next_run_at", lookup_expr="gte")
    next_run_before = django_filters.IsoDateTimeFilter(field_name="next_run_at", lookup_expr="lt")
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Job
        fields = ["job_type", "enabled", "last_run_status"]


class JobRunFilter(django_filters.FilterSet):
    job = django_filters.NumberFilter(field_name="job_id")
    job_type = django_filters.CharFilter(field_name="job__job_type")
    status = django_filters.MultipleChoiceFilter(choices=JobRun.Status.choices)
    trigger = django_filters.ChoiceFilter(choices=JobRun.Trigger.choices)
    scheduled_after = django_filters.IsoDateTimeFilter(field_name="scheduled_for", lookup_expr="gte")
    scheduled_before = django_filters.IsoDateTimeFilter(field_name="scheduled_for", lookup_expr="lt")
    started_after = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="gte")
    started_before = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="lt")

    class Meta:
        model = JobRun
        fields = ["job", "status", "trigger"]
