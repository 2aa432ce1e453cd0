"""recommend_topk / catalog_upsert / catalog_info: exact top-k over an embedding catalogue.

The catalogue is the file named in the call (`catalog`, resolved inside the
read roots), else `models.catalog`, else the bundled demo catalogue. The
engine's catalogue service (`engine.catalog.CatalogService`) holds it on the
device; this module checks limits, resolves paths and shapes results.
Upserts and deletes are written to the catalogue's change log (fsync'ed)
before the call answers, and replayed when the catalogue is next opened
(`engine.catalog.journal`); the catalogue file itself is never rewritten.
Where the catalogue's folder is read-only the answer says the change is not
durable (it lives in memory until the server stops).

Every argument is checked here, before the call joins shared work: filter
values (`Catalog.check_filters`) before the query joins a coalesced batch,
item values (`clean_row`) before anything is embedded or stored. An upsert
commits in one step after its embeddings, or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.catalog import Catalog, CatalogService, LoadReport, Query, clean_row, text_problem

from .base import ToolContext, ToolError, ToolOutput, ToolSpec

Filters = dict[str, Any]
_FILTERS_DOC = ("field -> condition. A condition is a value (equality), a list (membership), or an object with "
                "'eq', 'ne', 'in', 'not_in' (exclusions: a row without the field passes them), 'min', 'max' "
                "(numeric range, inclusive). Example: {\"category\": {\"not_in\": [\"phone\"]}, "
                "\"price\": {\"max\": 30}, \"in_stock\": true}")


def _service(ctx: ToolContext) -> CatalogService:
    svc = ctx.engine.service("catalog", CatalogService)
    svc.max_call_memory_mb = int(getattr(ctx.settings.limits, "max_call_memory_mb", 0) or 0)  # if configured
    svc.index = getattr(ctx.settings.models, "catalog_index", "exact")
    svc.index_min_rows = int(getattr(ctx.settings.models, "catalog_index_min_rows", svc.index_min_rows))
    svc.hnsw_ef_search = int(getattr(ctx.settings.models, "catalog_hnsw_ef_search", svc.hnsw_ef_search))
    c = getattr(ctx.settings, "catalog", None)  # issue 18: catalog.backend = "local" | "qdrant"
    if c is not None:
        svc.backend = c.backend
        svc.qdrant = {"url": c.qdrant_url, "api_key": c.qdrant_api_key.get_secret_value(), "path": c.qdrant_path,
                      "prefix": c.qdrant_collection_prefix, "hnsw_ef": c.qdrant_hnsw_ef, "exact": c.qdrant_exact,
                      "timeout_s": c.qdrant_timeout_s}
    return svc


def _open(ctx: ToolContext, catalog: str | None) -> tuple[Catalog, LoadReport]:
    """The catalogue (a local `Catalog`, or with catalog.backend = "qdrant" a `QdrantCatalog`: the same
    interface) and its load report."""
    source: Path | None = None
    if catalog is not None:  # a client path: always through the sandbox ("" is refused there)
        return _service(ctx).open(ctx.resolve_input(catalog, "catalog"), **_open_kwargs(ctx))
    name = ctx.settings.models.catalog
    if name:
        source = Path(name).expanduser()
        if not source.is_file():
            raise ToolError.invalid("models.catalog", name, "configured catalogue file does not exist")
    return _service(ctx).open(source, **_open_kwargs(ctx))


def _open_kwargs(ctx: ToolContext) -> dict[str, Any]:
    models = ctx.settings.models
    return dict(model=models.embedding, dtype=models.embedding_dtype, max_rows=ctx.settings.limits.max_catalog_rows,
                token=ctx.cancel_token(),
                progress=lambda done, total: ctx.report(done, total, f"embedded {done}/{total} items"))


# -- recommend_topk ----------------------------------------------------------
class RecommendInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="Query text, embedded with the catalogue's model "
                                               "(e.g. 'accessories for a Pixel 9 phone').")
    item_id: str | None = Field(None, description="'More like this': the id of a catalogue item; "
                                                  "the item itself is excluded.")
    vector: list[float] | None = Field(None, description="A raw query vector with the catalogue's dimension.")
    k: int = Field(5, description="How many items to return (1 .. limits.max_k).")
    filters: Filters | None = Field(None, description=_FILTERS_DOC)
    category_limit: int | None = Field(None, description="At most this many items per category (diversity).")
    exclude: list[str] = Field(default_factory=list, description="Item ids never to return.")
    min_score: float | None = Field(None, description="Drop items whose cosine similarity is below this.")
    catalog: str | None = Field(None, description="Catalogue file (.jsonl/.csv/.parquet) inside the read roots; "
                                                  "default: the configured catalogue or the bundled demo.")


class RecommendedItem(BaseModel):
    id: str
    score: float = Field(description="cosine similarity")
    category: str
    fields: dict[str, Any]


class RecommendOutput(BaseModel):
    items: list[RecommendedItem]
    query: str = Field(description="what was searched: the text, 'item:<id>' or 'vector'")
    catalog: str
    rows: int = Field(description="live items in the catalogue")
    warnings: list[str] = Field(default_factory=list, description="malformed catalogue rows that were skipped")


def _recommend(args: RecommendInput, ctx: ToolContext) -> ToolOutput:
    given = [n for n in ("text", "item_id", "vector") if getattr(args, n) is not None]
    if len(given) != 1:
        raise ToolError.invalid("text/item_id/vector", given or None, "give exactly one of text, item_id or vector")
    max_k = ctx.settings.limits.max_k
    if args.k < 1 or args.k > max_k:
        raise ToolError.invalid("k", args.k, f"must be between 1 and {max_k} (limits.max_k)")
    if args.category_limit is not None and args.category_limit < 1:
        raise ToolError.invalid("category_limit", args.category_limit, "must be >= 1")
    if args.min_score is not None and not -1.0 <= args.min_score <= 1.0:
        raise ToolError.invalid("min_score", args.min_score, "must be between -1 and 1 (cosine similarity)")
    ctx.check()
    cat, report = _open(ctx, args.catalog)
    ctx.check()
    cat.check_filters(args.filters)  # every filter value checked and converted before any work
    with cat.expect_query():  # concurrent calls join one batch (engine.catalog.Coalescer)
        exclude_rows = {cat.row_of(i) for i in args.exclude if cat.has(i)}
        if args.text is not None:
            if not args.text.strip():
                raise ToolError.invalid("text", args.text, "must not be empty")
            if len(args.text) > ctx.settings.limits.max_prompt_chars:
                raise ToolError.invalid("text", args.text[:40], "longer than limits.max_prompt_chars")
            bad = text_problem(args.text, "text")
            if bad is not None:
                raise ToolError(bad)
            vec = _service(ctx).embed_texts(cat, ctx.settings.models.embedding, [args.text], "text")[0]
            label = args.text
        elif args.item_id is not None:
            if not cat.has(args.item_id):
                raise ToolError.invalid("item_id", args.item_id, "unknown item id in this catalogue")
            vec = cat.vector(args.item_id)
            exclude_rows.add(cat.row_of(args.item_id))
            label = f"item:{args.item_id}"
        else:
            assert args.vector is not None
            if len(args.vector) != cat.dim:
                raise ToolError.invalid("vector", f"<{len(args.vector)} numbers>",
                                        f"expected {cat.dim} numbers (the catalogue's dimension)")
            a64 = np.asarray(args.vector, dtype=np.float64)
            if not np.isfinite(a64).all() or float(np.abs(a64).max()) > float(np.finfo(np.float32).max):
                raise ToolError.invalid("vector", "...", "numbers must be finite and at most 3.4e38 in magnitude "
                                        "(float32)")
            vec = torch.from_numpy(a64.astype(np.float32))
            label = "vector"
        hits = cat.search(Query(vector=vec, k=args.k, filters=args.filters, category_limit=args.category_limit,
                                exclude_rows=frozenset(exclude_rows), min_score=args.min_score))
    items = [RecommendedItem(id=h.id, score=round(h.score, 6), category=h.fields.get("category", ""),
                             fields={k: v for k, v in h.fields.items() if k not in ("id", "category")})
             for h in hits]
    out = RecommendOutput(items=items, query=label, catalog=report.source, rows=len(cat), warnings=report.errors)
    lines = [f"{len(items)} item(s) for {label!r} from {report.source} ({len(cat)} items):"]
    for i, it in enumerate(items, 1):
        name = it.fields.get("name") or it.fields.get("title") or ""
        price = it.fields.get("price")
        lines.append(f"{i}. {it.id} [{it.category}] {name}" + (f" ({price})" if price is not None else "")
                     + f" score {it.score:.3f}")
    if report.errors:
        lines.append(f"({len(report.errors)} malformed catalogue row(s) skipped; see warnings)")
    return ToolOutput(text="\n".join(lines), structured=out)


# -- catalog_upsert ----------------------------------------------------------
class UpsertInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Items to add or update: each an object with 'id', 'category', text fields (name, description, ...), "
        "any other fields, and optionally 'embedding' (a vector with the catalogue's dimension). An existing id "
        "is updated: given fields replace the old ones, and the text is embedded again (in a catalogue that "
        "carries its own vectors, the stored vector is kept unless 'embedding' is given)."))
    delete: list[str] = Field(default_factory=list, description="Ids of items to remove.")
    catalog: str | None = Field(None, description="Catalogue file inside the read roots; default: the configured "
                                                  "catalogue or the bundled demo.")


class UpsertOutput(BaseModel):
    added: int
    updated: int
    deleted: int
    rows: int
    catalog: str
    durable: bool = Field(description="the change is on disk (the catalogue's log, or Qdrant) and survives a restart")
    log_file: str | None = Field(None, description="the catalogue's change log")
    collection: str | None = Field(None, description="the Qdrant collection (catalog.backend = 'qdrant')")
    warning: str | None = Field(None, description="why the change is not durable")


def _upsert(args: UpsertInput, ctx: ToolContext) -> ToolOutput:
    if not args.items and not args.delete:
        raise ToolError.invalid("items", [], "give items to add/update or ids to delete")
    cat, report = _open(ctx, args.catalog)
    own_vectors = cat.model == "provided"  # the file came with its vectors: nothing here can embed text for it
    limit = ctx.settings.limits.max_catalog_rows
    rows: list[dict[str, Any]] = []
    vecs: list[torch.Tensor | None] = []
    seen: set[str] = set()
    for i, raw in enumerate(args.items):
        if i % 1024 == 0:
            ctx.check()
        try:
            row, vec = clean_row(raw, f"items[{i}]", argument=True)  # every value checked: nothing can poison
        except ValueError as exc:
            raise ToolError(str(exc)) from exc
        if row["id"] in seen:
            raise ToolError.invalid(f"items[{i}].id", row["id"], "appears twice in this call")
        seen.add(row["id"])
        stored = None
        if cat.has(row["id"]):
            merged = cat.item(row["id"])
            merged.update(row)
            row = merged
            if vec is None and own_vectors:  # a fields-only update keeps the item's vector
                stored = cat.vector(row["id"]).detach().to("cpu", torch.float32)
        elif vec is None and own_vectors:
            raise ToolError.invalid(f"items[{i}]", row["id"], (
                f"this catalogue carries its own vectors (no embedding model): a new item needs an 'embedding' of "
                f"{cat.dim} numbers; to change fields of an existing item, give its id and those fields only "
                f"(its vector is kept)"))
        if vec is not None and len(vec) != cat.dim:
            raise ToolError.invalid(f"items[{i}].embedding", f"<{len(vec)} numbers>",
                                    f"expected {cat.dim} numbers (the catalogue's dimension)")
        rows.append(row)
        vecs.append(torch.tensor(vec, dtype=torch.float32) if vec is not None else stored)
    for rid in args.delete:
        if not cat.has(rid):
            raise ToolError.invalid("delete", rid, "unknown item id in this catalogue")
    new = sum(1 for r in rows if not cat.has(r["id"]))
    if len(cat) + new - len(set(args.delete)) > limit:
        raise ToolError.invalid("items", f"<{len(rows)} items>", f"the catalogue would exceed {limit} rows "
                                "(limits.max_catalog_rows)")
    if any(v is None for v in vecs):
        ctx.report(0, sum(v is None for v in vecs), "embedding items")
    # memory bound checked first, embedding in chunks with a cancel check before each, then one commit:
    # a cancelled or failed call leaves the catalogue as it was
    added, updated, deleted = _service(ctx).upsert(
        cat, rows, vecs, args.delete, model=ctx.settings.models.embedding, token=ctx.cancel_token(),
        progress=lambda done, total: ctx.report(done, total, f"embedded {done}/{total} items"))
    durable = report.durable
    out = UpsertOutput(added=added, updated=updated, deleted=deleted, rows=len(cat), catalog=report.source,
                       durable=durable, log_file=report.log_file, collection=report.collection,
                       warning=None if durable else report.not_durable)
    note = (f"NOT durable: {report.not_durable}." if not durable else "saved to the catalogue's log."
            if report.log_file else f"saved in Qdrant collection {report.collection}.")
    return ToolOutput(text=f"{report.source}: {added} added, {updated} updated, {deleted} deleted; "
                           f"{len(cat)} items now; {note}", structured=out)


# -- catalog_info ------------------------------------------------------------
class InfoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    catalog: str | None = Field(None, description="Catalogue file inside the read roots; default: the configured "
                                                  "catalogue or the bundled demo.")


class InfoOutput(BaseModel):
    catalog: str
    rows: int
    dims: int
    model: str = Field(description="embedding model id, or 'provided' when the file carries vectors")
    dtype: str
    device: str
    bytes_on_device: int = Field(description="the embedding matrix")
    sketch_bytes: int = Field(0, description="the int8 search sketch beside an fp32 CPU matrix (0: none)")
    capacity: int
    categories: dict[str, int]
    fields: list[str]
    warnings: list[str] = Field(default_factory=list)
    cache_file: str | None = None
    log_file: str | None = Field(None, description="the change log of upserts and deletes (None: not durable)")
    log_bytes: int = 0
    replayed: int = Field(0, description="log records applied when the catalogue was opened")
    index: str = Field("exact", description="'exact' scan, 'hnsw' (approximate index; filters and category "
                                            "limits still exact on the returned items), or 'qdrant'")
    index_bytes: int = 0
    backend: str = Field("local", description="'local' (this process) or 'qdrant' (catalog.backend)")
    collection: str | None = Field(None, description="the Qdrant collection (backend 'qdrant')")


def _info(args: InfoInput, ctx: ToolContext) -> ToolOutput:
    cat, report = _open(ctx, args.catalog)
    info = cat.info()
    out = InfoOutput(catalog=report.source, rows=info["rows"], dims=info["dims"], model=info["model"],
                     dtype=info["dtype"], device=info["device"], bytes_on_device=info["bytes_on_device"],
                     sketch_bytes=info["sketch_bytes"],
                     capacity=info["capacity"], categories=info["categories"], fields=info["fields"],
                     warnings=report.errors, cache_file=report.cache_file, log_file=report.log_file,
                     log_bytes=cat.journal.size() if cat.journal is not None else 0, replayed=report.replayed,
                     index=info["index"], index_bytes=info["index_bytes"], backend=report.backend,
                     collection=report.collection)
    cats = ", ".join(f"{c or '(none)'} {n}" for c, n in list(out.categories.items())[:12])
    text = (f"{out.catalog}: {out.rows} items x {out.dims} dims, model {out.model}, {out.dtype} on {out.device} "
            f"({out.bytes_on_device / 1e6:.1f} MB); categories: {cats}")
    return ToolOutput(text=text, structured=out)


recommend_topk = ToolSpec(
    name="recommend_topk", title="Recommend top-k items",
    description=("Exact top-k recommendations from an embedding catalogue by text, by item id ('more like this') "
                 "or by vector, with field filters, excluded ids, a minimum score and at most N per category. "
                 "Example: text='accessories for a Pixel 9 phone', k=5, category_limit=2, "
                 "filters={'category': {'in': ['phone case', 'charger', 'cable']}}."),
    input_model=RecommendInput, output_model=RecommendOutput, run=_recommend,
    execution="thread", read_only=True, priority=0)

catalog_upsert = ToolSpec(
    name="catalog_upsert", title="Add, update or delete catalogue items",
    description="Add or update items (their text is embedded) or delete them by id; the next recommend_topk sees "
                "the change. Each change is saved to the catalogue's log before the answer and survives a "
                "restart ('durable' says so; not where the catalogue's folder is read-only); the catalogue file "
                "itself is not rewritten.",
    input_model=UpsertInput, output_model=UpsertOutput, run=_upsert,
    execution="thread", read_only=False, priority=0)

catalog_info = ToolSpec(
    name="catalog_info", title="Describe the catalogue",
    description="Rows, dimensions, embedding model, dtype, bytes on the device, and item counts per category.",
    input_model=InfoInput, output_model=InfoOutput, run=_info,
    execution="thread", read_only=True, priority=0)

TOOLS = [recommend_topk, catalog_upsert, catalog_info]
