"""An index of the disabled jobs, so that /metrics counts them without reading every job.

The enabled ones are counted through `job_due_idx`. Disabled jobs are usually few, and a fire
(an UPDATE of an enabled job) adds no entry here. Built CONCURRENTLY on PostgreSQL.
"""

from django.db import migrations, models

from jobs.migration_operations import AddIndexConcurrently


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("jobs", "0006_api_list_indexes"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="job",
            index=models.Index(fields=["id"], condition=models.Q(enabled=False), name="job_disabled_idx"),
        ),
    ]
