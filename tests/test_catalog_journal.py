"""engine.catalog.journal: durable upserts. Every accepted change is in the catalogue's log before the call
answers, a restart replays it, compaction keeps it small, a torn or damaged log still loads, a failed log
write refuses the change, a read-only folder is said to be not durable.

The oracle for replay is the live catalogue the same changes were applied to one by one (`Catalog.apply` in
order): after a restart (a new engine and service, the log folded and applied in two bulk steps) the rows,
their order, their stored vectors and every search answer must be identical, and both must equal a NumPy
brute force over the expected rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig
from engine.catalog import CatalogService, Query
from engine.catalog import journal as J
from engine.errors import InvalidInput
from tools.recommend import TOOLS, InfoInput, RecommendInput, UpsertInput
from tests.helpers import REFUSED

from fakectx import make_context

recommend, upsert, info = TOOLS
DIM = 8
ROOT = Path(__file__).resolve().parents[1]


def _write_catalog(path: Path, n: int = 60, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mat = rng.standard_normal((n, DIM))
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "category": "abc"[i % 3], "price": i,
                                 "embedding": mat[i].tolist()}) + "\n")
    return mat


def _service(cache: Path, compact_bytes: int | None = None) -> CatalogService:
    svc = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(cache))))
    if compact_bytes is not None:
        svc.log_compact_bytes = compact_bytes
    return svc


def _state(cat) -> tuple[list[str], list[dict], np.ndarray]:  # noqa: ANN001
    """Live ids in row order, their fields, their stored vectors."""
    with cat._lock:
        rows = [r for r in range(cat._n) if cat._alive[r]]
        ids = [cat._columns["id"][r] for r in rows]
        return ids, [cat._fields_at(r) for r in rows], cat._matrix[rows].numpy().copy()


def _random_changes(svc: CatalogService, cat, rng: np.random.Generator, steps: int) -> None:  # noqa: ANN001
    """Adds, in-place updates, deletes, and deletes followed by re-adds, through CatalogService.upsert."""
    fresh = 0
    for _ in range(steps):
        ids = [cat._columns["id"][r] for r in range(cat._n) if cat._alive[r]]
        rows, vecs, dels = [], [], []
        for _ in range(int(rng.integers(0, 4))):
            if rng.random() < 0.5 or not ids:
                rid = f"n{fresh}"
                fresh += 1
            else:
                rid = str(rng.choice(ids))
            if rid in {r["id"] for r in rows}:
                continue
            rows.append({"id": rid, "category": str(rng.choice(["a", "b", "z"])), "price": int(rng.integers(100)),
                         "tags": ["x", float(rng.random())]})
            vecs.append(torch.from_numpy(rng.standard_normal(DIM).astype(np.float32)))
        if ids and rng.random() < 0.6:
            dels = [str(x) for x in rng.choice(ids, size=min(len(ids), int(rng.integers(1, 3))), replace=False)]
        if not rows and not dels:
            continue
        svc.upsert(cat, rows, vecs, dels)
        if rows and rng.random() < 0.3:  # re-add a just-deleted id: it moves to the end
            gone = [d for d in dels if not cat.has(d)]
            if gone:
                svc.upsert(cat, [{"id": gone[0], "category": "back"}],
                           [torch.from_numpy(rng.standard_normal(DIM).astype(np.float32))])


def _brute(ids: list[str], mat: np.ndarray, q: np.ndarray, k: int) -> list[str]:
    m = mat.astype(np.float64)
    s = m @ (q / np.linalg.norm(q))
    return [ids[i] for i in np.lexsort((np.arange(len(s)), -s))[:k]]


@pytest.mark.parametrize("compact_bytes", [None, 4096])
def test_restart_replays_every_change_exactly(tmp_path: Path, compact_bytes: int | None) -> None:
    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    svc = _service(tmp_path / "cache", compact_bytes)
    cat, report = svc.open(src)
    assert report.log_file is not None and report.not_durable == ""
    _random_changes(svc, cat, np.random.default_rng(7), 80)
    before = _state(cat)
    log = Path(report.log_file)
    if compact_bytes is not None:
        assert cat.journal.compactions >= 1  # the log was rewritten (atomically) while changes went on
    size = log.stat().st_size

    svc2 = _service(tmp_path / "cache", compact_bytes)  # a restart: a new engine, nothing in memory
    cat2, report2 = svc2.open(src)
    after = _state(cat2)
    assert report2.replayed >= 1 and report2.errors == []
    assert after[0] == before[0]  # same live ids, same row order (re-added ids at the end)
    assert after[1] == before[1]
    np.testing.assert_array_equal(after[2], before[2])  # bit-identical stored vectors
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = rng.standard_normal(DIM).astype(np.float32)
        got = [h.id for h in cat2.search(Query(vector=torch.from_numpy(q), k=7))]
        assert got == [h.id for h in cat.search(Query(vector=torch.from_numpy(q), k=7))]
        assert got == _brute(after[0], after[2], q, 7)
    if compact_bytes is not None:
        assert size < 3 * 4096 + 4 * len(after[0]) * (DIM * 4 + 200)  # bounded by the changed rows, not history


def test_fold_equals_one_by_one_on_a_hand_sequence() -> None:
    """An independent small oracle: the fold of add / update / delete / re-add / add-then-delete."""
    v = lambda x: torch.full((1, DIM), float(x))  # noqa: E731
    recs = [J.encode([{"id": "a"}], v(1), [], [True]),          # new a
            J.encode([{"id": "base1", "p": 1}], v(2), [], [False]),  # in-place update of a base row
            J.encode([], None, ["base2"], []),                   # delete a base row
            J.encode([{"id": "base3"}], v(3), ["base3"], [False]),   # update then delete in one change
            J.encode([{"id": "b"}], v(4), [], [True]),
            J.encode([], None, ["base4"], []),
            J.encode([{"id": "base4"}], v(5), [], [True]),       # re-added: goes to the end, after b
            J.encode([{"id": "c"}], v(6), ["c"], [True])]         # added and deleted in one change
    records, good, more = J.frames(b"".join(recs))
    assert len(records) == 8 and good == len(b"".join(recs)) and not more
    dels, rows, vecs = J.fold(records)
    assert sorted(dels) == ["base2", "base3", "base4", "c"]
    assert [r["id"] for r in rows] == ["base1", "a", "b", "base4"]
    assert vecs is not None and vecs[:, 0].tolist() == [2.0, 1.0, 4.0, 5.0]


def test_torn_tail_and_damaged_middle_still_load(tmp_path: Path) -> None:
    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    svc = _service(tmp_path / "cache")
    cat, report = svc.open(src)
    for i in range(3):
        svc.upsert(cat, [{"id": f"k{i}", "category": "k"}], [torch.ones(DIM) * (i + 1)])
    log = Path(report.log_file)
    whole = log.read_bytes()
    frame = J.encode([{"id": "torn", "category": "k"}], torch.ones(1, DIM), [], [True])
    log.write_bytes(whole + frame[: len(frame) // 2])  # kill -9 in the middle of a write
    cat2, rep2 = _service(tmp_path / "cache").open(src)
    assert all(cat2.has(f"k{i}") for i in range(3)) and not cat2.has("torn")
    assert log.read_bytes() == whole  # the torn frame was cut off
    # a flipped byte in the middle: the records before it load, the rest is kept aside, the log is cut there
    bad = bytearray(whole)
    second = whole.index(J.MAGIC, 1)
    bad[second + J._HEAD.size + 5] ^= 0xFF
    log.write_bytes(bytes(bad))
    cat3, rep3 = _service(tmp_path / "cache").open(src)
    assert cat3.has("k0") and not cat3.has("k1") and not cat3.has("k2") and len(cat3) == 61
    assert any("damaged" in e for e in rep3.errors)
    assert list(tmp_path.glob(".cat.jsonl.provided.log.damaged-*"))
    # new changes append after the good prefix and survive
    svc4 = _service(tmp_path / "cache")
    cat4, _ = svc4.open(src)
    svc4.upsert(cat4, [{"id": "after", "category": "k"}], [torch.ones(DIM)])
    cat5, _ = _service(tmp_path / "cache").open(src)
    assert cat5.has("after") and cat5.has("k0")


def test_a_log_cannot_name_a_class(tmp_path: Path) -> None:
    """A log is data: a pickle naming any class beyond the date/decimal ones is not executed, it ends the log."""
    import pickle
    import zlib

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    payload = pickle.dumps({"rows": [Evil()], "ins": [True], "vec": b"\0" * 4 * DIM, "dim": DIM, "dels": []})
    (tmp_path / ".cat.jsonl.provided.log").write_bytes(J._HEAD.pack(J.MAGIC, len(payload), zlib.crc32(payload))
                                                         + payload)
    cat, rep = _service(tmp_path / "cache").open(src)
    assert len(cat) == 60 and not (tmp_path / "pwned").exists()
    assert (tmp_path / ".cat.jsonl.provided.log").read_bytes() == b""


def test_parquet_values_are_logged_and_others_refused(tmp_path: Path) -> None:
    import datetime
    from decimal import Decimal

    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    svc = _service(tmp_path / "cache")
    cat, _ = svc.open(src)
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    svc.upsert(cat, [{"id": "d", "category": "k", "when": when, "cost": Decimal("1.10")}], [torch.ones(DIM)])
    cat2, _ = _service(tmp_path / "cache").open(src)
    assert cat2.item("d") == {"id": "d", "category": "k", "when": when, "cost": Decimal("1.10")}
    with pytest.raises(InvalidInput, match="items=.*cannot store"):
        svc.upsert(cat, [{"id": "e", "category": "k", "obj": complex(1, 2)}], [torch.ones(DIM)])
    assert not cat.has("e")


def test_failed_log_write_refuses_the_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    ctx = make_context(tmp_path)
    upsert.run(UpsertInput(items=[{"id": "ok1", "category": "k", "embedding": [1.0] * DIM}], catalog=str(src)), ctx)
    log = tmp_path / ".cat.jsonl.provided.log"
    size = log.stat().st_size

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(J.os, "fsync", full)
    with pytest.raises(REFUSED, match=r"catalog=.*log \(No space left on device\); nothing was changed"):
        upsert.run(UpsertInput(items=[{"id": "lost", "category": "k", "embedding": [2.0] * DIM}],
                               delete=["r1"], catalog=str(src)), ctx)
    monkeypatch.undo()
    out = info.run(InfoInput(catalog=str(src)), ctx).structured
    assert out.rows == 61 and log.stat().st_size == size  # nothing changed in memory, the partial frame cut off
    got = recommend.run(RecommendInput(vector=[2.0] * DIM, k=61, catalog=str(src)), ctx).structured.items
    assert "lost" not in {it.id for it in got} and "r1" in {it.id for it in got}


def test_tool_says_durable_and_survives_restart(tmp_path: Path) -> None:
    src = tmp_path / "cat.jsonl"
    _write_catalog(src)
    ctx = make_context(tmp_path)
    out = upsert.run(UpsertInput(items=[{"id": "new", "category": "k", "name": "x", "embedding": [1.0] * DIM}],
                                 delete=["r2"], catalog=str(src)), ctx)
    assert out.structured.durable and out.structured.warning is None and "saved" in out.text
    ctx2 = make_context(tmp_path)  # a new engine: a restarted server
    inf = info.run(InfoInput(catalog=str(src)), ctx2).structured
    assert inf.rows == 60 and inf.replayed == 1 and inf.log_file and inf.log_bytes > 0
    got = recommend.run(RecommendInput(vector=[1.0] * DIM, k=1, catalog=str(src)), ctx2).structured.items
    assert got[0].id == "new" and got[0].fields == {"name": "x"}


READ_ONLY = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from engine import Engine, EngineConfig
from engine.catalog import CatalogService
import torch
svc = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=sys.argv[2])))
cat, rep = svc.open(Path(sys.argv[1]))
svc.upsert(cat, [{"id": "mem", "category": "k"}], [torch.ones(8)])
print(json.dumps({"log": rep.log_file, "why": rep.not_durable, "has": cat.has("mem")}))
"""


def test_read_only_folder_is_not_durable(tmp_path: Path) -> None:
    """A real read-only folder: a read-only bind mount in a private mount namespace when root (root may
    write into a 0o555 folder), else a 0o555 folder."""
    ro, cache = tmp_path / "ro", tmp_path / "cache"
    ro.mkdir()
    _write_catalog(ro / "cat.jsonl")
    cmd = [sys.executable, "-c", READ_ONLY, str(ro / "cat.jsonl"), str(cache), str(ROOT)]
    if os.geteuid() == 0:
        cmd = ["unshare", "-m", "sh", "-c", f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" '
               '&& exec "$@"', "sh", *cmd]
    else:
        os.chmod(ro, 0o555)
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=120)
    finally:
        os.chmod(ro, 0o755)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    res = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert res["log"] is None and res["has"] is True
    assert "read-only" in res["why"] and str(ro) in res["why"]
    assert sorted(p.name for p in ro.iterdir()) == ["cat.jsonl"]
