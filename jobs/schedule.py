"""Cron maths: validation, next fire times across daylight saving, plain-words descriptions.

Pure functions with the time passed in; no ORM and no clock reads. Every fire time the product
shows or runs comes from `next_fire_after`, so the preview and the scheduler cannot disagree.

Daylight saving follows Vixie cron (kept by cronie):

* A *fixed-time* schedule (no `*` in its seconds, minute or hour field) whose wall-clock time is
  skipped by a spring-forward gap runs once, at the first instant after the gap. One whose time
  is repeated by a fall-back runs once, at the first occurrence.
* A *wildcard* schedule follows the clock: it fires at every wall-clock time that exists and
  matches, so in both passes of a repeated hour and never inside a gap.

croniter does the calendar maths on naive wall-clock times; this module maps those to instants.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from croniter import croniter
from croniter.croniter import CroniterBadDateError, CroniterError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_PREVIEW = 100

_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


class CronError(ValueError):
    """A cron expression or time zone that cannot be scheduled; the message says why."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_offset: int = 0


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DOM = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, tuple(_MONTHS), 1)
_DOW = _Field("day-of-week", 0, 7, tuple(_DAYS), 0)

_ITEM = re.compile(r"^(?P<base>\*|\?|[A-Z0-9]+(?:-[A-Z0-9]+)?)(?:/(?P<step>[^/]*))?$")


@dataclass(frozen=True)
class Cron:
    """A validated cron expression."""

    expression: str  # normalised: macros kept, fields upper-cased and single-spaced
    croniter_expression: str  # the same schedule in the syntax croniter reads
    has_seconds: bool
    fixed_time: bool  # Vixie's "fixed-time job": no wildcard in seconds, minutes or hours


def _value(field: _Field, token: str) -> int:
    if token.isdigit():
        number = int(token)
    elif token in field.names:
        number = field.names.index(token) + field.name_offset
    else:
        known = f" (or a name: {', '.join(field.names)})" if field.names else ""
        raise CronError(f"{field.name}: {token!r} is not a number{known}")
    if not field.low <= number <= field.high:
        raise CronError(f"{field.name}: {number} is out of range {field.low}-{field.high}")
    return number


def _check_item(field: _Field, item: str) -> str:
    """Validate one comma-separated item of a field; return it in croniter's syntax."""
    if field is _DOM and (item == "L" or re.fullmatch(r"\d{1,2}W", item)):
        if item != "L":
            _value(field, item[:-1])
        return item
    if field is _DOW:
        quartz_last = re.fullmatch(r"([A-Z0-9]+)L", item)  # Quartz: 5L = last Friday
        croniter_last = re.fullmatch(r"L([A-Z0-9]+)", item)
        if quartz_last or croniter_last:
            day = (quartz_last or croniter_last).group(1)  # type: ignore[union-attr]
            return f"L{_value(field, day) % 7}"
        nth = re.fullmatch(r"([A-Z0-9]+)#(.*)", item)
        if nth:
            if nth.group(2) not in {"1", "2", "3", "4", "5"}:
                raise CronError(f"{field.name}: {item!r} needs a week number 1-5 after '#'")
            return f"{_value(field, nth.group(1)) % 7}#{nth.group(2)}"
    match = _ITEM.match(item)
    if not match:
        raise CronError(f"{field.name}: {item!r} is not a valid value, range or step")
    base, step = match.group("base"), match.group("step")
    if step is not None and (not step.isdigit() or int(step) == 0):
        raise CronError(f"{field.name}: step {step!r} must be a whole number of at least 1")
    if base in {"*", "?"}:
        return "*" + (f"/{step}" if step else "")
    bounds = [_value(field, part) for part in base.split("-")]
    if len(bounds) == 2 and bounds[0] > bounds[1] and field is not _DOW:
        raise CronError(f"{field.name}: range {base} runs backwards")
    text = "-".join(str(bound) for bound in bounds)
    return text + (f"/{step}" if step else "")


def _check_list(field: _Field, part: str, items: list[str]) -> None:
    """Refuse lists croniter cannot combine, naming the field rather than leaving croniter's message."""
    if len(items) < 2:
        return
    if field is _DOM and any(item.endswith("W") for item in items):
        raise CronError(f"{field.name}: {part!r} uses 'W', which takes a single day, not a list")
    if field is _DOW:
        special = [item for item in items if item.startswith("L") or "#" in item]
        # croniter refuses some mixes and silently drops the plain day from others ("1,1#2").
        if special and len(special) < len(items):
            raise CronError(f"{field.name}: {part!r} mixes plain days with 'L' or '#' days; use one kind")


@lru_cache(maxsize=4096)
def parse(expression: str) -> Cron:
    """Validate an expression and return its parsed form; raise CronError naming the field."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronError("cron expression is empty")
    text = " ".join(expression.split()).upper()
    macro = text.lower()
    if macro.startswith("@"):
        if macro not in MACROS:
            raise CronError(f"unknown macro {expression.strip()!r}; use one of {', '.join(MACROS)}")
        normalised, body = macro, MACROS[macro]
    else:
        normalised, body = text, text
    parts = body.split(" ")
    if len(parts) == 5:
        fields = [_MINUTE, _HOUR, _DOM, _MONTH, _DOW]
    elif len(parts) == 6:
        fields = [_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW]
    else:
        raise CronError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds "
            f"first, but got {len(parts)}"
        )
    converted = []
    for field, part in zip(fields, parts, strict=True):
        items = [_check_item(field, item) for item in part.split(",")]
        _check_list(field, part, items)
        converted.append(",".join(items))
    has_seconds = len(parts) == 6
    time_fields = parts[: 3 if has_seconds else 2]
    cron = Cron(
        expression=normalised,
        croniter_expression=" ".join(converted),
        has_seconds=has_seconds,
        fixed_time=not any("*" in part or "?" in part for part in time_fields),
    )
    try:
        _iterator(cron, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise CronError(f"{expression.strip()!r} never fires (no such date)") from None
    except (CroniterError, ValueError, KeyError) as exc:
        raise CronError(f"{expression.strip()!r} is not a valid cron expression: {exc}") from None
    return cron


def validate_cron(expression: str) -> str:
    """Return the normalised expression, or raise CronError with a message naming the field."""
    return parse(expression).expression


# IANA names: ASCII letters, digits, '_', '+', '-', in '/'-separated parts (no look-alikes,
# invisible or direction-override characters, no paths).
_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2}$")
# Files in a zoneinfo folder that are not zones: the host's own setting, a placeholder zone,
# and POSIX defaults; "posix/" and "right/" are copies with other leap-second rules.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@lru_cache(maxsize=1)
def iana_zone_names() -> tuple[str, ...]:
    """Return the IANA time zone names this host knows, sorted: the names jobs may use."""
    return tuple(
        sorted(
            name
            for name in zoneinfo.available_timezones()
            if len(name) <= 64
            and _ZONE_NAME.fullmatch(name)
            and name not in _NOT_ZONES
            and not name.startswith(("posix/", "right/"))
        )
    )


@lru_cache(maxsize=1)
def _zone_name_set() -> frozenset[str]:
    return frozenset(iana_zone_names())


def validate_timezone(name: str) -> str:
    """Return `name` if it is an IANA time zone name, or raise CronError."""
    if not (isinstance(name, str) and name in _zone_name_set()):
        raise CronError(f"{name!r} is not an IANA time zone (for example Europe/Berlin or UTC)")
    zone(name)  # listed, so it loads; this keeps the two checks from ever disagreeing
    return name


@lru_cache(maxsize=512)
def zone(name: str) -> zoneinfo.ZoneInfo:
    """Return the time zone `name` for computing fire times, or raise CronError."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise CronError(f"{name!r} is not an IANA time zone (for example Europe/Berlin or UTC)") from None


def _iterator(cron: Cron, start: datetime) -> croniter[datetime]:
    # 28 years covers every weekday/date combination of the Gregorian calendar's leap cycle.
    return croniter(
        cron.croniter_expression,
        start,
        ret_type=datetime,
        day_or=True,
        second_at_beginning=cron.has_seconds,
        max_years_between_matches=28,
    )


def _transition(before: datetime, after: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    """Return the first UTC instant in (before, after] whose UTC offset differs from before's."""
    offset = before.astimezone(tz).utcoffset()
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


def _instants(wall: datetime, tz: zoneinfo.ZoneInfo, fixed_time: bool) -> list[datetime]:
    """Map a naive wall-clock fire time to the UTC instants at which it fires."""
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    first_utc = first.astimezone(UTC)
    if first.utcoffset() == second.utcoffset():
        return [first_utc]
    if first_utc.astimezone(tz).replace(tzinfo=None) == wall:  # repeated by a fall-back
        return [first_utc] if fixed_time else [first_utc, second.astimezone(UTC)]
    if not fixed_time:  # skipped by a spring-forward: the clock never shows it
        return []
    return [_transition(second.astimezone(UTC), first_utc, tz)]


def _first_instant_after(cron: Cron, tz: zoneinfo.ZoneInfo, start: datetime, after: datetime) -> datetime | None:
    iterator = _iterator(cron, start)
    while True:
        try:
            wall = iterator.get_next(datetime)
        except (CroniterBadDateError, OverflowError, ValueError):  # no match, or past year 9999
            return None
        later = [instant for instant in _instants(wall, tz, cron.fixed_time) if instant > after]
        if later:
            return min(later)


def next_fire_after(expression: str, timezone: str, after: datetime) -> datetime | None:
    """Return the first fire time strictly after the aware instant `after`, in UTC.

    None when the expression never fires again.
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    parse(expression)
    zone(timezone)
    return _cached_next_fire(expression, timezone, after.astimezone(UTC))


# Many jobs share a schedule and fire together; a burst of them costs one computation.
@lru_cache(maxsize=16384)
def _cached_next_fire(expression: str, timezone: str, after: datetime) -> datetime | None:
    try:
        return _next_instant(parse(expression), zone(timezone), after)
    except OverflowError:  # the instant or its next fire lies beyond year 9999, where datetime ends
        return None


def _next_instant(cron: Cron, tz: zoneinfo.ZoneInfo, after: datetime) -> datetime | None:
    local = after.astimezone(tz)
    wall = local.replace(tzinfo=None, fold=0)
    # croniter only returns times strictly after its start, at whole seconds.
    start = wall.replace(microsecond=0)
    best = _first_instant_after(cron, tz, start, after)
    # Inside the first pass of a repeated hour, a wildcard schedule also fires at wall times
    # before `wall` in the second pass, which come later in real time.
    other = wall.replace(tzinfo=tz, fold=1)
    repeated = (
        other.utcoffset() != local.utcoffset() and other.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall
    )
    if not cron.fixed_time and local.fold == 0 and repeated:
        gap = local.utcoffset() - other.utcoffset()  # type: ignore[operator]
        change = _transition(after, after + gap, tz)
        second_pass = change.astimezone(tz).replace(tzinfo=None) - timedelta(seconds=1)
        candidate = _first_instant_after(cron, tz, second_pass, after)
        if candidate is not None and (best is None or candidate < best):
            best = candidate
    return best


def fire_times(expression: str, timezone: str, after: datetime, count: int) -> list[datetime]:
    """Return up to `count` successive fire times after `after`, in UTC."""
    times: list[datetime] = []
    current = after
    for _ in range(count):
        following = next_fire_after(expression, timezone, current)
        if following is None:
            break
        times.append(following)
        current = following
    return times


def _exact_steps(field: _Field, item: str) -> str:
    """Write a step as the values it fires at when "every N" would not hold across the wrap.

    `*/7` minutes fires at :56 and then :00, four minutes later, and `*/90` only at :00; a
    description must say what fires, so such steps become lists ("at 0, 7, ... 56 minutes").
    """
    match = re.fullmatch(r"(\*|\d+)/(\d+)", item)
    if not match:
        return item
    high = 6 if field is _DOW else field.high  # day 7 is Sunday again
    start = field.low if match[1] == "*" else int(match[1])
    step, count = int(match[2]), high - field.low + 1
    if step < count and count % step == 0:
        return item
    return ",".join(str(value) for value in range(start, high + 1, step))


def describe(expression: str) -> str:
    """Describe a valid expression in plain words, e.g. "At 09:00, only on Monday"."""
    from cron_descriptor import Options, get_description

    cron = parse(expression)
    fields = [_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW][0 if cron.has_seconds else 1 :]
    parts = cron.croniter_expression.split(" ")
    body = " ".join(
        ",".join(_exact_steps(field, item) for item in part.split(","))
        for field, part in zip(fields, parts, strict=True)
    )
    # cron-descriptor reads Quartz's "5L" for the last Friday; croniter writes "L5".
    body = re.sub(r"\bL([0-7])\b", r"\1L", body)
    options = Options()
    options.use_24hour_time_format = True
    options.verbose = False
    try:
        return str(get_description(body, options))
    except Exception:  # noqa: BLE001 - a description is a courtesy, never a reason to fail
        return cron.expression
