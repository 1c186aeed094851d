"""The scheduler loop: fire due jobs, claim runs up to the free slots, run them, record outcomes.

One engine per `manage.py runscheduler` process. Runs execute on worker threads, at most
`max_concurrent` at once; the engine thread alone talks to the database about run lifecycles.
Each pass writes back the runs that finished, fires due jobs and claims runs for the free
slots, in a few statements whatever the number of runs. Between passes it sleeps until the next
thing is due (bounded by `max_sleep`). On PostgreSQL a LISTEN connection wakes it as soon as a
job or run changes; on SQLite it asks the database's commit counter a few times a second.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import Error, close_old_connections, connection, connections, transaction

from jobs.conf import get
from jobs.models import SchedulerProcess
from jobs.retention import prune_history

from . import claiming, liveness, runner
from .clock import DatabaseClock, scheduler_clock
from .notify import CHANNEL, CommitWatcher, notify_schedulers

logger = logging.getLogger("jobs.scheduler")

PRUNE_EVERY_SECONDS = 600.0
# The first prune waits this long after start, so as not to compete with catching up on fires.
PRUNE_FIRST_AFTER_SECONDS = 60.0
# When one run finishes while others are in flight, wait this long for them too, so that
# short runs finishing together are written back (and their slots refilled) in one go.
GATHER_SECONDS = 0.001
# SQLite has no NOTIFY: this often, an idle scheduler asks whether another process committed.
WATCH_SECONDS = 0.5
# While the database is unavailable: the first retry after this long, each next one after twice
# as long, up to a quarter of the lost-after time (so a scheduler is back well before anyone
# judges it) and at most this long.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
# After the grace, this long to write back what it can before the process exits regardless.
FINAL_WRITE_SECONDS = 5.0


def _noted_by_the_wakeup_fd(signum: int, frame: Any) -> None:
    """A signal handler that takes no lock: the wake-up fd carries the signal (see
    Engine.install_signal_handlers)."""


@dataclass
class _Inflight:
    run: Any
    deadline: float  # time.monotonic() after which the run has timed out


class _Workers:
    """Long-lived threads that execute runs; a thread is added whenever none is idle.

    A run that overran its timeout keeps its thread (Python cannot kill it), so its slot is
    freed by starting another thread rather than by waiting for that one. Threads idle for
    `idle_seconds` end.
    """

    def __init__(self, work: Callable[[Any], None], *, idle_seconds: float = 60.0) -> None:
        self._work = work
        self._idle_seconds = idle_seconds
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a task, less the tasks handed to them but not yet taken
        self._started = 0

    def submit(self, task: Any) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._tasks.put(task)
        if spawn:
            self._started += 1
            threading.Thread(target=self._loop, name=f"run-worker-{self._started}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:
                        self._idle -= 1
                        return
                # Every idle thread has a task on its way: this one must stay for it.
                continue
            self._work(task)
            with self._lock:
                self._idle += 1


class _Helper(threading.Thread):
    """A daemon thread beside the engine's loop, told to stop by `stop()`."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


class _Listener(_Helper):
    """Wake the engine when PostgreSQL delivers a NOTIFY on the scheduler channel."""

    def __init__(self, on_notify: Callable[[], None]) -> None:
        super().__init__("scheduler-listen")
        self._on_notify = on_notify

    def run(self) -> None:
        import select

        failures = 0
        while not self._stop_event.is_set():
            wrapper = connections.create_connection("default")
            try:
                wrapper.ensure_connection()
                raw = wrapper.connection
                raw.autocommit = True
                with raw.cursor() as cursor:
                    cursor.execute(f"LISTEN {CHANNEL}")
                if failures:
                    logger.info("LISTEN connection back after %d failed attempt(s)", failures)
                    failures = 0
                    self._on_notify()  # changes made meanwhile sent no notice this side saw
                while not self._stop_event.is_set():
                    readable, _, _ = select.select([raw], [], [], 1.0)
                    if readable:
                        raw.poll()
                        if raw.notifies:
                            raw.notifies.clear()
                            self._on_notify()
            except Exception as exc:  # noqa: BLE001 - keep listening through database restarts
                failures += 1
                delay = _retry_delay(failures, RETRY_MAX_SECONDS)
                # The traceback once; while the database stays away, one line per try.
                logger.warning(
                    "LISTEN connection failed (%s); retrying in %.1fs", _brief(exc), delay, exc_info=failures == 1
                )
                self._stop_event.wait(delay)
            finally:
                try:
                    wrapper.close()
                except Exception:  # noqa: BLE001 - the connection may already be gone
                    logger.debug("closing LISTEN connection failed", exc_info=True)


def _retry_delay(failures: int, longest: float) -> float:
    """Seconds before the next try after `failures` failures in a row: doubling, up to `longest`."""
    return min(RETRY_FIRST_SECONDS * 2 ** (failures - 1), longest)


def _brief(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


class _Pruner(_Helper):
    """Prune the run history `first_after` seconds after start and then every `interval`
    seconds, on a connection of its own: a prune reads the whole runs table (a third of a second
    at three million runs on PostgreSQL here, half a second on SQLite), which on the engine
    thread would make every job due meanwhile that late."""

    def __init__(self, clock: Callable[[], datetime], *, first_after: float, interval: float) -> None:
        super().__init__("scheduler-prune")
        self._clock = clock
        self._first_after = first_after
        self._interval = interval

    def run(self) -> None:
        self._stop_event.wait(self._first_after)
        while not self._stop_event.is_set():
            try:
                prune_history(now=self._clock(), stop=self._stop_event.is_set)
            except Exception:  # a failed prune must not end pruning for good
                logger.exception("pruning the run history failed; trying again in %.0fs", self._interval)
            finally:
                connection.close()  # this thread's own; not held open between prunes
            self._stop_event.wait(self._interval)


class Engine:
    """Fire, claim, run and record, until told to stop."""

    def __init__(
        self,
        *,
        max_concurrent: int | None = None,
        clock: Callable[[], datetime] | None = None,
        max_sleep: float | None = None,
        heartbeat_seconds: float | None = None,
        lost_after: float | None = None,
        shutdown_grace: float | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent or int(get("MAX_CONCURRENT_JOBS"))
        # Every time it writes or compares is the database's (see clock.py); tests pass their own.
        self.clock = clock or scheduler_clock()
        self.max_sleep = float(max_sleep if max_sleep is not None else get("MAX_SLEEP_SECONDS"))
        self.heartbeat_seconds = float(heartbeat_seconds if heartbeat_seconds is not None else get("HEARTBEAT_SECONDS"))
        self.lost_after = float(lost_after if lost_after is not None else get("LOST_AFTER_SECONDS"))
        self.shutdown_grace = float(shutdown_grace if shutdown_grace is not None else get("SHUTDOWN_GRACE_SECONDS"))
        self.process: SchedulerProcess | None = None
        self._wake = threading.Event()
        # Outcomes handed back by the worker threads, under `_finished`.
        self._finished = threading.Condition()
        self._done: list[runner.Outcome] = []
        self._awaited = 0  # outcomes the engine waits for: its runs in flight
        self._inflight: dict[int, _Inflight] = {}
        # Timed-out runs whose threads still run (Python cannot stop a thread): their rows have
        # no finished_at until the thread ends, so forbid-overlap jobs do not fire meanwhile.
        self._lingering: dict[int, Any] = {}
        self._late_ends: list[runner.Outcome] = []  # their threads ended; not yet stored
        self._workers = _Workers(self._work)
        # Outcomes taken from finished or timed-out runs and not yet committed: a failed write
        # keeps them here for the next pass, so no outcome is ever dropped.
        self._unrecorded: list[runner.Outcome] = []
        # After a database error: runs this scheduler may have claimed without knowing it.
        self._release_unheld = False
        self._stop_requested_at: float | None = None
        self._next_heartbeat = 0.0
        self._beat_at: datetime | None = None  # the last heartbeat written, by self.clock()
        # time.monotonic() from which it may judge other schedulers dead: a full lost_after after
        # it started or last recovered from a database error (None: not yet recovered).
        self._judge_from: float | None = None
        self._stop_requested = threading.Event()
        self._exited = threading.Event()
        self._listener: _Listener | None = None
        self._pruner: _Pruner | None = None
        # What makes a pass look for due jobs and queued runs (rather than only record outcomes):
        self._notified = False  # a NOTIFY said jobs or runs changed elsewhere
        self._poll_at = 0.0  # time.monotonic() of the next look regardless (SQLite has no NOTIFY)
        self._check_at: datetime | None = None  # earliest known next fire or queued run
        self._check_stale = True  # _check_at must be read again before sleeping
        self._check_has_queue = False  # it took queued runs into account
        self._backlog = False  # the last claim filled every free slot, so more may be waiting
        self._watcher = CommitWatcher() if connection.vendor == "sqlite" else None

    # -- lifecycle -----------------------------------------------------------------------------

    def register(self) -> SchedulerProcess:
        if isinstance(self.clock, DatabaseClock):
            self.clock.sync()
        now = self.clock()
        self.process = SchedulerProcess.objects.create(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            max_concurrent=self.max_concurrent,
            started_at=now,
            last_heartbeat_at=now,
        )
        liveness.hold(self.process.pk, lost_after=self.lost_after)
        self._beat_at = now
        self._next_heartbeat = time.monotonic() + self.heartbeat_seconds
        self._judge_from = time.monotonic() + self.lost_after
        logger.info("scheduler %s started: %s slots, database %s", self.process, self.max_concurrent, connection.vendor)
        return self.process

    def request_stop(self) -> None:
        """Stop claiming and let running jobs finish (first call); exit at once (second call)."""
        if self._stopping:
            logger.warning("second stop signal: exiting now; unfinished runs will be recovered as lost")
            os._exit(1)
        self._stop_requested_at = time.monotonic()
        self._stop_requested.set()
        logger.info(
            "stopping: no new runs; waiting up to %.0fs for %d running", self.shutdown_grace, len(self._inflight)
        )
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """Turn SIGTERM and SIGINT into `request_stop()` calls on a thread of their own.

        A Python signal handler runs in the main thread between any two bytecodes, possibly
        while that thread holds a lock the handler would need too (logging's, the wake-up
        event's): taking one there can deadlock. So the handlers do nothing, and the signal's
        number reaches a watcher thread through the interpreter's wake-up pipe, written in C.
        """
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _noted_by_the_wakeup_fd)
        threading.Thread(target=self._watch_signals, args=(read_end,), name="scheduler-signals", daemon=True).start()

    def _watch_signals(self, read_end: int) -> None:
        while True:
            for signum in os.read(read_end, 64):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.request_stop()

    def run_forever(self) -> int:
        """Run passes until stopped; return the process exit status."""
        self.register()
        if self._watcher is not None:
            self._watcher.changed()  # the baseline: commits from here on wake it
        if connection.vendor == "postgresql":
            self._listener = _Listener(self._on_notify)
            self._listener.start()
        self._pruner = _Pruner(self.clock, first_after=PRUNE_FIRST_AFTER_SECONDS, interval=PRUNE_EVERY_SECONDS)
        self._pruner.start()
        threading.Thread(target=self._watchdog, name="scheduler-watchdog", daemon=True).start()
        failures = 0  # database errors in a row
        failing_since = 0.0
        try:
            while True:
                self._wake.clear()
                try:
                    self._tick()
                    if failures:
                        logger.warning(
                            "database available again after %.1fs (%d failed attempt(s))",
                            time.monotonic() - failing_since,
                            failures,
                        )
                        failures = 0
                    if self._done_stopping():
                        break
                    self._sleep()
                except Error as exc:  # DatabaseError, or InterfaceError on a connection gone under it
                    self._after_database_error()
                    failures += 1
                    delay = _retry_delay(failures, self._retry_max())
                    if failures == 1:
                        failing_since = time.monotonic()
                        logger.error("database error in the scheduler loop; retrying in %.1fs", delay, exc_info=True)
                    else:
                        # One line per try while it lasts, not a traceback a second.
                        logger.warning(
                            "database still unavailable after %.0fs (%s); retrying in %.1fs",
                            time.monotonic() - failing_since,
                            _brief(exc),
                            delay,
                        )
                    # A stop wins whatever the database does: runs it could not write back are
                    # recovered as lost by the other schedulers.
                    if self._done_stopping():
                        break
                    # Stopping with runs still going: look again when one ends (it wakes us) or
                    # the grace does.
                    self._wake.wait(max(min(delay, self._grace_left()), 0.0))
        finally:
            self._shutdown()
        return 0

    @property
    def _stopping(self) -> bool:
        return self._stop_requested.is_set()

    def _done_stopping(self) -> bool:
        return self._stopping and (not self._inflight or self._grace_over())

    def _retry_max(self) -> float:
        return max(RETRY_FIRST_SECONDS, min(RETRY_MAX_SECONDS, self.lost_after / 4))

    def _after_database_error(self) -> None:
        # A claim may have committed without its reply reaching us.
        self._release_unheld = True
        # Back from an outage, it cannot yet tell a dead scheduler from one still reconnecting.
        self._judge_from = None
        close_old_connections()
        connection.close()

    def _watchdog(self) -> None:
        """Once a stop is requested, end the process if shutting down outlasts the grace by
        FINAL_WRITE_SECONDS (a database that accepts connections but never answers)."""
        self._stop_requested.wait()
        if not self._exited.wait(self.shutdown_grace + FINAL_WRITE_SECONDS):
            logger.error(
                "shutdown still not done %.0fs after the stop signal (the database does not answer?); exiting now",
                self.shutdown_grace + FINAL_WRITE_SECONDS,
            )
            os._exit(1)

    def run_once(self) -> list[runner.Outcome]:
        """Do one pass, wait for the runs it started (or their timeouts), record them, stop."""
        if self.process is None:
            self.register()
        outcomes: list[runner.Outcome] = []
        self._tick(collect_into=outcomes)
        while self._inflight:
            wait = min(item.deadline for item in self._inflight.values()) - time.monotonic()
            self._wake.wait(max(0.0, min(wait, 0.05)))
            self._wake.clear()
            self._take_outcomes()
            self._write(outcomes)
        return outcomes

    def stop(self) -> None:
        """Mark this scheduler stopped (after run_once)."""
        self._shutdown()

    def _on_notify(self) -> None:
        self._notified = True
        self._wake.set()

    def _grace_left(self) -> float:
        """Seconds of the shutdown grace left (infinite before a stop is requested)."""
        if self._stop_requested_at is None:
            return float("inf")
        return self._stop_requested_at + self.shutdown_grace - time.monotonic()

    def _grace_over(self) -> bool:
        return self._grace_left() <= 0

    def prune(self) -> int:
        """Prune the run history now, on this thread (`run_forever` prunes on its own thread)."""
        return prune_history(now=self.clock())

    def _shutdown(self) -> None:
        for helper in (self._listener, self._pruner):
            if helper is not None:
                helper.stop()
        try:
            self._take_outcomes()
            self._write([])
            self._record_late_ends()
            if self._lingering:
                # Their threads die with this process.
                runner.record_late_ends(
                    [
                        runner.Outcome(run, "failed", self.clock(), error="the scheduler stopped while it still ran")
                        for run in self._lingering.values()
                    ]
                )
            if self._inflight:
                logger.warning(
                    "grace period over with %d run(s) unfinished; other schedulers will mark them lost",
                    len(self._inflight),
                )
            if self.process is not None:
                SchedulerProcess.objects.filter(pk=self.process.pk).update(stopped_at=self.clock())
        except Error:
            logger.exception("could not record the shutdown (is the database down?)")
            if self._unrecorded:
                logger.error(
                    "%d finished run(s) could not be written back; other schedulers will mark them lost",
                    len(self._unrecorded),
                )
        for helper in (self._listener, self._pruner):
            if helper is not None:
                helper.join(timeout=2.0)
        if not connection.in_atomic_block:
            connection.close()  # this thread's connection; nothing else will close it
        logger.info("scheduler %s stopped", self.process)
        self._exited.set()

    # -- one pass ------------------------------------------------------------------------------

    def _tick(self, collect_into: list[runner.Outcome] | None = None) -> None:
        sink: list[runner.Outcome] = collect_into if collect_into is not None else []
        self._take_outcomes()
        assert self.process is not None
        # After a reconnect the new session takes the liveness lock (a dictionary look-up otherwise).
        liveness.hold(self.process.pk, lost_after=self.lost_after)
        if self._release_unheld:
            held = set(self._inflight) | {outcome.run.pk for outcome in self._unrecorded}
            claiming.release_unheld_runs(worker_id=self.process.pk, held=held, now=self.clock())
            self._release_unheld = False
        if self._beat_at is not None and self.clock() - self._beat_at > timedelta(seconds=self.lost_after / 4):
            # Paused or cut off (the wall clock moved on, perhaps not the monotonic one): claims
            # need a fresh heartbeat, or a new identity if another presumed this one dead.
            self._heartbeat()
        # Before the pass too, so that a job whose lingering run just ended can fire in it.
        self._record_late_ends()
        self._pass(sink)
        self._record_late_ends()
        # After the pass, so that a heartbeat falling due with a fire does not delay it.
        if time.monotonic() >= self._next_heartbeat:
            self._heartbeat()
        if self._judge_from is None:
            self._judge_from = time.monotonic() + self.lost_after

    def _pass(self, sink: list[runner.Outcome]) -> None:
        if self._stopping:
            self._write(sink)
            return
        now = self.clock()
        look = (
            self._notified
            or time.monotonic() >= self._poll_at
            or (self._check_at is not None and now >= self._check_at)
        )
        if not look:
            # Woken by a finished run: record it, and claim only if runs may be waiting.
            self._write(sink, claim=self._backlog)
            return
        self._notified = False
        self._poll_at = time.monotonic() + self.max_sleep
        self._check_at = None
        self._check_stale = True
        report = self._write(sink, claim=True, fire=True)
        queued = report.queued
        while report.jobs >= claiming.FIRE_BATCH:
            # More due jobs than one batch: fire the rest in transactions of their own.
            report = claiming.fire_due_jobs(now=self.clock())
            queued += report.queued
            if report.queued:
                self._backlog = True
        if self._backlog:
            self._write(sink, claim=True)
        if queued > self.max_concurrent:
            # More work than this process can take right now: wake the others.
            notify_schedulers()

    def _write(self, sink: list[runner.Outcome], *, claim: bool = False, fire: bool = False) -> claiming.FireReport:
        """Record the taken outcomes, fire due jobs, claim runs for the free slots; start them."""
        assert self.process is not None
        report = claiming.FireReport()
        free = self.max_concurrent - len(self._inflight)
        claim = claim and free > 0
        if not (self._unrecorded or claim or fire):
            return report
        runs: list[Any] = []
        worker_id = self.process.pk
        try:
            if connection.vendor == "sqlite":
                # One IMMEDIATE transaction for the whole pass is cheaper than one per step.
                with transaction.atomic():
                    accepted = runner.record_outcomes(self._unrecorded, worker_id=worker_id)
                    if fire:
                        report = claiming.fire_due_jobs(now=self.clock())
                    if claim:
                        runs = claiming.claim_runs(
                            worker_id=worker_id, slots=free, now=self.clock(), lost_after=self.lost_after
                        )
                self._recorded(accepted, sink)
            elif claim and not fire and self._unrecorded and not any(map(runner.wants_retry, self._unrecorded)):
                # PostgreSQL: writing back and claiming share one statement (one round trip,
                # one commit).
                write_back = runner.write_back_ctes(self._unrecorded, worker_id=worker_id)
                recorded, runs = claiming.record_and_claim(
                    write_back, worker_id=worker_id, slots=free, now=self.clock(), lost_after=self.lost_after
                )
                self._recorded(runner.accepted_outcomes(self._unrecorded, recorded), sink)
            else:
                # PostgreSQL, each step atomic on its own; what is written is let go at once, so
                # a later step failing cannot send it twice. Outcomes are written before firing:
                # a job whose run just ended must not have its next fire skipped as overlapping.
                self._recorded(runner.record_outcomes(self._unrecorded, worker_id=worker_id), sink)
                if fire:
                    report = claiming.fire_due_jobs(now=self.clock())
                if claim:
                    runs = claiming.claim_runs(
                        worker_id=worker_id, slots=free, now=self.clock(), lost_after=self.lost_after
                    )
        except runner.REFUSED_VALUES:
            if not self._unrecorded:
                raise
            # Not a lost connection: the database refused a value. Write the outcomes one by
            # one, each refused one as a failure saying why, so one cannot block the others.
            logger.exception("writing back %d outcome(s) failed; writing them one by one", len(self._unrecorded))
            self._recorded(runner.record_one_by_one(self._unrecorded, worker_id=worker_id), sink)
            return report
        if claim:
            # A full claim means more runs may be waiting.
            self._backlog = len(runs) == free
        self._start(runs)
        return report

    def _recorded(self, accepted: list[runner.Outcome], sink: list[runner.Outcome]) -> None:
        """The taken outcomes are written: let them go, and log those that were accepted."""
        self._unrecorded = []
        self._log_finished(accepted)
        sink.extend(accepted)
        if any(outcome.status != "succeeded" for outcome in accepted):
            self._check_stale = True  # a retry may now be queued; look for it when it is due

    def _start(self, runs: list[Any]) -> None:
        """Log the claimed runs as started, then hand them to worker threads.

        Logging first keeps the workers from competing with this thread (for the interpreter
        lock) until it goes to sleep.
        """
        if not runs:
            return
        now_mono = time.monotonic()
        for run in runs:
            lateness = (run.started_at - run.scheduled_for).total_seconds()
            logger.info(
                "run started job=%s run=%s attempt=%s trigger=%s lateness=%.3fs",
                run.job_id,
                run.pk,
                run.attempt,
                run.trigger,
                lateness,
                extra={"job_id": run.job_id, "run_id": run.pk, "status": "running", "lateness_seconds": lateness},
            )
            run.deadline = now_mono + run.job.timeout_seconds  # executors bound their waits by it
            self._inflight[run.pk] = _Inflight(run, run.deadline)
        with self._finished:
            self._awaited = len(self._inflight)
        for run in runs:
            self._workers.submit(run)

    def _work(self, run: Any) -> None:
        try:
            outcome = runner.execute(run, clock=self.clock)
        except Exception as exc:  # execute() catches the job's own errors; this guards the rest
            logger.exception("running job=%s run=%s failed outside the job", run.job_id, run.pk)
            outcome = runner.Outcome(run, "failed", self.clock(), error=f"scheduler error: {type(exc).__name__}: {exc}")
        finally:
            # The worker thread's own connection, if the executor used one, is not kept open
            # while the thread idles.
            connections.close_all()
        self._hand_over(outcome)

    def _hand_over(self, outcome: runner.Outcome) -> None:
        """Give a worker's outcome to the engine thread.

        The engine is woken for the first outcome (to record it soon) and for the last one it
        waits for (to record them all together), not for each one.
        """
        with self._finished:
            self._done.append(outcome)
            last = len(self._done) >= self._awaited
            if last:
                self._finished.notify()
            wake = last or len(self._done) == 1
        if wake:
            self._wake.set()

    def _take_outcomes(self) -> None:
        """Take the outcomes of finished runs and of runs past their timeout, freeing their slots.

        A run past its timeout is recorded timed_out at once and lingers until its thread (which
        cannot be killed) ends; the late outcome then only says when and how it ended.
        """
        with self._finished:
            if self._done:
                self._finished.wait_for(lambda: len(self._done) >= self._awaited, GATHER_SECONDS)
            done, self._done = self._done, []
        for outcome in done:
            if self._inflight.pop(outcome.run.pk, None) is not None:
                self._unrecorded.append(outcome)
            elif self._lingering.pop(outcome.run.pk, None) is not None:
                self._late_ends.append(outcome)
        now_mono = time.monotonic()
        expired = [run_id for run_id, item in self._inflight.items() if item.deadline <= now_mono]
        for run_id in expired:
            run = self._inflight.pop(run_id).run
            self._lingering[run_id] = run
            self._unrecorded.append(runner.timed_out(run, self.clock()))
        with self._finished:
            self._awaited = len(self._inflight)

    def _record_late_ends(self) -> None:
        """Store the ends of lingering runs whose timed-out outcome is already written."""
        if not self._late_ends:
            return
        unwritten = {outcome.run.pk for outcome in self._unrecorded}
        ready = [late for late in self._late_ends if late.run.pk not in unwritten]
        if ready:
            runner.record_late_ends(ready)
            self._late_ends = [late for late in self._late_ends if late.run.pk in unwritten]

    def _log_finished(self, accepted: list[runner.Outcome]) -> None:
        for outcome in accepted:
            run = outcome.run
            duration = (outcome.finished_at - run.started_at).total_seconds() if run.started_at else 0.0
            log = logger.info if outcome.status == "succeeded" else logger.warning
            log(
                "run finished job=%s run=%s status=%s duration=%.3fs%s",
                run.job_id,
                run.pk,
                outcome.status,
                duration,
                f" error={outcome.error.splitlines()[0]}" if outcome.error else "",
                extra={
                    "job_id": run.job_id,
                    "run_id": run.pk,
                    "status": outcome.status,
                    "duration_seconds": duration,
                },
            )

    def _heartbeat(self) -> None:
        assert self.process is not None
        if isinstance(self.clock, DatabaseClock):
            self.clock.sync()
        now = self.clock()
        self._next_heartbeat = time.monotonic() + self.heartbeat_seconds
        alive = SchedulerProcess.objects.filter(pk=self.process.pk, stopped_at__isnull=True).update(
            last_heartbeat_at=now
        )
        self._beat_at = now
        if not alive:
            # Another scheduler presumed us dead and took our runs; carry on under a new identity.
            logger.error("scheduler %s was presumed dead by another scheduler; registering again", self.process)
            self.register()
            # Claims under the old identity took nothing (claiming refuses a stopped or stale
            # scheduler): look for due jobs and ready runs at once.
            self._notified = True
            self._wake.set()
        judging = self._judge_from is not None and time.monotonic() >= self._judge_from
        if judging and claiming.recover_lost_runs(now=now, lost_after=self.lost_after):
            self._notified = True  # retries of lost runs may be waiting: look at once
            self._wake.set()

    # -- sleeping ------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self._stopping:
            self._wake.wait(0.1)
            return
        now_mono = time.monotonic()
        timeout = min(self._poll_at - now_mono, self._next_heartbeat - now_mono)
        if self._inflight:
            timeout = min(timeout, min(item.deadline for item in self._inflight.values()) - now_mono)
        free = len(self._inflight) < self.max_concurrent
        include_queue = free and not self._backlog
        if self._check_stale or (include_queue and not self._check_has_queue):
            # Once per look (or when a slot frees for queued runs), not after every finished run:
            # changes made elsewhere arrive by NOTIFY, the commit watcher or the poll.
            self._check_at = claiming.next_wakeup(include_queue=include_queue)
            self._check_stale, self._check_has_queue = False, include_queue
        if self._check_at is not None:
            timeout = min(timeout, (self._check_at - self.clock()).total_seconds())
        # A floor, so a due row locked by another scheduler cannot make this loop spin.
        deadline = now_mono + max(timeout, 0.002)
        if self._watcher is None:
            self._wake.wait(deadline - now_mono)
            return
        # SQLite: between passes, ask whether another process committed; only then look.
        while not self._wake.wait(min(WATCH_SECONDS, max(deadline - time.monotonic(), 0.0))):
            if time.monotonic() >= deadline:
                return
            if self._watcher.changed():
                self._notified = True  # the web process or another scheduler wrote something
                return
