"""The shared compute engine: device and dtype policy, model registry, scheduler,
and the domain engines (colour, masks, recommendation, llm, diffusion, detection).

The engine knows nothing about MCP, JSON or client paths; it is a library you
can drive from a notebook:

    from engine import Engine, EngineConfig
    eng = Engine(EngineConfig(device="cpu"))
    eng.scheduler.run_sync(lambda token: ...)
    eng.backends.report()   # which implementation runs each operation, and why (engine.backends)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import _compat
from .backends import Backends
from .backends import resolve as resolve_backends
from .device import describe, select_device, select_dtype
from .registry import ModelRegistry
from .scheduler import CancelToken, Scheduler

__all__ = ["Backends", "Engine", "EngineConfig", "CancelToken"]

T = TypeVar("T")


@dataclass
class EngineConfig:
    device: str = "auto"
    dtype: str = "auto"
    memory_budget_bytes: int | None = None  # None = 60% of device / system memory
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "atelier-mcp")
    hf_offline: bool = True
    queue_length: int = 16
    kernel_backend: str = "auto"  # auto | triton | torch (engine.backends)
    torch_threads: int = 0
    llm_decode: str = "auto"  # models.llm_decode: auto | numpy | torch (engine.backends, the decoder's step)
    llm_compile: bool = False  # models.llm_compile


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device.index or 0).total_memory
    else:
        try:
            import psutil

            total = psutil.virtual_memory().total
        except Exception:  # pragma: no cover
            total = 8 * 1024**3
    return int(total * 0.6)


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.config.cache_dir = Path(self.config.cache_dir).expanduser()
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        # offline switches now; torchvision (and its shim) only when a model library is first imported
        _compat.configure_offline(self.config.cache_dir, hf_offline=self.config.hf_offline)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.device = select_device(self.config.device)
        self.dtype = select_dtype(self.config.dtype, self.device)
        # every operation's implementation, decided once here and passed explicitly (engine.backends)
        self.backends: Backends = resolve_backends(
            device=self.device, dtype=self.dtype, kernel_backend=self.config.kernel_backend,
            llm_decode=self.config.llm_decode, llm_compile=self.config.llm_compile)
        budget = self.config.memory_budget_bytes or _default_budget(self.device)
        self.registry = ModelRegistry(budget_bytes=budget)
        self.scheduler = Scheduler(self.device.type, max_queue=self.config.queue_length)
        self._services: dict[str, Any] = {}
        self._services_lock = threading.Lock()

    @staticmethod
    def start_thread() -> None:
        """Start the calling thread's intra-op threads now. OpenMP gives every thread that runs a parallel op
        its own team (torch.get_num_threads() - 1 more threads) at its first one: a server's pool threads
        call this when they start, so the process's thread count is set when the pools start and does not
        grow later with whichever pool threads happen to run a parallel op (mcp_server/pool.py)."""
        torch.ones(1 << 17).mul_(2)  # an element-wise op over 4 x at::internal::GRAIN_SIZE elements: parallel

    # -- domain services (lazy singletons: catalogue, llm batcher, ...) ------
    def service(self, name: str, factory: Callable[[Engine], T]) -> T:
        with self._services_lock:
            svc = self._services.get(name)
            if svc is None:
                svc = factory(self)
                self._services[name] = svc
            return svc

    def services(self) -> dict[str, Any]:
        with self._services_lock:
            return dict(self._services)

    @property
    def torchvision_state(self) -> str:
        """native, shim or missing; "not imported yet" until a tool first loads a model library."""
        return _compat.torchvision_state()

    @property
    def kernel_backend(self) -> str:
        """triton or torch: the Triton kernels' side (`backends` has every operation's)."""
        return self.backends.topk.impl

    def memory(self) -> dict[str, int | None]:
        used = self.registry.used_bytes
        info = describe(self.device, self.dtype)
        return {"models_bytes": used, "budget_bytes": self.registry.budget_bytes,
                "device_total_bytes": info.total_bytes, "device_allocated_bytes": info.allocated_bytes}

    def close(self) -> None:
        for svc in self.services().values():
            close = getattr(svc, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    pass
        self.scheduler.shutdown()
        self.registry.unload_all()
