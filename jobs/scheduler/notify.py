"""Wake sleeping schedulers soon after jobs or runs change (see each store's `notify`)."""

from __future__ import annotations


def notify_schedulers() -> None:
    """PostgreSQL: a NOTIFY the schedulers LISTEN to. SQLite: nothing; schedulers notice commits
    by the database's commit counter."""
    from .store import get_store

    get_store().notify()
