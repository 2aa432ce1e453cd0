"""Issue 16.3: importing the server changes no process state; building an engine writes no environment.

Each check runs in a fresh interpreter, so what earlier tests did to this process cannot hide a change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_every_server_module_patches_nothing():
    r = _run("""
        import json, logging, os, sys, warnings
        from PIL import Image, ImageFile
        before = (logging.getLogRecordFactory(), Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
                  dict(os.environ), list(warnings.filters))
        import mcp_server.app, mcp_server.cli, mcp_server.transports, tools, engine, kernels  # noqa: F401
        after = (logging.getLogRecordFactory(), Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
                 dict(os.environ), list(warnings.filters))
        names = ["log record factory", "Image.MAX_IMAGE_PIXELS", "ImageFile.LOAD_TRUNCATED_IMAGES", "os.environ"]
        changed = [n for n, a, b in zip(names, before, after) if a != b]
        env_added = sorted(set(after[3]) - set(before[3]))
        print(json.dumps({"changed": changed, "env_added": env_added}))
    """)
    assert r["changed"] == [], r


def test_building_the_server_state_decides_backends_without_the_environment(tmp_path):
    """The backend decision is a value passed around, never ATELIER_*/TRITON_* variables written for later
    readers. (The libraries' own offline/telemetry switches, HF_HUB_OFFLINE and the like, are environment
    variables by their design; the engine sets those once when it starts, not at import.)"""
    r = _run(f"""
        import json, os
        before = dict(os.environ)
        from mcp_server.config import Settings
        from mcp_server.app import make_state
        s = Settings(_env_file=None, paths={{"output_dir": {str(tmp_path / 'out')!r}}},
                     engine={{"cache_dir": {str(tmp_path / 'cache')!r}, "kernel_backend": "torch"}})
        state = make_state(s)
        state.open()  # the engine (and its Backends) is built here, as the MCP lifespan does when serving
        after = dict(os.environ)
        state.close()
        print(json.dumps({{"added": sorted(set(after) - set(before)),
                          "changed": sorted(k for k in before if before[k] != after.get(k))}}))
    """)
    ours = [k for k in r["added"] + r["changed"] if k.startswith(("ATELIER_", "TRITON_"))]
    assert ours == [], r


def test_torchvision_is_imported_at_the_first_model_library_not_at_start(tmp_path):
    """Importing torchvision (and its shim) costs seconds; a server's start must not pay it. It happens at the
    first import of a model library (here the embedded embedding model's transformers), and engine_status
    says which state it is in, before and after."""
    r = _run(f"""
        import json, sys
        from mcp_server.config import Settings
        from mcp_server.app import make_state
        s = Settings(_env_file=None, paths={{"output_dir": {str(tmp_path / 'out')!r}}},
                     engine={{"cache_dir": {str(tmp_path / 'cache')!r}}})
        state = make_state(s)
        at_start = {{"modules": sorted(m for m in ("torchvision", "transformers", "diffusers", "ultralytics")
                                      if m in sys.modules), "state": state.engine.torchvision_state}}
        from engine.embed import SentenceEmbedder, model_folder
        SentenceEmbedder(model_folder(""), state.engine.device)
        after = {{"modules": sorted(m for m in ("torchvision", "transformers") if m in sys.modules),
                 "state": state.engine.torchvision_state}}
        import torchvision.ops
        import torch
        boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
        kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        state.close()
        print(json.dumps({{"at_start": at_start, "after": after, "kept": kept}}))
    """)
    assert r["at_start"] == {"modules": [], "state": "not imported yet"}, r
    assert r["after"]["modules"] == ["torchvision", "transformers"], r
    assert r["after"]["state"] in ("native", "shim"), r
    assert r["kept"] == [0, 2], r  # torchvision's nms works afterwards, native or through the shim
