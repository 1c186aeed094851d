"""Whether a scheduler whose heartbeat is stale may be presumed dead.

A stale heartbeat alone is no evidence: a scheduler cut off from the database stops
heartbeating, and so does every other one during a database outage. Presuming a live scheduler
dead makes its runs `lost` and retries them while it still runs them. So besides the heartbeat:

- PostgreSQL: each scheduler holds a session-level advisory lock keyed by its id on its own
  connection. Nobody can take that lock while the session lives, and the server frees it the
  moment the session ends (the process died, or its connection did). A scheduler is presumed
  dead only if the lock is free; recovery takes it for the rest of its transaction, so the
  scheduler cannot come back mid-way.
- SQLite: everything is on one machine. A scheduler registered from this host whose process is
  still there (same pid, started before it registered) is alive.

And a scheduler judges others only once it has been connected for a full `LOST_AFTER_SECONDS`
itself (wake.Heartbeat): just back from an outage, it cannot tell a dead peer from one that
is still reconnecting.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection

from jobs.models import SchedulerProcess

logger = logging.getLogger("jobs.scheduler")

# The first key of the two-key advisory lock form ("jobs" in ASCII); the second is the id.
LOCK_NAMESPACE = 0x6A6F6273
_KEY_MASK = 0x7FFFFFFF
# Raw connections (held weakly) known to hold this process's lock, with the id it was taken for.
_holding: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# Schedulers already reported as silent but alive, so the warning is not repeated every heartbeat.
_reported_alive: set[int] = set()
# This process's schedulers whose lock an older session still holds (reported once).
_waiting: set[int] = set()


def _key(process_id: int) -> int:
    return process_id & _KEY_MASK


def hold(process_id: int, *, lost_after: float) -> bool:
    """PostgreSQL: make this thread's connection hold the scheduler's liveness lock.

    Costs nothing when it already does. The same statement sets the session's TCP keepalives,
    so that if this host vanishes (power cut, network partition) the server ends the session,
    freeing the lock, within about two thirds of `lost_after` rather than after the kernel's
    default of two hours. Return False if the lock is held elsewhere (an earlier connection of
    this process the server has not noticed is gone yet): the caller tries again at its next
    pass.
    """
    connection.ensure_connection()
    raw = connection.connection
    if _holding.get(raw) == process_id:
        return True
    idle, interval = max(1, int(lost_after / 3)), max(1, int(lost_after / 9))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_try_advisory_lock(%s, %s), set_config('tcp_keepalives_idle', %s, false), "
            "set_config('tcp_keepalives_interval', %s, false), set_config('tcp_keepalives_count', '3', false)",
            [LOCK_NAMESPACE, _key(process_id), str(idle), str(interval)],
        )
        taken = cursor.fetchone()[0]
    if taken:
        _holding[raw] = process_id
        _waiting.discard(process_id)
    elif process_id not in _waiting:
        _waiting.add(process_id)
        logger.warning("the liveness lock of scheduler %s is still held by an older session; trying again", process_id)
    return bool(taken)


def session_open(process: SchedulerProcess) -> bool:
    """PostgreSQL: whether the scheduler's session still holds its lock. When it does not, the
    lock is now held by this transaction until it ends, so the scheduler cannot come back mid-way."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [LOCK_NAMESPACE, _key(process.pk)])
        (free,) = cursor.fetchone()
    return not free


def process_here(process: SchedulerProcess) -> bool:
    """Whether the scheduler's process is still running on this host (SQLite's evidence)."""
    return process.hostname == socket.gethostname() and _process_running(process.pid, process.started_at)


def judged_dead(process: SchedulerProcess, *, alive: bool, evidence: str, now: datetime) -> bool:
    """The verdict on a scheduler with a stale heartbeat, given the evidence; a scheduler silent
    but alive is reported once (not at every heartbeat of its judge)."""
    if alive and process.pk not in _reported_alive:
        _reported_alive.add(process.pk)
        silent = (now - process.last_heartbeat_at).total_seconds()
        logger.warning(
            "scheduler %s has not heartbeaten for %.0fs but %s (paused, or stuck?): its runs are left to it",
            process,
            silent,
            evidence,
        )
    if not alive:
        _reported_alive.discard(process.pk)
    return not alive


def _process_running(pid: int, registered_at: datetime) -> bool:
    """Whether `pid` is a process that started before `registered_at` (not a later one that
    reuses the number, as a restarted container's first process does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = _process_started_at(pid)
    # Boot time is given in whole seconds: allow for its rounding.
    return started is None or started <= registered_at + timedelta(seconds=2)


def _process_started_at(pid: int) -> datetime | None:
    """When a process started, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name (field 2) may hold spaces: count fields after its closing ")".
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), tz=UTC)
