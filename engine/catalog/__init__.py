"""Recommendation catalogues: an embedding catalogue on the engine device with exact top-k search.

    svc = engine.service("catalog", CatalogService)
    cat, report = svc.open(path_or_None, model="", dtype="float32", max_rows=2_000_000, token=token)
    hits = cat.search(Query(vector=v, k=5, category_limit=2))      # v: [dim] float, any norm

What it knows: rows (an `id`, a `category`, any other fields), a row-major matrix of L2-normalised
embeddings `[capacity, dim]` (fp32, or fp16) on the engine device, and cosine scores. It does not know MCP,
JSON arguments or client paths: the tool layer resolves paths and limits.

One concern per file — the rule: a module owns one kind of state or one decision, and can be read and
tested without the others' internals. Dependencies point one way: rows <- filters <- query; coalescer, scan,
ann, files stand alone; store uses those; journal uses files; service uses everything.

| module | owns |
|---|---|
| `rows.py` | a row's values (`clean_row`, `value_problem`, `_ABSENT`), its text, reading catalogue files |
| `filters.py` | filter compilation (`compile_filters` -> `Cond`s) and evaluation over columns (`filter_mask`) |
| `query.py` | the data of a search: `Query`, `Request` (checked), `Hit` |
| `coalescer.py` | the generic coalescer: concurrent requests batched on one worker thread |
| `scan.py` | the exact running top-k over the matrix: one `scan`, which picks the path once per call |
| `store.py` | the `Catalog`: columns, id index, matrix + sketch, upsert/apply/delete, views, the search entry |
| `service.py` | `CatalogService`: catalogues by source, loading, the embedding cache, embed-then-apply upserts |
| `journal.py` | the change log: durable upserts (append + fsync before commit), replay on open, compaction |
| `ann.py` | the approximate index (HNSW, hnswlib) labelled by row: candidates, online updates, save/load |
| `files.py` | whole-or-nothing files (temp, fsync, replace, folder fsync) and the sweep of a crash's temp files |
| `qdrant.py` | `QdrantCatalog`: a catalogue in a Qdrant collection (catalog.backend = "qdrant", issue 18.3), same interface |

Contracts kept across the package:

Exactness: results equal a brute-force sort of all valid rows by (score descending, row ascending), where a
row's position is its order in the file, then upserts in arrival order (an update keeps its row). Filters,
`exclude` and deleted rows are masked to -inf before the top-k, so they never cost exactness; `min_score`
cuts the sorted list; `category_limit` is a greedy walk down the sorted list, and the search widens (k'
doubles) until k items pass or every valid row was seen.

Bad input stays with its caller: `search` checks and converts a query (`prepare`: vector, k, limits, and
`compile_filters`) before it joins a batch, and the Coalescer re-runs a failed batch one request at a time.
Stored values pass `value_problem` in `clean_row` (files and the tool): every number finite in float64, so
no stored value can fail a filter.

All or nothing: `Catalog.apply` does an upsert and deletes as one change (all checked first);
`CatalogService.upsert` embeds missing vectors in chunks (cancel checks between them) and then calls
`apply` once, so a cancelled or failed update changes nothing.

Memory: `search_bytes` / `upsert_bytes` (and the embedder's `estimate_bytes`) are upper bounds computed
from the arguments; over `memory_limit()` the work is refused before it starts
(`workmem.MemoryLimitExceeded`), and a batch takes queries while their bounds sum to at most that limit.
"""

from .coalescer import Coalescer
from .filters import Cond, compile_filters
from .query import Hit, Query, Request
from .rows import DEMO_CATALOG, clean_row, read_catalog, row_text, text_problem, value_problem
from .service import CatalogService, LoadReport
from .store import Catalog

__all__ = ["Catalog", "CatalogService", "Coalescer", "Cond", "DEMO_CATALOG", "Hit", "LoadReport", "Query",
           "Request", "clean_row", "compile_filters", "read_catalog", "row_text", "text_problem", "value_problem"]
