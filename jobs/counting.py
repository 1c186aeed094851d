"""Counting rows at a cost that does not grow with the table."""

from __future__ import annotations

import json
from typing import Any

from django.db import connections
from django.db.models import QuerySet

# Counts up to this are exact; above it, PostgreSQL's planner estimate (never one that looks exact).
EXACT_COUNT_LIMIT = 10_000


def bounded_count(queryset: QuerySet[Any], limit: int = EXACT_COUNT_LIMIT) -> tuple[int, bool]:
    """The number of rows `queryset` matches, and whether it is an estimate.

    Reads at most `limit` + 1 rows, and above that asks the planner (EXPLAIN), whose estimate
    costs the same at any table size. SQLite keeps no statistics to estimate from, and serves
    tables small enough to count.
    """
    rows = queryset.order_by().values("pk")
    if connections[rows.db].vendor != "postgresql":
        return rows.count(), False
    counted = rows[: limit + 1].count()
    if counted <= limit:
        return counted, False
    plan = json.loads(rows.explain(format="json"))
    return max(round(plan[0]["Plan"]["Plan Rows"]), limit + 1), True
