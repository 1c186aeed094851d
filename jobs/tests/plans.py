"""Recording the statements a request runs, and asking the database how it would run them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection


@contextmanager
def statements() -> Iterator[list[tuple[str, Any]]]:
    """Record each statement with its parameters, as the database receives them."""
    recorded: list[tuple[str, Any]] = []

    def record(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        recorded.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield recorded


def explain(sql: str, params: Any) -> tuple[list[dict[str, Any]], str]:
    """Return the plan's nodes (PostgreSQL) or lines (SQLite) and their text, for the statement as sent.

    The parameters are bound as the list bound them: SQLite plans a bound value differently from
    the same value written into the statement (it uses a partial index only for the latter).
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            nodes, todo = [], [cursor.fetchone()[0][0]["Plan"]]
            while todo:
                node = todo.pop()
                nodes.append(node)
                todo.extend(node.get("Plans", []))
            return nodes, json.dumps(nodes)
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
        lines = [{"detail": row[-1]} for row in cursor.fetchall()]
        return lines, " | ".join(line["detail"] for line in lines)
