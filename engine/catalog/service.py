"""CatalogService: the engine's catalogues by (source, model, dtype), loaded and embedded on first use,
with the embedding cache; text embedding and the all-or-nothing upsert (embed, then one `Catalog.apply`).

Backends (`backend`, config `catalog.backend`): "local" holds each catalogue in this process (`store.Catalog`,
its change log and optional HNSW index); "qdrant" keeps it in a Qdrant collection shared by every replica
(`qdrant.QdrantCatalog`, the same search and update interface), seeded from the file by the first replica
that opens it. Reading and embedding the file (`_read`) is the same for both.

Embeddings of a file are cached beside it (or in the engine cache dir when that folder is read-only) as
`.npy`, keyed by model and a hash of the embedded texts, written atomically (temp file, fsync, replace);
temp files a crash left are swept on the next load.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import workmem
from ..errors import InvalidInput
from .ann import _TMP_PREFIX as ANN_TMP_PREFIX
from .ann import EF_SEARCH, HnswIndex
from .files import atomic_write, sweep
from .journal import DEFAULT_COMPACT_BYTES, Journal
from .rows import DEMO_CATALOG, read_catalog, row_text
from .store import DEFAULT_CHUNK_ROWS, Catalog

HNSW_MIN_ROWS = 20_000  # index="auto": the measured crossover (benchmarks/recommend_bench.py --hnsw, README)

_TMP_PREFIX = ".atelier-tmp-emb-"

def sweep_temp_files(folder: Path) -> int:
    """Remove embedding-cache temp files a crash left in `folder` (ours only, by prefix)."""
    return sweep(folder, _TMP_PREFIX)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write the cache file whole or not at all (`files.atomic_write`)."""
    atomic_write(path, lambda tmp: np.save(tmp, arr), prefix=_TMP_PREFIX, suffix=".npy")


def content_hash(model: str, rows: Sequence[Mapping[str, Any]]) -> str:
    h = hashlib.sha256(model.encode())
    for row in rows:
        h.update(b"\x1e" + str(row["id"]).encode() + b"\x1f" + row_text(row).encode())
    return h.hexdigest()[:20]


@dataclass
class LoadReport:
    source: str
    rows: int
    errors: list[str] = field(default_factory=list)
    embedded: int = 0  # rows embedded now (0 when the cache or the file had them)
    cache_file: str | None = None
    log_file: str | None = None  # the change log (None: changes are not durable, see `not_durable`)
    not_durable: str = ""  # why changes live in memory only ("" when they are logged)
    replayed: int = 0  # log records applied on open
    index: str = "exact"  # the search: "exact", or "hnsw" (an approximate index; see engine.catalog.ann)
    index_file: str | None = None
    index_loaded: bool = False  # the saved index fitted the catalogue (else it was built now)
    index_build_s: float = 0.0
    backend: str = "local"  # "local" (this process's Catalog) or "qdrant" (engine.catalog.qdrant)
    collection: str | None = None  # the Qdrant collection (backend "qdrant")

    @property
    def durable(self) -> bool:
        """An accepted change survives a restart: written to the change log, or answered by Qdrant."""
        return self.log_file is not None or (self.backend == "qdrant" and not self.not_durable)


class CatalogService:
    """The engine's catalogues, keyed by (source, model, dtype). Get it with `engine.service("catalog", CatalogService)`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._catalogs: dict[tuple[str, ...], tuple[Any, LoadReport]] = {}
        self.chunk_rows = DEFAULT_CHUNK_ROWS
        self.max_call_memory_mb = 0  # the per-call memory limit (0: from the engine budget; see memory_limit)
        self.log_compact_bytes = DEFAULT_COMPACT_BYTES  # a catalogue's log is compacted past this size
        self._journals: dict[Path, Journal] = {}  # one per log file, shared by the catalogues that write it
        self.index = "exact"  # "exact" | "hnsw" | "auto" (models.catalog_index)
        self.index_min_rows = HNSW_MIN_ROWS  # auto: the approximate index from this many rows (the crossover)
        self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search = 16, 200, EF_SEARCH  # models.catalog_hnsw_ef_search
        self.backend = "local"  # "local" | "qdrant" (catalog.backend)
        self.qdrant: dict[str, Any] = {}  # url, api_key, path, prefix, hnsw_ef, exact, timeout_s (catalog.qdrant_*)

    def embedder(self, model: str) -> Any:
        from ..embed import get_embedder

        return get_embedder(self.engine, model)

    def cache_path(self, source: Path | None, model_id: str, digest: str) -> Path:
        name = f"{source.name if source else 'demo_catalog.jsonl'}.{model_id}.{digest}.emb.npy"
        if source is not None and os.access(source.parent, os.W_OK):
            return source.parent / f".{name}"
        return Path(self.engine.config.cache_dir) / "catalog-embeddings" / name

    def log_path(self, source: Path | None, model_id: str) -> tuple[Path | None, str]:
        """Where a catalogue's change log lives -> (path, "") or (None, why changes are not durable). Beside
        the file (hidden, `.NAME.MODEL.log`) when its folder is writable; the bundled demo's in the engine
        cache dir (`catalog-logs/`), as the package folder may be read-only (site-packages)."""
        if source is None:
            return Path(self.engine.config.cache_dir) / "catalog-logs" / f"demo_catalog.jsonl.{model_id}.log", ""
        if not os.access(source.parent, os.W_OK):
            return None, (f"the catalogue's folder {source.parent} is read-only: changes live in memory until "
                          "the server stops")
        return source.parent / f".{source.name}.{model_id}.log", ""

    def _journal(self, path: Path) -> Journal:
        j = self._journals.get(path)
        if j is None:
            j = self._journals[path] = Journal(path, compact_bytes=self.log_compact_bytes)
        return j

    def open(self, source: Path | None, *, model: str = "", dtype: str = "float32", max_rows: int = 2_000_000,
             token: Any = None, progress: Callable[[int, int], None] | None = None) -> tuple[Any, LoadReport]:
        """The catalogue of `source` (None = the bundled demo), loading and embedding it on first use."""
        path = source.resolve() if source is not None else DEMO_CATALOG  # resolved once, at import
        key = (str(path), model, dtype, self.index, self.backend,
               self.qdrant.get("url", "") + "|" + self.qdrant.get("path", "") + "|" + self.qdrant.get("prefix", ""))
        with self._lock:
            hit = self._catalogs.get(key)
            if hit is not None:
                return hit
            cat, report = self._load(path, source is None, model, dtype, max_rows, token, progress)
            self._catalogs[key] = (cat, report)
            return cat, report

    def _load(self, path: Path, is_demo: bool, model: str, dtype: str, max_rows: int, token: Any,
              progress: Callable[[int, int], None] | None) -> tuple[Any, LoadReport]:
        report = LoadReport(source="demo" if is_demo else str(path), rows=0)
        if self.backend == "qdrant":
            return self._load_qdrant(path, is_demo, model, dtype, max_rows, token, progress, report)
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        rows, matrix, model_id = self._read(path, is_demo, model, dtype, max_rows, token, progress, report)
        cat = Catalog(matrix.shape[1], device=self.engine.device, dtype=torch_dtype, chunk_rows=self.chunk_rows,
                      model=model_id, source=report.source, capacity=max(1024, len(rows)),
                      memory_limit=self.memory_limit,
                      backends=getattr(self.engine, "backends", None))  # issue 16 (H4): the engine's scan choice
        cat.upsert(rows, matrix)
        del rows, matrix
        log, why = self.log_path(None if is_demo else path, model_id)
        if log is not None:
            journal = self._journal(log)
            report.replayed, warnings = journal.replay(cat.apply, cat.has)
            report.errors.extend(warnings)
            report.log_file = str(log)
            cat.journal = journal
        else:
            report.not_durable = why
        if self.index == "hnsw" or (self.index == "auto" and len(cat) >= self.index_min_rows):
            self._attach_index(cat, report, None if is_demo else path, model_id)
        return cat, report

    def _read(self, path: Path, is_demo: bool, model: str, dtype: str, max_rows: int, token: Any,
              progress: Callable[[int, int], None] | None, report: LoadReport
              ) -> tuple[list[dict[str, Any]], torch.Tensor, str]:
        """Read a catalogue file and its vectors (the file's own, the embedding cache, or embedded now)
        -> (rows, vectors [n, dim] float32, model id); fills the report's rows, errors, cache file."""
        rows, vecs, errors = read_catalog(path, max_rows=max_rows)
        report.rows, report.errors = len(rows), errors
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        emb = self.embedder(model) if vecs[0] is None else None
        texts = [row_text(r) for r in rows] if emb is not None else []
        dim = emb.dim if emb is not None else len(vecs[0] or ())
        n, el = len(rows), torch_dtype.itemsize
        ncols = len({k for r in rows for k in r}) + 1
        # the vectors (fp32 twice: parsed and converted), the matrix, its sketch, the columns, the id index,
        # and the embedding's output and one batch's activations
        need = n * dim * (8 + el) + n * (dim + 9) + 8 * n * ncols + 200 * n
        need += emb.estimate_bytes(texts) if emb is not None else 0
        workmem.require("catalog", report.source, need, self.memory_limit(), f"loading {n} rows of {dim} dims")
        if emb is None:
            return rows, torch.tensor(np.asarray(vecs, dtype=np.float32)), "provided"
        model_id = emb.name
        digest = content_hash(model_id, rows)
        cache = self.cache_path(None if is_demo else path, model_id, digest)
        report.cache_file = str(cache)
        sweep_temp_files(cache.parent)
        matrix = None
        if cache.is_file():
            try:
                arr = np.load(cache, allow_pickle=False)
                if arr.shape == (len(rows), emb.dim):
                    matrix = torch.from_numpy(arr)
            except (OSError, ValueError):
                matrix = None
        if matrix is None:
            matrix = emb.encode(texts, token=token, progress=progress)
            report.embedded = len(rows)
            try:
                _atomic_save(cache, matrix.numpy())
            except OSError:
                fallback = self.cache_path(None, model_id, digest)
                if fallback != cache:
                    _atomic_save(fallback, matrix.numpy())
                    report.cache_file = str(fallback)
        return rows, matrix, model_id

    def collection_name(self, path: Path, is_demo: bool, model: str) -> str:
        """The Qdrant collection of a catalogue: `<prefix><file stem>_<12 hex>`, the hex a hash of the
        file's resolved path (`demo` for the bundled demo) and the configured embedding model, so every
        replica that opens the same file with the same model shares one collection."""
        key = "demo" if is_demo else str(path)
        stem = "demo" if is_demo else "".join(ch if ch.isalnum() else "_" for ch in path.stem.lower())[:40]
        digest = hashlib.sha256(f"{key}\x1f{model}".encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return f"{self.qdrant.get('prefix', 'atelier_')}{stem}_{digest}"

    def _load_qdrant(self, path: Path, is_demo: bool, model: str, dtype: str, max_rows: int, token: Any,
                     progress: Callable[[int, int], None] | None, report: LoadReport) -> tuple[Any, LoadReport]:
        """The catalogue's Qdrant collection; seeded from the file (read and embedded as for the local
        backend) only when no replica has loaded it completely before."""
        try:
            from .qdrant import QdrantCatalog, qdrant_client_for
        except ImportError as exc:  # qdrant_client missing
            raise InvalidInput("catalog.backend", "qdrant", "needs the qdrant-client package "
                               "(pip install qdrant-client)") from exc
        q = self.qdrant
        url, where = q.get("url", ""), q.get("path", "") or ":memory:"
        client = qdrant_client_for(url=url, api_key=q.get("api_key", ""), path=where,
                                   timeout_s=q.get("timeout_s", 10.0))
        name = self.collection_name(path, is_demo, model)
        cat = QdrantCatalog(client, name, source=report.source, hnsw_ef=q.get("hnsw_ef", 128),
                            exact=q.get("exact", False), embedded=not url)
        report.backend, report.collection = "qdrant", name
        if not url and where == ":memory:":
            report.not_durable = ("catalog.qdrant_path is ':memory:' (an in-memory Qdrant): changes live until the "
                                  "server stops")
        if not cat.ready():
            rows, matrix, model_id = self._read(path, is_demo, model, dtype, max_rows, token, progress, report)
            cat.create(matrix.shape[1], model_id)
            cat.load(rows, matrix)
            del rows, matrix
        report.rows = len(cat)
        if report.rows > max_rows:  # a collection grown past the limit (by upserts, or another replica's config)
            raise InvalidInput("catalog", report.source, f"has more than {max_rows} rows (limits.max_catalog_rows)")
        return cat, report

    def index_path(self, source: Path | None, model_id: str) -> Path:
        """Where a catalogue's HNSW index is saved: beside the file (`.NAME.MODEL.hnsw`) when its folder is
        writable, else (and for the demo) in the engine cache dir (`catalog-index/`)."""
        name = f"{source.name if source else 'demo_catalog.jsonl'}.{model_id}.hnsw"
        if source is not None and os.access(source.parent, os.W_OK):
            return source.parent / f".{name}"
        return Path(self.engine.config.cache_dir) / "catalog-index" / name

    def _attach_index(self, cat: Catalog, report: LoadReport, source: Path | None, model_id: str) -> None:
        """Load the saved index when it fits the catalogue as opened (file + log), else build and save it."""
        try:
            import hnswlib  # noqa: F401
        except ImportError as exc:
            raise InvalidInput("models.catalog_index", self.index, "needs the hnswlib package "
                               "(pip install hnswlib==0.8.0)") from exc
        path = self.index_path(source, model_id)
        sweep(path.parent, ANN_TMP_PREFIX)
        fingerprint = cat.fingerprint()
        ix = HnswIndex.load(path, fingerprint, cat.dim, ef_search=self.hnsw_ef_search)
        report.index, report.index_file = "hnsw", str(path)
        if ix is not None:
            cat.index = ix
            report.index_loaded = True
        else:
            t = time.perf_counter()
            cat.build_index(HnswIndex(cat.dim, M=self.hnsw_m, ef_construction=self.hnsw_ef_construction,
                                      ef_search=self.hnsw_ef_search))
            report.index_build_s = time.perf_counter() - t
            try:
                cat.index.save(path, fingerprint)
            except OSError:
                report.index_file = None
        cat.index_saved = (cat.version, report.index_file)

    def save_indexes(self) -> int:
        """Save every catalogue's index that changed since it was saved (engine shutdown) -> how many."""
        n = 0
        for cat, _ in self.catalogs():
            saved = getattr(cat, "index_saved", None)
            if cat.index is not None and saved is not None and saved[1] and saved[0] != cat.version:
                with cat._lock:
                    try:
                        cat.index.save(Path(saved[1]), cat.fingerprint())
                        cat.index_saved = (cat.version, saved[1])
                        n += 1
                    except OSError:
                        pass
        return n

    def memory_limit(self) -> int | None:
        """Bytes one search or upsert may need, read at each call: `workmem.call_limit` (the configured
        per-call limit `max_call_memory_mb` when > 0, else the engine's memory budget less its models)."""
        return workmem.call_limit(self.engine, self.max_call_memory_mb)

    def _embedder_for(self, catalog: Catalog, model: str, texts: Sequence[str], argument: str) -> Any:
        emb = self.embedder(model)
        if emb.dim != catalog.dim:
            raise InvalidInput(argument, texts[0] if texts else "", f"the catalogue holds {catalog.dim}-d vectors "
                               f"but the embedding model gives {emb.dim}-d: query by vector or item_id instead")
        return emb

    def embed_texts(self, catalog: Catalog, model: str, texts: Sequence[str], argument: str,
                    token: Any = None) -> torch.Tensor:
        """Embed texts with the catalogue's model -> [n, dim] float32. A catalogue whose vectors came with
        the file can only take text when the configured model has the same dimension. Refused before any
        work when the embedding's upper bound of memory exceeds `memory_limit()`."""
        emb = self._embedder_for(catalog, model, texts, argument)
        workmem.require(argument, texts[0][:40] if len(texts) == 1 else f"<{len(texts)} texts>",
                        emb.estimate_bytes(texts), self.memory_limit(), "embedding it")
        return emb.encode(list(texts), token=token)

    def upsert(self, catalog: Catalog, rows: Sequence[Mapping[str, Any]], vectors: Sequence[torch.Tensor | None],
               delete: Sequence[str] = (), *, model: str = "", token: Any = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[int, int, int]:
        """Add or update `rows` (checked by `clean_row`; vectors[i] [dim], or None to embed the row's text)
        and delete ids, all or nothing -> (added, updated, deleted).

        Order: the memory bound (embedding + commit) is checked against `memory_limit()` before any work;
        missing vectors are embedded in chunks, `token.check()` before each; the token is checked once
        more; then one `Catalog.apply` commits under the catalogue's lock, first writing the change to the
        catalogue's log (`catalog.journal`, fsync'ed) when it has one. A cancel (or any error, a failed log
        write included) before that step leaves the catalogue as it was; nothing can cancel the step itself."""
        need_text = [i for i, v in enumerate(vectors) if v is None]
        texts = [row_text(rows[i]) for i in need_text]
        emb = self._embedder_for(catalog, model, texts, "items") if texts else None
        need = catalog.upsert_need(rows) + (emb.estimate_bytes(texts) if emb else 0)
        workmem.require("items", f"<{len(rows)} items>", need, self.memory_limit(),
                        f"embedding {len(texts)} and storing {len(rows)} items of {catalog.dim} dims: send fewer "
                        "items per call")
        full = list(vectors)
        if emb is not None:
            out = emb.encode(texts, token=token, progress=progress)  # token.check() before every chunk
            for j, i in enumerate(need_text):
                full[i] = out[j]
        if token is not None:
            token.check()  # the last moment a cancel can stop the change
        stacked = torch.stack([v.float() for v in full if v is not None]) if rows else None
        del full
        try:
            journal = catalog.journal
            return catalog.apply(rows, stacked, delete, journal=None if journal is None else journal.append)
        finally:
            del stacked
            workmem.release(need)  # hand freed heap pages back to the OS after a large update

    def close(self) -> None:
        """Engine shutdown: save changed indexes, release every catalogue's query worker."""
        self.save_indexes()
        with self._lock:
            for cat, _ in self._catalogs.values():
                cat.close()
            for j in self._journals.values():
                j.close()

    def catalogs(self) -> list[tuple[Any, LoadReport]]:
        with self._lock:
            return list(self._catalogs.values())
