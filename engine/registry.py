"""Model registry: lazy loading under a memory budget, LRU eviction, OOM recovery.

A model is registered by key with a loader (a zero-argument callable that
returns the loaded object) and is loaded on first `get`. Its size is measured
from its tensors (parameters + buffers for `nn.Module`s, or a `nbytes`
attribute / `size_bytes()` method otherwise). When loading would exceed the
budget, least-recently-used models are evicted first. An out-of-memory error
while loading frees what it can and raises `InsufficientMemory`; the registry
stays usable.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InsufficientMemory, ModelTooLarge, ModelUnavailable
from .workmem import gb

log = logging.getLogger("atelier.engine.registry")


def object_nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a model-like object (best effort, no double counting)."""
    if hasattr(obj, "size_bytes") and callable(obj.size_bytes):
        return int(obj.size_bytes())
    if hasattr(obj, "nbytes") and isinstance(obj.nbytes, int):
        return int(obj.nbytes)
    seen: set[int] = set()
    total = 0

    def add_module(m: torch.nn.Module) -> None:
        nonlocal total
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0

    if isinstance(obj, torch.nn.Module):
        add_module(obj)
    elif isinstance(obj, torch.Tensor):
        total += obj.untyped_storage().nbytes()
    else:
        components = getattr(obj, "components", None)
        if isinstance(components, dict):
            for v in components.values():
                if isinstance(v, torch.nn.Module):
                    add_module(v)
    return total


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, InsufficientMemory)):
        return True
    oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ModelEntry:
    key: str
    family: str
    loader: Callable[[], Any]
    source: str = ""
    obj: Any = None
    nbytes: int = 0
    loaded_at: float = 0.0
    last_used: float = 0.0
    load_seconds: float = 0.0
    pinned: bool = False
    # the bytes the loaded model will hold, computed without loading it (a GGUF's header: `estimate_llm_bytes`);
    # None: unknown, checked after the load only
    estimate: Callable[[], int | None] | None = None


class ModelRegistry:
    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._entries: dict[str, ModelEntry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()

    def register(self, key: str, loader: Callable[[], Any], *, family: str, source: str = "",
                 replace: bool = False, estimate: Callable[[], int | None] | None = None) -> None:
        """estimate(): the bytes the model will hold once loaded, known before loading it (None: unknown). A
        model estimated over the budget is refused before anything is allocated, and the least recently used
        models make room for the estimate before the load rather than after it."""
        with self._lock:
            if key in self._entries and not replace:
                return
            if key in self._entries:
                self.unload(key)
            self._entries[key] = ModelEntry(key=key, family=family, loader=loader, source=source, estimate=estimate)

    def registered(self, key: str) -> bool:
        return key in self._entries

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.obj is not None)

    def loaded(self) -> list[ModelEntry]:
        with self._lock:
            return [self._entries[k] for k in self._lru if self._entries[k].obj is not None]

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise ModelUnavailable(f"model {key!r} is not configured")
            if entry.obj is None:
                self._load(entry)
            entry.last_used = time.monotonic()
            self._lru.pop(key, None)
            self._lru[key] = None
            return entry.obj

    def unload(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.obj is None:
                return False
            entry.obj = None
            entry.nbytes = 0
            self._lru.pop(key, None)
        free_memory()
        log.info("model unloaded", extra={"model": key})
        return True

    def unload_all(self) -> None:
        for key in list(self._lru):
            self.unload(key)

    def _evict_for(self, needed: int, keep: str) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes + needed > self.budget_bytes:
            victims = [k for k in self._lru if k != keep and not self._entries[k].pinned]
            if not victims:
                return
            self.unload(victims[0])

    def _expected_bytes(self, entry: ModelEntry) -> int | None:
        if entry.estimate is None:
            return None
        try:
            need = entry.estimate()
        except Exception:  # an estimate must never stop a load: the load's own errors say what is wrong
            log.debug("model size estimate failed", extra={"model": entry.key}, exc_info=True)
            return None
        return int(need) if need else None

    def _load(self, entry: ModelEntry) -> None:
        t0 = time.perf_counter()
        need = self._expected_bytes(entry)
        if need is not None:
            if self.budget_bytes is not None and need > self.budget_bytes:
                raise ModelTooLarge(
                    f"model {entry.key!r} would need about {gb(need)} once loaded (estimated before loading), over "
                    f"the memory budget of {gb(self.budget_bytes)} (engine.memory_budget_mb); nothing was loaded")
            self._evict_for(need, keep=entry.key)
        try:
            obj = entry.loader()
        except BaseException as exc:
            if is_oom(exc):
                free_memory()
                # evict everything else and try once more
                for k in [k for k in self._lru if k != entry.key]:
                    self.unload(k)
                try:
                    obj = entry.loader()
                except BaseException as exc2:
                    if is_oom(exc2):
                        free_memory()
                        raise InsufficientMemory(
                            f"insufficient memory to load model {entry.key!r}; other models were unloaded"
                        ) from exc2
                    raise
            else:
                raise
        nbytes = object_nbytes(obj)
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            del obj
            free_memory()
            raise ModelTooLarge(
                f"model {entry.key!r} needs {gb(nbytes)} once loaded, over the memory budget of "
                f"{gb(self.budget_bytes)} (engine.memory_budget_mb); it was unloaded")
        self._evict_for(nbytes, keep=entry.key)
        entry.obj, entry.nbytes = obj, nbytes
        entry.loaded_at = time.monotonic()
        entry.load_seconds = time.perf_counter() - t0
        self._lru[entry.key] = None
        log.info("model loaded", extra={"model": entry.key, "bytes": nbytes,
                                         "seconds": round(entry.load_seconds, 3)})
