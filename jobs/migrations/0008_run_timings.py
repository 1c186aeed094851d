"""Run durations and start lateness on the finished-run counters (jobs.models.RunCount), as histograms.

Timing starts with this migration: the runs kept so far are counted (0005) but not timed.
"""

from django.db import migrations, models

# The buckets' upper bounds as they were when this migration was written (jobs.models.TIMING_BUCKETS).
BOUNDS = (
    "0_005",
    "0_01",
    "0_025",
    "0_05",
    "0_1",
    "0_25",
    "0_5",
    "1",
    "2_5",
    "5",
    "10",
    "30",
    "60",
    "300",
    "1800",
    "3600",
)


def fields(measure: str) -> list[tuple[str, models.Field]]:
    return [
        (f"{measure}_count", models.BigIntegerField(db_default=0)),
        (f"{measure}_sum", models.FloatField(db_default=0.0)),
        *(
            (f"{measure}_le_{bound}", models.BigIntegerField(db_default=0, db_column=f"{measure[0]}_{bound}"))
            for bound in BOUNDS
        ),
    ]


class Migration(migrations.Migration):
    dependencies = [("jobs", "0007_disabled_jobs_index")]

    operations = [
        migrations.AddField(model_name="runcount", name=name, field=field)
        for measure in ("duration", "lateness")
        for name, field in fields(measure)
    ]
