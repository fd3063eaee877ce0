# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve worker test bench lint fuzz soak clean pacs-node

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

## serve: install the runtime and serve every handler with gunicorn on port 8900
serve: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py

## worker: install the runtime and run a celery job worker (INFERENCE_JOB_BACKEND=celery; CONCURRENCY jobs at once)
CONCURRENCY ?= 1
worker: $(VENV)/.runtime
	$(BIN)/celery -A worker worker --concurrency $(CONCURRENCY) --loglevel INFO
## pacs-node: the DICOM node (dicom_node.py): flags via PACS_ARGS, settings from INFERENCE_PACS_* variables
pacs-node: $(VENV)/.runtime
	$(BIN)/python dicom_node.py $(PACS_ARGS)

## test: install everything and run the test suite
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

## bench: run the benchmark (prints one JSON line)
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run

## fuzz: the live mutation fuzz at 3,000 requests (the suite runs 60), fixed seed
fuzz: $(VENV)/.dev
	FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q -s tests/test_fuzz.py

## soak: 10 minutes at 16 mixed clients against the served gateway (one JSON line)
soak: $(VENV)/.dev
	$(BIN)/python -m bench.soak

## lint: hadolint on both Dockerfiles
lint: $(VENV)/.dev
	$(BIN)/hadolint Dockerfile inference-test-tool/Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache inference-test-tool/output output
