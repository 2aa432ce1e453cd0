"""The sandbox: path-escape vectors (all refused), atomic writes, temp sweeping,
and safe image decoding (formats, bombs, frames, truncation)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mcp_server.config import LimitsSection
from mcp_server.media import MediaStore, thumbnail
from mcp_server.sandbox import TEMP_PREFIX, Sandbox
from tools.base import ImageOut, ToolError


@pytest.fixture()
def box(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(_png(8, 8))
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").write_bytes(_png(4, 4))
    evil = tmp_path / "data-evil"  # sibling with the root as a prefix
    evil.mkdir()
    (evil / "x.png").write_bytes(_png(2, 2))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(3, 3))
    (outside / "secret.txt").write_text("secret")
    # symlinks inside the root pointing out
    (root / "link_file").symlink_to(outside / "secret.png")
    (root / "link_dir").symlink_to(outside)
    (root / "link_parent").symlink_to(tmp_path)
    (root / "chain1").symlink_to(root / "chain2")
    (root / "chain2").symlink_to(outside / "secret.png")
    (root / "dangling").symlink_to(tmp_path / "nope.png")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (root / "link_inside").symlink_to(root / "ok.png")  # allowed: stays inside
    os.mkfifo(root / "fifo")
    sb = Sandbox([root], tmp_path / "out")
    return sb, root, tmp_path


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


ESCAPES = [
    "../outside/secret.png",
    "../../outside/secret.png",
    "sub/../../outside/secret.png",
    "./../outside/secret.png",
    "sub/../../../etc/passwd",
    "/etc/passwd",
    "/etc/shadow",
    "/proc/self/environ",
    "/proc/self/mem",
    "/dev/zero",
    "/dev/random",
    "/dev/stdin",
    "{tmp}/outside/secret.png",
    "{tmp}/data-evil/x.png",
    "{tmp}/data/../data-evil/x.png",
    "{tmp}/data/../outside/secret.png",
    "link_file",
    "link_dir/secret.png",
    "link_dir/secret.txt",
    "link_parent/outside/secret.png",
    "link_parent/data-evil/x.png",
    "chain1",
    "dangling",
    "loop_a",
    "fifo",
    "sub",
    ".",
    "",
    "   ",
    "ok.png\x00.txt",
    "\x00",
    "~/secret.png",
    "~root/.bashrc",
    "a" * 5000,
    "..",
    "../data-evil/x.png",
    "sub/../../data-evil/x.png",
    "/",
    "//etc//passwd",
    "file:///etc/passwd",
]


def test_at_least_thirty_vectors():
    assert len(ESCAPES) >= 30


@pytest.mark.parametrize("vector", ESCAPES)
def test_escape_vectors_are_refused(box, vector):
    sb, root, tmp = box
    path = vector.replace("{tmp}", str(tmp))
    with pytest.raises(ToolError) as ei:
        sb.read_bytes(path, "image", 1 << 20)
    msg = str(ei.value)
    assert msg.startswith("image="), msg
    assert "Traceback" not in msg


def test_allowed_paths_resolve_inside(box):
    sb, root, tmp = box
    assert sb.read_bytes("ok.png", "image", 1 << 20)[0] == root / "ok.png"
    assert sb.read_bytes("sub/inner.png", "image", 1 << 20)[0] == root / "sub" / "inner.png"
    assert sb.read_bytes(str(root / "ok.png"), "image", 1 << 20)[0] == root / "ok.png"
    assert sb.read_bytes("sub/../ok.png", "image", 1 << 20)[0] == root / "ok.png"
    # a symlink that stays inside the root is fine
    assert sb.read_bytes("link_inside", "image", 1 << 20)[0] == root / "ok.png"


def test_rule_texts(box):
    sb, root, tmp = box
    with pytest.raises(ToolError, match="outside the allowed read roots"):
        sb.resolve_input("../outside/secret.png", "image")
    with pytest.raises(ToolError, match="NUL"):
        sb.resolve_input("a\x00b", "image")
    with pytest.raises(ToolError, match="FIFO"):
        sb.resolve_input("fifo", "image")
    with pytest.raises(ToolError, match="directory"):
        sb.resolve_input("sub", "image")
    with pytest.raises(ToolError, match="no such file"):
        sb.resolve_input("missing.png", "image")


def test_size_cap_checked_before_reading(box):
    sb, root, tmp = box
    (root / "big.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(ToolError, match="limit is 1000"):
        sb.read_bytes("big.bin", "image", 1000)


def test_atomic_write_fresh_names_and_sweep(tmp_path):
    sb = Sandbox([tmp_path], tmp_path / "out")
    a = sb.fresh_output_path("result", ".png")
    b = sb.fresh_output_path("result", ".png")
    assert a != b and a.parent == sb.output_dir
    sb.write_atomic(a, b"hello")
    assert a.read_bytes() == b"hello"
    with pytest.raises(ToolError, match="overwrite"):
        sb.write_atomic(a, b"again")
    with pytest.raises(ToolError, match="output directory"):
        sb.write_atomic(tmp_path / "elsewhere.png", b"x")
    stale = sb.output_dir / f"{TEMP_PREFIX}deadbeef"
    stale.write_bytes(b"partial")
    assert sb.sweep_temp_files() == 1 and not stale.exists()
    assert a.exists()


def test_output_dir_symlinked_elsewhere_is_resolved(tmp_path):
    real = tmp_path / "real_out"
    real.mkdir()
    (tmp_path / "out_link").symlink_to(real)
    sb = Sandbox([tmp_path / "data"], tmp_path / "out_link")
    p = sb.write_atomic(sb.fresh_output_path("x", ".bin"), b"1")
    assert p.parent == real


# ---------------------------------------------------------------------------- media decoding
@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    limits = LimitsSection(max_image_pixels=4_000_000, max_image_bytes=2_000_000, max_base64_chars=3_000_000)
    return MediaStore(Sandbox([root], tmp_path / "out"), limits), root


def _png_header_claiming(w: int, h: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims w x h but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decode_roundtrip_modes(media):
    store, root = media
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    (root / "a.png").write_bytes(buf.getvalue())
    out = store.load_image("a.png", "image")
    assert out.shape == (20, 30, 4) and np.array_equal(out, arr)
    rgb = store.load_image("a.png", "image", mode="RGB")
    assert rgb.shape == (20, 30, 3)
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert np.array_equal(store.load_image("data:image/png;base64," + b64, "image"), arr)


@pytest.mark.parametrize("name,payload,rule", [
    ("claims_20000", lambda: _png_header_claiming(20000, 20000), "pixel limit of 4000000"),
    ("gif", lambda: b"GIF89a" + b"\0" * 100, "unsupported image format"),
    ("text_as_png_ext", lambda: b"hello world, not an image", "unsupported image format"),
    ("truncated_png", lambda: _png(64, 64)[:60], "cannot decode"),
    ("svg", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "unsupported image format"),
    ("bmp", lambda: b"BM" + b"\0" * 100, "unsupported image format"),
])
def test_hostile_images_rejected(media, name, payload, rule):
    store, root = media
    (root / f"{name}.png").write_bytes(payload())
    with pytest.raises(ToolError) as ei:
        store.load_image(f"{name}.png", "image")
    assert rule in str(ei.value) and str(ei.value).startswith("image=")


def test_big_pixel_count_small_file_rejected(media):
    store, root = media
    img = Image.new("L", (3000, 3000))  # 9 MP of zeros: a small file over the 4 MP cap
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    (root / "bomb.png").write_bytes(buf.getvalue())
    with pytest.raises(ToolError, match="limit (is|of) 4000000"):
        store.load_image("bomb.png", "image")


def test_animated_webp_rejected(media):
    store, root = media
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    (root / "anim.webp").write_bytes(buf.getvalue())
    with pytest.raises(ToolError, match="animated"):
        store.load_image("anim.webp", "image")


def test_base64_limits_and_garbage(media):
    store, _ = media
    with pytest.raises(ToolError, match="not valid base64"):
        store.load_image("data:image/png;base64,@@@@", "image")
    with pytest.raises(ToolError, match="base64 encoded"):
        store.load_image("data:image/png,rawbytes", "image")
    with pytest.raises(ToolError, match="limit is 3000000"):
        store.load_image("data:image/png;base64," + "A" * 3_000_100, "image")


def test_unknown_image_uri(media):
    store, _ = media
    with pytest.raises(ToolError, match="no image with that id"):
        store.load_image("image://0123456789ab", "image")
    with pytest.raises(ToolError, match="no image with that id"):
        store.load_image("image://../../etc/passwd", "image")


def test_thumbnail_caps():
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)  # incompressible
    data, mime = thumbnail(noisy)
    assert len(data) <= 100_000
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert max(img.size) <= 512 and mime in ("image/png", "image/jpeg")


def test_saved_outputs_survive_restart(media, tmp_path):
    store, root = media
    rec = store.save(ImageOut(np.zeros((5, 7, 3), np.uint8), "x"))
    again = MediaStore(store.sandbox, store.limits)
    assert again.get(rec.id) is not None and again.get(rec.id).path == rec.path


# ---------------------------------------------------------------------------- issue 17: full disk, ownership
@pytest.mark.parametrize("stage", ["open", "write", "fsync", "replace"])
def test_write_atomic_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, stage):
    import errno

    import mcp_server.sandbox as sandbox_mod

    sb = Sandbox([tmp_path], tmp_path / "out")
    final = sb.fresh_output_path("full", ".png")
    real = getattr(os, stage)

    def no_space(*a, **k):
        if stage == "write":
            real(a[0], bytes(a[1])[:3])  # a few bytes land first, as on a filling disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sandbox_mod.os, stage, no_space)
    with pytest.raises(ToolError) as ei:
        sb.write_atomic(final, b"x" * 100_000)
    monkeypatch.setattr(sandbox_mod.os, stage, real)
    msg = str(ei.value)
    assert msg.startswith("output_dir=") and f"no space left on device writing {sb.output_dir}" in msg
    assert list(sb.output_dir.iterdir()) == []  # neither the final name nor a temp file


def test_write_atomic_other_os_errors_still_propagate(tmp_path, monkeypatch):
    import errno

    import mcp_server.sandbox as sandbox_mod

    sb = Sandbox([tmp_path], tmp_path / "out")

    def eio(*a, **k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(sandbox_mod.os, "fsync", eio)
    with pytest.raises(OSError) as ei:
        sb.write_atomic(sb.fresh_output_path("x", ".bin"), b"abc")
    assert ei.value.errno == errno.EIO and not isinstance(ei.value, ToolError)
    assert list(sb.output_dir.iterdir()) == []


def test_media_records_belong_to_their_client(media, tmp_path):
    store, root = media
    mine = store.save(ImageOut(np.full((6, 5, 3), 7, np.uint8), "mine"), owner="session:a")
    theirs = store.save(ImageOut(np.zeros((4, 4, 3), np.uint8), "theirs"), owner="session:b")
    assert [r.id for r in store.records("session:a")] == [mine.id]
    assert {r.id for r in store.records()} == {mine.id, theirs.id}  # the local (stdio) client sees all
    assert store.get(theirs.id, "session:a") is None and store.get(theirs.id, "session:b") is not None
    assert store.load_image(mine.uri, "image", caller="session:a").shape == (6, 5, 3)
    # another client's image answers exactly like a nonexistent one, by URI and by path
    with pytest.raises(ToolError) as other:
        store.load_image(theirs.uri, "image", caller="session:a")
    with pytest.raises(ToolError) as missing:
        store.load_image("image://0123456789ab", "image", caller="session:a")
    assert str(other.value).replace(theirs.id, "X") == str(missing.value).replace("0123456789ab", "X")
    with pytest.raises(ToolError, match="no such file inside the read roots"):
        store.load_image(str(theirs.path), "image", caller="session:a")
    assert store.load_image(str(mine.path), "image", caller="session:a").shape == (6, 5, 3)
    # images found on disk at start have no owner: only the local client sees them
    again = MediaStore(store.sandbox, store.limits)
    assert again.records("session:a") == [] and len(again.records()) == 2
    with pytest.raises(ToolError, match="no such file inside the read roots"):
        again.load_image(str(mine.path), "image", caller="session:a")
