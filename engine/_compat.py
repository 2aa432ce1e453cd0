"""Process-wide set-up the engine needs before importing model libraries.

- `ensure_torchvision()` (also under the name `model_libraries()`, called right before each import of
  transformers, diffusers or ultralytics; not when the engine starts, since importing torchvision costs
  about 4 s of a server's start here and most calls never need it): PyPI's torchvision wheel is CUDA-linked; beside a CPU
  torch its C++ ops fail to load and `import torchvision` dies with
  "operator torchvision::nms does not exist", which takes transformers,
  diffusers and ultralytics down with it. Only when the native import fails,
  we define `torchvision::nms` (and `qnms`) with a pure-torch implementation,
  import torchvision again, and let `torchvision.ops.nms` use it.
- `configure_offline(cache_dir)`: no network at run time: Hugging Face offline
  unless configured otherwise, ultralytics offline with its config dir inside
  our cache dir (no online checks, font downloads or auto-installs).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger("atelier.engine.compat")

_TV_STATE: str | None = None  # "native" | "shim" | "missing"
_TV_LOCK = threading.Lock()  # two tool threads may reach their first model-library import together
_LIB: torch.library.Library | None = None


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, the semantics of `torchvision.ops.nms`.

    boxes: [N, 4] (x1, y1, x2, y2); scores: [N]. Returns int64 indices of the
    kept boxes in decreasing score order (ties: the lower index first).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].to(torch.float64)
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(n, dtype=torch.bool, device=b.device)
    chunk = 1024
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # IoU of this chunk's boxes against all boxes: [C, N]
        xx1 = torch.maximum(x1[start:stop, None], x1[None, :])
        yy1 = torch.maximum(y1[start:stop, None], y1[None, :])
        xx2 = torch.minimum(x2[start:stop, None], x2[None, :])
        yy2 = torch.minimum(y2[start:stop, None], y2[None, :])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        union = area[start:stop, None] + area[None, :] - inter
        iou = torch.where(union > 0, inter / union, torch.zeros_like(inter))
        over = (iou > iou_threshold).cpu().numpy()
        sup = suppressed.cpu().numpy().copy()
        for i in range(start, stop):
            if sup[i]:
                continue
            keep.append(i)
            row = over[i - start]
            row[: i + 1] = False
            sup |= row
        suppressed = torch.from_numpy(sup).to(b.device)
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _define_nms_ops() -> None:
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive in _LIB
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def _nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        return nms_reference(dets, scores, iou_threshold)

    def _qnms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        return nms_reference(dets.dequantize(), scores.dequantize(), iou_threshold)

    lib.impl("nms", _nms, "CompositeExplicitAutograd")
    lib.impl("qnms", _qnms, "CompositeExplicitAutograd")
    _LIB = lib


def ensure_torchvision() -> str:
    """Make `import torchvision` work; returns "native", "shim" or "missing"."""
    if _TV_STATE is not None:
        return _TV_STATE
    with _TV_LOCK:
        return _ensure_torchvision_locked()


def _ensure_torchvision_locked() -> str:
    global _TV_STATE
    if _TV_STATE is not None:
        return _TV_STATE
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        _TV_STATE = "missing"
        return _TV_STATE
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_nms_ops()
        import torchvision  # noqa: F401
        import torchvision.ops.boxes as _boxes

        # nms now has a real implementation; the other C++ ops stay unavailable
        # and keep torchvision's own clear error.
        _boxes._assert_has_ops = lambda: None
        _TV_STATE = "shim"
        log.info("torchvision native ops unavailable; using the pure-torch nms shim")
        return _TV_STATE
    _TV_STATE = "native"
    return _TV_STATE


model_libraries = ensure_torchvision  # the name used at the import sites of transformers/diffusers/ultralytics


def torchvision_state() -> str:
    """native, shim or missing once a model library was imported; before that "not imported yet"."""
    return _TV_STATE or "not imported yet"


def configure_offline(cache_dir: str | os.PathLike[str], hf_offline: bool = True) -> None:
    """Environment for model libraries: offline, quiet, config inside `cache_dir`."""
    cache = Path(cache_dir)
    yolo_dir = cache / "ultralytics"
    yolo_dir.mkdir(parents=True, exist_ok=True)
    if hf_offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(yolo_dir))
    if "ultralytics" in sys.modules:
        _ultralytics_settings()


def _ultralytics_settings() -> None:
    try:
        from ultralytics.utils import SETTINGS
    except Exception:  # pragma: no cover - ultralytics missing or broken
        return
    try:
        SETTINGS.update({"sync": False, "hub": False, "mlflow": False, "wandb": False,
                         "tensorboard": False, "clearml": False, "comet": False, "dvc": False,
                         "neptune": False, "raytune": False})
    except Exception:
        log.debug("could not update ultralytics settings", exc_info=True)


def quiet_progress_bars() -> None:
    """tqdm bars of transformers/diffusers go to stderr; in a server they are noise."""
    for mod_name in ("transformers.utils.logging", "diffusers.utils.logging"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "disable_progress_bar"):
            try:
                mod.disable_progress_bar()
            except Exception:
                pass


def prepare(cache_dir: str | os.PathLike[str], hf_offline: bool = True) -> str:
    """Everything above, in order. Returns the torchvision state."""
    configure_offline(cache_dir, hf_offline=hf_offline)
    return ensure_torchvision()
