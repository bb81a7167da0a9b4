# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SOCKET ?= ./qmp.sock

.PHONY: run test bench schema oracle clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Run the daemon in the foreground with the built-in demo setup. Ctrl-C stops it.
run: $(STAMP)
	@echo "qmpjobd: QMP on $(SOCKET); connect with:  $(BIN)/qmp-shell $(SOCKET)"
	@exec $(BIN)/qmpjobd --socket $(SOCKET) --demo --log-level info

# The whole suite: unit, socket-level integration and conformance against
# qemu-storage-daemon (installed here if missing; a missing oracle is a failure).
test: $(STAMP) oracle
	$(BIN)/pytest -q -p no:cacheprovider

oracle:
	@scripts/ensure-oracle.sh

# Side-by-side benchmarks against qemu-storage-daemon.
bench: $(STAMP) oracle
	$(BIN)/python -m bench

# Write the JSON Schema derived from schema/*.json for users to read.
schema: $(STAMP)
	mkdir -p build
	$(BIN)/python -m qmpjobd.qapi --json-schema build/qmpjobd-schema.json
	@echo "wrote build/qmpjobd-schema.json"

clean:
	rm -rf $(VENV) build *.egg-info $(SOCKET)

# Coverage-guided fuzzing of the lexer, the validator, the keyval parser and qcow2 images with
# atheris, FUZZ_SECONDS each (not part of `make test`). Corpora grow in build/fuzz/;
# a crashing input is written to build/fuzz/crash-*. See fuzz/README.md.
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	@for target in lexer validator keyval qcow2; do \
		mkdir -p build/fuzz/$$target; \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		$(BIN)/python fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) \
			-max_len=16384 -artifact_prefix=build/fuzz/ -print_final_stats=1 \
			build/fuzz/$$target fuzz/seeds/$$target || exit 1; \
	done
