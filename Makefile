# The two commands of the README, `make serve` and `make test`, and `make images`
# (deploy/local-images.sh: the images built with podman where no registry can be reached).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000
# As the image's CMD (Dockerfile): h11 caps a request's line and headers at 32 KiB.
HTTP_OPTIONS := --http h11 --h11-max-incomplete-event-size 32768

.PHONY: serve test install-serve install-test bench images clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,dev]'

serve: install-serve
	$(BIN)/uvicorn service.app:app --host $(HOST) --port $(PORT) $(HTTP_OPTIONS)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m bench.load --url http://127.0.0.1:$(PORT)

images:
	deploy/local-images.sh

clean:
	rm -rf $(VENV) .pytest_cache .cache
