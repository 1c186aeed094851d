# Two commands for a newcomer: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/scheduler
SQLITE_TEST_URL ?= sqlite:///$(CURDIR)/.pytest-db.sqlite3
PYTEST_ARGS ?=

.PHONY: run test test-sqlite test-postgres lint format typecheck check-migrations check-deploy bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Web server and scheduler together until Ctrl-C. DEBUG stays false; .env gets a generated local
# SECRET_KEY and HTTPS-only cookies/redirects switched off for http://127.0.0.1 (scripts/local_env.py),
# so `manage.py runserver` started later with the same .env behaves the same.
run: $(VENV)/.installed
	@$(PY) scripts/local_env.py .env
	@$(PY) manage.py migrate --noinput -v0 && \
	$(PY) manage.py collectstatic --noinput -v0 && \
	$(PY) manage.py ensureadmin --url http://127.0.0.1:$(PORT) && \
	trap 'kill $$sched 2>/dev/null; wait $$sched 2>/dev/null' EXIT INT TERM; \
	$(PY) manage.py runscheduler & sched=$$!; \
	$(PY) manage.py runserver --noreload 127.0.0.1:$(PORT)

# The whole suite on SQLite, then again on PostgreSQL when a server answers (required when CI=true).
test: $(VENV)/.installed
	@$(MAKE) --no-print-directory test-sqlite
	@if $(PY) scripts/pg_available.py "$(PG_TEST_URL)"; then \
		$(MAKE) --no-print-directory test-postgres; \
	elif [ "$$CI" = "true" ]; then \
		echo "PostgreSQL is required in CI but $(PG_TEST_URL) does not answer" >&2; exit 1; \
	else \
		echo ""; echo "*** PostgreSQL SKIPPED: no server answers at $(PG_TEST_URL); only the SQLite suite ran. ***"; \
	fi

test-sqlite: $(VENV)/.installed
	@echo "=== test suite on SQLite ==="
	DATABASE_URL=$(SQLITE_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

test-postgres: $(VENV)/.installed
	@echo "=== test suite on PostgreSQL ($(PG_TEST_URL)) ==="
	DATABASE_URL=$(PG_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The django-stubs plugin imports the settings: no .env, and a placeholder key since DEBUG is off.
typecheck: $(VENV)/.installed
	ENV_FILE=/dev/null SECRET_KEY=typecheck-only-not-secret $(VENV)/bin/mypy jobs scheduler_project bench manage.py

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

check-migrations: $(VENV)/.installed
	DEBUG=true $(PY) manage.py makemigrations --check --dry-run

# Production-like settings: DEBUG off, a long random key, a real host name.
check-deploy: $(VENV)/.installed
	DEBUG=false ALLOWED_HOSTS=scheduler.example.com \
	SECRET_KEY=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(50))') \
	$(PY) manage.py check --deploy --fail-level WARNING

bench: $(VENV)/.installed
	$(PY) bench/burst.py
	$(PY) bench/idle.py

clean:
	rm -rf $(VENV) staticfiles .pytest-db.sqlite3* .pytest_cache
