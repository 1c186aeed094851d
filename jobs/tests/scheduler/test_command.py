"""`manage.py runscheduler`: bad options stop it before it registers, with one line naming them."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from jobs.models import SchedulerProcess


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-concurrent", "0"], "--max-concurrent must be positive"),
        (["--grace", "-1"], "--grace must be positive"),
        (["--heartbeat", "20", "--lost-after", "30"], "--heartbeat (20s) must be at most half of --lost-after (30s)"),
        (["--heartbeat", "16"], "--heartbeat (16s) must be at most half of --lost-after (30s)"),
    ],
)
def test_bad_options_stop_it_before_it_registers(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as error:
        call_command("runscheduler", "--once", *args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not SchedulerProcess.objects.exists()


def test_a_heartbeat_of_half_the_lost_after_time_is_accepted(db: None) -> None:
    call_command("runscheduler", "--once", "--heartbeat", "15", "--lost-after", "30")
    assert SchedulerProcess.objects.get().stopped_at is not None
