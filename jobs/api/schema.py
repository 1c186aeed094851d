"""OpenAPI schema hooks for drf-spectacular."""

from __future__ import annotations

from typing import Any

Endpoint = tuple[str, str, str, Any]


def document_paths_without_slash(endpoints: list[Endpoint], **kwargs: Any) -> list[Endpoint]:
    """Document each route once, as `/jobs/{id}`, though it also answers with a trailing slash."""
    seen: set[tuple[str, str]] = set()
    result = []
    for path, path_regex, method, callback in endpoints:
        path = path.rstrip("/") or "/"
        if (path, method) in seen:
            continue
        seen.add((path, method))
        result.append((path, path_regex, method, callback))
    return result
