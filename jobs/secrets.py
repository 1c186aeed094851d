"""Secret-looking values in job parameters, masked for people who may read a job but not change it."""

from __future__ import annotations

import re
from typing import Any

MASK = "********"
# Keys (parameter names, header names) whose values are credentials.
SECRET_KEY = re.compile(
    r"(authori[sz]ation|token|passw(or)?d|secret|api[-_]?key|cookie|credential|private[-_]?key|signature)", re.I
)


def mask_secrets(value: Any) -> Any:
    """Return a copy of `value` with the values under secret-looking keys replaced by MASK.

    A value that names where the secret is read at run time ({"from_env": ...} or
    {"from_setting": ...}) holds no secret and is shown as it is.
    """
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if not isinstance(value, dict):
        return value
    masked: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and SECRET_KEY.search(key) and not _reference(item) and item not in (None, ""):
            masked[key] = MASK
        else:
            masked[key] = mask_secrets(item)
    return masked


def _reference(value: Any) -> bool:
    return isinstance(value, dict) and bool({"from_env", "from_setting"} & set(value))
