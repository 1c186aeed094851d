"""Write what a local `.env` needs for plain HTTP on 127.0.0.1 (run by `make run`).

A random SECRET_KEY, and HTTPS-only redirects, cookies and HSTS switched off, so that
`manage.py runserver` (or the scheduler) started later with the same `.env` behaves as
`make run` does. Settings already in the file are kept; production sets none of these
(its environment keeps the hardening on, see README "Production").
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

LOCAL_HTTP = {
    "SECURE_SSL_REDIRECT": "false",
    "SESSION_COOKIE_SECURE": "false",
    "CSRF_COOKIE_SECURE": "false",
    "SECURE_HSTS_SECONDS": "0",
}


def ensure(path: Path) -> list[str]:
    """Add the missing local settings to `path`; return the names added."""
    text = path.read_text() if path.exists() else ""
    present = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line and not line.startswith("#")}
    wanted = {"SECRET_KEY": secrets.token_urlsafe(50), **LOCAL_HTTP}
    added = [name for name in wanted if name not in present]
    if added:
        lines = ["# Written by `make run` for http://127.0.0.1; not for production."] if not text else []
        lines += [f"{name}={wanted[name]}" for name in added]
        with path.open("a") as out:
            if text and not text.endswith("\n"):
                out.write("\n")
            out.write("\n".join(lines) + "\n")
    return added


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".env")
    for name in ensure(target):
        print(f"wrote {name} to {target}")
