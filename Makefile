# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve worker test bench lint fuzz soak clean pacs-node image-test kube-test proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The project installs editable (pyproject.toml): the code is imported from this folder, and the console
# scripts land in $(BIN). The stamps make re-runs instant until a dependency list changes.
$(VENV)/.runtime: pyproject.toml requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
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

## image-test: build the image, run the compose stack (Docker, else podman) and check it (tests/image/run.sh)
image-test: $(VENV)/.dev
	PYTHON=$(BIN)/python tests/image/run.sh

## kube-test: play the Helm chart's podman profile with podman kube play and send Study1 through it (tests/kube/run.sh)
kube-test: $(VENV)/.dev
	PYTHON=$(BIN)/python tests/kube/run.sh

## bench: run the benchmark (prints one JSON line)
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run

## fuzz: the live mutation fuzz at 3,000 requests (the suite runs 60), fixed seed
fuzz: $(VENV)/.dev
	FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q -s tests/test_fuzz.py

## soak: 10 minutes at 16 mixed clients against the served gateway (one JSON line)
soak: $(VENV)/.dev
	$(BIN)/python -m bench.soak

## lint: ruff on the code, mypy on the packages pyproject.toml names, hadolint on both Dockerfiles
lint: $(VENV)/.dev
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/mypy || status=1; \
	$(BIN)/hadolint Dockerfile inference-test-tool/Dockerfile || status=1; \
	exit $$status

## proto: regenerate the Radiomics API's committed *_pb2.py from its .proto files (pinned grpcio-tools)
proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. inference/radiomics/proto/*.proto

clean:
	rm -rf $(VENV) .pytest_cache inference-test-tool/output output
