"""Fixtures for the fault tests: a PostgreSQL cluster of their own, fresh fault databases, fleets.

The fault tests never use the suite's test database: each gets a database of its own (on its
own cluster for PostgreSQL, in tmp_path for SQLite) that the tests may break at will.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Fleet, PgCluster, PgUnavailable, SchedulerOptions, migrate

TEMPLATE = "faults_template"
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of the fault tests' own, with a migrated template database."""
    try:
        cluster = PgCluster()
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the fault tests need a PostgreSQL cluster of their own in CI: {exc}", pytrace=False)
        pytest.skip(f"no PostgreSQL cluster of our own: {exc}")
    with cluster:
        cluster.start()
        migrate(cluster.create_database(TEMPLATE))
        yield cluster


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, migrated database on the fault cluster (started if a test left it stopped)."""
    pg_cluster.ensure_running()
    return pg_cluster.create_database(f"faults_{next(_numbers)}", template=TEMPLATE)


@pytest.fixture
def sqlite_database(tmp_path: Path) -> str:
    """The URL of a fresh, migrated SQLite file in tmp_path."""
    url = f"sqlite:///{tmp_path / 'faults.sqlite3'}"
    migrate(url)
    return url


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Make fleets of scheduler processes; every process they started is killed at the end."""
    fleets: list[Fleet] = []

    def make(database_url: str, options: SchedulerOptions | None = None) -> Fleet:
        fleet = Fleet(database_url, tmp_path / f"logs-{len(fleets)}", options)
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.close()
