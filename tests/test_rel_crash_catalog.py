"""Reliability item 6, catalogue part: kill -9 at random moments while a
catalogue is embedded and its cache file written, then restart: the cache is
either absent, the old file or the new one — never a partial file under the
final name — temp files are swept, and the catalogue loads.

Issue 18.1: kill -9 at random moments while upserts and deletes are logged
(and the log compacted every few KB), then restart: the catalogue loads and
holds every change answered "ok" (checked against a plain dict of the
acknowledged changes), plus at most the one change in flight, whole."""

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

from tests.zygote import Popen
from tests.zygote import run as zrun

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
        proc = Popen([sys.executable, "-c", LOADER, str(cat)], env=env, stdout=subprocess.PIPE,
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
    out = zrun([sys.executable, "-c", LOADER, str(cat)], env=env, capture_output=True, timeout=300,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert b"LOADED 120" in out.stdout
    swept = list(tmp_path.glob(".atelier-tmp-emb-*"))
    print(f"\ncatalogue crash: {figures}; temp files after restart: {len(swept)}")
    assert figures["corrupt"] == 0
    assert figures["killed"] >= 5  # the kills really landed mid-work
    assert swept == []


# -- durable upserts (issue 18.1): kill -9 while changes are logged, appended and compacted --------------
CHANGES = r"""
import random
POOL = [f"p{j}" for j in range(40)] + [f"r{j}" for j in range(10)]  # new ids and some rows of the file


def change(i, has):
    '''Change number i, given `has(id)` (the state it applies to) -> (rows, vectors (8 floats each), dels).'''
    rng = random.Random(i)
    rows, vecs, seen = [], [], set()
    for _ in range(rng.randint(1, 3)):
        rid = rng.choice(POOL)
        if rid in seen:
            continue
        seen.add(rid)
        rows.append({"id": rid, "category": rng.choice("xyz"), "n": i})
        vecs.append([rng.uniform(-1, 1) for _ in range(8)])
    dels = [d for d in rng.sample(POOL, 2) if d not in seen and has(d)][: rng.randint(0, 2)]
    return rows, vecs, dels
"""

WRITER = CHANGES + r"""
import sys, os
from pathlib import Path
import torch
from engine import Engine, EngineConfig
from engine.catalog import CatalogService
svc = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=os.environ["ATELIER_TEST_CACHE"])))
svc.log_compact_bytes = 8192  # compactions all the time: kills land in them too
cat, report = svc.open(Path(sys.argv[1]))
i = int(sys.argv[2])
print("READY", flush=True)
while True:
    rows, vecs, dels = change(i, cat.has)
    svc.upsert(cat, rows, [torch.tensor(v) for v in vecs], dels)
    # answered "ok": from here on the change must survive anything. One write of the whole line (under
    # PYTHONUNBUFFERED, which .ci/run sets, print() writes "OK", " ", i and the newline one by one)
    sys.stdout.write(f"OK {i}\n")
    sys.stdout.flush()
    i += 1
"""


def _model_apply(model: dict, rows: list, vecs: list, dels: list) -> None:
    for r, v in zip(rows, vecs):
        model[r["id"]] = (dict(r), np.asarray(v, dtype=np.float64))
    for d in dels:
        model.pop(d, None)


def _matches(cat, model: dict) -> bool:  # noqa: ANN001
    import torch

    live = {cat._columns["id"][r] for r in range(cat._n) if cat._alive[r]}
    if live != set(model):
        return False
    for rid, (fields, vec) in model.items():
        want = torch.from_numpy((vec / np.linalg.norm(vec)).astype(np.float32))
        if cat.item(rid) != fields or not torch.allclose(cat.vector(rid), want, rtol=0, atol=1e-6):
            return False
    return True


def test_kill9_during_logged_upserts_loses_nothing_answered(tmp_path):

    from engine import Engine, EngineConfig
    from engine.catalog import CatalogService

    ns: dict = {}
    exec(CHANGES, ns)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("ATELIER_TEST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)
    src = tmp_path / "cat.jsonl"
    base = rng.standard_normal((200, 8))
    with src.open("w") as fh:
        for j in range(200):
            fh.write(json.dumps({"id": f"r{j}", "category": "base", "embedding": base[j].tolist()}) + "\n")
    model = {f"r{j}": ({"id": f"r{j}", "category": "base"}, base[j]) for j in range(200)}  # the oracle: a dict
    done = 0  # changes the catalogue on disk holds
    figures = {"trials": 0, "acknowledged": 0, "unacknowledged_but_kept": 0, "max_log_bytes": 0}
    log = tmp_path / ".cat.jsonl.provided.log"
    for trial in range(6):
        proc = Popen([sys.executable, "-c", WRITER, str(src), str(done)], env=env, bufsize=0,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        # bufsize=0: readline below must not buffer "OK" lines that communicate() would then never see
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"READY"), proc.stderr.read().decode()[-2000:] if proc.stderr else line
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        # an answer is a whole line: a kill may cut the last one short ("OK 1" of "OK 12"), and that one
        # was never answered
        acked = [int(x.split()[1]) for x in out.decode().split("\n")[:-1] if x.startswith("OK ")]
        assert acked == list(range(done, done + len(acked)))
        for i in acked:  # the oracle follows every acknowledged change
            _model_apply(model, *ns["change"](i, model.__contains__))
        figures["acknowledged"] += len(acked)
        done += len(acked)
        # restart: the catalogue loads, and holds every acknowledged change (and maybe the next one, logged
        # but killed before its answer)
        cat, report = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(tmp_path / "c2")))).open(src)
        assert report.errors == []
        if not _matches(cat, model):
            nxt = dict(model)
            _model_apply(nxt, *ns["change"](done, model.__contains__))
            assert _matches(cat, nxt), f"trial {trial}: the restarted catalogue is neither the acknowledged state " \
                                       "nor that plus the next change"
            model, done = nxt, done + 1  # the unanswered change was on disk: it is kept, whole
            figures["unacknowledged_but_kept"] += 1
        figures["max_log_bytes"] = max(figures["max_log_bytes"], log.stat().st_size)
        figures["trials"] += 1
        cat.close()
    print(f"\nlogged upserts under kill -9: {figures}")
    assert figures["acknowledged"] >= 50  # the kills landed while changes were being written
    assert figures["max_log_bytes"] < 64 * 1024  # compacted all along (uncompacted: ~300 B per change)
    assert not list(tmp_path.glob(".atelier-tmp-log-*"))  # a compaction's temp file a kill left is swept on open
