"""Which implementation runs each operation: decided once, when the engine starts, then passed explicitly.

    b = resolve(device=torch.device("cpu"), dtype=torch.float32)   # Engine.__init__ does this
    b.topk.impl                    # "triton" | "torch"
    b.catalog_scan(torch.float16)  # Choice(impl="half", why="...")
    b.report()                     # {"topk": {"impl": "torch", "why": "..."}, ...}: engine_status

Operations and their implementations:

| operation | implementations | used by |
|---|---|---|
| topk | triton, torch | `atelier_kernels.topk`: the catalogue's torch scan (GPU), sampling's top-k |
| deltae | triton, torch | `atelier_kernels.deltae`: CIEDE2000 maps (color_compare, mask delta_e) |
| kv_quant | triton, torch | `atelier_kernels.kv_quant`: the int8 K/V cache |
| cpu_kernels | numba, numpy | `atelier_kernels.cpu_decode`, `atelier_kernels.cpu_topk`: the Numba kernels or their NumPy twins |
| qmatmul | numba, numpy | `atelier_kernels.cpu_qmatmul`: products with GGUF-packed weights (same switch as cpu_kernels) |
| wq_matmul | cpu, triton, dequant | packed weights (GGUF, int8/int4) on a CUDA device: kept packed, `atelier_kernels.wq_matmul` (triton), or de-quantised at load (dequant); cpu: they run in qmatmul |
| catalog_scan_float32 | sketch, numpy, torch | `engine.catalog.scan` for fp32 catalogues |
| catalog_scan_float16 | half, torch | `engine.catalog.scan` for fp16 catalogues |
| llm_decode_step | numpy, torch, torch.compile | the decoder's step (CPU fp32: `engine.llm.npstep`) |

Inputs, all read here and only here: `engine.kernel_backend` (auto | triton |
torch), the engine's device and dtype, `models.llm_decode` (auto | numpy |
torch) and `models.llm_compile`; and two environment variables that are
documented inputs, read once per process and never written:
`TRITON_INTERPRET=1` (Triton's own switch: its kernels may then run on CPU
tensors, in the interpreter; the tests set it) and `ATELIER_CPU_KERNELS=numpy`
(the NumPy twins instead of the Numba kernels; `atelier_kernels._numba.wanted`).
Nothing in the engine or the kernels writes `os.environ` to carry a choice.

Fallbacks, each stated once: `catalog_scan_float32` is `sketch` where fbgemm's
int8 product works here and honours its error bound (checked once on random
rows), else `numpy`; `llm_decode_step` is `numpy` only on the CPU in fp32, and
a model the NumPy step does not implement (GPT-2 with the exact GELU) keeps
the torch forward (`engine.llm.model.Transformer.set_decode_step`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KERNEL_BACKENDS = ("auto", "triton", "torch")
OPERATIONS = ("topk", "deltae", "kv_quant", "cpu_kernels", "qmatmul", "wq_matmul", "catalog_scan_float32",
              "catalog_scan_float16", "llm_decode_step")


@dataclass(frozen=True)
class Choice:
    impl: str
    why: str


@dataclass(frozen=True)
class Backends:
    device: str
    dtype: str
    topk: Choice
    deltae: Choice
    kv_quant: Choice
    cpu_kernels: Choice
    qmatmul: Choice
    wq_matmul: Choice
    catalog_scan_float32: Choice
    catalog_scan_float16: Choice
    llm_decode_step: Choice

    def catalog_scan(self, dtype: torch.dtype) -> Choice:
        """The scan path for a catalogue stored in `dtype` (float32 or float16) on the engine's device."""
        if dtype == torch.float32:
            return self.catalog_scan_float32
        if dtype == torch.float16:
            return self.catalog_scan_float16
        raise ValueError(f"dtype={dtype}: expected float32 or float16")

    def report(self) -> dict[str, dict[str, str]]:
        """{operation: {"impl": ..., "why": ...}} for every operation, in `OPERATIONS` order."""
        return {op: asdict(getattr(self, op)) for op in OPERATIONS}


def _triton_choice(setting: str, device: torch.device, op: str) -> Choice:
    from atelier_kernels._backend import default_backend, interpret_mode

    if setting == "torch":
        return Choice("torch", "engine.kernel_backend=torch")
    if setting == "triton":
        where = "the interpreter (TRITON_INTERPRET=1)" if device.type == "cpu" and interpret_mode() else "CUDA"
        return Choice("triton", f"engine.kernel_backend=triton ({op} on {where})")
    if default_backend(device) == "triton":
        return Choice("triton", f"auto: Triton {op} kernel on CUDA")
    if device.type == "cuda":
        return Choice("torch", "auto: Triton is not installed, the torch reference runs")
    return Choice("torch", f"auto: the torch reference on {device.type} (Triton kernels run on CUDA)")


def _wq_choice(setting: str, device: torch.device) -> Choice:
    from atelier_kernels._backend import triton_available

    if device.type == "cpu":
        return Choice("cpu", "packed weights on the CPU run in atelier_kernels.cpu_qmatmul (qmatmul); the Triton "
                             "weight-only products serve CUDA devices")
    packed = "GGUF Q8_0/Q4_0/Q4_1 blocks and int8/int4 weights stay packed on " + device.type
    if setting == "triton" or (setting == "auto" and triton_available()):
        return Choice("triton", f"{packed}: Triton weight-only products (atelier_kernels.wq_matmul); other block types "
                                "are de-quantised at load")
    why = "engine.kernel_backend=torch" if setting == "torch" else "Triton is not installed"
    return Choice("dequant", f"{why}: packed weights are de-quantised to the engine dtype at load")


def _scan_choice(device: torch.device, dtype: torch.dtype, topk: Choice) -> Choice:
    from .catalog.scan import choose_path

    path, why = choose_path(device, dtype, topk_backend=topk.impl)
    return Choice(path, why)


def _decode_choice(setting: str, compile_step: bool, device: torch.device) -> Choice:
    from .llm.model import DECODE_STEPS, decode_step_choice

    if setting not in DECODE_STEPS:
        raise ValueError(f"models.llm_decode={setting!r}: expected one of {', '.join(DECODE_STEPS)}")
    if compile_step:
        return Choice("torch.compile", "models.llm_compile=true: the torch forward compiled by torch.compile "
                                       "(GGUF-packed weights stay uncompiled, in the NumPy step on the CPU)")
    dtype = torch.float32  # the language model runs in fp32 on the CPU (engine.llm.batcher.service_for)
    impl = decode_step_choice(setting, device, dtype)
    if impl == "numpy":
        return Choice("numpy", f"models.llm_decode={setting}: the NumPy step (engine.llm.npstep) on the CPU in "
                               "fp32 with a full cache; longer prompts, int8/window caches use the torch forward")
    if setting == "numpy":
        return Choice("torch", f"models.llm_decode=numpy needs the CPU in fp32; the torch forward on {device.type}")
    return Choice("torch", f"models.llm_decode={setting}: the torch forward on {device.type}")


def resolve(*, device: torch.device, dtype: torch.dtype, kernel_backend: str = "auto", llm_decode: str = "auto",
            llm_compile: bool = False) -> Backends:
    """Decide every operation's implementation (see the module docstring). Raises ValueError naming the
    setting when a forced backend cannot run here."""
    from atelier_kernels import _numba
    from atelier_kernels._backend import runnable

    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"engine.kernel_backend={kernel_backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
    if kernel_backend == "triton" and not runnable(device):
        raise ValueError(f"engine.kernel_backend='triton': the Triton kernels cannot run on {device} here (they "
                         "need Triton and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors); use auto or torch")
    topk = _triton_choice(kernel_backend, device, "top-k")
    cpu_impl, cpu_why = _numba.wanted()
    return Backends(
        device=str(device), dtype=str(dtype).removeprefix("torch."),
        topk=topk,
        deltae=_triton_choice(kernel_backend, device, "CIEDE2000"),
        kv_quant=_triton_choice(kernel_backend, device, "K/V int8"),
        cpu_kernels=Choice(cpu_impl, cpu_why),
        qmatmul=Choice(cpu_impl, "GGUF-packed weight products: " + cpu_why),
        wq_matmul=_wq_choice(kernel_backend, device),
        catalog_scan_float32=_scan_choice(device, torch.float32, topk),
        catalog_scan_float16=_scan_choice(device, torch.float16, topk),
        llm_decode_step=_decode_choice(llm_decode, llm_compile, device),
    )
