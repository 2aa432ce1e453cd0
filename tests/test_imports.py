"""The torchvision shim: torch, torchvision.ops.nms, transformers, diffusers and
ultralytics import and work on this machine (CPU torch + PyPI torchvision)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine._compat import nms_reference


def _numpy_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Independent oracle: the textbook greedy NMS loop."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            xx2, yy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            a_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            a_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            union = a_i + a_j - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    """One fresh interpreter, run from the project root (the project first on sys.path, as the server and the
    tests run it): the shim prepared, torch, torchvision, transformers, diffusers (its pipelines) and
    ultralytics imported, torchvision's nms called, and every installed distribution's top-level names."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.metadata as md, json, tempfile;"
        "from engine._compat import prepare; state = prepare(tempfile.mkdtemp());"
        "import torch, torchvision, transformers, diffusers, ultralytics;"
        "from torchvision.ops import nms;"
        "from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline;"
        "from transformers import AutoModelForCausalLM;"
        "b = torch.tensor([[0,0,10,10],[1,1,11,11],[20,20,30,30.]]); s = torch.tensor([.9,.8,.7]);"
        "dists = {d.metadata['Name'].lower().replace('_', '-'): d for d in md.distributions()};"
        "tops = {}\n"
        "for name, d in dists.items():\n"
        "    if name == 'atelier-mcp': continue\n"
        "    for f in (d.files or []):\n"
        "        top = f.parts[0]\n"
        "        if len(f.parts) > 1 and '.' not in top or f.suffix == '.py' and len(f.parts) == 1:\n"
        "            tops.setdefault(top.removesuffix('.py'), name)\n"
        "print(json.dumps({'state': state, 'kept': nms(b, s, 0.5).tolist(), 'tops': tops}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return {"root": root, **json.loads(out.stdout.decode().strip().splitlines()[-1])}


def test_all_model_libraries_import_in_a_fresh_process(fresh_process):
    assert fresh_process["state"] in ("native", "shim")
    assert fresh_process["kept"] == [0, 2]


def test_no_project_package_shadows_a_dependency(fresh_process):
    """Our top-level packages keep names no dependency uses: transformers 5.25 requires Hugging Face's `kernels`
    package, and while ours was called `kernels` too, the project's copy shadowed it and diffusers' pipelines
    failed to import (`cannot import name 'CUDAProperties' from 'kernels'`)."""
    root, tops = fresh_process["root"], fresh_process["tops"]
    ours = [p.name for p in root.iterdir() if (p / "__init__.py").is_file()]
    assert {"engine", "mcp_server", "tools", "atelier_kernels"} <= set(ours)
    assert "transformers" in tops.values() and "torch" in tops  # the map really holds the installed names
    clash = {n: tops[n] for n in ours if n in tops}
    assert not clash, f"project packages named like an installed distribution's: {clash}"


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 200), (3, 1500)])
def test_nms_matches_greedy_oracle(seed, n):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.choice(np.linspace(0, 1, 20), n)  # ties on purpose
    got = nms_reference(torch.tensor(boxes), torch.tensor(scores), 0.4).tolist()
    assert got == _numpy_nms(boxes, scores, 0.4)


def test_torchvision_nms_uses_a_working_kernel():
    from engine._compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.ops import batched_nms, nms

    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 50, (300, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(1, 20, (300, 2))], 1), dtype=torch.float32)
    scores = torch.tensor(rng.uniform(0, 1, 300), dtype=torch.float32)
    assert nms(boxes, scores, 0.5).tolist() == _numpy_nms(boxes.double().numpy(), scores.double().numpy(), 0.5)
    idx = torch.tensor(rng.integers(0, 3, 300))
    kept = batched_nms(boxes, scores, idx, 0.5)
    assert len(kept) >= len(nms(boxes, scores, 0.5))
