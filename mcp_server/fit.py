"""Every result fits every client: one place measures a tool result before it is sent.

Claude Desktop rejects a tool result over 1,048,576 characters and Claude Code
an image over 8000 px on a side. `fit_result` keeps a `CallToolResult` within
`max_chars` characters of JSON (as the client receives it, non-ASCII escaped,
so the count is an upper bound) and every inline image within `max_side`
pixels, in this order:

1. an inline image with a side over `max_side` is downscaled to fit;
2. if the whole result is still over `max_chars`, the inline images share
   what the rest leaves: each is downscaled (PNG, then JPEG for photographs)
   until it fits its share, or dropped when no useful size fits; a text block
   says so and names the full-resolution `image://` link and path, which the
   result already carries (media delivery adds them);
3. then the longest text blocks are cut, with a note of how much;
4. a result whose structured content alone is over the limit becomes an
   error that says how large it was and to ask for less (structured content
   must match the tool's output schema, so it is never cut).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from mcp_types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image

DEFAULT_MAX_CHARS = 1_000_000  # Claude Desktop's 1,048,576, less room for the JSON-RPC envelope
DEFAULT_MAX_SIDE = 8000  # Claude Code refuses larger images
_MIN_IMAGE_CHARS = 2_000  # below this an inline image says nothing useful: drop it instead
_NOTE_ROOM = 600  # characters kept free for the notes this module adds


def result_chars(result: CallToolResult) -> int:
    """Characters of the result's JSON as sent (non-ASCII escaped: an upper bound)."""
    return len(json.dumps(result.model_dump(by_alias=True, mode="json", exclude_none=True)))


def _decode(block: ImageContent) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(base64.b64decode(block.data, validate=True)))
        img.load()
        return img
    except (binascii.Error, ValueError, OSError):
        return None


def _encode(img: Image.Image, max_chars: int | None) -> tuple[str, str] | None:
    """PNG, else JPEG at falling quality; None when neither fits `max_chars` (None = any size)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=max_chars is not None)
    data = base64.b64encode(buf.getvalue()).decode()
    if max_chars is None or len(data) <= max_chars:
        return data, "image/png"
    flat = img.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", flat.size, (255, 255, 255, 255)), flat).convert("RGB")
    for q in (88, 75, 60):
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=q)
        data = base64.b64encode(buf.getvalue()).decode()
        if len(data) <= max_chars:
            return data, "image/jpeg"
    return None


def _scaled(img: Image.Image, side: int) -> Image.Image:
    t = img.copy()
    t.thumbnail((side, side), Image.Resampling.LANCZOS)
    return t


def _shrink(img: Image.Image, max_chars: int, max_side: int) -> tuple[str, str, Image.Image] | None:
    side = min(max(img.size), max_side)
    while side >= 16:
        t = _scaled(img, side) if side < max(img.size) else img
        enc = _encode(t, max_chars)
        if enc is not None:
            return enc[0], enc[1], t
        side = int(side * 0.7)
    return None


def _link_for(content: list[Any], index: int) -> str:
    """The full-resolution link and path that media delivery put after inline image `index`, in words."""
    uri = next((b.uri for b in content[index + 1:] if isinstance(b, ResourceLink)), None)
    path = next((b.text.split(" to ", 1)[1].split(" (", 1)[0] for b in content[index + 1:]
                 if isinstance(b, TextContent) and ": saved " in b.text and " to " in b.text), None)
    where = " and ".join(x for x in (str(uri) if uri else None, path) if x)
    return f"; full resolution: {where}" if where else ""


def fit_result(result: CallToolResult, max_chars: int = DEFAULT_MAX_CHARS,
               max_side: int = DEFAULT_MAX_SIDE) -> CallToolResult:
    """`result` within `max_chars` characters and `max_side` px per inline image (see the module docstring)."""
    content = list(result.content)
    notes: list[str] = []
    images = [i for i, b in enumerate(content) if isinstance(b, ImageContent)]
    decoded: dict[int, Image.Image] = {}
    for i in images:  # 1. sides
        img = _decode(content[i])
        if img is None:
            continue
        decoded[i] = img
        if max(img.size) > max_side:
            t = _scaled(img, max_side)
            data, mime = _encode(t, None)  # type: ignore[misc]
            content[i] = ImageContent(type="image", data=data, mime_type=mime)
            decoded[i] = t
            notes.append(f"inline image downscaled from {img.size[0]}x{img.size[1]} to {t.size[0]}x{t.size[1]} "
                         f"(clients refuse images over {max_side} px){_link_for(content, i)}")
    out = result.model_copy(update={"content": content})
    if result_chars(out) + (_NOTE_ROOM if notes else 0) <= max_chars:
        return _with_notes(out, notes)
    # 2. images share what the rest leaves
    inline = [i for i in images if i in decoded]
    rest = result_chars(out) - sum(len(content[i].data) for i in inline)
    share = (max_chars - rest - _NOTE_ROOM * (len(inline) + 1)) // max(1, len(inline))
    for i in inline:
        img = decoded[i]
        before = len(content[i].data)
        got = _shrink(img, share, max_side) if share >= _MIN_IMAGE_CHARS else None
        if got is None:
            content[i] = TextContent(type="text", text=f"(inline image of {img.size[0]}x{img.size[1]} left out: "
                                                        f"the result must stay under {max_chars} characters"
                                                        f"{_link_for(content, i)})")
            continue
        data, mime, t = got
        content[i] = ImageContent(type="image", data=data, mime_type=mime)
        notes.append(f"inline image downscaled from {img.size[0]}x{img.size[1]} to {t.size[0]}x{t.size[1]} "
                     f"({before} -> {len(data)} base64 characters) to keep the result under {max_chars} "
                     f"characters{_link_for(content, i)}")
    out = result.model_copy(update={"content": content})
    over = result_chars(out) + _NOTE_ROOM - max_chars
    # 3. the longest text blocks are cut
    while over > 0:
        texts = [i for i, b in enumerate(content) if isinstance(b, TextContent) and len(b.text) > 200]
        if not texts:
            break
        i = max(texts, key=lambda j: len(content[j].text))
        text = content[i].text
        keep = max(100, len(text) - over - 120)
        cut = len(text) - keep
        content[i] = TextContent(type="text", text=text[:keep] + f"\n[... {cut} characters cut: the result must "
                                                                 f"stay under {max_chars} characters]")
        out = result.model_copy(update={"content": content})
        over = result_chars(out) + _NOTE_ROOM - max_chars
    if over > 0:  # 4. structured content alone is too large
        size = result_chars(result)
        return CallToolResult(content=[TextContent(type="text", text=(
            f"the result is {size} characters; clients accept at most {max_chars} "
            f"(limits.max_result_chars): ask for less (fewer items, a smaller k, shorter text)"))], is_error=True)
    return _with_notes(out, notes)


def _with_notes(result: CallToolResult, notes: list[str]) -> CallToolResult:
    if not notes:
        return result
    return result.model_copy(update={"content": [*result.content, TextContent(type="text", text="; ".join(notes))]})
