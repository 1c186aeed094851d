"""Where the scheduler reads and writes jobs and runs: one `RunStore` per kind of database.

`get_store()` gives the store of the default database's vendor. Everything that differs between
PostgreSQL and SQLite (locking, statements, waking, liveness evidence, the clock) lives in the
store, so the engine has no vendor branch.
"""

from __future__ import annotations

from django.db import connection

from .base import FIRE_BATCH, Pass, RunStore

__all__ = ["FIRE_BATCH", "Pass", "RunStore", "get_store"]

_stores: dict[str, RunStore] = {}


def get_store() -> RunStore:
    """The store for the default database; refuses a database the scheduler does not support."""
    vendor = connection.vendor
    store = _stores.get(vendor)
    if store is None:
        if vendor == "postgresql":
            from .postgres import PostgresStore

            store = PostgresStore()
        elif vendor == "sqlite":
            from .sqlite import SqliteStore

            store = SqliteStore()
        else:
            raise NotImplementedError(f"the scheduler supports PostgreSQL and SQLite, not {vendor}")
        _stores[vendor] = store
    return store
