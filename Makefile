# The README's two quickstart commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-install lint unit demo bench clean

# The control plane, editable, with its dev extra. Its wheel ships the agent's package
# (agent/src/aviator_agent, see pyproject.toml), so this installs the agent too.
$(STAMP): pyproject.toml agent/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check aviator agent tests
	$(VENV)/bin/mypy aviator agent/src
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(VENV)/bin/pytest -q

# Only the tests that pip-install this tree into fresh venvs (the base install as the image
# has it, the agent alone); `make test` runs them too.
test-install: $(STAMP)
	$(VENV)/bin/pytest -q -m install

demo: $(STAMP)
	$(VENV)/bin/aviator demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
