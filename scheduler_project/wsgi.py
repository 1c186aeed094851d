"""WSGI entry point for gunicorn: `gunicorn scheduler_project.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_project.settings")

from scheduler_project.startup import exit_on_config_error

exit_on_config_error(check_jobs=True)
application = get_wsgi_application()
