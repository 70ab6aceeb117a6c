# expertmesh developer entry points. `make demo` and `make test` are the whole quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The dev setup pins a CPU build of torch (a local wheel on our machines; any other spec pulls a
# multi-GB CUDA build). Users install whatever torch >= 2.4 they have; see pyproject's extras.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: demo plan-demo test lint venv redis-server protos clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# Tests start their own private redis-server on a free port; here we only make sure the binary exists.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server from Debian packages" >&2; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server >/dev/null; }

# The gRPC stubs under protos/v1/ from protos/expertmesh/v1/*.proto (committed; a test fails when stale).
protos: venv
	$(PY) -m expertmesh.protos.generate

# The service end to end: the tiny model on 2 CPU workers, a burst of requests over gRPC, then placements
# planned from the routing its workers recorded in a private redis-server.
demo: venv redis-server
	$(VENV)/bin/expertmesh demo

# The placement comparison on a synthetic trace (heatmaps under $(DEMO_OUT)).
plan-demo: venv
	$(VENV)/bin/expertmesh plan-demo --out $(DEMO_OUT)

lint: venv
	$(VENV)/bin/ruff check .

test: venv redis-server lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
