"""The scheduler loop: fire due jobs, claim runs up to the free slots, run them, record outcomes.

One engine per `manage.py runscheduler` process. Runs execute on worker threads, at most
`max_concurrent` at once; the engine thread alone talks to the database about run lifecycles,
through its store (store/), which does each step in a few statements whatever the number of
runs. Each pass writes back the runs that finished, fires due jobs and claims runs for the free
slots. Between passes it sleeps until the next thing is due (see wake.py); the store's watcher
wakes it when a job or run changes elsewhere.
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
from datetime import datetime
from typing import Any

from django.db import Error, close_old_connections, connection, connections

from jobs import conf
from jobs.conf import JobsConfig
from jobs.models import SchedulerProcess
from jobs.retention import prune_history

from . import runner
from .background import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, Helper, brief, retry_delay
from .firing import FireReport
from .store import FIRE_BATCH, Pass, get_store
from .wake import Heartbeat, WakePlan

logger = logging.getLogger("jobs.scheduler")

PRUNE_EVERY_SECONDS = 600.0
# The first prune waits this long after start, so as not to compete with catching up on fires.
PRUNE_FIRST_AFTER_SECONDS = 60.0
# When one run finishes while others are in flight, wait this long for them too, so that
# short runs finishing together are written back (and their slots refilled) in one go.
GATHER_SECONDS = 0.001
# After the grace, this long to write back what it can before the process exits regardless.
FINAL_WRITE_SECONDS = 5.0


def _noted_by_the_wakeup_fd(signum: int, frame: Any) -> None:
    """A signal handler that takes no lock: the wake-up fd carries the signal (see
    Engine.install_signal_handlers)."""


@dataclass
class Inflight:
    run: Any
    deadline: float  # time.monotonic() after which the run has timed out


class Handover:
    """Outcomes passed from the worker threads to the engine thread.

    The engine is woken for the first outcome (to record it soon) and for the last one it
    waits for (to record them all together), not for each one.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Condition()
        self._done: list[runner.Outcome] = []
        self._awaited = 0  # outcomes the engine waits for: its runs in flight

    def awaiting(self, count: int) -> None:
        """The engine has `count` runs in flight."""
        with self._lock:
            self._awaited = count

    def put(self, outcome: runner.Outcome) -> None:
        """A worker's run ended (called on the worker's thread)."""
        with self._lock:
            self._done.append(outcome)
            last = len(self._done) >= self._awaited
            if last:
                self._lock.notify()
            wake = last or len(self._done) == 1
        if wake:
            self._wake()

    def take(self, gather_seconds: float) -> list[runner.Outcome]:
        """The outcomes handed over; if some are, wait up to `gather_seconds` for the rest of the
        runs in flight, so that short runs ending together are written back in one go."""
        with self._lock:
            if self._done:
                self._lock.wait_for(lambda: len(self._done) >= self._awaited, gather_seconds)
            done, self._done = self._done, []
        return done


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


class _Pruner(Helper):
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
        config: JobsConfig | None = None,
        clock: Callable[[], datetime] | None = None,
        max_concurrent: int | None = None,
        max_sleep: float | None = None,
        heartbeat_seconds: float | None = None,
        lost_after: float | None = None,
        shutdown_grace: float | None = None,
    ) -> None:
        settings = config or conf.config()
        self.store = get_store()
        self.max_concurrent = max_concurrent or settings.max_concurrent_jobs
        # Every time it writes or compares is the database's (see clock.py); tests pass their own.
        self.clock = clock or self.store.clock()
        # A clock that reads the database's time now and then (a DatabaseClock) does so at
        # registration and at each heartbeat.
        self._sync_clock: Callable[[], None] = getattr(self.clock, "sync", lambda: None)
        self.max_sleep = _given(max_sleep, settings.max_sleep_seconds)
        self.heartbeat_seconds = _given(heartbeat_seconds, settings.heartbeat_seconds)
        self.lost_after = _given(lost_after, settings.lost_after_seconds)
        self.shutdown_grace = _given(shutdown_grace, settings.shutdown_grace_seconds)
        self.process: SchedulerProcess | None = None
        self.wake_plan = WakePlan(self.max_sleep)
        self.heartbeat = Heartbeat(self.heartbeat_seconds, self.lost_after)
        self.wakeup = threading.Event()
        self.handover = Handover(self.wakeup.set)
        self.inflight: dict[int, Inflight] = {}
        # Timed-out runs whose threads still run (Python cannot stop a thread): their rows have
        # no finished_at until the thread ends, so forbid-overlap jobs do not fire meanwhile.
        self._lingering: dict[int, Any] = {}
        self._late_ends: list[runner.Outcome] = []  # their threads ended; not yet stored
        self._workers = _Workers(self._work)
        # Outcomes taken from finished or timed-out runs and not yet committed: a failed write
        # keeps them here for the next pass, so no outcome is ever dropped.
        self.unrecorded: list[runner.Outcome] = []
        # After a database error: runs this scheduler may have claimed without knowing it.
        self.release_unheld = False
        self._stop_requested_at: float | None = None
        self._stop_requested = threading.Event()
        self._exited = threading.Event()
        self._watcher = self.store.watcher(self._changed_elsewhere)
        self._pruner: _Pruner | None = None

    # -- what tests and the command may look at --------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    # -- lifecycle -----------------------------------------------------------------------------

    def register(self) -> SchedulerProcess:
        self._sync_clock()
        now = self.clock()
        self.process = SchedulerProcess.objects.create(
            hostname=socket.gethostname(),
            pid=os.getpid(),
            max_concurrent=self.max_concurrent,
            started_at=now,
            last_heartbeat_at=now,
        )
        self.store.hold_liveness(self.process.pk, lost_after=self.lost_after)
        self.heartbeat.registered(now, time.monotonic())
        logger.info("scheduler %s started: %s slots, database %s", self.process, self.max_concurrent, connection.vendor)
        return self.process

    def request_stop(self) -> None:
        """Stop claiming and let running jobs finish (first call); exit at once (second call)."""
        if self.stopping:
            logger.warning("second stop signal: exiting now; unfinished runs will be recovered as lost")
            os._exit(1)
        self._stop_requested_at = time.monotonic()
        self._stop_requested.set()
        logger.info(
            "stopping: no new runs; waiting up to %.0fs for %d running", self.shutdown_grace, len(self.inflight)
        )
        self.wakeup.set()

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
        self._watcher.start()
        self._pruner = _Pruner(self.clock, first_after=PRUNE_FIRST_AFTER_SECONDS, interval=PRUNE_EVERY_SECONDS)
        self._pruner.start()
        threading.Thread(target=self._watchdog, name="scheduler-watchdog", daemon=True).start()
        failures = 0  # database errors in a row
        failing_since = 0.0
        try:
            while True:
                self.wakeup.clear()
                try:
                    self.tick()
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
                    self.database_error()
                    failures += 1
                    delay = retry_delay(failures, self._retry_max())
                    if failures == 1:
                        failing_since = time.monotonic()
                        logger.error("database error in the scheduler loop; retrying in %.1fs", delay, exc_info=True)
                    else:
                        # One line per try while it lasts, not a traceback a second.
                        logger.warning(
                            "database still unavailable after %.0fs (%s); retrying in %.1fs",
                            time.monotonic() - failing_since,
                            brief(exc),
                            delay,
                        )
                    # A stop wins whatever the database does: runs it could not write back are
                    # recovered as lost by the other schedulers.
                    if self._done_stopping():
                        break
                    # Stopping with runs still going: look again when one ends (it wakes us) or
                    # the grace does.
                    self.wakeup.wait(max(min(delay, self._grace_left()), 0.0))
        finally:
            self._shutdown()
        return 0

    def _done_stopping(self) -> bool:
        return self.stopping and (not self.inflight or self._grace_left() <= 0)

    def _retry_max(self) -> float:
        """The longest wait between retries while the database is unavailable: a quarter of the
        lost-after time (so a scheduler is back well before anyone judges it), at most 5 s."""
        return max(RETRY_FIRST_SECONDS, min(RETRY_MAX_SECONDS, self.lost_after / 4))

    def database_error(self) -> None:
        """A statement failed because the database went away: reconnect at the next pass."""
        # A claim may have committed without its reply reaching us.
        self.release_unheld = True
        # Back from an outage, it cannot yet tell a dead scheduler from one still reconnecting.
        self.heartbeat.connection_lost()
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
        self.tick(collect_into=outcomes)
        while self.inflight:
            wait = min(item.deadline for item in self.inflight.values()) - time.monotonic()
            self.wakeup.wait(max(0.0, min(wait, 0.05)))
            self.wakeup.clear()
            self.take_outcomes()
            self._write(outcomes)
        return outcomes

    def stop(self) -> None:
        """Mark this scheduler stopped (after run_once)."""
        self._shutdown()

    def _changed_elsewhere(self) -> None:
        self.wake_plan.changed_elsewhere()
        self.wakeup.set()

    def _grace_left(self) -> float:
        """Seconds of the shutdown grace left (infinite before a stop is requested)."""
        if self._stop_requested_at is None:
            return float("inf")
        return self._stop_requested_at + self.shutdown_grace - time.monotonic()

    def prune(self) -> int:
        """Prune the run history now, on this thread (`run_forever` prunes on its own thread)."""
        return prune_history(now=self.clock())

    def _shutdown(self) -> None:
        for helper in (self._watcher, self._pruner):
            if helper is not None:
                helper.stop()
        try:
            self.take_outcomes()
            self._write([])
            self._record_late_ends()
            if self._lingering:
                # Their threads die with this process.
                self.store.record_late_ends(
                    [
                        runner.Outcome(run, "failed", self.clock(), error="the scheduler stopped while it still ran")
                        for run in self._lingering.values()
                    ]
                )
            if self.inflight:
                logger.warning(
                    "grace period over with %d run(s) unfinished; other schedulers will mark them lost",
                    len(self.inflight),
                )
            if self.process is not None:
                SchedulerProcess.objects.filter(pk=self.process.pk).update(stopped_at=self.clock())
        except Error:
            logger.exception("could not record the shutdown (is the database down?)")
            if self.unrecorded:
                logger.error(
                    "%d finished run(s) could not be written back; other schedulers will mark them lost",
                    len(self.unrecorded),
                )
        for helper in (self._watcher, self._pruner):
            if helper is not None:
                helper.join(timeout=2.0)
        if not connection.in_atomic_block:
            connection.close()  # this thread's connection; nothing else will close it
        logger.info("scheduler %s stopped", self.process)
        self._exited.set()

    # -- one pass ------------------------------------------------------------------------------

    def tick(self, collect_into: list[runner.Outcome] | None = None) -> None:
        """One pass: take finished runs, write them back, fire and claim as due, heartbeat."""
        sink: list[runner.Outcome] = collect_into if collect_into is not None else []
        self.take_outcomes()
        assert self.process is not None
        # After a reconnect the new session takes the liveness lock (a dictionary look-up otherwise).
        self.store.hold_liveness(self.process.pk, lost_after=self.lost_after)
        if self.release_unheld:
            held = set(self.inflight) | {outcome.run.pk for outcome in self.unrecorded}
            self.store.release_unheld_runs(worker_id=self.process.pk, held=held, now=self.clock())
            self.release_unheld = False
        if self.heartbeat.needed_before_claiming(self.clock()):
            self.beat()
        # Before the pass too, so that a job whose lingering run just ended can fire in it.
        self._record_late_ends()
        self._pass(sink)
        self._record_late_ends()
        # After the pass, so that a heartbeat falling due with a fire does not delay it.
        if self.heartbeat.due(time.monotonic()):
            self.beat()
        self.heartbeat.connected(time.monotonic())

    def _pass(self, sink: list[runner.Outcome]) -> None:
        if self.stopping:
            self._write(sink)
            return
        if not self.wake_plan.should_look(self.clock(), time.monotonic()):
            # Woken by a finished run: record it, and claim only if runs may be waiting.
            self._write(sink, claim=self.wake_plan.backlog)
            return
        self.wake_plan.looking(time.monotonic())
        fired = self._write(sink, claim=True, fire=True)
        queued = fired.queued
        while fired.jobs >= FIRE_BATCH:
            # More due jobs than one batch: fire the rest in transactions of their own.
            fired = self.store.fire_due_jobs(now=self.clock())
            queued += fired.queued
            if fired.queued:
                self.wake_plan.queued_more()
        if self.wake_plan.backlog:
            self._write(sink, claim=True)
        if queued > self.max_concurrent:
            # More work than this process can take right now: wake the others.
            self.store.notify()

    def _write(self, sink: list[runner.Outcome], *, claim: bool = False, fire: bool = False) -> FireReport:
        """Record the taken outcomes, fire due jobs, claim runs for the free slots; start them."""
        assert self.process is not None
        free = self.max_concurrent - len(self.inflight)
        slots = free if claim and free > 0 else 0
        if not (self.unrecorded or slots or fire):
            return FireReport()
        result = self.store.write_pass(
            Pass(
                self.unrecorded,
                worker_id=self.process.pk,
                clock=self.clock,
                lost_after=self.lost_after,
                fire=fire,
                slots=slots,
                recorded=lambda accepted: self._recorded(accepted, sink),
            )
        )
        if slots and not result.refused:
            # A full claim means more runs may be waiting.
            self.wake_plan.claimed(len(result.claimed), slots)
        self._start(result.claimed)
        return result.fired

    def _recorded(self, accepted: list[runner.Outcome], sink: list[runner.Outcome]) -> None:
        """The taken outcomes are written: let them go, and log those that were accepted."""
        self.unrecorded = []
        self._log_finished(accepted)
        sink.extend(accepted)
        self.wake_plan.recorded(all(outcome.status == "succeeded" for outcome in accepted))

    def _start(self, runs: list[Any]) -> None:
        """Hand the claimed runs to worker threads (logged at DEBUG: the finished line says the
        rest, and a line per run costs a fifth of a burst when the log goes to a pipe).

        Logging first keeps the workers from competing with this thread (for the interpreter
        lock) until it goes to sleep.
        """
        if not runs:
            return
        now_mono = time.monotonic()
        debug = logger.isEnabledFor(logging.DEBUG)
        for run in runs:
            if debug:
                lateness = run.lateness_seconds or 0.0
                logger.debug(
                    "run started job=%s run=%s attempt=%s trigger=%s lateness=%.3fs",
                    run.job_id,
                    run.pk,
                    run.attempt,
                    run.trigger,
                    lateness,
                    extra={"job_id": run.job_id, "run_id": run.pk, "status": "running", "lateness_seconds": lateness},
                )
            run.deadline = now_mono + run.job.timeout_seconds  # executors bound their waits by it
            self.inflight[run.pk] = Inflight(run, run.deadline)
        self.handover.awaiting(len(self.inflight))
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
        self.handover.put(outcome)

    def take_outcomes(self) -> None:
        """Take the outcomes of finished runs and of runs past their timeout, freeing their slots.

        A run past its timeout is recorded timed_out at once and lingers until its thread (which
        cannot be killed) ends; the late outcome then only says when and how it ended.
        """
        done = self.handover.take(GATHER_SECONDS)
        for outcome in done:
            if self.inflight.pop(outcome.run.pk, None) is not None:
                self.unrecorded.append(outcome)
            elif self._lingering.pop(outcome.run.pk, None) is not None:
                self._late_ends.append(outcome)
        now_mono = time.monotonic()
        expired = [run_id for run_id, item in self.inflight.items() if item.deadline <= now_mono]
        for run_id in expired:
            run = self.inflight.pop(run_id).run
            self._lingering[run_id] = run
            self.unrecorded.append(runner.timed_out(run, self.clock()))
        self.handover.awaiting(len(self.inflight))

    def _record_late_ends(self) -> None:
        """Store the ends of lingering runs whose timed-out outcome is already written."""
        if not self._late_ends:
            return
        unwritten = {outcome.run.pk for outcome in self.unrecorded}
        ready = [late for late in self._late_ends if late.run.pk not in unwritten]
        if ready:
            self.store.record_late_ends(ready)
            self._late_ends = [late for late in self._late_ends if late.run.pk in unwritten]

    def _log_finished(self, accepted: list[runner.Outcome]) -> None:
        for outcome in accepted:
            run = outcome.run
            duration = (outcome.finished_at - run.started_at).total_seconds() if run.started_at else 0.0
            log = logger.info if outcome.status == "succeeded" else logger.warning
            lateness = run.lateness_seconds or 0.0
            log(
                "run finished job=%s run=%s attempt=%s trigger=%s status=%s lateness=%.3fs duration=%.3fs%s",
                run.job_id,
                run.pk,
                run.attempt,
                run.trigger,
                outcome.status,
                lateness,
                duration,
                f" error={outcome.error.splitlines()[0]}" if outcome.error else "",
                extra={
                    "job_id": run.job_id,
                    "run_id": run.pk,
                    "status": outcome.status,
                    "lateness_seconds": lateness,
                    "duration_seconds": duration,
                },
            )

    def beat(self) -> None:
        """Write a heartbeat; recover the runs of dead schedulers once it may judge them."""
        assert self.process is not None
        self._sync_clock()
        now = self.clock()
        self.heartbeat.beating(time.monotonic())
        alive = SchedulerProcess.objects.filter(pk=self.process.pk, stopped_at__isnull=True).update(
            last_heartbeat_at=now
        )
        self.heartbeat.written(now)
        if not alive:
            # Another scheduler presumed us dead and took our runs; carry on under a new identity.
            logger.error("scheduler %s was presumed dead by another scheduler; registering again", self.process)
            self.register()
            # Claims under the old identity took nothing (claiming refuses a stopped or stale
            # scheduler): look for due jobs and ready runs at once.
            self._changed_elsewhere()
        if self.heartbeat.may_judge(time.monotonic()) and self.store.recover_lost_runs(
            now=now, lost_after=self.lost_after
        ):
            self._changed_elsewhere()  # retries of lost runs may be waiting: look at once

    # -- sleeping ------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.stopping:
            self.wakeup.wait(0.1)
            return
        now_mono = time.monotonic()
        wake_by = self.heartbeat.next_at
        if self.inflight:
            wake_by = min(wake_by, min(item.deadline for item in self.inflight.values()))
        timeout = self.wake_plan.sleep_seconds(
            mono=now_mono,
            clock=self.clock,
            slots_free=len(self.inflight) < self.max_concurrent,
            wake_by=wake_by,
            next_due=lambda include_queue: self.store.next_wakeup(include_queue=include_queue),
        )
        deadline = now_mono + timeout
        # Between passes, ask the watcher whether another process committed (SQLite, a few times
        # a second); a watcher that wakes the engine itself has an infinite poll_seconds.
        while not self.wakeup.wait(min(self._watcher.poll_seconds, max(deadline - time.monotonic(), 0.0))):
            if time.monotonic() >= deadline:
                return
            if self._watcher.changed():
                self.wake_plan.changed_elsewhere()  # the web process or another scheduler wrote something
                return


def _given(value: float | None, default: float) -> float:
    return float(value if value is not None else default)
