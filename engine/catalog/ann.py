"""The approximate index: an HNSW graph (hnswlib) over the catalogue's rows, labelled by row position.

    ix = HnswIndex(dim, M=16, ef_construction=200, ef_search=EF_SEARCH)
    ix.build(vectors, rows)                  # vectors: [n, dim] float32 L2-normalised; rows: int64 [n]
    ix.update(vectors, rows); ix.delete(rows)     # online: the next query sees them, nothing is rebuilt
    rows, sims = ix.candidates(q, kk)        # q: [B, dim] float32 -> int64 [B, kk'], float32 [B, kk'] (approximate)

Knows vectors and row labels; knows nothing of filters, categories or exactness: the Catalog asks it for
candidates, drops those its mask refuses, rescores the rest exactly from the matrix and widens (or falls
back to the exact scan) until k valid items are found (`store.Catalog._ann_search`).

Why hnswlib (measured in `benchmarks/recommend_bench.py --hnsw`, against FAISS `IndexHNSWFlat` in the same
run): an element's vector is replaced in place by label (`add_items` with an existing label) and removed
with `mark_deleted` (its slot reused by the next add), so upserts and deletes need no rebuild and leave no
garbage; FAISS's HNSW cannot remove or replace a vector (updates would pile up as masked garbage until a
rebuild). At equal M / ef both reach the same recall at similar latency on our clustered data.

Saving: `save(path, fingerprint)` writes the graph to a temp file in the same folder, fsyncs it and renames
it over `path`, then the fingerprint (a hash of the rows' ids, vectors and liveness) beside it the same way;
`load` returns None unless the fingerprint matches the catalogue as opened, so a stale index is rebuilt,
never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .files import atomic_write

_TMP_PREFIX = ".atelier-tmp-ann-"
# The graph's search width: recall@10 on 1M clustered rows (benchmarks/recommend_bench.py --rows 1000000) was
# 0.940 at ef 64 (FAISS with the same graph parameters: 0.946 at 64, 0.999 at 128 for +0.18 ms per query).
EF_SEARCH = 128


class HnswIndex:
    def __init__(self, dim: int, *, M: int = 16, ef_construction: int = 200, ef_search: int = EF_SEARCH,
                 threads: int = 0) -> None:
        import hnswlib

        self.dim, self.M, self.ef_construction, self.ef_search = int(dim), int(M), int(ef_construction), int(ef_search)
        self.threads = threads or max(1, os.cpu_count() or 1)
        self._ix = hnswlib.Index(space="ip", dim=self.dim)
        self._ix.init_index(max_elements=1024, M=self.M, ef_construction=self.ef_construction,
                            allow_replace_deleted=True)
        self._ix.set_ef(self.ef_search)
        self._ix.set_num_threads(self.threads)
        self.live = 0

    @property
    def nbytes(self) -> int:
        """Approximate resident size: the vectors plus the level-0 links (M0 = 2M per element)."""
        n = self._ix.get_max_elements()
        return n * (self.dim * 4 + 2 * self.M * 4 + 16)

    def _reserve(self, extra: int) -> None:
        need = self._ix.get_current_count() + extra
        cap = self._ix.get_max_elements()
        if need > cap:
            self._ix.resize_index(max(need, 2 * cap))

    def build(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        """vectors: [n, dim] float32 normalised; rows: int64 [n] labels (row positions)."""
        self._reserve(len(rows))
        if len(rows):
            self._ix.add_items(np.ascontiguousarray(vectors, dtype=np.float32), rows, num_threads=self.threads)
        self.live += len(rows)

    def update(self, vectors: np.ndarray, rows: np.ndarray, new: np.ndarray) -> None:
        """Add or replace rows: `new[i]` whether row i is not in the index yet (a replace keeps its label)."""
        if not len(rows):
            return
        self._reserve(int(new.sum()))
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if new.any():  # fresh labels take the slots of deleted elements first
            self._ix.add_items(v[new], rows[new], num_threads=1, replace_deleted=True)
            self.live += int(new.sum())
        if (~new).any():  # an existing label: hnswlib replaces its vector and repairs its links
            self._ix.add_items(v[~new], rows[~new], num_threads=1)

    def delete(self, rows: np.ndarray) -> None:
        for r in rows.tolist():
            self._ix.mark_deleted(int(r))
        self.live -= len(rows)

    def candidates(self, q: np.ndarray, kk: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-kk by inner product. q: [B, dim] float32 -> (rows int64 [B, kk'], sims float32
        [B, kk']), kk' = min(kk, live). RuntimeError when the graph cannot return kk' (too many deleted)."""
        kk = min(int(kk), self.live)
        if kk <= 0:
            return np.empty((q.shape[0], 0), np.int64), np.empty((q.shape[0], 0), np.float32)
        self._ix.set_ef(max(self.ef_search, ef or 0, kk))
        labels, dist = self._ix.knn_query(np.ascontiguousarray(q, dtype=np.float32), k=kk,
                                          num_threads=min(self.threads, q.shape[0]))
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    # -- files ---------------------------------------------------------------
    def save(self, path: Path, fingerprint: str) -> None:
        """The graph, then its fingerprint beside it (`path`.json), each replaced atomically (`files`)."""
        meta = json.dumps({"fingerprint": fingerprint, "live": self.live, "M": self.M,
                           "ef_construction": self.ef_construction, "dim": self.dim})
        atomic_write(path, lambda tmp: self._ix.save_index(tmp), prefix=_TMP_PREFIX)
        atomic_write(Path(f"{path}.json"), lambda tmp: Path(tmp).write_text(meta), prefix=_TMP_PREFIX)

    @classmethod
    def load(cls, path: Path, fingerprint: str, dim: int, *, ef_search: int = EF_SEARCH, threads: int = 0
             ) -> HnswIndex | None:
        """The index saved at `path` when its fingerprint is `fingerprint`, else None (absent, stale, unreadable)."""
        import hnswlib

        try:
            meta = json.loads(Path(f"{path}.json").read_text())
            if meta.get("fingerprint") != fingerprint or meta.get("dim") != dim:
                return None
            self = cls(dim, M=meta["M"], ef_construction=meta["ef_construction"], ef_search=ef_search,
                       threads=threads)
            ix = hnswlib.Index(space="ip", dim=dim)
            ix.load_index(str(path), allow_replace_deleted=True)
            ix.set_ef(ef_search)
            ix.set_num_threads(self.threads)
            self._ix, self.live = ix, int(meta["live"])
            return self
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
