"""A GGUF file loaded as it is: its config from the metadata, its weight blocks kept packed.

    cfg, tensors = read_gguf(path)          # HF-style config dict; {gguf name: Packed | fp32 ndarray}
    model = build_packed(cfg, tensors)      # engine.llm.model.Transformer on qweights modules

What it knows: the GGUF container (its header read with `struct`, the tensor
bytes through a memory map, copied once into the packed arrays), the llama architecture's metadata keys and
tensor names, and that
llama.cpp's converter stores q/k rows already in the interleaved RoPE layout our
decoder uses (so, unlike `model.build`, no permutation; and 1/sqrt(head_dim)
stays in `attn_scale` rather than folded into fp16 scales). Block types kept
packed: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS;
F32/F16/BF16 tensors become fp32. The block types we do not compute packed
but the `gguf` package de-quantises (IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS/
IQ3_S, TQ1_0/TQ2_0, MXFP4, NVFP4) are re-quantised to Q8_0 blocks at load, a
chunk of rows at a time, and cached on disk (`requantisable`, `read_gguf`):
8.5 bits per weight instead of fp32's 32. Any other block
type or architecture raises `UnsupportedGGUF` naming the file, the tensor and
the type; the caller falls back to transformers' de-quantising conversion. A
truncated or corrupt file raises `CorruptGGUF`; nothing is written anywhere.

What it does not know: tokenisation (`engine.llm.load` caches the tokenizer
files), the kernels (`atelier_kernels.cpu_qmatmul`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import ModelArgs, Transformer, blas_backend
from .qweights import BLOCK_BYTES, BLOCK_VALUES, Packed, PackedEmbedding, PackedLinear, Scratch

FLOAT_TYPES = ("F32", "F16", "BF16")
log = logging.getLogger("atelier.engine.llm")


class UnsupportedGGUF(Exception):
    """An architecture, option or block type this loader does not keep packed."""


class CorruptGGUF(Exception):
    """The file is not a readable GGUF (truncated, bad magic, inconsistent sizes)."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type id -> name, for the types we read (others are reported by id and name when gguf knows it)
_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
          12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 23: "IQ4_XS", 30: "BF16"}
_KEPT = ", ".join(BLOCK_BYTES) + "; floats: " + ", ".join(FLOAT_TYPES)
_SKIP = object()


def _type_name(t: int) -> str:
    if t in _TYPES:
        return _TYPES[t]
    try:
        import gguf

        return gguf.GGMLQuantizationType(t).name
    except Exception:
        return f"type {t}"


class _Header:
    """The GGUF header read with `struct` (gguf's own reader builds a NumPy view per token string: a
    minute for SmolLM2's 49k-token vocabulary on a busy 2-core machine; this walks it in well under 1 s).
    Arrays are skipped, except their length is kept (`n_tokens`)."""

    def __init__(self, path: Path, keep: tuple[str, ...] = ()) -> None:
        import mmap
        import struct

        self.path = path
        self.keep = keep  # array keys read whole (the tokenizer's), others skipped
        with open(path, "rb") as f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file
                raise CorruptGGUF(f"{path}: not a readable GGUF file ({exc})") from exc
        self.buf = buf
        self.pos = 0
        self._struct = struct
        try:
            if self._raw(4) != b"GGUF":
                raise CorruptGGUF(f"{path}: not a GGUF file (bad magic)")
            version = self._num("<I")
            if version not in (2, 3):
                raise CorruptGGUF(f"{path}: GGUF version {version} (read: 2, 3)")
            n_tensors, n_kv = self._num("<Q"), self._num("<Q")
            self.fields: dict[str, Any] = {}
            self.array_lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = self._str()
                self.fields[key] = self._value(self._num("<I"), key)
            self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []
            for _ in range(n_tensors):
                name = self._str()
                dims = tuple(self._num("<Q") for _ in range(self._num("<I")))
                self.tensors.append((name, dims, self._num("<I"), self._num("<Q")))
            align = int(self.fields.get("general.alignment", 32))
            self.data_start = (self.pos + align - 1) // align * align
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
            raise CorruptGGUF(f"{path}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from exc

    def _raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise IndexError(f"{n} bytes at offset {self.pos} run past the end ({len(self.buf)} bytes)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def _num(self, fmt: str) -> Any:
        size = self._struct.calcsize(fmt)
        return self._struct.unpack(fmt, self._raw(size))[0]

    def _str(self) -> str:
        return self._raw(self._num("<Q")).decode("utf-8")

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self._num(_SCALARS[vtype])
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, count = self._num("<I"), self._num("<Q")
            self.array_lengths[key] = count
            if key in self.keep:
                if etype == 8:
                    return [self._str() for _ in range(count)]
                if etype in _SCALARS:
                    size = self._struct.calcsize(_SCALARS[etype])
                    return list(self._struct.unpack(f"<{count}{_SCALARS[etype][1]}", self._raw(size * count)))
            if etype in _SCALARS:
                self._raw(self._struct.calcsize(_SCALARS[etype]) * count)
            elif etype == 8:  # strings: skipped without decoding
                unpack, buf = self._struct.unpack_from, self.buf
                for _ in range(count):
                    self.pos += 8 + unpack("<Q", buf, self.pos)[0]
                if self.pos > len(buf):
                    raise IndexError(f"array {key} runs past the end of the file")
            else:
                for _ in range(count):
                    self._value(etype, key)
            return _SKIP
        raise CorruptGGUF(f"{self.path}: metadata key {key} has unknown value type {vtype}")


REQUANT_FORMAT = "Q8_0"  # what the block types we do not compute packed become at load (see requantisable)
REQUANT_VERSION = 1  # the re-quantised blocks' cache layout (a new value orphans older cache files)
_REQUANT_CHUNK = 1 << 22  # values de-quantised at a time per thread (16 MB of fp32)


def _gguf_type(ttype: str) -> Any:
    try:
        import gguf

        return gguf.GGMLQuantizationType[ttype]
    except (ImportError, KeyError):
        return None


def requantisable(ttype: str) -> bool:
    """Whether a block type we do not compute packed (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
    TQ1_0, TQ2_0, MXFP4, NVFP4 with gguf 0.19) is one `gguf.quants` de-quantises, in blocks of a multiple of
    32 values: such tensors are re-quantised to `REQUANT_FORMAT` blocks at load (see `read_gguf`)."""
    if ttype in BLOCK_BYTES or ttype in FLOAT_TYPES:
        return False
    qt = _gguf_type(ttype)
    if qt is None:
        return False
    from gguf import GGML_QUANT_SIZES, quants

    return qt in getattr(quants, "_type_traits", {}) and GGML_QUANT_SIZES[qt][0] % 32 == 0


def _block_size(ttype: str) -> tuple[int, int]:
    """(values, bytes) of one block of a kept or re-quantisable type."""
    if ttype in BLOCK_BYTES:
        return BLOCK_VALUES[ttype], BLOCK_BYTES[ttype]
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_gguf_type(ttype)]


def _requantise(path: Path, name: str, ttype: str, raw: np.ndarray, rows: int) -> np.ndarray:
    """One tensor's blocks of `ttype` (uint8 [rows, bytes per row]) -> its Q8_0 blocks as a GGUF stores them,
    de-quantised by `gguf.quants` and re-quantised with llama.cpp's rounding a chunk of rows at a time (both
    threads: NumPy lets go of the GIL), so no fp32 copy of the whole tensor exists."""
    from .qweights import quantize_blocks

    parts = _chunks(path, name, ttype, raw, rows, lambda w: quantize_blocks(w, REQUANT_FORMAT))
    return np.concatenate(parts) if parts else np.empty((0, _q8_row_bytes(ttype, raw)), np.uint8)


def _dequantise(path: Path, name: str, ttype: str, raw: np.ndarray, rows: int) -> np.ndarray:
    """One tensor's blocks of `ttype` (uint8 [rows, bytes per row]) -> fp32 [rows, values per row], de-quantised
    by `gguf.quants` a chunk of rows at a time on every core (non-finite values refused as in `_requantise`)."""
    qk, bb = _block_size(ttype)
    parts = _chunks(path, name, ttype, raw, rows, lambda w: w.astype(np.float32, copy=False))
    return np.concatenate(parts) if parts else np.empty((0, raw.shape[1] // bb * qk), np.float32)


def _chunks(path: Path, name: str, ttype: str, raw: np.ndarray, rows: int, then: Any) -> list[np.ndarray]:
    """`then(values)` of each chunk of rows of the tensor de-quantised by `gguf.quants` (both threads: NumPy lets
    go of the GIL); CorruptGGUF where a chunk de-quantises to NaN or inf (corrupt scales)."""
    from concurrent.futures import ThreadPoolExecutor

    from gguf import quants

    qt = _gguf_type(ttype)
    step = max(1, _REQUANT_CHUNK // max(1, raw.shape[1] * 4))  # rows per chunk (at most ~4 values per byte)

    def one(r0: int) -> np.ndarray:
        with np.errstate(all="ignore"):
            w = quants.dequantize(raw[r0:r0 + step], qt).reshape(min(step, rows - r0), -1)
        if not np.isfinite(w).all():
            raise CorruptGGUF(f"{path}: tensor {name} ({ttype}) de-quantises to non-finite values (corrupt "
                              f"scales)")
        return then(w)

    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(one, range(0, rows, step)))


def requant_cache_file(path: Path, cache_dir: Path) -> Path:
    """Where the re-quantised blocks of the GGUF at `path` are cached: named after the file's resolved path,
    size and mtime and the cache layout version (a changed file gives a new name)."""
    import hashlib
    import json

    st = path.stat()
    stamp = [REQUANT_FORMAT, REQUANT_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{path.stem}-{REQUANT_FORMAT}-{key}.npz"


def _cached_requant(cache: Path | None, want: dict[str, tuple[int, int]]) -> dict[str, np.ndarray] | None:
    """The cached blocks, if `cache` holds every wanted tensor with its shape; None (the file removed when
    unreadable) otherwise."""
    import zipfile

    if cache is None or not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            got = {n: z[n] for n in want}
        if all(got[n].dtype == np.uint8 and got[n].shape == want[n] for n in want):
            return got
        log.warning("re-quantised GGUF blocks cache does not match the file; rebuilding it",
                    extra={"path": str(cache)})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("re-quantised GGUF blocks cache unreadable; rebuilding it",
                    extra={"path": str(cache), "reason": f"{type(exc).__name__}: {exc}"})
    cache.unlink(missing_ok=True)
    return None


def _save_requant(cache: Path, blocks: dict[str, np.ndarray]) -> bool:
    """Write the cache under a temporary name, then rename it: a crash leaves no file under the final name."""
    import tempfile

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".requant-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **blocks)
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as exc:  # a full or read-only disk costs the next start a re-quantisation, nothing else
        log.warning("re-quantised GGUF blocks not cached", extra={"path": str(cache), "reason": str(exc)})
        return False


def _read_header(path: Path) -> _Header:
    try:
        return _Header(path)
    except OSError as exc:
        raise CorruptGGUF(f"{path}: cannot read ({exc})") from exc


def _not_kept(path: Path, h: _Header) -> str | None:
    """Why the file cannot be loaded packed (an architecture, option or block type we do not read), or None."""
    arch = h.fields.get("general.architecture")
    if arch != "llama":
        return f"{path}: architecture {arch!r} (kept packed: llama)"
    scaling = h.fields.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        return f"{path}: llama.rope.scaling.type={scaling!r}"
    for name, _, t, _ in h.tensors:
        ttype = _type_name(t)
        if ttype not in FLOAT_TYPES and ttype not in BLOCK_BYTES and not requantisable(ttype):
            return (f"{path}: tensor {name} has block type {ttype} (kept packed: {_KEPT}; re-quantised to "
                    f"{REQUANT_FORMAT}: the types gguf de-quantises)")
    return None


def read_gguf(path: Path, requant_cache: Path | None = None, progress: Any = None, dequantise: bool = False
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-style config, {tensor name: Packed | fp32 ndarray}) of a llama-architecture GGUF.

    dequantise: every matrix a `Values` instead (`models.llm_weights` = fp32 / fp16 / bf16 / int8 / int4 on a
    GGUF), de-quantised only when `build_packed` copies it into its dtype, a tensor at a time (the load then
    never holds more than the model in that dtype plus one fp32 tensor): the block types we compute packed by
    our kernels (`Packed.dequant`), the others by `gguf.quants` (`_dequantise`: no Q8_0 re-quantisation, so
    the file's own values).

    Tensors of a block type we do not compute packed but `gguf` de-quantises (`requantisable`: the IQ1 / IQ2 /
    IQ3 types, TQ1_0 / TQ2_0, MXFP4, NVFP4) become Q8_0 blocks, re-quantised at load and cached in the folder
    `requant_cache` (None: not cached); config["_requantised"] then says which types, how many tensors, their
    bytes in the file and as Q8_0, and what the cache did ("hit", "written", "unwritable", "off").
    `progress(message)` is told when a re-quantisation starts."""
    path = Path(path)
    h = _read_header(path)
    refused = _not_kept(path, h)
    if refused:
        raise UnsupportedGGUF(refused)
    fields = h.fields

    def need(key: str) -> Any:
        v = fields.get(key)
        if v is None or v is _SKIP:
            raise CorruptGGUF(f"{path}: metadata key {key} is missing")
        return v

    n_heads = int(need("llama.attention.head_count"))
    d = int(need("llama.embedding_length"))
    size = len(h.buf)
    data = np.frombuffer(h.buf, dtype=np.uint8)
    tensors: dict[str, Any] = {}
    pending: dict[str, tuple[str, np.ndarray, int]] = {}  # re-quantised: name -> (type, raw blocks, rows)
    for name, dims, t, off in h.tensors:
        ttype = _type_name(t)
        shape = tuple(reversed(dims))  # ggml lists the fastest axis first
        n = int(np.prod(shape))
        if ttype in FLOAT_TYPES:
            nbytes = n * (4 if ttype == "F32" else 2)
        elif ttype in BLOCK_BYTES or requantisable(ttype):
            qk, bb = _block_size(ttype)
            if not shape or shape[-1] % qk:
                raise CorruptGGUF(f"{path}: tensor {name} ({ttype}) rows of {shape[-1] if shape else 0} are not "
                                  f"whole blocks of {qk}")
            nbytes = n // qk * bb
        else:
            raise UnsupportedGGUF(f"{path}: tensor {name} has block type {ttype} (kept packed: {_KEPT})")
        start = h.data_start + off
        if start + nbytes > size:
            raise CorruptGGUF(f"{path}: tensor {name} ({ttype}, {nbytes} bytes at {start}) runs past the end of "
                              f"the file ({size} bytes): truncated")
        raw = data[start:start + nbytes]
        if dequantise and len(shape) == 2:
            tensors[name] = Values(path, name, ttype, raw, shape)
        elif ttype == "F32":  # a copy: the mapped file is let go
            tensors[name] = _floats(ttype, raw, shape).copy()
        elif ttype in FLOAT_TYPES:
            tensors[name] = _floats(ttype, raw, shape)
        elif ttype in BLOCK_BYTES:
            rows = n // shape[-1]
            tensors[name] = Packed.from_blocks(ttype, raw.reshape(rows, -1))
        else:
            rows = n // shape[-1]
            pending[name] = (ttype, raw.reshape(rows, -1), rows)
    if pending:
        cfg_requant = _requantise_all(path, pending, tensors, requant_cache, progress)
    del data
    if "token_embd.weight" not in tensors:
        raise CorruptGGUF(f"{path}: tensor token_embd.weight is missing")
    vocab = int(fields.get("llama.vocab_size") or h.array_lengths.get("tokenizer.ggml.tokens")
                or _shape(tensors["token_embd.weight"])[0])
    cfg: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(fields.get("llama.attention.head_count_kv") or n_heads),
        "head_dim": int(fields.get("llama.rope.dimension_count") or d // n_heads),
        "rms_norm_eps": float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(fields.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(fields.get("llama.context_length") or 2048),
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu", "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if isinstance(fields.get(name), int):
            cfg[key] = int(fields[name])
    cfg["_has_tokenizer"] = "tokenizer.ggml.tokens" in h.array_lengths
    if pending:
        cfg["_requantised"] = cfg_requant
    return cfg, tensors


def resident_bytes(path: Path) -> tuple[int | None, int]:
    """(bytes `read_gguf` + `build_packed` will hold for the file's tensors, their number of values), from the
    header alone (well under a second, the checks `read_gguf` makes): blocks kept packed at their size,
    re-quantised types at Q8_0's, float tensors as fp32; None for the bytes where `read_gguf` would refuse
    the file (UnsupportedGGUF: it is then de-quantised). Raises CorruptGGUF for an unreadable header."""
    h = _read_header(Path(path))
    values = sum(math.prod(dims) for _, dims, _, _ in h.tensors)
    if _not_kept(Path(path), h) or _mixed_projection(h):
        return None, values
    total = 0
    for _, dims, t, _ in h.tensors:
        ttype = _type_name(t)
        n = math.prod(dims)
        if ttype in FLOAT_TYPES:
            total += 4 * n
        elif ttype in BLOCK_BYTES:
            total += n // BLOCK_VALUES[ttype] * BLOCK_BYTES[ttype]
        else:  # re-quantised
            total += n // 32 * BLOCK_BYTES[REQUANT_FORMAT]
    return total, values


def _mixed_projection(h: Any) -> bool:
    """Whether a fused projection (q | k | v, gate | up) mixes float and block tensors: `_linear` then refuses
    to keep it packed (the load de-quantises the file)."""
    kinds: dict[tuple[str, str], set[bool]] = {}
    for name, _, t, _ in h.tensors:
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _FUSED:
            kinds.setdefault((parts[1], _FUSED[parts[2]]), set()).add(_type_name(t) in FLOAT_TYPES)
    return any(len(v) > 1 for v in kinds.values())


_FUSED = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "13", "ffn_up": "13"}


def _requantise_all(path: Path, pending: dict[str, tuple[str, np.ndarray, int]], tensors: dict[str, Any],
                    requant_cache: Path | None, progress: Any) -> dict[str, Any]:
    """The pending tensors as Q8_0 `Packed` into `tensors`, from the cache or re-quantised (then cached)."""
    want = {n: (rows, _q8_row_bytes(ttype, raw)) for n, (ttype, raw, rows) in pending.items()}
    cache = requant_cache_file(path, requant_cache) if requant_cache is not None else None
    blocks = _cached_requant(cache, want)
    status = "hit" if blocks is not None else "off" if cache is None else "written"
    if blocks is None:
        types = sorted({t for t, _, _ in pending.values()})
        if progress is not None:
            progress(f"loading model: re-quantising {len(pending)} {'/'.join(types)} tensors to {REQUANT_FORMAT}"
                     + (" (once; cached)" if cache is not None else ""))
        blocks = {n: _requantise(path, n, ttype, raw, rows) for n, (ttype, raw, rows) in pending.items()}
        if cache is not None and not _save_requant(cache, blocks):
            status = "unwritable"
    kinds: dict[str, int] = {}
    nbytes = int(sum(b.nbytes for b in blocks.values()))
    for n, (ttype, _, _) in pending.items():  # one tensor's copy at a time beside the blocks (popped)
        tensors[n] = Packed.from_blocks(REQUANT_FORMAT, blocks.pop(n))
        kinds[ttype] = kinds.get(ttype, 0) + 1
    return {"types": kinds, "file_bytes": int(sum(raw.nbytes for _, raw, _ in pending.values())),
            "bytes": nbytes, "cache": status, "cache_file": str(cache) if cache is not None else ""}


def _q8_row_bytes(ttype: str, raw: np.ndarray) -> int:
    """The bytes of one row of the tensor as Q8_0 blocks (its values per row / 32 x 34)."""
    qk, bb = _block_size(ttype)
    return raw.shape[1] // bb * qk // 32 * BLOCK_BYTES[REQUANT_FORMAT]


def _shape(t: Any) -> tuple[int, int]:
    return t.shape if isinstance(t, Packed) else tuple(t.shape)


def _floats(ttype: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A float tensor's bytes (F32 / F16 / BF16) as fp32 `shape` (F32: a view of raw)."""
    if ttype == "F32":
        return raw.view(np.float32).reshape(shape)
    if ttype == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)  # BF16: an fp32's top half


class Values:
    """A matrix of the file de-quantised when asked (`read_gguf(dequantise=True)`): `array()` -> fp32
    [rows, cols], from the mapped file's bytes (nothing is read before)."""

    def __init__(self, path: Path, name: str, ttype: str, raw: np.ndarray, shape: tuple[int, ...]) -> None:
        self.path, self.name, self.ttype, self.raw, self.shape = path, name, ttype, raw, tuple(shape)

    def array(self) -> np.ndarray:
        rows = self.shape[0]
        if self.ttype in FLOAT_TYPES:
            return _floats(self.ttype, self.raw, self.shape)
        if self.ttype in BLOCK_BYTES:
            return Packed.from_blocks(self.ttype, self.raw.reshape(rows, -1)).dequant()
        return _dequantise(self.path, self.name, self.ttype, self.raw.reshape(rows, -1), rows)


def _dense(path: Path, names: list[str], parts: list[Any], dtype: torch.dtype) -> torch.Tensor:
    """The parts (fp32 arrays or `Values`) stacked along the rows into one `dtype` matrix, filled a part at a
    time."""
    widths = {_shape(p)[1] for p in parts}
    if len(widths) != 1:
        raise CorruptGGUF(f"{path}: tensors {names} have different widths {sorted(widths)}")
    w = torch.empty(sum(_shape(p)[0] for p in parts), widths.pop(), dtype=dtype)
    o = 0
    for p in parts:
        a = p.array() if isinstance(p, Values) else p
        w[o:o + a.shape[0]] = torch.from_numpy(np.ascontiguousarray(a))
        o += a.shape[0]
    return w


def _linear(path: Path, tensors: dict[str, Any], names: list[str], scratch: Scratch,
            dtype: torch.dtype = torch.float32) -> nn.Module:
    """One fused projection from the GGUF tensors `names` (stacked along the output); float ones (and
    `Values`) as one `dtype` matrix."""
    parts = []
    for n in names:
        if n not in tensors:
            raise CorruptGGUF(f"{path}: tensor {n} is missing")
        parts.append(tensors[n])
    if all(isinstance(p, (np.ndarray, Values)) for p in parts):
        w = _dense(path, names, parts, dtype)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin
    if not all(isinstance(p, Packed) for p in parts):
        raise UnsupportedGGUF(f"{path}: tensors {names} mix packed and float types")
    runs: list[list[Packed]] = []  # consecutive parts of one format stacked: one kernel call each
    for p in parts:
        if runs and runs[-1][0].fmt == p.fmt:
            runs[-1].append(p)
        else:
            runs.append([p])
    return PackedLinear([r[0] if len(r) == 1 else Packed.concat(r) for r in runs], None, scratch)


def build_packed(cfg: dict[str, Any], tensors: dict[str, Any], path: Path, blas: str = "auto",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """Our Transformer on the GGUF's own blocks (CPU; fp32 for norms and the few float tensors); matrices read
    with `read_gguf(dequantise=True)` de-quantised into `dtype`, a matrix at a time (the norms then cast too)."""
    a = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Transformer(a)
    scratch = Scratch()
    model.scratch = scratch
    emb = tensors["token_embd.weight"]
    if isinstance(emb, Packed):
        model.tok = PackedEmbedding(emb, scratch)
    else:
        model.tok = nn.Embedding.from_pretrained(_dense(path, ["token_embd.weight"], [emb], dtype), freeze=True)

    def vec(name: str) -> nn.Parameter:
        if name not in tensors or not isinstance(tensors[name], np.ndarray):
            raise CorruptGGUF(f"{path}: float tensor {name} is missing")
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(tensors[name], dtype=np.float32)),
                            requires_grad=False)

    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        layer.wqkv = _linear(path, tensors, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], scratch,
                             dtype)
        layer.wo = _linear(path, tensors, [p + "attn_output.weight"], scratch, dtype)
        layer.w13 = _linear(path, tensors, [p + "ffn_gate.weight", p + "ffn_up.weight"], scratch, dtype)
        layer.w2 = _linear(path, tensors, [p + "ffn_down.weight"], scratch, dtype)
        layer.ln1.weight = vec(p + "attn_norm.weight")
        layer.ln2.weight = vec(p + "ffn_norm.weight")
    model.norm.weight = vec("output_norm.weight")
    if not a.tie_embeddings:
        model.output = _linear(path, tensors, ["output.weight"], scratch, dtype)
    want = {"wqkv": (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, "w13": 2 * a.intermediate}
    for name, n in want.items():
        got = getattr(model.layers[0], name)
        rows = got.out_features
        if rows != n:
            raise CorruptGGUF(f"{path}: layer 0 {name} has {rows} rows, the metadata says {n}")
    model = model.eval().requires_grad_(False)
    if dtype != torch.float32:  # the norms join the matrices' dtype
        model.to(dtype=dtype)
        model._freqs = None
    return model.set_blas(blas_backend(blas, "cpu", dtype))


TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def byte_level_tokenizer_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tokenizer.json, tokenizer_config.json) contents for a GGUF whose tokenizer is byte-level BPE
    (`tokenizer.ggml.model = "gpt2"`) with the default GPT-2 split, built from the file's own arrays, as
    transformers' GGUF converter builds it (BPE on the vocabulary and merges, the ByteLevel pre-tokenizer
    and decoder, no BOS added, control tokens spelled in the byte alphabet added as special tokens and
    user-defined ones as plain added tokens). None for any other tokenizer: the caller then uses
    transformers. Reading the arrays takes a fraction of a second; importing transformers takes 5-15 s."""
    h = _Header(Path(path), keep=TOKENIZER_ARRAYS)
    f = h.fields
    tokens, merges, types = (f.get(k) for k in TOKENIZER_ARRAYS)
    pre = f.get("tokenizer.ggml.pre")
    if f.get("tokenizer.ggml.model") != "gpt2" or not isinstance(tokens, list) or not isinstance(merges, list) \
            or pre not in (None, "default", "gpt-2", "smollm"):
        return None
    types = types if isinstance(types, list) and len(types) == len(tokens) else [1] * len(tokens)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    alphabet = {chr(b) for b in bs} | {chr(256 + i) for i in range(256 - len(bs))}
    added = []
    for i, (tok, t) in enumerate(zip(tokens, types)):
        if (t == 3 and set(tok) <= alphabet) or t == 4:
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t == 3})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
    cfg: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = f.get(f"tokenizer.ggml.{key}")
        cfg[name] = tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    if isinstance(f.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = f["tokenizer.chat_template"]
    return tok_json, cfg
