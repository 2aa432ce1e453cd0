"""Configuration: one TOML file plus environment overrides (pydantic-settings).

Precedence (highest first): keyword arguments, environment variables
(`ATELIER_<SECTION>__<KEY>`, e.g. `ATELIER_LIMITS__MAX_NEW_TOKENS=64`), the TOML
file (`--config FILE`, else `$ATELIER_CONFIG`, else `./atelier.toml` if it
exists), then the defaults below. Every key is documented in the README.
An invalid value raises `ConfigError` naming the key; the server refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_settings import (
    SettingsError,
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ALL_TOOLS = (
    "generate_text",
    "recommend_topk",
    "catalog_upsert",
    "catalog_info",
    "generate_image",
    "detail_image",
    "color_compare",
    "mask_edit",
    "engine_status",
    "job_status",
    "job_cancel",
)


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineSection(_Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory_budget_mb: int = Field(0, ge=0, description="0 = 60% of device (or system) memory")
    cache_dir: Path = Path("~/.cache/atelier-mcp")
    hf_offline: bool = True
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    torch_threads: int = Field(0, ge=0, description="0 = torch default")


class ModelsSection(_Section):
    llm: str = Field("", description="HF model folder (Llama family / GPT-2) or .gguf; '' = embedded SmolLM2")
    embedding: str = Field("", description="sentence-transformers folder; '' = embedded all-MiniLM-L6-v2")
    diffusion: str = Field("", description="diffusers pipeline folder; '' = none configured")
    detectors: dict[str, str] = Field(default_factory=dict, description="name -> ultralytics .pt path")
    catalog: str = Field("", description="default catalogue file; '' = the bundled demo catalogue")
    llm_compile: bool = False
    llm_decode: Literal["auto", "numpy", "torch"] = Field(
        "auto", description="decode steps: 'numpy' (CPU fp32, full cache), 'torch'; 'auto' = numpy where it applies")
    # issue 13 (quantised weights): the weight format of the language model
    llm_weights: Literal["auto", "gguf", "int8", "int4", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto'/'gguf' = a GGUF's own blocks kept packed (CPU); 'int8'/'int4' = quantised at load "
                            "(Q8_0/Q4_1 blocks); 'bf16'/'fp16'/'fp32' = de-quantised in that dtype")
    llm_activations: Literal["auto", "fp32", "q8", "q8_fast"] = Field(
        "auto", description="packed GGUF / int8 / int4 weights: 'q8' = activations quantised to Q8 blocks "
                            "and integer dot products, and llama.cpp's float arithmetic between them (its logits bit "
                            "for bit on an AVX2 CPU, at its speed); 'fp32' = the de-quantised network exactly "
                            "(transformers' logits up to summation order, ~2.5x slower); 'q8_fast' = q8 with Q4_1 "
                            "matrices interleaved by 8 rows (faster steps, not llama.cpp's bits: about as close to "
                            "transformers as llama.cpp is); 'auto' = q8 where the CPU has AVX2")
    embedding_dtype: Literal["float32", "float16"] = "float32"
    # issue 18.2 (engine/catalog, helper h6): the catalogue's search index
    catalog_index: Literal["exact", "hnsw", "auto"] = Field(
        "exact", description="'exact' scan; 'hnsw' approximate index (hnswlib) with exact filters and category "
                             "limits; 'auto' = hnsw from catalog_index_min_rows live rows")
    catalog_index_min_rows: int = Field(20_000, gt=0, description="catalog_index='auto': the crossover row count")
    catalog_hnsw_ef_search: int = Field(128, ge=1, le=100_000,
                                        description="the HNSW graph's search width (recall against latency)")
    # issue 15.3 (helper H1): generate_text on an external OpenAI-compatible engine (vLLM, llama.cpp server)
    llm_backend: Literal["local", "openai"] = Field(
        "local", description="'local' = our decoder (models.llm); 'openai' = the server at llm_base_url")
    llm_base_url: str = Field("", validate_default=True,
                              description="llm_backend='openai': the API root, e.g. http://127.0.0.1:8000/v1")
    llm_remote_model: str = Field("", validate_default=True,
                                  description="llm_backend='openai': the model name sent (vLLM: served name)")
    llm_api_key: SecretStr = Field(SecretStr(""), description="bearer key for llm_base_url; never logged or shown")
    llm_timeout_s: float = Field(120.0, gt=0, le=3600, description="longest wait to connect and between two chunks")
    llm_json_format: Literal["auto", "json_schema", "json_object"] = Field(
        "auto", description="how json_schema is sent: OpenAI's json_schema response_format, or json_object + "
                            "schema (llama-cpp-python); 'auto' tries json_schema first")

    @field_validator("llm_base_url")
    @classmethod
    def _http_url(cls, v: str, info: ValidationInfo) -> str:  # issue 15.3 (H1)
        v = _check_llm_base_url(v)
        if info.data.get("llm_backend") == "openai" and not v:
            raise ValueError("models.llm_backend='openai' needs this URL (e.g. http://127.0.0.1:8000/v1)")
        return v

    @field_validator("llm_remote_model")
    @classmethod
    def _model_named(cls, v: str, info: ValidationInfo) -> str:  # issue 15.3 (H1)
        if info.data.get("llm_backend") == "openai" and not v.strip():
            raise ValueError("models.llm_backend='openai' needs the model name the server serves (vLLM: "
                             "--served-model-name)")
        return v.strip()


def _check_http_url(v: str, example: str, key_key: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment (the key goes in `key_key`);
    '' stays ''; the trailing '/' is removed. Shared by models.llm_base_url and catalog.qdrant_url."""
    from urllib.parse import urlsplit

    v = v.strip()
    if not v:
        return v
    try:
        u = urlsplit(v)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, e.g. {example}")
    if u.username or u.password or u.query or u.fragment:
        raise ValueError(f"must not carry credentials, a query or a fragment (put the key in {key_key})")
    return v.rstrip("/")


def _check_llm_base_url(v: str) -> str:  # issue 15.3 (H1): models.llm_base_url
    return _check_http_url(v, "http://127.0.0.1:8000/v1", "models.llm_api_key")


class PathsSection(_Section):
    output_dir: Path = Path("./atelier-output")
    read_roots: list[Path] = Field(default_factory=lambda: [Path(".")])


class ToolsSection(_Section):
    enabled: list[str] = Field(default_factory=lambda: ["*"])
    disabled: list[str] = Field(default_factory=list)
    # a tool whose model is not configured (generate_image without models.diffusion) is listed with a
    # description that starts by saying so (the default: a model can tell its user how to enable it);
    # true leaves it out of tools/list instead
    hide_unconfigured: bool = False

    @field_validator("enabled", "disabled")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name != "*" and name not in ALL_TOOLS:
                raise ValueError(f"unknown tool {name!r}; known: {', '.join(ALL_TOOLS)}")
        return v


class LimitsSection(_Section):
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_image_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_base64_chars: int = Field(24 * 1024 * 1024, gt=0)
    max_new_tokens: int = Field(1024, gt=0)
    max_prompt_chars: int = Field(100_000, gt=0)
    max_stop_strings: int = Field(8, gt=0)
    max_diffusion_steps: int = Field(100, gt=0)
    max_image_side: int = Field(2048, ge=64)
    max_images_per_call: int = Field(4, gt=0)
    max_k: int = Field(1000, gt=0)
    max_catalog_rows: int = Field(2_000_000, gt=0)
    max_expression_chars: int = Field(2000, gt=0)
    max_expression_depth: int = Field(32, gt=0)
    max_call_memory_mb: int = Field(0, ge=0, description="per-call working memory; 0 = engine budget less models")  # issue 17.4 (h2)
    deadline_s: float = Field(45.0, gt=0, le=3600)
    queue_length: int = Field(16, gt=0)
    job_ttl_s: float = Field(3600.0, gt=0)
    max_jobs: int = Field(256, gt=0)
    # every result fits every client (mcp_server/fit.py): Claude Desktop refuses results over 1,048,576
    # characters, Claude Code images over 8000 px
    max_result_chars: int = Field(1_000_000, ge=10_000)
    max_inline_side: int = Field(8000, ge=64)
    # output retention (mcp_server/media.py): the oldest images this server wrote go first; 0 = no such rule
    output_max_bytes: int = Field(2_000_000_000, ge=0)
    output_max_age_s: float = Field(7 * 86400.0, ge=0)


class HttpSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    auth_token: str = ""
    allowed_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # connections cannot be held hostage (mcp_server/transports.py, GuardedH11Protocol)
    max_connections: int = Field(1024, gt=0, description="open connections in all; beyond: 503 and closed")
    max_connections_per_client: int = Field(128, gt=0, description="open connections per client IP address")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="request line + headers must arrive within")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="longest pause inside a request body")
    min_body_rate_bytes_s: int = Field(1024, ge=0, description="body rate floor after the grace period; 0 = off")
    body_rate_grace_s: float = Field(5.0, ge=0, le=3600, description="seconds before the rate floor applies")

    # issue 15 (h2): stateless streamable HTTP, for replicas behind a load balancer (docs/scaling.md)
    stateless: bool = Field(False, description="every request stands alone (SDK stateless_http); streamable HTTP only")

    @model_validator(mode="after")
    def _per_client_below_global(self) -> "HttpSection":
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(f"http.max_connections_per_client={self.max_connections_per_client}: must not exceed "
                             f"http.max_connections={self.max_connections}")
        return self


# issue 15 (h2): where jobs, tasks, cancel flags, the image:// index and stream events live (docs/scaling.md)
class StateSection(_Section):
    backend: Literal["memory", "redis"] = Field("memory", description="'memory' = this process only (default); "
                                                                      "'redis' = shared by every replica")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="state.backend='redis': the server to use")
    key_prefix: str = Field("atelier", min_length=1, max_length=64, description="prefix of every Redis key")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="how often a replica renews its lease")
    lease_s: float = Field(5.0, gt=0, le=600, description="a replica silent this long is dead: its jobs fail")
    max_result_bytes: int = Field(4_000_000, ge=10_000, description="largest job result shared through Redis")
    event_ttl_s: float = Field(600.0, gt=0, description="how long stream events are kept for resumption")

    @model_validator(mode="after")
    def _lease_above_heartbeat(self) -> "StateSection":
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(f"state.lease_s={self.lease_s}: must be at least twice state.heartbeat_s="
                             f"{self.heartbeat_s}")
        if self.backend == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"state.redis_url={self.redis_url!r}: must start with redis://, rediss:// or unix://")
        return self


# issue 18 (H3): where catalogues live: this process ("local") or a shared Qdrant ("qdrant"); README "Catalogues in Qdrant"
class CatalogSection(_Section):
    backend: Literal["local", "qdrant"] = Field(
        "local", description="'local' = in this process (change log + optional HNSW); 'qdrant' = a Qdrant collection "
                             "per catalogue, shared by every replica")
    qdrant_url: str = Field("", description="backend='qdrant': the server, e.g. http://qdrant:6333 ('' = embedded, "
                                            "see qdrant_path)")
    qdrant_api_key: SecretStr = Field(SecretStr(""), description="Qdrant API key (the server's api-key); never logged "
                                                                 "or shown")
    qdrant_path: str = Field("", description="no qdrant_url: the folder of an embedded Qdrant (qdrant-client's local "
                                             "mode, one process only); '' or ':memory:' = in memory, not durable")
    qdrant_collection_prefix: str = Field("atelier_", pattern=r"^[A-Za-z0-9_-]{0,32}$",
                                          description="collections are named <prefix><file stem>_<hash>")
    qdrant_hnsw_ef: int = Field(128, ge=1, le=100_000, description="Qdrant's hnsw_ef per search (server only)")
    qdrant_exact: bool = Field(False, description="server only: exact (brute-force) search instead of Qdrant's HNSW")
    qdrant_timeout_s: float = Field(10.0, gt=0, le=600, description="longest wait for one Qdrant request")

    @field_validator("qdrant_url")
    @classmethod
    def _qdrant_url(cls, v: str) -> str:
        return _check_http_url(v, "http://qdrant:6333", "catalog.qdrant_api_key")


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    # libraries' loggers (numba, PIL, httpx, ...) log at max(level, third_party_level)
    third_party_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    @field_validator("level", "third_party_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATELIER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    engine: EngineSection = Field(default_factory=EngineSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    http: HttpSection = Field(default_factory=HttpSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    state: StateSection = Field(default_factory=StateSection)  # issue 15 (h2)
    catalog: CatalogSection = Field(default_factory=CatalogSection)  # issue 18 (H3)

    # not a config key: where the settings came from (set by load_settings)
    config_file: Path | None = Field(default=None, exclude=True)

    _toml_path: ClassVar[str | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)

    # -- derived ------------------------------------------------------------
    def enabled_tools(self) -> list[str]:
        wanted = set(ALL_TOOLS) if "*" in self.tools.enabled else set(self.tools.enabled)
        wanted -= set(self.tools.disabled)
        return [t for t in ALL_TOOLS if t in wanted]

    def resolved_cache_dir(self) -> Path:
        return Path(os.path.expanduser(str(self.engine.cache_dir))).resolve()

    def resolved_output_dir(self) -> Path:
        return Path(os.path.expanduser(str(self.paths.output_dir))).resolve()

    def resolved_read_roots(self) -> list[Path]:
        return [Path(os.path.expanduser(str(p))).resolve() for p in self.paths.read_roots]

    def model_post_init(self, __context: Any) -> None:
        for p in self.resolved_read_roots():
            if p == Path(p.anchor):
                raise ValueError(f"paths.read_roots contains {str(p)!r} (from the entry resolving to the filesystem "
                                 f"root): that would expose the whole filesystem; name a project folder instead")


_SECRET_PARTS = ("key", "token", "secret", "password", "passwd", "auth", "credential")


def _mask_secret(key: str, value: Any) -> Any:
    """What a config error may show of `value`: nothing of a key that looks secret, nor a URL's
    password (`redis://:pw@host`). Unknown keys (a misspelled `llm_api_kee`) are named without a value."""
    last = key.rsplit(".", 1)[-1].lower()
    if any(p in last for p in _SECRET_PARTS) and value not in (None, ""):
        return "<hidden>"
    if isinstance(value, dict):
        return {k: _mask_secret(str(k), v) for k, v in value.items()}
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://<hidden>@{rest.split('@', 1)[1]}"
    return value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not key:  # a check across keys (model_post_init): its message names the key itself
            lines.append(f"  {msg}")
            continue
        value = _mask_secret(key, err.get("input"))
        if err.get("type") == "extra_forbidden":  # an unknown (perhaps misspelled secret) key: name it only
            lines.append(f"  {key}: {msg} (not a configuration key; see the README's Configuration table)")
            continue
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {key} = {shown}: {msg}")
    return "\n".join(lines)


def find_config_file(path: str | os.PathLike[str] | None) -> Path | None:
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist or is not a file")
        return p.resolve()
    env = os.environ.get("ATELIER_CONFIG")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"ATELIER_CONFIG={env!r}: file does not exist")
        return p.resolve()
    default = Path("atelier.toml")
    return default.resolve() if default.is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise `ConfigError` with the offending key on failure."""
    cfg = find_config_file(path)
    source = str(cfg) if cfg else "defaults + environment"
    if cfg is not None:
        import tomllib

        try:
            tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"invalid configuration ({cfg}): not valid TOML: {exc}") from exc
    Settings._toml_path = str(cfg) if cfg else None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    except SettingsError as exc:  # e.g. an ATELIER_* variable holding malformed JSON
        raise ConfigError(f"invalid configuration ({source}): {exc} (lists and tables in environment "
                          f"variables are JSON, e.g. ATELIER_PATHS__READ_ROOTS='[\"/data\"]')") from exc
    finally:
        Settings._toml_path = None
    object.__setattr__(settings, "config_file", cfg)
    return settings
