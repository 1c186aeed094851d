"""Threads beside the engine's loop, and how they (and the loop) wait after a failure."""

from __future__ import annotations

import threading

# While the database is unavailable: the first retry after this long, each next one after twice
# as long, up to a limit the caller gives.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


class Helper(threading.Thread):
    """A daemon thread beside the engine's loop, told to stop by `stop()`."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


def retry_delay(failures: int, longest: float) -> float:
    """Seconds before the next try after `failures` failures in a row: doubling, up to `longest`."""
    return min(RETRY_FIRST_SECONDS * 2 ** (failures - 1), longest)


def brief(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
