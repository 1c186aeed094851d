"""Table-driven tests of `jobs/schedule.py`: cron maths, daylight saving, validation, descriptions.

Every expected instant below was worked out by hand from the zone's rules (offsets and transition
times of the IANA database) and is written as a literal UTC string; none is produced by the code
under test. Pure functions, so no database, no clock and no sleeping.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta

import pytest

from jobs.schedule import (
    CronError,
    describe,
    fire_times,
    next_fire_after,
    validate_cron,
    validate_timezone,
    zone,
)

MICROSECOND = timedelta(microseconds=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


def iso(instant: datetime) -> str:
    """Format an instant as the tables write it; a non-UTC result keeps its offset and fails."""
    return instant.isoformat().replace("+00:00", "Z")


# The 2026 transitions the DST tables rely on: (zone, instant of the change, offset before, after).
TRANSITIONS = [
    ("Europe/Berlin", "2026-03-29T01:00:00Z", timedelta(hours=1), timedelta(hours=2)),
    ("Europe/Berlin", "2026-10-25T01:00:00Z", timedelta(hours=2), timedelta(hours=1)),
    ("Europe/Berlin", "2027-03-28T01:00:00Z", timedelta(hours=1), timedelta(hours=2)),
    ("Europe/Berlin", "2027-10-31T01:00:00Z", timedelta(hours=2), timedelta(hours=1)),
    ("America/New_York", "2026-03-08T07:00:00Z", timedelta(hours=-5), timedelta(hours=-4)),
    ("America/New_York", "2026-11-01T06:00:00Z", timedelta(hours=-4), timedelta(hours=-5)),
    ("Australia/Sydney", "2026-04-04T16:00:00Z", timedelta(hours=11), timedelta(hours=10)),
    ("Australia/Sydney", "2026-10-03T16:00:00Z", timedelta(hours=10), timedelta(hours=11)),
    ("Australia/Lord_Howe", "2026-04-04T15:00:00Z", timedelta(hours=11), timedelta(hours=10, minutes=30)),
    ("Australia/Lord_Howe", "2026-10-03T15:30:00Z", timedelta(hours=10, minutes=30), timedelta(hours=11)),
    ("America/Santiago", "2026-04-05T03:00:00Z", timedelta(hours=-3), timedelta(hours=-4)),
    ("America/Santiago", "2026-09-06T04:00:00Z", timedelta(hours=-4), timedelta(hours=-3)),
    ("Antarctica/Troll", "2026-10-25T01:00:00Z", timedelta(hours=2), timedelta(hours=0)),
    ("Pacific/Apia", "2011-12-30T10:00:00Z", timedelta(hours=-10), timedelta(hours=14)),
]


@pytest.mark.parametrize(("zone_name", "change", "before", "after"), TRANSITIONS)
def test_the_hand_computed_transitions_match_tzdata(
    zone_name: str, change: str, before: timedelta, after: timedelta
) -> None:
    """Guard the premises of the DST tables: the offset changes exactly at the stated instant."""
    tz = zone(zone_name)
    assert (utc(change) - MICROSECOND).astimezone(tz).utcoffset() == before
    assert utc(change).astimezone(tz).utcoffset() == after


DST_CASES = [
    # Europe/Berlin 2026: spring forward 29 March 02:00 CET -> 03:00 CEST (01:00Z);
    # fall back 25 October 03:00 CEST -> 02:00 CET (01:00Z), so 02:00-02:59 happens twice.
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z", "2026-10-27T01:30:00Z"],
        id="berlin-fall-fixed-runs-once-at-first-occurrence",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-25T00:30:00Z",
        ["2026-10-26T01:30:00Z"],
        id="berlin-fall-fixed-from-its-first-occurrence-skips-the-second",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-25T01:00:00Z",
        ["2026-10-26T01:30:00Z"],
        id="berlin-fall-fixed-from-inside-second-pass-waits-a-day",
    ),
    pytest.param(
        "0 30 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
        id="berlin-fall-fixed-with-seconds-runs-once",
    ),
    pytest.param(
        "0-59/30 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        ["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:00:00Z"],
        id="berlin-fall-step-without-star-is-fixed-time",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-28T12:00:00Z",
        ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"],
        id="berlin-spring-fixed-runs-once-at-0300-cest",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-29T00:59:59.999999Z",
        ["2026-03-29T01:00:00Z"],
        id="berlin-spring-fixed-a-microsecond-before-the-gap",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-29T01:00:00Z",
        ["2026-03-30T00:30:00Z"],
        id="berlin-spring-fixed-from-the-transition-instant",
    ),
    pytest.param(
        "0,30 2 * * *",
        "Europe/Berlin",
        "2026-03-28T12:00:00Z",
        ["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z", "2026-03-30T00:30:00Z"],
        id="berlin-spring-two-skipped-times-run-once",
    ),
    pytest.param(
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-10-24T23:45:00Z",
        [
            "2026-10-25T00:00:00Z",  # 02:00 CEST
            "2026-10-25T00:30:00Z",  # 02:30 CEST
            "2026-10-25T01:00:00Z",  # 02:00 CET
            "2026-10-25T01:30:00Z",  # 02:30 CET
            "2026-10-25T02:00:00Z",  # 03:00 CET
        ],
        id="berlin-fall-wildcard-both-passes",
    ),
    pytest.param(
        "*/15 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        [
            "2026-10-25T00:00:00Z",
            "2026-10-25T00:15:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-25T00:45:00Z",
            "2026-10-25T01:00:00Z",
            "2026-10-25T01:15:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T01:45:00Z",
            "2026-10-26T01:00:00Z",
        ],
        id="berlin-fall-wildcard-minute-fixed-hour-both-passes",
    ),
    pytest.param(
        "*/15 2 * * *",
        "Europe/Berlin",
        "2026-10-25T00:50:00Z",
        ["2026-10-25T01:00:00Z", "2026-10-25T01:15:00Z", "2026-10-25T01:30:00Z", "2026-10-25T01:45:00Z"],
        id="berlin-fall-wildcard-from-late-first-pass-goes-back-to-0200",
    ),
    pytest.param(
        "*/15 2 * * *",
        "Europe/Berlin",
        "2026-10-25T01:05:00Z",
        ["2026-10-25T01:15:00Z", "2026-10-25T01:30:00Z", "2026-10-25T01:45:00Z", "2026-10-26T01:00:00Z"],
        id="berlin-fall-wildcard-from-inside-second-pass",
    ),
    pytest.param(
        "*/20 30 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        [
            "2026-10-25T00:30:00Z",
            "2026-10-25T00:30:20Z",
            "2026-10-25T00:30:40Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T01:30:20Z",
            "2026-10-25T01:30:40Z",
            "2026-10-26T01:30:00Z",
        ],
        id="berlin-fall-wildcard-seconds-both-passes",
    ),
    pytest.param(
        "@hourly",
        "Europe/Berlin",
        "2026-10-24T22:30:00Z",
        ["2026-10-24T23:00:00Z", "2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z"],
        id="berlin-fall-hourly-is-wildcard",
    ),
    pytest.param(
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-03-29T00:15:00Z",
        ["2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"],
        id="berlin-spring-wildcard-skips-gap",
    ),
    pytest.param(
        "30 * * * *",
        "Europe/Berlin",
        "2026-03-29T00:00:00Z",
        ["2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z", "2026-03-29T02:30:00Z"],
        id="berlin-spring-hour-wildcard-has-no-0230",
    ),
    pytest.param(
        "*/15 2 * * *",
        "Europe/Berlin",
        "2026-03-28T12:00:00Z",
        ["2026-03-30T00:00:00Z", "2026-03-30T00:15:00Z"],
        id="berlin-spring-wildcard-inside-gap-skips-the-day",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2027-10-30T12:00:00Z",
        ["2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"],
        id="berlin-2027-fall-fixed-once",
    ),
    pytest.param(
        "30 2 * * *",
        "Europe/Berlin",
        "2027-03-27T12:00:00Z",
        ["2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"],
        id="berlin-2027-spring-fixed-once",
    ),
    # America/New_York 2026: 8 March 02:00 EST -> 03:00 EDT (07:00Z); 1 November 02:00 EDT -> 01:00 EST
    # (06:00Z), so 01:00-01:59 happens twice and 02:30 is unambiguous.
    pytest.param(
        "30 2 * * *",
        "America/New_York",
        "2026-03-07T12:00:00Z",
        ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"],
        id="new-york-spring-fixed-at-0300-edt",
    ),
    pytest.param(
        "*/30 * * * *",
        "America/New_York",
        "2026-03-08T06:15:00Z",
        ["2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z"],
        id="new-york-spring-wildcard-skips-gap",
    ),
    pytest.param(
        "30 1 * * *",
        "America/New_York",
        "2026-10-31T12:00:00Z",
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
        id="new-york-fall-fixed-once",
    ),
    pytest.param(
        "30 1 * * *",
        "America/New_York",
        "2026-11-01T06:00:00Z",
        ["2026-11-02T06:30:00Z"],
        id="new-york-fall-fixed-from-inside-second-pass-waits-a-day",
    ),
    pytest.param(
        "30 2 * * *",
        "America/New_York",
        "2026-10-31T12:00:00Z",
        ["2026-11-01T07:30:00Z", "2026-11-02T07:30:00Z"],
        id="new-york-fall-0230-is-not-repeated",
    ),
    pytest.param(
        "*/30 * * * *",
        "America/New_York",
        "2026-11-01T04:45:00Z",
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-01T07:00:00Z",
        ],
        id="new-york-fall-wildcard-both-passes",
    ),
    # Australia/Sydney 2026: 5 April 03:00 AEDT -> 02:00 AEST (4 April 16:00Z), 02:00-02:59 twice;
    # 4 October 02:00 AEST -> 03:00 AEDT (3 October 16:00Z), 02:00-02:59 skipped.
    pytest.param(
        "30 2 * * *",
        "Australia/Sydney",
        "2026-04-04T00:00:00Z",
        ["2026-04-04T15:30:00Z", "2026-04-05T16:30:00Z"],
        id="sydney-april-fixed-once",
    ),
    pytest.param(
        "*/30 2 * * *",
        "Australia/Sydney",
        "2026-04-04T12:00:00Z",
        [
            "2026-04-04T15:00:00Z",
            "2026-04-04T15:30:00Z",
            "2026-04-04T16:00:00Z",
            "2026-04-04T16:30:00Z",
            "2026-04-05T16:00:00Z",
        ],
        id="sydney-april-wildcard-both-passes",
    ),
    pytest.param(
        "30 2 * * *",
        "Australia/Sydney",
        "2026-10-03T00:00:00Z",
        ["2026-10-03T16:00:00Z", "2026-10-04T15:30:00Z"],
        id="sydney-october-fixed-at-0300-aedt",
    ),
    pytest.param(
        "0 * * * *",
        "Australia/Sydney",
        "2026-10-03T14:30:00Z",
        ["2026-10-03T15:00:00Z", "2026-10-03T16:00:00Z", "2026-10-03T17:00:00Z"],
        id="sydney-october-wildcard-skips-gap",
    ),
    # Australia/Lord_Howe 2026, a 30-minute shift: 5 April 02:00 +11 -> 01:30 +10:30 (4 April 15:00Z),
    # 01:30-01:59 twice; 4 October 02:00 +10:30 -> 02:30 +11 (3 October 15:30Z), 02:00-02:29 skipped.
    pytest.param(
        "*/15 * * * *",
        "Australia/Lord_Howe",
        "2026-04-04T14:10:00Z",
        [
            "2026-04-04T14:15:00Z",  # 01:15 +11
            "2026-04-04T14:30:00Z",  # 01:30 +11
            "2026-04-04T14:45:00Z",  # 01:45 +11
            "2026-04-04T15:00:00Z",  # 01:30 +10:30
            "2026-04-04T15:15:00Z",  # 01:45 +10:30
            "2026-04-04T15:30:00Z",  # 02:00 +10:30
        ],
        id="lord-howe-april-wildcard-both-half-hour-passes",
    ),
    pytest.param(
        "45 1 * * *",
        "Australia/Lord_Howe",
        "2026-04-04T00:00:00Z",
        ["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"],
        id="lord-howe-april-fixed-once",
    ),
    pytest.param(
        "45 1 * * *",
        "Australia/Lord_Howe",
        "2026-04-04T15:00:00Z",
        ["2026-04-05T15:15:00Z"],
        id="lord-howe-april-fixed-from-inside-second-pass-waits-a-day",
    ),
    pytest.param(
        "15 2 * * *",
        "Australia/Lord_Howe",
        "2026-10-03T00:00:00Z",
        ["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"],
        id="lord-howe-october-fixed-at-0230",
    ),
    pytest.param(
        "*/15 * * * *",
        "Australia/Lord_Howe",
        "2026-10-03T15:10:00Z",
        ["2026-10-03T15:15:00Z", "2026-10-03T15:30:00Z", "2026-10-03T15:45:00Z"],
        id="lord-howe-october-wildcard-skips-half-hour-gap",
    ),
    # Zones without daylight saving: nothing special on the European transition days.
    pytest.param(
        "30 2 * * *",
        "Asia/Tokyo",
        "2026-03-28T12:00:00Z",
        ["2026-03-28T17:30:00Z", "2026-03-29T17:30:00Z"],
        id="tokyo-march",
    ),
    pytest.param(
        "30 2 * * *",
        "Asia/Tokyo",
        "2026-10-24T12:00:00Z",
        ["2026-10-24T17:30:00Z", "2026-10-25T17:30:00Z"],
        id="tokyo-october",
    ),
    pytest.param(
        "*/30 * * * *",
        "UTC",
        "2026-10-25T00:45:00Z",
        ["2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"],
        id="utc-october",
    ),
    # Transitions at midnight, of two hours, and of a whole day.
    pytest.param(
        "0 0 * * *",
        "America/Santiago",
        "2026-09-05T12:00:00Z",
        ["2026-09-06T04:00:00Z", "2026-09-07T03:00:00Z"],
        id="santiago-skipped-midnight-runs-at-0100",
    ),
    pytest.param(
        "30 23 * * *",
        "America/Santiago",
        "2026-04-04T12:00:00Z",
        ["2026-04-05T02:30:00Z", "2026-04-06T03:30:00Z"],
        id="santiago-repeated-2330-runs-once",
    ),
    pytest.param(
        "30 1 * * *",
        "Antarctica/Troll",
        "2026-10-24T12:00:00Z",
        ["2026-10-24T23:30:00Z", "2026-10-26T01:30:00Z"],
        id="troll-two-hour-fall-back-runs-once",
    ),
    pytest.param(
        "0 12 * * *",
        "Pacific/Apia",
        "2011-12-29T00:00:00Z",
        ["2011-12-29T22:00:00Z", "2011-12-30T10:00:00Z", "2011-12-30T22:00:00Z"],
        id="apia-2011-skipped-day-runs-at-first-instant-after",
    ),
]


@pytest.mark.parametrize(("expression", "zone_name", "after", "expected"), DST_CASES)
def test_fire_times_across_daylight_saving(expression: str, zone_name: str, after: str, expected: list[str]) -> None:
    assert [iso(t) for t in fire_times(expression, zone_name, utc(after), len(expected))] == expected


@pytest.mark.parametrize(
    ("expression", "zone_name", "local_day", "after", "runs"),
    [
        ("30 2 * * *", "Europe/Berlin", "2026-10-25", "2026-10-24T12:00:00Z", 1),
        ("30 2 * * *", "Europe/Berlin", "2026-03-29", "2026-03-28T12:00:00Z", 1),
        ("30 1 * * *", "America/New_York", "2026-11-01", "2026-10-31T12:00:00Z", 1),
        ("30 2 * * *", "Australia/Sydney", "2026-04-05", "2026-04-04T00:00:00Z", 1),
        ("30 2 * * *", "Australia/Sydney", "2026-10-04", "2026-10-03T00:00:00Z", 1),
        ("45 1 * * *", "Australia/Lord_Howe", "2026-04-05", "2026-04-04T00:00:00Z", 1),
        ("15 2 * * *", "Australia/Lord_Howe", "2026-10-04", "2026-10-03T00:00:00Z", 1),
        ("*/30 * * * *", "Europe/Berlin", "2026-10-25", "2026-10-24T12:00:00Z", 50),
        ("*/30 * * * *", "Europe/Berlin", "2026-03-29", "2026-03-28T12:00:00Z", 46),
        ("*/30 * * * *", "Australia/Lord_Howe", "2026-04-05", "2026-04-04T00:00:00Z", 49),
        ("*/30 * * * *", "Australia/Lord_Howe", "2026-10-04", "2026-10-03T00:00:00Z", 47),
        ("*/30 * * * *", "Asia/Tokyo", "2026-10-25", "2026-10-24T00:00:00Z", 48),
    ],
)
def test_runs_per_local_day_on_transition_days(
    expression: str, zone_name: str, local_day: str, after: str, runs: int
) -> None:
    """A fixed-time job runs once on a transition day; a half-hourly one follows a 25/23-hour clock."""
    tz = zone(zone_name)
    days = []
    previous = utc(after)
    fire = next_fire_after(expression, zone_name, previous)
    while fire is not None and (day := fire.astimezone(tz).date().isoformat()) <= local_day:
        assert fire > previous
        days.append(day)
        previous, fire = fire, next_fire_after(expression, zone_name, fire)
    assert days.count(local_day) == runs


CALENDAR_CASES = [
    pytest.param("0 0 31 * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-31T00:00:00Z", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z", "2026-07-31T00:00:00Z"],
                 id="31st-skips-short-months"),
    pytest.param("0 0 L * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z", "2026-04-30T00:00:00Z"],
                 id="last-day-of-month"),
    pytest.param("0 0 L 2 *", "UTC", "2027-03-01T00:00:00Z",
                 ["2028-02-29T00:00:00Z", "2029-02-28T00:00:00Z"],
                 id="last-day-of-february-in-leap-year"),
    pytest.param("0 0 L * *", "Europe/Berlin", "2026-01-01T00:00:00Z",
                 ["2026-01-30T23:00:00Z", "2026-02-27T23:00:00Z", "2026-03-30T22:00:00Z"],
                 id="last-day-of-month-local-midnight"),
    pytest.param("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z",
                 ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
                 id="leap-day"),
    pytest.param("0 0 29 2 *", "UTC", "2028-02-29T00:00:00Z",
                 ["2032-02-29T00:00:00Z"],
                 id="leap-day-strictly-after"),
    pytest.param("0 0 15W * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-15T00:00:00Z", "2026-02-16T00:00:00Z", "2026-03-16T00:00:00Z", "2026-04-15T00:00:00Z"],
                 id="nearest-weekday-sunday-moves-to-monday"),
    pytest.param("0 0 15W * *", "UTC", "2026-08-01T00:00:00Z",
                 ["2026-08-14T00:00:00Z"],
                 id="nearest-weekday-saturday-moves-to-friday"),
    pytest.param("0 0 1W * *", "UTC", "2026-07-15T00:00:00Z",
                 ["2026-08-03T00:00:00Z", "2026-09-01T00:00:00Z"],
                 id="nearest-weekday-stays-in-month"),
    pytest.param("0 0 * * 5L", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-30T00:00:00Z", "2026-02-27T00:00:00Z", "2026-03-27T00:00:00Z", "2026-04-24T00:00:00Z"],
                 id="last-friday-quartz-5L"),
    pytest.param("0 0 * * L5", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-30T00:00:00Z", "2026-02-27T00:00:00Z", "2026-03-27T00:00:00Z", "2026-04-24T00:00:00Z"],
                 id="last-friday-croniter-L5"),
    pytest.param("0 0 * * FRI#2", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-09T00:00:00Z", "2026-02-13T00:00:00Z", "2026-03-13T00:00:00Z"],
                 id="second-friday"),
    pytest.param("0 0 * * 1#2,3#4", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-12T00:00:00Z", "2026-01-28T00:00:00Z", "2026-02-09T00:00:00Z", "2026-02-25T00:00:00Z"],
                 id="list-of-nth-weekdays"),
    pytest.param("0 9 * * MON", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-05T09:00:00Z", "2026-01-12T09:00:00Z"],
                 id="day-name"),
    pytest.param("0 0 1 JAN,JUL *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"],
                 id="month-names-list"),
    pytest.param("0 9 * * MON-FRI", "UTC", "2026-01-02T10:00:00Z",
                 ["2026-01-05T09:00:00Z", "2026-01-06T09:00:00Z", "2026-01-07T09:00:00Z", "2026-01-08T09:00:00Z",
                  "2026-01-09T09:00:00Z", "2026-01-12T09:00:00Z"],
                 id="weekday-range"),
    pytest.param("0 0 * * FRI-MON", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z", "2026-01-05T00:00:00Z",
                  "2026-01-09T00:00:00Z"],
                 id="weekday-range-wrapping-the-weekend"),
    pytest.param("0 0 * * 7", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z"],
                 id="seven-is-sunday"),
    pytest.param("0,30 9-10 * * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-01T09:00:00Z", "2026-01-01T09:30:00Z", "2026-01-01T10:00:00Z", "2026-01-01T10:30:00Z",
                  "2026-01-02T09:00:00Z"],
                 id="list-and-range"),
    pytest.param("5-10/2 * * * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-01T00:05:00Z", "2026-01-01T00:07:00Z", "2026-01-01T00:09:00Z", "2026-01-01T01:05:00Z"],
                 id="range-with-step"),
    pytest.param("*/20 * * * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-01T00:20:00Z", "2026-01-01T00:40:00Z", "2026-01-01T01:00:00Z"],
                 id="star-step"),
    pytest.param("0 0 1 */3 *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-04-01T00:00:00Z", "2026-07-01T00:00:00Z", "2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z"],
                 id="quarterly-month-step"),
    pytest.param("@yearly", "UTC", "2026-06-01T12:00:00Z", ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
                 id="macro-yearly"),
    pytest.param("@annually", "UTC", "2026-06-01T12:00:00Z", ["2027-01-01T00:00:00Z"], id="macro-annually"),
    pytest.param("@monthly", "UTC", "2026-06-01T12:00:00Z", ["2026-07-01T00:00:00Z", "2026-08-01T00:00:00Z"],
                 id="macro-monthly"),
    pytest.param("@weekly", "UTC", "2026-06-01T12:00:00Z", ["2026-06-07T00:00:00Z", "2026-06-14T00:00:00Z"],
                 id="macro-weekly-on-sunday"),
    pytest.param("@daily", "UTC", "2026-06-01T12:00:00Z", ["2026-06-02T00:00:00Z", "2026-06-03T00:00:00Z"],
                 id="macro-daily"),
    pytest.param("@midnight", "UTC", "2026-06-01T12:00:00Z", ["2026-06-02T00:00:00Z"], id="macro-midnight"),
    pytest.param("@hourly", "UTC", "2026-06-01T12:00:00Z", ["2026-06-01T13:00:00Z", "2026-06-01T14:00:00Z"],
                 id="macro-hourly"),
    pytest.param("@daily", "Asia/Tokyo", "2026-06-01T12:00:00Z", ["2026-06-01T15:00:00Z"],
                 id="macro-in-a-zone"),
    pytest.param("*/20 * * * * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-01T00:00:20Z", "2026-01-01T00:00:40Z", "2026-01-01T00:01:00Z"],
                 id="seconds-field"),
    pytest.param("30 0 9 * * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-01T09:00:30Z", "2026-01-02T09:00:30Z"],
                 id="seconds-field-fixed"),
    # Vixie: when both day fields are restricted, a day matching either one fires.
    pytest.param("0 0 13 * FRI", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-02T00:00:00Z", "2026-01-09T00:00:00Z", "2026-01-13T00:00:00Z", "2026-01-16T00:00:00Z",
                  "2026-01-23T00:00:00Z", "2026-01-30T00:00:00Z", "2026-02-06T00:00:00Z", "2026-02-13T00:00:00Z"],
                 id="day-of-month-or-day-of-week"),
    pytest.param("0 0 30 2 MON", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-02-02T00:00:00Z", "2026-02-09T00:00:00Z", "2026-02-16T00:00:00Z", "2026-02-23T00:00:00Z",
                  "2027-02-01T00:00:00Z"],
                 id="impossible-day-or-weekday-still-fires-on-mondays"),
    pytest.param("0 0 L * FRI", "UTC", "2026-01-20T00:00:00Z",
                 ["2026-01-23T00:00:00Z", "2026-01-30T00:00:00Z", "2026-01-31T00:00:00Z", "2026-02-06T00:00:00Z"],
                 id="last-day-or-friday"),
    pytest.param("0 0 13 * *", "UTC", "2026-01-01T00:00:00Z",
                 ["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z"],
                 id="day-of-month-alone"),
]  # fmt: skip


@pytest.mark.parametrize(("expression", "zone_name", "after", "expected"), CALENDAR_CASES)
def test_fire_times_calendar(expression: str, zone_name: str, after: str, expected: list[str]) -> None:
    assert [iso(t) for t in fire_times(expression, zone_name, utc(after), len(expected))] == expected


def test_after_in_another_offset_is_the_same_instant() -> None:
    after = datetime.fromisoformat("2026-06-01T17:00:00+05:00")  # 12:00Z, 14:00 in Berlin
    assert iso(next_fire_after("0 9 * * *", "Europe/Berlin", after)) == "2026-06-02T07:00:00Z"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expression", "zone_name", "after", "expected"),
    [
        ("0 0 1 1 *", "UTC", "9999-06-01T00:00:00Z", []),
        ("0 0 * * *", "UTC", "9999-12-30T12:00:00Z", ["9999-12-31T00:00:00Z"]),
        ("30 23 * * *", "America/New_York", "9999-12-30T12:00:00Z", ["9999-12-31T04:30:00Z"]),
        ("0 0 * * *", "Pacific/Kiritimati", "9999-12-31T09:00:00Z", []),
    ],
)
def test_no_fire_after_the_last_representable_year(
    expression: str, zone_name: str, after: str, expected: list[str]
) -> None:
    """Past year 9999 a schedule never fires again: None, not an overflow error."""
    assert [iso(t) for t in fire_times(expression, zone_name, utc(after), 5)] == expected


def test_fire_times_count_zero_is_empty() -> None:
    assert fire_times("* * * * *", "UTC", utc("2026-01-01T00:00:00Z"), 0) == []


def test_naive_after_is_refused() -> None:
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        next_fire_after("0 9 * * *", "UTC", datetime(2026, 1, 1, 9, 0))


# Instants around which the invariants are checked: each zone's transitions, and an ordinary noon.
ANCHORS = {
    "Europe/Berlin": ["2026-03-29T01:00:00Z", "2026-10-25T01:00:00Z", "2026-06-10T10:00:00Z"],
    "America/New_York": ["2026-03-08T07:00:00Z", "2026-11-01T06:00:00Z", "2026-06-10T16:00:00Z"],
    "Australia/Sydney": ["2026-04-04T16:00:00Z", "2026-10-03T16:00:00Z", "2026-06-10T02:00:00Z"],
    "Australia/Lord_Howe": ["2026-04-04T15:00:00Z", "2026-10-03T15:30:00Z", "2026-06-10T01:30:00Z"],
    "Asia/Tokyo": ["2026-03-29T01:00:00Z", "2026-10-25T01:00:00Z", "2026-06-10T03:00:00Z"],
}
OFFSETS = [timedelta(minutes=m) for m in (-60, -30, 0, 30, 60)] + [
    -timedelta(seconds=1),
    -MICROSECOND,
    MICROSECOND,
    timedelta(seconds=1),
]
INVARIANT_EXPRESSIONS = [
    "30 2 * * *",
    "0,30 2 * * *",
    "45 1 * * *",
    "*/15 * * * *",
    "*/15 2 * * *",
    "@hourly",
    "*/20 * * * * *",
    "0 0 L * *",
]


WINDOWS = [-timedelta(minutes=65), -timedelta(minutes=1), timedelta(minutes=55)]


@pytest.mark.parametrize("zone_name", list(ANCHORS))
@pytest.mark.parametrize("expression", INVARIANT_EXPRESSIONS)
def test_next_fire_is_strictly_later_and_never_skips_a_fire(expression: str, zone_name: str) -> None:
    for anchor in ANCHORS[zone_name]:
        for instant in [utc(anchor) + offset for offset in OFFSETS]:
            following = next_fire_after(expression, zone_name, instant)
            assert following is not None
            assert following > instant, (expression, zone_name, instant)

        # Windows just before, across and after the change, so even sub-minute schedules cross it.
        for window in WINDOWS:
            start = utc(anchor) + window
            times = fire_times(expression, zone_name, start, 6)
            assert len(times) == 6
            assert all(t.utcoffset() == timedelta(0) for t in times)
            assert times[0] > start
            assert all(earlier < later for earlier, later in zip(times, times[1:], strict=False))
            # From any instant inside the listed span, the next fire is the first listed one after it.
            for fire in times[:-1]:
                for instant in (fire - MICROSECOND, fire, fire + MICROSECOND):
                    expected = min(t for t in times if t > instant)
                    assert next_fire_after(expression, zone_name, instant) == expected, (expression, instant)


VALID_CASES = [
    ("0 9 * * 1", "0 9 * * 1"),
    ("  0  9 * * mon ", "0 9 * * MON"),
    ("0\t9 * jan-mar/2 *", "0 9 * JAN-MAR/2 *"),
    ("@Daily", "@daily"),
    ("@ANNUALLY", "@annually"),
    ("*/20 * * * * *", "*/20 * * * * *"),
    ("0 0 L * *", "0 0 L * *"),
    ("0 0 15W * *", "0 0 15W * *"),
    ("0 0 * * fri#2", "0 0 * * FRI#2"),
    ("0 0 * * 5l", "0 0 * * 5L"),
    ("0 0 ? * MON", "0 0 ? * MON"),
    ("0 0 29 2 *", "0 0 29 2 *"),
]


@pytest.mark.parametrize(("expression", "normalised"), VALID_CASES)
def test_validate_cron_normalises(expression: str, normalised: str) -> None:
    assert validate_cron(expression) == normalised


FIELD_COUNT = "expected 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first, but got "
INVALID_CASES = [
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("0 24 * * *", "hour: 24 is out of range 0-23"),
    ("0 0 32 * *", "day-of-month: 32 is out of range 1-31"),
    ("0 0 0 * *", "day-of-month: 0 is out of range 1-31"),
    ("0 0 * 13 *", "month: 13 is out of range 1-12"),
    ("0 0 * 0 *", "month: 0 is out of range 1-12"),
    ("0 0 * * 8", "day-of-week: 8 is out of range 0-7"),
    ("60 0 0 * * *", "second: 60 is out of range 0-59"),
    ("0 0 32W * *", "day-of-month: 32 is out of range 1-31"),
    ("* * * *", f"{FIELD_COUNT}4"),
    ("* * * * * * *", f"{FIELD_COUNT}7"),
    ("*/0 * * * *", "minute: step '0' must be a whole number of at least 1"),
    ("0 1-5/0 * * *", "hour: step '0' must be a whole number of at least 1"),
    ("0 */x * * *", "hour: step 'X' must be a whole number of at least 1"),
    ("30-10 * * * *", "minute: range 30-10 runs backwards"),
    ("1,,2 * * * *", "minute: '' is not a valid value, range or step"),
    ("MON * * * *", "minute: 'MON' is not a number"),
    ("0 0 * FOO *", "month: 'FOO' is not a number (or a name: JAN, FEB, MAR, APR, MAY, JUN, JUL, AUG, SEP, OCT, NOV, "
                    "DEC)"),
    ("0 0 * * FUN", "day-of-week: 'FUN' is not a number (or a name: SUN, MON, TUE, WED, THU, FRI, SAT)"),
    ("0 0 * * FRI#6", "day-of-week: 'FRI#6' needs a week number 1-5 after '#'"),
    ("0 0 * * FRI#0", "day-of-week: 'FRI#0' needs a week number 1-5 after '#'"),
    ("0 0 1,15W * *", "day-of-month: '1,15W' uses 'W', which takes a single day, not a list"),
    ("0 0 * * 1,1#2", "day-of-week: '1,1#2' mixes plain days with 'L' or '#' days; use one kind"),
    ("0 0 * * 1-5,L5", "day-of-week: '1-5,L5' mixes plain days with 'L' or '#' days; use one kind"),
    ("@reboot", "unknown macro '@reboot'; use one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, "
                "@hourly"),
    ("@daily 5", "unknown macro '@daily 5'"),
    ("0 0 30 2 *", "'0 0 30 2 *' never fires (no such date)"),
    ("0 0 31 4,6,9,11 *", "'0 0 31 4,6,9,11 *' never fires (no such date)"),
    ("", "cron expression is empty"),
    ("   ", "cron expression is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("expression", "message"), INVALID_CASES)
def test_invalid_expressions_are_refused_naming_the_field(expression: str, message: str) -> None:
    with pytest.raises(CronError, match=f"^{re.escape(message)}"):
        validate_cron(expression)
    with pytest.raises(CronError, match=f"^{re.escape(message)}"):
        next_fire_after(expression, "UTC", utc("2026-01-01T00:00:00Z"))


@pytest.mark.parametrize("zone_name", ["Mars/Olympus", "Europe/Atlantis", "", "../../etc/passwd", "UTC+2"])
def test_bad_time_zones_are_refused(zone_name: str) -> None:
    message = f"{zone_name!r} is not an IANA time zone (for example Europe/Berlin or UTC)"
    with pytest.raises(CronError, match=f"^{re.escape(message)}$"):
        zone(zone_name)
    with pytest.raises(CronError, match=f"^{re.escape(message)}$"):
        next_fire_after("0 9 * * *", zone_name, utc("2026-01-01T00:00:00Z"))


# Files and links a zoneinfo folder holds that are not IANA zones, and names dressed up with
# characters that do not show.
NOT_IANA = [
    "localtime",
    "Factory",
    "posixrules",
    "posix/Europe/Berlin",
    "right/UTC",
    "Europe/Berlin\u200b",
    "\u202eUTC",
    "Europe/Ber\u200dlin",
    "Europe\u2215Berlin",
    "utc",
    " UTC",
    "Europe//Berlin",
    "/usr/share/zoneinfo/UTC",
    "Europe/Berlin/",
    "x" * 65,
]


@pytest.mark.parametrize("zone_name", NOT_IANA)
def test_only_iana_zone_names_are_accepted(zone_name: str) -> None:
    with pytest.raises(CronError, match="is not an IANA time zone"):
        validate_timezone(zone_name)


@pytest.mark.parametrize(
    "zone_name", ["UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires", "Etc/GMT+5", "Asia/Kolkata", "EST5EDT"]
)
def test_iana_zone_names_are_accepted(zone_name: str) -> None:
    assert validate_timezone(zone_name) == zone_name


# Steps whose "every N" would be false somewhere (at the wrap of the hour, day or month) must be
# described by the values that fire; those that divide the range evenly keep "every N".
STEP_EXPRESSIONS = [
    "*/90 * * * *",
    "*/7 * * * *",
    "*/45 * * * *",
    "5/15 * * * *",
    "*/15 * * * *",
    "*/30 * * * *",
    "*/1 * * * *",
    "*/60 * * * *",
    "0 */5 * * *",
    "0 */6 * * *",
    "0 */7 * * *",
    "0 */25 * * *",
    "3/4 * * * *",
    "*/7 * * * * *",
    "*/20 * * * * *",
    "*/59 * * * * *",
    "0 0 */2 * *",
    "0 0 */10 * *",
    "0 0 1 */5 *",
    "0 0 1 */3 *",
    "0 0 * * */2",
    "0 0 * * */3",
]
_EVERY = re.compile(r"^Every (\d+ )?(second|minute|hour)s?\b")
_UNIT = {"second": 1, "minute": 60, "hour": 3600}


@pytest.mark.parametrize("expression", STEP_EXPRESSIONS)
def test_an_every_n_description_matches_the_gaps_between_fire_times(expression: str) -> None:
    description = describe(expression)
    times = fire_times(expression, "UTC", utc("2026-01-30T21:00:00Z"), 100)
    gaps = {int((later - earlier).total_seconds()) for earlier, later in itertools.pairwise(times)}
    match = _EVERY.match(description)
    if match:
        # "Every N minutes": every fire is N minutes after the one before, across the wrap too.
        assert gaps == {int(match[1] or 1) * _UNIT[match[2]]}, (description, sorted(gaps))
    else:
        assert len(gaps) > 1 or "every" not in description.lower(), (description, sorted(gaps))


@pytest.mark.parametrize(
    ("expression", "description"),
    [
        ("*/90 * * * *", "Every hour"),
        ("*/7 * * * *", "At 0, 7, 14, 21, 28, 35, 42, 49, and 56 minutes past the hour"),
        ("0 0 */10 * *", "At 00:00, on day 1, 11, 21, and 31 of the month"),
        ("0 0 1 */5 *", "At 00:00, on day 1 of the month, only in January, June, and November"),
        ("0 0 * * */2", "At 00:00, only on Sunday, Tuesday, Thursday, and Saturday"),
        ("5/15 * * * *", "Every 15 minutes, starting at 5 minutes past the hour"),
        ("0 */6 * * *", "Every 6 hours"),
        ("0 */5 * * *", "At 00:00, 05:00, 10:00, 15:00 and 20:00"),
    ],
)
def test_steps_are_described_by_what_fires(expression: str, description: str) -> None:
    assert describe(expression) == description


@pytest.mark.parametrize(
    ("expression", "description"),
    [
        ("0 9 * * 1", "At 09:00, only on Monday"),
        ("0 9 * * MON-FRI", "At 09:00, Monday through Friday"),
        ("30 2 * * *", "At 02:30"),
        ("*/15 * * * *", "Every 15 minutes"),
        ("*/20 * * * * *", "Every 20 seconds"),
        ("@hourly", "Every hour"),
        ("@weekly", "At 00:00, only on Sunday"),
        ("0 0 L * *", "At 00:00, on the last day of the month"),
        ("0 0 15W * *", "At 00:00, on the weekday nearest day 15 of the month"),
        ("0 0 * * 5L", "At 00:00, on the last Friday of the month"),
        ("0 0 * * L5", "At 00:00, on the last Friday of the month"),
        ("0 0 * * FRI#2", "At 00:00, on the second Friday of the month"),
        ("0 0 13 * FRI", "At 00:00, on day 13 of the month, or on Friday"),
    ],
)
def test_describe_in_plain_words(expression: str, description: str) -> None:
    assert describe(expression) == description


def test_describe_refuses_an_invalid_expression() -> None:
    with pytest.raises(CronError, match=r"^minute: 60 is out of range 0-59$"):
        describe("60 * * * *")
