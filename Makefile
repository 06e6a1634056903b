# The README's two quickstart commands: `make demo` and `make test`; `make release` writes the
# install files (dist/crd.yaml, dist/operator.yaml, dist/gateway.yaml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint unit demo bench clean kube-testenv release

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check aviator tests
	$(VENV)/bin/mypy aviator
	$(VENV)/bin/lint-imports --no-cache

# The real Kubernetes API server (1.20.2) and etcd the tests run against: built once into
# ~/.cache/aviator/ (5-17 min on a fresh machine), then a no-op. See scripts/kube-testenv.sh.
kube-testenv:
	bash scripts/kube-testenv.sh

test: lint kube-testenv
	$(VENV)/bin/pytest -q

release:
	bash scripts/release.sh dist

demo: $(STAMP)
	$(VENV)/bin/aviator demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
