"""Device and dtype policy: which accelerator the engine runs on, and in which precision.

Order of preference for `auto`: cuda > mps > cpu. Half precision is used only
where the device runs it fast (cuda, mps); the CPU computes in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: str = "auto") -> torch.device:
    """Resolve a configured device name; raise ValueError if it is not available here."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device={name!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is available on this machine")
    if name == "mps" and not mps_available():
        raise ValueError("device='mps': MPS is not available on this machine")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` gives float16 on cuda/mps and float32 on cpu."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class DeviceInfo:
    device: str
    dtype: str
    name: str
    total_bytes: int | None
    allocated_bytes: int | None


def describe(device: torch.device, dtype: torch.dtype) -> DeviceInfo:
    if device.type == "cuda":
        idx = device.index or 0
        props = torch.cuda.get_device_properties(idx)
        return DeviceInfo(str(device), str(dtype).removeprefix("torch."), props.name,
                          int(props.total_memory), int(torch.cuda.memory_allocated(idx)))
    if device.type == "mps":
        return DeviceInfo(str(device), str(dtype).removeprefix("torch."), "Apple MPS", None,
                          int(torch.mps.current_allocated_memory()))
    import platform

    return DeviceInfo(str(device), str(dtype).removeprefix("torch."),
                      platform.processor() or platform.machine(), None, None)
