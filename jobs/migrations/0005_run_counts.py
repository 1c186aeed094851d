"""Counters of finished runs (see jobs.models.RunCount), started from the runs already kept."""

from typing import Any

from django.db import migrations, models

# The runs kept so far, counted once. The scheduler's store adds the runs that finish from now on.
BACKFILL = """
    INSERT INTO jobs_runcount (job_type, status, shard, total)
    SELECT job.job_type, run.status, 0, COUNT(*) FROM jobs_jobrun AS run JOIN jobs_job AS job ON job.id = run.job_id
    WHERE run.status IN ('succeeded', 'failed', 'timed_out', 'skipped', 'lost') GROUP BY job.job_type, run.status
"""


def backfill(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(BACKFILL, params=None)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0004_lingering_runs_and_backup_permission")]

    operations = [
        migrations.CreateModel(
            name="RunCount",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("job_type", models.CharField(max_length=100)),
                ("status", models.CharField(max_length=16)),
                ("shard", models.PositiveSmallIntegerField(default=0)),
                ("total", models.BigIntegerField(default=0)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("job_type", "status", "shard"), name="runcount_one_per_shard")
                ],
            },
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
