# `make run` starts mailer on the embedded defaults; `make test` runs every test, on SQLite
# and, when MAILER_TEST_POSTGRES_URL names a PostgreSQL server, again on PostgreSQL.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mailer init
	$(BIN)/mailer serve

# With MAILER_TEST_POSTGRES_URL set, the PostgreSQL pass runs beside the SQLite one (the suite
# mostly waits on sockets and subprocesses, so two passes fit in the time of one and a half);
# its output is printed after SQLite's, and either pass failing fails the target.
test: $(STAMP)
	@if [ -z "$$MAILER_TEST_POSTGRES_URL" ]; then exec $(BIN)/pytest; fi; \
	log=$$(mktemp); \
	$(BIN)/pytest --db=postgresql -p no:cacheprovider >$$log 2>&1 & pg=$$!; \
	$(BIN)/pytest; sqlite=$$?; \
	wait $$pg; postgresql=$$?; \
	echo "== the PostgreSQL pass (--db=postgresql)"; cat $$log; rm -f $$log; \
	echo "== SQLite pass: exit $$sqlite; PostgreSQL pass: exit $$postgresql"; \
	[ $$sqlite -eq 0 ] && [ $$postgresql -eq 0 ]

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict mailer
	$(BIN)/lint-imports

check: lint test

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
