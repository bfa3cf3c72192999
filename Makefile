# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve test install-serve install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,dev]'

serve: install-serve
	$(BIN)/uvicorn service.app:app --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m bench.load --url http://127.0.0.1:$(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .cache
