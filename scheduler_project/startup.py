"""Turn a bad setting into one line on stderr and exit status 2, never a traceback."""

import sys

from django.conf import settings

from .env import ConfigError


def exit_on_config_error(*, check_jobs: bool = False) -> None:
    """Load settings now, so a ConfigError stops start-up with one line naming the variable.

    `check_jobs`: an unusable JOBS setting too, for the web server, which runs no system checks
    (management commands report it as jobs.E006).
    """
    try:
        settings.INSTALLED_APPS  # noqa: B018 - touching a setting imports the settings module
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if check_jobs:
        from jobs.conf import problems

        for problem in problems():
            print(f"configuration error: {problem}", file=sys.stderr)
            raise SystemExit(2)
