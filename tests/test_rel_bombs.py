"""Item 3 of the reliability suite: image bombs through the real server.

Each crafted file (or base64 payload) is sent to the test tool `test_load`
(tests/tooling.py), which loads it through `mcp_server.media`, over HTTP to a
server subprocess. For each: the call must be an error naming the rule, the
server's peak RSS during the call (VmHWM, reset before each call) must grow
by < 200 MB over its RSS before the call, and the server must spend < 1 s of
CPU on it (CPU time, not wall time, so a busy CI machine does not flake; the
wall time is printed). A small valid PNG is the control: it must load.
A table of figures is printed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import subprocess
import time
import zlib

import numpy as np
import psutil
import pytest
from mcp import Client
from PIL import Image

from tests.reltools import proc_status, reset_peak, server_cmd, stop
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

pytestmark = pytest.mark.slow

MB = 1_000_000
RSS_LIMIT = 200 * MB
CPU_LIMIT_S = 1.0


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def ihdr(w: int, h: int, depth: int = 8, color: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))


PNG_SIG = b"\x89PNG\r\n\x1a\n"


def zeros_deflated(n: int, level: int = 9) -> bytes:
    """zlib stream of n zero bytes, built in pieces (never holds n bytes)."""
    comp = zlib.compressobj(level)
    piece = bytes(1 << 20)
    out = []
    left = n
    while left > 0:
        take = min(left, len(piece))
        out.append(comp.compress(piece[:take]))
        left -= take
    out.append(comp.flush())
    return b"".join(out)


def small_png(w: int = 32, h: int = 24, **save) -> bytes:
    arr = (np.arange(w * h * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def bombs() -> list[tuple[str, str, bytes]]:
    """(name, file name, bytes)."""
    out: list[tuple[str, str, bytes]] = []
    # 1. header claims 20 000 x 20 000 (IHDR + a tiny IDAT)
    out.append(("png header 20000x20000", "claims.png",
                PNG_SIG + ihdr(20000, 20000) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")))
    # 2. a real 100-megapixel greyscale PNG of ~100 KB (every row: filter byte + 10 000 zeros)
    out.append(("png 100 MP real (~100 KB)", "hundred_mp.png",
                PNG_SIG + ihdr(10000, 10000) + chunk(b"IDAT", zeros_deflated(10000 * 10001)) + chunk(b"IEND", b"")))
    # 3. a 10 000-frame GIF (GIF is not on the allow-list, frames or not)
    frame = b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    gif = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
           + (b"\x21\xf9\x04\x00\x01\x00\x00\x00" + frame) * 10000 + b"\x3b")
    out.append(("gif 10 000 frames", "frames.gif", gif))
    # 4. an APNG claiming 10 000 frames (PNG is allowed: the frame count must be refused)
    actl = chunk(b"acTL", struct.pack(">II", 10000, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1, 1, 0, 0, 1, 10, 0, 0))
    apng = PNG_SIG + ihdr(1, 1) + actl + fctl + chunk(b"IDAT", zlib.compress(b"\0\0")) + b"".join(
        chunk(b"fcTL", struct.pack(">IIIIIHHBB", 2 * i + 1, 1, 1, 0, 0, 1, 10, 0, 0))
        + chunk(b"fdAT", struct.pack(">I", 2 * i + 2) + zlib.compress(b"\0\0")) for i in range(200)) + chunk(b"IEND", b"")
    out.append(("apng 10 000 frames", "anim.png", apng))
    # 5-7. truncated files
    good = small_png(400, 300)
    out.append(("png truncated (half)", "trunc.png", good[: len(good) // 2]))
    jpg = small_png(400, 300, format="JPEG", quality=90)
    out.append(("jpeg truncated (half)", "trunc.jpg", jpg[: len(jpg) // 2]))
    webp = small_png(400, 300, format="WEBP", quality=80)
    out.append(("webp truncated (half)", "trunc.webp", webp[: len(webp) // 2]))
    # 8-9. wrong extension: BMP and SVG bytes under a .png name
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, format="BMP")
    out.append(("bmp named .png", "bitmap.png", bmp.getvalue()))
    out.append(("svg named .png", "vector.png",
                b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"></svg>'))
    # 10-11. zTXt / iTXt decompression bombs: 200 MB of text in ~200 KB
    bomb = zeros_deflated(200 * MB)
    base = PNG_SIG + ihdr(8, 8)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 9 * 8)) + chunk(b"IEND", b"")
    out.append(("png zTXt bomb 200 MB", "ztxt.png", base + chunk(b"zTXt", b"Comment\0\0" + bomb) + idat))
    out.append(("png iTXt bomb 200 MB", "itxt.png", base + chunk(b"iTXt", b"Comment\0\1\0\0\0" + bomb) + idat))
    # 12. a huge ICC profile: iCCP decompressing to 200 MB
    out.append(("png iCCP profile 200 MB", "icc.png", base + chunk(b"iCCP", b"icc\0\0" + bomb) + idat))
    # 13. many zTXt chunks of 1 MB each (each under Pillow's per-chunk cap; 400 MB in all)
    one = zeros_deflated(1_000_000)
    many = b"".join(chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + one) for i in range(400))
    out.append(("png 400 x 1 MB zTXt", "manytxt.png", base + many + idat))
    # 14. a JPEG whose SOF claims 65 000 x 65 000
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65000, 65000, 1) + b"\x01\x11\x00"
    i = jpg.index(b"\xff\xc0")
    seg_len = struct.unpack(">H", jpg[i + 2:i + 4])[0]
    out.append(("jpeg SOF claims 65000x65000", "huge.jpg", jpg[:i] + sof + jpg[i + 2 + seg_len:]))
    # 15. a WEBP animation (VP8X animation flag, ANIM + 2 ANMF frames)
    out.append(("webp animation", "anim.webp", webp_animation()))
    # 16. a WEBP whose VP8X canvas claims 16 384 x 16 384
    out.append(("webp canvas claims 16384x16384", "canvas.webp", webp_vp8x(16384, 16384, flags=0, body=b"")))
    return out


def webp_vp8x(w: int, h: int, flags: int, body: bytes) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (
        h - 1).to_bytes(3, "little")
    payload = b"WEBP" + vp8x + body
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def webp_animation() -> bytes:
    frame = small_png(16, 16, format="WEBP", lossless=True)
    vp8l = frame[12:]  # the VP8L chunk of a simple lossless WEBP
    anim = b"ANIM" + struct.pack("<I", 6) + b"\0\0\0\0" + b"\0\0"

    def anmf() -> bytes:
        head = (0).to_bytes(3, "little") * 2 + (15).to_bytes(3, "little") * 2 + (100).to_bytes(3, "little") + b"\0"
        data = head + vp8l
        pad = b"\0" if len(data) % 2 else b""
        return b"ANMF" + struct.pack("<I", len(data)) + data + pad

    return webp_vp8x(16, 16, flags=0x02, body=anim + anmf() + anmf())


async def _call(url: str, image: str):
    async with Client(url) as c:
        return await c.call_tool("test_load", {"image": image})


def test_image_bombs_rejected_fast_and_small(tmp_path):
    env = server_env(tmp_path)
    data = tmp_path / "data"
    cases = bombs()
    for _, fname, blob in cases:
        (data / fname).write_bytes(blob)
    (data / "control.png").write_bytes(small_png(64, 48))
    port = free_port()
    proc = Popen(server_cmd("http", port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/mcp"
    ps = psutil.Process(proc.pid)
    rows = []
    problems = []
    try:
        wait_port(port, proc)
        r = asyncio.run(_call(url, "control.png"))  # warm up the whole path once; also the control
        assert not r.is_error and r.structured_content["shape"] == [48, 64, 3], r.content[0].text
        inputs = [(name, fname) for name, fname, _ in cases]
        inputs.append(("png 20000x20000 as base64 data URI", "data:image/png;base64,"
                       + base64.b64encode(cases[0][2]).decode()))
        inputs.append(("png zTXt bomb as base64 data URI", "data:image/png;base64,"
                       + base64.b64encode(next(b for n, _, b in cases if 'zTXt bomb' in n)).decode()))
        for name, ref in inputs:
            reset_peak(proc.pid)
            rss0 = ps.memory_info().rss
            cpu0 = sum(ps.cpu_times()[:2])
            t0 = time.perf_counter()
            res = asyncio.run(_call(url, ref))
            wall = time.perf_counter() - t0
            cpu = sum(ps.cpu_times()[:2]) - cpu0
            growth = proc_status(proc.pid)["VmHWM"] - rss0
            text = res.content[0].text if res.content else ""
            rows.append((name, len(ref) if ref.startswith("data:") else (data / ref).stat().st_size, res.is_error,
                         wall, cpu, growth, text))
            if not res.is_error:
                problems.append(f"{name}: accepted ({text[:100]})")
            elif not text.startswith("image="):
                problems.append(f"{name}: the error does not name the argument: {text[:160]}")
            if growth >= RSS_LIMIT:
                problems.append(f"{name}: peak RSS grew {growth / MB:.0f} MB")
            if cpu >= CPU_LIMIT_S:
                problems.append(f"{name}: {cpu:.2f} s of server CPU")
            if wall >= 10:
                problems.append(f"{name}: {wall:.1f} s wall (hang?)")
            assert proc.poll() is None, f"server died on {name}"
        r = asyncio.run(_call(url, "control.png"))
        assert not r.is_error, "the server no longer loads a valid image after the bombs"
    finally:
        stop(proc)
    print(f"\n[rel-bombs] {len(rows)} hostile inputs; limits: < {RSS_LIMIT // MB} MB peak RSS growth, "
          f"< {CPU_LIMIT_S:.0f} s server CPU")
    print(f"{'input':38} {'bytes':>10} {'rejected':>8} {'wall ms':>8} {'cpu ms':>7} {'peak +MB':>8}  reason")
    for name, size, err, wall, cpu, growth, text in rows:
        print(f"{name:38} {size:>10} {str(err):>8} {wall * 1000:>8.0f} {cpu * 1000:>7.0f} {growth / MB:>8.1f}  "
              f"{text[:90]}")
    print(f"[rel-bombs] rejected {sum(r[2] for r in rows)}/{len(rows)}, max wall {max(r[3] for r in rows) * 1000:.0f} ms,"
          f" max cpu {max(r[4] for r in rows) * 1000:.0f} ms, max peak growth {max(r[5] for r in rows) / MB:.1f} MB")
    assert len(rows) >= 10
    assert not problems, "\n".join(problems)


def truncated_25mp_png() -> bytes:
    """A 128-byte PNG claiming 5000 x 5000 greyscale whose zlib stream ends (cleanly) after 10 rows."""
    return PNG_SIG + ihdr(5000, 5000) + chunk(b"IDAT", zlib.compress(b"\0" * 5001 * 10)) + chunk(b"IEND", b"")


def test_png_with_truncated_pixel_data_is_rejected(tmp_path):
    """Regression (found by this suite): Pillow fills the missing rows of a PNG whose IDAT zlib stream
    ends early with zeros and raises nothing, so `media.decode` accepted a 128-byte file as a 25 MP
    image (250 MB peak RSS in the server). A truncated file must be refused before pixels are decoded."""
    from mcp_server.media import MediaStore
    from mcp_server.sandbox import Sandbox
    from mcp_server.config import LimitsSection
    from tools.base import ToolError

    store = MediaStore(Sandbox([tmp_path], tmp_path / "out"), LimitsSection())
    full = PNG_SIG + ihdr(300, 200) + chunk(b"IDAT", zlib.compress(b"\0" * 301 * 200)) + chunk(b"IEND", b"")
    assert store.decode(full, "image").shape == (200, 300, 3)  # the complete twin decodes
    with pytest.raises(ToolError) as exc:
        store.decode(truncated_25mp_png(), "image")
    print(f"\n[rel-bombs] truncated 25 MP PNG -> {exc.value}")
    assert str(exc.value).startswith("image=")
