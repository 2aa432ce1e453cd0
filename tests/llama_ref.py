"""llama.cpp (llama-cpp-python) as the tests' and the benchmark's reference, without its AMX weight buffers.

On a CPU with AMX (Intel Sapphire Rapids and later), llama.cpp built with GGML_NATIVE (as pip builds
llama-cpp-python 0.3.36) repacks Q4_1/Q8_0 weights into its AMX buffer type, and evaluating a batch of
tokens (any prompt longer than one token) then dies with a segmentation fault: seen on an Intel Xeon with
amx_int8 (`llm.eval([1, 2, ..., 8])`, exit -11); one token at a time runs. `use_extra_bufts = False` keeps
the weights in plain CPU buffers (llama.cpp's AVX-512/AVX2 dot products, the same arithmetic as without
AMX), and batches run. Only where the CPU has AMX: elsewhere llama.cpp keeps its repacking (the faster
reference).

    import tests.llama_ref as ref; ref.patch()          # before creating llama_cpp.Llama objects
    python tests/llama_ref.py --model F ...             # python -m llama_cpp.server, patched
"""

from __future__ import annotations

import functools


@functools.cache
def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def patch() -> bool:
    """Make every `llama_cpp.Llama` created from now on in this process skip llama.cpp's extra weight buffers
    (AMX, repacking) where the CPU has AMX. Returns whether it patched."""
    if not cpu_has_amx():
        return False
    import llama_cpp.llama as high  # Llama.__init__ calls its module's llama_cpp.llama_model_default_params()

    low = high.llama_cpp
    if getattr(low.llama_model_default_params, "_atelier_patched", False):
        return True
    orig = low.llama_model_default_params

    def default_params():  # noqa: ANN202
        p = orig()
        p.use_extra_bufts = False
        return p

    default_params._atelier_patched = True  # type: ignore[attr-defined]
    low.llama_model_default_params = default_params
    return True


if __name__ == "__main__":  # the OpenAI-compatible server, patched: argv as for python -m llama_cpp.server
    import runpy

    patch()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
