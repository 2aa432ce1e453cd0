"""Reliability item 6, catalogue part: kill -9 at random moments while a
catalogue is embedded and its cache file written, then restart: the cache is
either absent, the old file or the new one — never a partial file under the
final name — temp files are swept, and the catalogue loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

LOADER = r"""
import sys, os
from pathlib import Path
from engine import Engine, EngineConfig
from engine.catalog import CatalogService
eng = Engine(EngineConfig(device="cpu", cache_dir=os.environ["ATELIER_TEST_CACHE"]))
svc = CatalogService(eng)
cat, report = svc.open(Path(sys.argv[1]))
print("LOADED", len(cat), report.cache_file, flush=True)
"""


def _catalog(path: Path, trial: int, n: int = 120) -> None:
    rng = random.Random(trial)
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"t{trial}-{i}", "category": rng.choice(["a", "b", "c"]),
                                 "name": f"item {i} {rng.random():.6f}"}) + "\n")


def test_kill9_during_catalogue_cache_writes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(1234)
    figures = {"trials": 0, "killed": 0, "finished": 0, "valid_caches": 0, "corrupt": 0, "temps_left": 0}
    cat = tmp_path / "cat.jsonl"
    for trial in range(20):
        _catalog(cat, trial)
        proc = subprocess.Popen([sys.executable, "-c", LOADER, str(cat)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(rng.uniform(1.0, 4.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            figures["killed"] += 1
        else:
            figures["finished"] += 1
        proc.wait(30)
        figures["trials"] += 1
        for f in tmp_path.glob(".cat.jsonl.*.emb.npy"):
            try:
                arr = np.load(f, allow_pickle=False)
                assert arr.ndim == 2 and arr.shape[0] == 120 and np.isfinite(arr).all()
                figures["valid_caches"] += 1
            except Exception:
                figures["corrupt"] += 1
    figures["temps_left"] = len(list(tmp_path.glob(".atelier-tmp-emb-*")))
    # restart: the catalogue loads (from a valid cache or by re-embedding) and temp files are swept
    out = subprocess.run([sys.executable, "-c", LOADER, str(cat)], env=env, capture_output=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert b"LOADED 120" in out.stdout
    swept = list(tmp_path.glob(".atelier-tmp-emb-*"))
    print(f"\ncatalogue crash: {figures}; temp files after restart: {len(swept)}")
    assert figures["corrupt"] == 0
    assert figures["killed"] >= 5  # the kills really landed mid-work
    assert swept == []
