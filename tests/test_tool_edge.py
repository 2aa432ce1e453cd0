"""Issue 16 (items 2 and 4): the thin tool edge, ADetailer on engine.masks' operations, one atomic-write helper.

- The engine's InvalidInput reaches the client as the text the tool wrappers used to make (each expected
  text is written from the engine's rule, "argument=value: rule").
- mask_edit's fill colour: engine.color's syntax plus a hex alpha, checked against Pillow's ImageColor.
- `ALL_TOOLS` (mcp_server/config.py) lists exactly the tool specs; it cannot import them (config must not
  import torch), which a fresh process checks.
- Square dilation / erosion against scipy, the ADetailer feather against OpenCV's GaussianBlur.
- `engine.files`: whole-or-nothing writes, no overwrite when asked, the sweep.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from mcp import Client
from PIL import Image, ImageColor
from scipy import ndimage

from engine import adetailer as A
from engine import files, masks
from engine.detect import Detection
from mcp_server.app import build_server
from tests.helpers import make_settings


# -- errors reach the client unchanged ---------------------------------------------------------------
def test_engine_errors_reach_the_client_as_argument_value_rule(tmp_path):
    s = make_settings(tmp_path)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "data" / "p.png")
    Image.fromarray(np.zeros((60, 81), np.uint8)).save(tmp_path / "data" / "m.png")
    calls = [
        (("mask_edit", {"image": "p.png", "expression": "(r > 200", "operation": "blur"}),
         "expression='(r > 200': expected ')' to close the '(' opened at character 1, found the end of the "
         "expression at column 9"),
        (("mask_edit", {"image": "p.png", "mask_image": "m.png", "operation": "none"}),
         "mask_image='81x60': the mask image must have the size of the image, 80x60"),
        (("mask_edit", {"image": "p.png", "expression": "r > 1", "operation": "fill", "color": "not-a-colour"}),
         "color='not-a-colour': unknown colour name: use one of the 148 CSS colour names, #RRGGBB, #RGB, "
         "rgb(r, g, b) or lab(L, a, b)"),
        (("color_compare", {"image_a": "p.png", "image_b": "p.png", "mask_expression": "x <"}),
         "mask_expression='x <': the expression ends too early at column 4"),
        (("color_compare", {"color_a": "#GG0000", "color_b": "red"}),
         "color_a='#GG0000': malformed hex colour: expected #RRGGBB or #RGB (hex digits)"),
        (("generate_image", {"prompt": "a cat", "scheduler": "PLMS"}),
         "scheduler='PLMS': expected one of DDIM, "),
    ]
    out = []

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                for (name, args), _ in calls:
                    out.append(await c.call_tool(name, args))
        finally:
            server.state.close()

    asyncio.run(main())
    for ((name, _), want), r in zip(calls, out, strict=True):
        text = r.content[0].text
        assert r.is_error, (name, text)
        if want.endswith(", "):
            assert text.startswith(want), (name, text)
        else:
            assert text == want, (name, text)


# -- mask_edit's fill colour ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["#0000ff", "#0000FF", "#f00", "white", "DodgerBlue", "rgb(1, 2, 3)",
                                  "#ff000080", "#ff0000ff", "#f008", " #12345678 "])
def test_fill_colour_matches_pillow(text):
    from tools.masks import _fill_color

    rgba = ImageColor.getcolor(text.strip(), "RGBA")
    want = tuple(rgba) if rgba[3] != 255 else tuple(rgba[:3])
    assert _fill_color(text) == want


@pytest.mark.parametrize("text", ["not-a-colour", "#ggg", "#12345", "rgb(1, 2)", "#1234567890"])
def test_fill_colour_refusals_name_the_argument(text):
    from engine.errors import InvalidInput
    from tools.masks import _fill_color

    with pytest.raises(InvalidInput, match=r"^color="):
        _fill_color(text)


# -- the tool list -------------------------------------------------------------------------------------
def test_all_tools_lists_exactly_the_specs():
    from mcp_server.app import _server_specs
    from mcp_server.config import ALL_TOOLS
    from tools import load_specs

    names = [s.name for s in load_specs()] + [s.name for s in _server_specs()]
    assert len(ALL_TOOLS) == len(set(ALL_TOOLS))
    assert sorted(ALL_TOOLS) == sorted(names)


def test_config_imports_no_torch():
    """Why ALL_TOOLS is written out: the specs live in modules that import torch, config must not."""
    code = "import sys, mcp_server.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# -- ADetailer's masks on engine.masks ------------------------------------------------------------------
def _random_mask(seed: int, h: int = 41, w: int = 57) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) > 0.93
    m[:3, 10:20] = True  # touches the top edge
    m[30:, -2:] = True  # touches the right and bottom edges
    return m


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("px", [1, 3, 7])
def test_square_footprint_matches_scipy(seed, px):
    m = _random_mask(seed)
    sq = np.ones((2 * px + 1, 2 * px + 1), bool)
    t = torch.from_numpy(m)
    assert np.array_equal(masks.dilate(t, px, footprint="square").numpy(), ndimage.binary_dilation(m, sq))
    assert np.array_equal(masks.erode(t, px, footprint="square").numpy(),
                          ndimage.binary_erosion(m, sq, border_value=1))


@pytest.mark.parametrize("feather", [1, 2, 5, 9])
def test_adetailer_feather_matches_opencv(feather):
    m = _random_mask(feather)
    k = 2 * feather + 1
    want = cv2.GaussianBlur(m.astype(np.float32), (k, k), sigmaX=feather / 2.0, borderType=cv2.BORDER_REFLECT)
    want[want < 1e-6] = 0.0
    got = A.feather_alpha(m, feather)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.clip(want, 0, 1), rtol=0, atol=2e-6)
    assert np.array_equal(got > 0, want > 0)


def test_detection_with_an_empty_segmentation_uses_its_box():
    empty = np.zeros((20, 30), bool)
    det = Detection("face", 0.9, (2, 3, 12, 8), empty, "test")
    want = np.zeros((20, 30), bool)
    want[3:8, 2:12] = True
    assert np.array_equal(masks.detection_mask([det], 20, 30).numpy(), want)
    assert np.array_equal(A.detection_mask(det, (20, 30), "auto"), want)


def test_lazy_colour_engine_constant_is_in_step():
    from engine import color
    from engine.masks import expression

    assert expression._CPU_PIECE == color.CPU_PIECE


# -- engine.files ---------------------------------------------------------------------------------------
def test_atomic_write_bytes_and_callable(tmp_path):
    p = files.atomic_write(tmp_path / "sub" / "a.bin", b"hello", prefix=".t-")
    assert p.read_bytes() == b"hello" and stat.S_IMODE(p.stat().st_mode) == 0o600
    files.atomic_write(p, lambda tmp: np.save(tmp, np.arange(3)), prefix=".t-", suffix=".npy")
    with open(p, "rb") as fh:
        assert np.load(fh).tolist() == [0, 1, 2]
    q = files.atomic_write(tmp_path / "b.bin", bytearray(b"xy"), prefix=".t-", mode=0o644)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(q.stat().st_mode) == 0o644 & ~umask
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b.bin", "sub"]
    assert [x.name for x in (tmp_path / "sub").iterdir()] == ["a.bin"]


def test_atomic_write_keeps_the_old_file_on_failure_and_never_overwrites_when_asked(tmp_path):
    p = tmp_path / "a.bin"
    files.atomic_write(p, b"old", prefix=".t-")

    def broken(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"par")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        files.atomic_write(p, broken, prefix=".t-")
    with pytest.raises(files.TargetExists):
        files.atomic_write(p, b"new", prefix=".t-", overwrite=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(files.TargetExists):
        files.atomic_write(tmp_path / "dangling", b"new", prefix=".t-", overwrite=False)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bin", "dangling"]


def test_directory_fsync_rule(tmp_path, monkeypatch):
    real = os.fsync
    calls = []

    def dir_fails(code):
        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                calls.append(code)
                raise OSError(code, os.strerror(code))
            return real(fd)
        return fsync

    monkeypatch.setattr(os, "fsync", dir_fails(errno.EINVAL))  # a file system without directory fsync
    files.atomic_write(tmp_path / "a", b"1", prefix=".t-")
    with pytest.raises(OSError):
        files.fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", dir_fails(errno.EIO))
    with pytest.raises(OSError) as ei:
        files.atomic_write(tmp_path / "b", b"2", prefix=".t-")
    assert ei.value.errno == errno.EIO and calls == [errno.EINVAL, errno.EINVAL, errno.EIO]
    assert (tmp_path / "b").read_bytes() == b"2"  # the rename had happened; only its durability is in doubt


def test_atomic_folder_and_sweep(tmp_path):
    out = tmp_path / "model"
    with files.atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(ValueError):
        with files.atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("half")
            raise ValueError("conversion failed")
    assert (out / "config.json").read_text() == "{}"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]

    (tmp_path / ".t-stale").write_bytes(b"x")
    (tmp_path / ".t-dir").mkdir()
    (tmp_path / ".t-link").symlink_to(out / "config.json")
    (tmp_path / "keep").write_bytes(b"y")
    assert files.sweep(tmp_path, ".t-") == 1
    assert files.sweep(tmp_path, ".t-", folders=True) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == [".t-link", "keep", "model"]
    assert (out / "config.json").exists()
