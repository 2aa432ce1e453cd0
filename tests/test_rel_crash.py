"""Item 6 of the reliability suite (image-write part): `kill -9` while writing images.

20 trials: a stdio server subprocess is asked for a stream of large noise
images (`rel_noise_image`, saved through `mcp_server.media` → the sandbox's
atomic write), and is killed with SIGKILL after a random delay (seeded). The
next trial's start is the restart. Checked:
- right after each restart (before any call) no `.atelier-tmp-*` file is left:
  the start-up sweep removed what the kill left;
- after the last restart every final-named PNG is complete, checked against
  the PNG spec with zlib (every chunk's CRC, IEND present, the IDAT stream
  inflates to exactly height x (1 + 3 x width) bytes), not just by Pillow;
- the restarted server lists every final image as an `image://` resource.
Figures: trials, kills that landed while a temp file existed, images kept,
temp files swept, failures.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.reltools import StdioPeer, server_cmd, stop
from tests.helpers import server_env

pytestmark = pytest.mark.slow

TRIALS = 20
SEED = 20261123
TEMP_PREFIX = ".atelier-tmp-"
FINAL_RE = re.compile(r"-[0-9a-f]{12}\.png$")


def png_complete(data: bytes) -> str | None:
    """None when `data` is a complete 8-bit RGB/RGBA/L non-interlaced PNG, else what is wrong."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "no PNG signature"
    pos, idat, size, seen_end = 8, [], None, False
    while pos < len(data):
        if pos + 8 > len(data):
            return "truncated chunk header"
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        crc = data[pos + 8 + n:pos + 12 + n]
        if len(body) != n or len(crc) != 4:
            return f"truncated {kind!r} chunk"
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            return f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
            if depth != 8 or channels is None or interlace:
                return f"unexpected IHDR {w}x{h} depth={depth} color={color} interlace={interlace}"
            size = h * (1 + channels * w)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            seen_end = True
            break
        pos += 12 + n
    if not seen_end:
        return "no IEND chunk"
    if size is None:
        return "no IHDR chunk"
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        return f"IDAT does not inflate: {exc}"
    if len(raw) != size:
        return f"IDAT inflates to {len(raw)} bytes, expected {size}"
    return None


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(f"{TEMP_PREFIX}*")) if out.exists() else []


def test_kill9_during_image_writes_leaves_no_partial_file(tmp_path):
    rng = random.Random(SEED)
    env = server_env(tmp_path)
    out = tmp_path / "out"
    figures = {"trials": 0, "kills_with_temp_file": 0, "temp_files_left_by_kills": 0, "temp_left_after_restart": 0,
               "images_answered": 0, "seed": SEED}
    failures: list[str] = []
    delays = []
    peer = None
    try:
        for trial in range(TRIALS + 1):
            peer = StdioPeer(server_cmd("stdio"), env, tmp_path)
            assert peer.initialize() is not None, bytes(peer.stderr)[-2000:].decode("utf-8", "replace")
            left = _temp_files(out)
            if left:
                figures["temp_left_after_restart"] += len(left)
                failures.append(f"restart {trial}: temp files not swept: {[p.name for p in left]}")
            if trial == TRIALS:
                break  # the last start is only the final restart
            figures["trials"] += 1
            for i in range(12):
                peer.send({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {
                    "name": "rel_noise_image", "arguments": {"side": 768, "count": 2, "seed": trial * 100 + i}}})
            delay = rng.uniform(0.05, 0.8)
            delays.append(delay)
            time.sleep(delay)
            # watch for a moment a temp file exists, up to the delay's end, then kill at once
            deadline = time.monotonic() + rng.uniform(0.0, 0.3)
            while time.monotonic() < deadline and not _temp_files(out):
                time.sleep(0.002)
            os.kill(peer.proc.pid, signal.SIGKILL)
            peer.proc.wait(10)
            figures["images_answered"] += sum(1 for k in peer.answers if k not in ("0",))
            left = _temp_files(out)
            if left:
                figures["kills_with_temp_file"] += 1
                figures["temp_files_left_by_kills"] += len(left)
        # the final restart: every final-named PNG is whole and listed as a resource
        finals = sorted(p for p in out.glob("*.png") if FINAL_RE.search(p.name))
        for p in finals:
            why = png_complete(p.read_bytes())
            if why:
                failures.append(f"{p.name}: {why}")
        odd = [p.name for p in out.iterdir() if not FINAL_RE.search(p.name)]
        if odd:
            failures.append(f"unexpected files in the output dir: {odd[:5]}")
        ans = peer.request("res", "resources/list", {}, timeout=30)
        listed = {r["uri"] for r in ans["result"]["resources"]} if ans and "result" in ans else set()
        expected = {"image://" + FINAL_RE.search(p.name).group(0)[1:13] for p in finals}
        if expected - listed:
            failures.append(f"{len(expected - listed)} final images are not listed after the restart")
        figures["final_pngs_checked"] = len(finals)
        figures["failures"] = len(failures)
        figures["delay_s_min_max"] = [round(min(delays), 3), round(max(delays), 3)]
        print(f"\n[rel-crash] {json.dumps(figures)}")
        assert not failures, "\n".join(failures[:20])
        assert figures["trials"] >= 20 and len(finals) > 0
    finally:
        if peer is not None:
            stop(peer.proc)
