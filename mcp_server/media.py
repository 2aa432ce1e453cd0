"""Media delivery: one module every image tool goes through.

Inputs (`load_image`): a path inside the read roots, an `image://ID` URI of an
image this server produced, or base64 data (a `data:image/...;base64,` URI, or
bare base64 of at least 512 characters). Decoding is defensive: the byte size
is checked before anything is opened, the format must be PNG, JPEG or WEBP
(checked on the magic bytes, then Pillow is told to accept only those), the
pixel count is checked from the header before pixels are decoded, images must
be single-frame, and Pillow's decompression-bomb warnings are errors.

Outputs (`deliver`): each image is saved as PNG (with text chunks for its
metadata) into the output directory atomically and registered as
`image://ID`; the client gets (a) a thumbnail `ImageContent` at most 512 px on
the long side and 100 000 base64 characters, (b) a `resource_link` to
`image://ID` and (c) the saved file path. Full resolution goes inline only when
asked.

Ownership (`mcp_server.clients`): each record is owned by the client whose
call produced it. Listing, `image://` reads and inputs (by URI, and by a path
that resolves into the output directory) answer only the owner; anyone else
gets the error a nonexistent image or file gets. Images found on disk from an
earlier run have no owner: the local (stdio) client sees them, HTTP clients
do not.

Shared index (issue 15, `state.backend = "redis"`): `shared` is the Redis
image index (mcp_server/state_redis.py). Every image saved is also recorded
there (id, path, size, owner), and an id this process does not know (or knows
only from a disk scan, without its owner) is looked up there, so a link made
by one replica reads on another. The output folder must be storage every
replica mounts at the same path (docs/scaling.md). Ids the retention deletes
are removed from the index and read "expired" everywhere.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import secrets
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mcp_types import ImageContent, ResourceLink, TextContent
from PIL import Image, PngImagePlugin

from tools.base import ImageOut, ToolError

from .clients import LOCAL, can_see
from .sandbox import Sandbox

SOFTWARE = "atelier-mcp"
_SOFTWARE_CHUNK = b"tEXtSoftware\x00" + SOFTWARE.encode()
RETENTION_GRACE_S = 300.0
EXPIRED = ("expired: the output retention deleted it (limits.output_max_bytes / limits.output_max_age_s); "
           "run the call again to make it anew")
THUMB_SIDE = 512
THUMB_MAX_B64 = 100_000
_B64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _looks_b64(ref: str) -> bool:
    """An image reference that carries base64 data (a data: URI, or bare base64 of >= 512 characters)."""
    return ref.startswith("data:") or (len(ref) >= 512 and "\x00" not in ref and bool(_B64_RE.match(ref[:4096]))
                                       and not ref.startswith("/"))


def png_data_short(data: bytes) -> bool:
    """True when a (non-interlaced) PNG's IDAT stream inflates to less than its header implies.

    Pillow fills missing rows with zeros instead of failing, so a tiny file can
    claim a huge image and be "decoded". Inflates at most 1 MiB per step and
    stops as soon as enough data is seen.
    """
    pos, need, got = 8, None, 0
    d = zlib.decompressobj()
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR" and len(body) >= 13:
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            if interlace:
                return False  # Adam7: left to Pillow
            channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 1)
            need = h * (1 + (w * channels * depth + 7) // 8)
        elif kind == b"IDAT" and need is not None:
            while body and got < need and not d.eof:
                got += len(d.decompress(body, 1 << 20))
                body = d.unconsumed_tail
            if got >= need:
                return False
        elif kind == b"IEND":
            break
    return need is not None and got < need


def sniff_format(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass
class ImageRecord:
    id: str
    path: Path
    width: int
    height: int
    name: str
    created: float
    mime_type: str = "image/png"
    owner: str | None = None  # the client that made it; None = found on disk from an earlier run
    size: int = 0  # bytes on disk
    ours: bool = True  # written by this server (tagged Software=atelier-mcp): the retention may delete it
    used: float = 0.0  # last read through image:// (a link in use is not deleted)

    @property
    def uri(self) -> str:
        return f"image://{self.id}"


def configure_pillow(max_pixels: int) -> None:
    """Pillow's decompression-bomb limit, set once when the server's media store is built (never per call:
    `decode` runs on several pool threads at once). Pillow refuses headers over twice the limit by itself;
    its warning between one and two times the limit is silenced because `decode` refuses those images with
    its own message. Truncated images stay refused (`LOAD_TRUNCATED_IMAGES` is left False)."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class MediaStore:
    def __init__(self, sandbox: Sandbox, limits: Any) -> None:
        self.sandbox = sandbox
        self.limits = limits
        configure_pillow(limits.max_image_pixels)
        self._records: dict[str, ImageRecord] = {}
        self._expired: dict[str, float] = {}  # id -> when the retention deleted it
        self.deleted = 0
        self._lock = threading.Lock()
        self.shared: Any = None  # issue 15: the Redis image index (RedisImageIndex), set by make_state
        self._scan_existing()
        self.enforce_retention()

    # -- registry -----------------------------------------------------------
    def _scan_existing(self) -> None:
        for p in sorted(self.sandbox.output_dir.glob("*.png")):
            m = re.search(r"-([0-9a-f]{12})\.png$", p.name)
            if not m or p.is_symlink():
                continue
            try:
                st = p.stat()
                with open(p, "rb") as f:
                    ours = _SOFTWARE_CHUNK in f.read(65536)
            except OSError:
                continue
            self._records[m.group(1)] = ImageRecord(m.group(1), p, 0, 0, p.stem, st.st_mtime, size=st.st_size,
                                                    ours=ours)

    # -- retention ----------------------------------------------------------
    def enforce_retention(self, now: float | None = None) -> list[str]:
        """Delete the oldest outputs this server wrote while the folder's outputs are over
        `limits.output_max_bytes`, and those older than `limits.output_max_age_s` (0 = no such rule).
        Never a file the server did not write (PNG without its Software tag, or another name), never an
        image written or read through its link in the last RETENTION_GRACE_S seconds. A deleted image's
        link answers "expired". Returns the ids deleted."""
        max_bytes = int(getattr(self.limits, "output_max_bytes", 0) or 0)
        max_age = float(getattr(self.limits, "output_max_age_s", 0) or 0)
        if not max_bytes and not max_age:
            return []
        now = time.time() if now is None else now
        gone: list[ImageRecord] = []
        with self._lock:
            ours = sorted((r for r in self._records.values() if r.ours), key=lambda r: r.created)
            total = sum(r.size for r in ours)
            for r in ours:
                if now - max(r.created, r.used) < RETENTION_GRACE_S:
                    continue
                if (max_age and now - r.created > max_age) or (max_bytes and total > max_bytes):
                    gone.append(r)
                    total -= r.size
                    del self._records[r.id]
                    self._expired[r.id] = now
            while len(self._expired) > 100_000:
                self._expired.pop(next(iter(self._expired)))
        if gone and self.shared is not None:  # issue 15
            try:
                self.shared.forget([r.id for r in gone], now)
            except ToolError:  # Redis unreachable: the links stay listed there until their files are found gone
                pass
        for r in gone:
            try:
                os.unlink(r.path)
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError:  # keep serving; the file stays (and is no longer counted)
                pass
        return [r.id for r in gone]

    def expired(self, image_id: str) -> float | None:
        """When the retention deleted this image (None: it was not deleted by the retention)."""
        local = self._expired.get(image_id)
        if local is None and self.shared is not None:  # issue 15: deleted by another replica's retention
            return self.shared.expired(image_id)
        return local

    def usage(self) -> dict[str, Any]:
        """The output folder as engine_status shows it."""
        with self._lock:
            ours = [r for r in self._records.values() if r.ours]
        return {"dir": str(self.sandbox.output_dir), "files": len(ours), "bytes": sum(r.size for r in ours),
                "max_bytes": int(getattr(self.limits, "output_max_bytes", 0) or 0),
                "max_age_s": float(getattr(self.limits, "output_max_age_s", 0) or 0),
                "deleted_by_retention": self.deleted}

    def records(self, caller: str = LOCAL) -> list[ImageRecord]:
        """The records `caller` may see, oldest first."""
        with self._lock:
            mine = {r.id: r for r in self._records.values() if can_see(r.owner, caller)}
        if self.shared is not None:  # issue 15: every replica's images (the newest 1000)
            for r in self.shared.records():
                if can_see(r.owner, caller) and (r.id not in mine or mine[r.id].owner is None):
                    mine[r.id] = r
        return sorted(mine.values(), key=lambda r: r.created)

    def get(self, image_id: str, caller: str = LOCAL) -> ImageRecord | None:
        if not _ID_RE.match(image_id or ""):
            return None
        with self._lock:
            rec = self._records.get(image_id)
        if self.shared is not None and (rec is None or rec.owner is None):  # issue 15: made by another replica
            other = self.shared.get(image_id)
            if other is not None:
                rec = other
                with self._lock:
                    self._records[image_id] = rec
        if rec is None or not can_see(rec.owner, caller) or not rec.path.is_file() or rec.path.is_symlink():
            return None
        return rec

    def _check_output_path(self, real: Path, ref: str, argument: str, caller: str) -> None:
        """A path into the output directory reads only an image `caller` owns (else: as if absent)."""
        if caller == LOCAL or not Sandbox._inside(str(real), self.sandbox.output_dir):
            return
        m = re.search(r"-([0-9a-f]{12})\.png$", real.name)
        rec = self.get(m.group(1), caller) if m else None
        if rec is None or Path(os.path.realpath(rec.path)) != Path(real):
            raise ToolError.invalid(argument, ref, "no such file inside the read roots")

    def read_bytes(self, image_id: str, caller: str = LOCAL) -> bytes:
        rec = self.get(image_id, caller)
        if rec is None:
            if self.expired(image_id) is not None:
                raise ToolError.invalid("uri", f"image://{image_id}", EXPIRED)
            raise ToolError.invalid("uri", f"image://{image_id}", "no image with that id was produced by this server")
        rec.used = time.time()
        _, data = self.sandbox.read_bytes(str(rec.path), "uri", self.limits.max_image_bytes)
        return data

    # -- inputs -------------------------------------------------------------
    def _decode_b64(self, text: str, argument: str) -> bytes:
        if len(text) > self.limits.max_base64_chars:
            raise ToolError.invalid(argument, text[:40], f"base64 data is {len(text)} characters; "
                                    f"the limit is {self.limits.max_base64_chars}")
        payload = text
        if text.startswith("data:"):
            head, sep, payload = text.partition(",")
            if not sep or ";base64" not in head:
                raise ToolError.invalid(argument, text[:40], "a data: URI must be base64 encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ToolError.invalid(argument, text[:40], "is not valid base64") from None

    def fetch_bytes(self, ref: str, argument: str, caller: str = LOCAL) -> bytes:
        """The raw bytes an image reference points at (path, image:// or base64)."""
        if not isinstance(ref, str) or not ref:
            raise ToolError.invalid(argument, ref, "expected an image path, an image://ID URI or base64 data")
        if ref.startswith("image://"):
            return self.read_bytes_for(ref[len("image://"):], argument, caller)
        if _looks_b64(ref):
            return self._decode_b64(ref, argument)
        if caller != LOCAL:
            self._check_output_path(self.sandbox.resolve_input(ref, argument), ref, argument, caller)
        real, data = self.sandbox.read_bytes(ref, argument, self.limits.max_image_bytes)
        if caller != LOCAL:
            self._check_output_path(real, ref, argument, caller)
        return data

    def read_bytes_for(self, image_id: str, argument: str, caller: str = LOCAL) -> bytes:
        rec = self.get(image_id, caller)
        if rec is None:
            if self.expired(image_id) is not None:
                raise ToolError.invalid(argument, f"image://{image_id}", EXPIRED)
            raise ToolError.invalid(argument, f"image://{image_id}", "no image with that id was produced by this server")
        rec.used = time.time()
        _, data = self.sandbox.read_bytes(str(rec.path), argument, self.limits.max_image_bytes)
        return data

    def decode(self, data: bytes, argument: str, mode: str = "keep", shown: str | None = None) -> np.ndarray:
        """`shown`: how errors name the input (its path or image:// URI); base64 data is named by its size."""
        label = shown if shown else f"<{len(data)} bytes>"
        if len(data) > self.limits.max_image_bytes:
            raise ToolError.invalid(argument, label, f"image is over the limit of "
                                    f"{self.limits.max_image_bytes} bytes")
        fmt = sniff_format(data[:16])
        if fmt is None:
            raise ToolError.invalid(argument, label,
                                    "unsupported image format; accepted: PNG, JPEG, WEBP")
        max_px = int(self.limits.max_image_pixels)
        # no process state is touched here (pool threads decode concurrently): Pillow's own limit was set
        # once when the store was built (`configure_pillow`); the size check below is ours, made on the
        # header before any pixel is decoded
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > max_px:
                raise ToolError.invalid(argument, f"{w}x{h}", f"image has {w * h} pixels; the limit is {max_px}")
            if getattr(img, "n_frames", 1) != 1:
                raise ToolError.invalid(argument, f"{img.n_frames} frames",
                                        "animated images are not accepted; send a single frame")
            if fmt == "PNG":
                try:
                    short = png_data_short(data)
                except (zlib.error, struct.error) as exc:
                    raise ToolError.invalid(argument, label,
                                            f"cannot decode image: {exc}") from None
                if short:
                    raise ToolError.invalid(argument, label,
                                            "cannot decode image: the PNG pixel data is truncated")
            img.load()
        except ToolError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ToolError.invalid(argument, label,
                                    f"rejected as a decompression bomb: over the pixel limit of {max_px} "
                                    f"({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as exc:
            raise ToolError.invalid(argument, label, f"cannot decode image: {exc}") from None
        return to_array(img, mode, argument)

    def load_image(self, ref: str, argument: str, mode: str = "keep", caller: str = LOCAL) -> np.ndarray:
        data = self.fetch_bytes(ref, argument, caller)
        return self.decode(data, argument, mode, None if _looks_b64(ref) else ref)

    # -- outputs ------------------------------------------------------------
    def save(self, out: ImageOut, owner: str = LOCAL) -> ImageRecord:
        arr = np.ascontiguousarray(out.array)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"ImageOut {out.name!r}: expected uint8 [H,W], [H,W,3] or [H,W,4], got {arr.dtype} {arr.shape}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(arr)
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)  # marks the file as ours: only such files are ever deleted
        for k, v in out.metadata.items():
            if str(k) != "Software":
                info.add_text(str(k)[:79], str(v))
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=info, compress_level=3)
        image_id = secrets.token_hex(6)
        path = self.sandbox.fresh_output_path(out.name, f"-{image_id}.png")
        # fresh_output_path adds its own random token; keep the id last for lookups after restart
        data = buf.getvalue()
        self.sandbox.write_atomic(path, data)
        rec = ImageRecord(image_id, path, img.width, img.height, out.name, time.time(), owner=owner, size=len(data))
        with self._lock:
            self._records[image_id] = rec
        if self.shared is not None:  # issue 15: the link reads on every replica
            self.shared.put(rec, float(getattr(self.limits, "output_max_age_s", 0) or 0))
        self.enforce_retention()
        return rec

    def deliver(self, out: ImageOut, inline_full: bool = False,
                owner: str = LOCAL) -> tuple[list[Any], dict[str, Any]]:
        """Save an output image (owned by `owner`); return MCP content blocks and a structured summary."""
        rec = self.save(out, owner)
        blocks: list[Any] = []
        full_b64 = None
        if inline_full:
            raw = rec.path.read_bytes()
            if (len(raw) + 2) // 3 * 4 <= self.limits.max_base64_chars:
                full_b64 = base64.b64encode(raw).decode()
        if full_b64 is not None:
            blocks.append(ImageContent(type="image", data=full_b64, mime_type="image/png"))
        else:  # a thumbnail (also when the full image is over limits.max_base64_chars: use the link)
            data, mime = thumbnail(out.array)
            blocks.append(ImageContent(type="image", data=data, mime_type=mime))
        blocks.append(ResourceLink(type="resource_link", uri=rec.uri, name=rec.path.name, mime_type="image/png",
                                   size=rec.path.stat().st_size,
                                   description=f"{out.name}: {rec.width}x{rec.height} PNG (full resolution)"))
        blocks.append(TextContent(type="text", text=f"{out.name}: saved {rec.width}x{rec.height} to {rec.path} ({rec.uri})"))
        summary = {"name": out.name, "uri": rec.uri, "path": str(rec.path), "width": rec.width, "height": rec.height}
        return blocks, summary


def to_array(img: Image.Image, mode: str, argument: str) -> np.ndarray:
    """Pillow image -> uint8 array in the requested mode ("keep" = RGB or RGBA)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F", "CMYK;16"):
        raise ToolError.invalid(argument, img.mode, "unsupported image mode; use 8-bit RGB, RGBA, L or P images")
    if mode == "keep":
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        target = "RGBA" if has_alpha else "RGB"
    elif mode in ("RGB", "RGBA", "L"):
        target = mode
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if img.mode != target:
        img = img.convert(target)
    return np.asarray(img).copy()


def thumbnail(arr: np.ndarray) -> tuple[str, str]:
    """A base64 thumbnail <= THUMB_SIDE px and <= THUMB_MAX_B64 characters: (data, mime)."""
    img = Image.fromarray(np.ascontiguousarray(arr))
    side = THUMB_SIDE
    while True:
        t = img.copy()
        t.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        t.save(buf, format="PNG", optimize=True)
        data = base64.b64encode(buf.getvalue()).decode()
        if len(data) <= THUMB_MAX_B64:
            return data, "image/png"
        flat = t.convert("RGBA")
        bg = Image.new("RGBA", flat.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, flat).convert("RGB")
        for q in (85, 70, 55, 40):
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=q)
            data = base64.b64encode(buf.getvalue()).decode()
            if len(data) <= THUMB_MAX_B64:
                return data, "image/jpeg"
        side = int(side * 0.75)
