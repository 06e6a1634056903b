# The README's two quickstart commands: `make demo` and `make test`; `make release` writes the
# install files (dist/crd.yaml, dist/operator.yaml, dist/gateway.yaml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-install lint unit demo bench clean kube-testenv release

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

# The real Kubernetes API server (1.20.2) and etcd the tests run against: built once into
# ~/.cache/aviator/ (5-17 min on a fresh machine), then a no-op. See scripts/kube-testenv.sh.
kube-testenv:
	bash scripts/kube-testenv.sh

test: lint kube-testenv
	$(VENV)/bin/pytest -q

# Only the tests that pip-install this tree into fresh venvs (the base install as the image
# has it, the agent alone); `make test` runs them too.
test-install: $(STAMP)
	$(VENV)/bin/pytest -q -m install

release:
	bash scripts/release.sh dist

demo: $(STAMP)
	$(VENV)/bin/aviator demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
