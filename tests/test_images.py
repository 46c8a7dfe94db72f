"""Tests for fusionlm.data.pixels.images: every file is made in tmp_path at test time, tiny sizes."""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from fusionlm.data.pixels.images import (
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    fit_square,
    image_to_pixels,
    load_image,
    to_pixels,
)
from fusionlm.errors import ImageError, SampleError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def close(a, b, tol: int = 0) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def corner_image(w: int = 20, h: int = 12) -> Image.Image:
    """White image with a red 5x5 block in the top-left corner."""
    img = Image.new("RGB", (w, h), WHITE)
    img.paste(RED, (0, 0, 5, 5))
    return img


def save_exif_jpeg(path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    corner_image().save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose IHDR claims width x height (CRC recomputed): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# ---- modes -> RGB -------------------------------------------------------------------------


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (20, 12), (255, 0, 0, 0))
    img.paste((255, 0, 0, 255), (10, 0, 20, 12))
    img.putpixel((0, 0), (0, 0, 0, 128))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (20, 12)
    assert out.getpixel((5, 5)) == BACKGROUND == WHITE
    assert out.getpixel((15, 5)) == RED
    assert close(out.getpixel((0, 0)), (127, 127, 127), tol=1)  # half black over white


def test_la_composited_on_white(tmp_path):
    img = Image.new("LA", (20, 12), (0, 0))
    img.paste((0, 255), (10, 0, 20, 12))
    img.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == WHITE and out.getpixel((15, 2)) == BLACK


def test_pa_in_memory_composited():
    img = Image.new("RGBA", (4, 4), (0, 0, 255, 255)).convert("PA")
    img.putpixel((0, 0), (img.getpixel((0, 0))[0], 0))
    out = load_image(img)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE and out.getpixel((3, 3)) == BLUE


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (20, 12), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (10, 0, 20, 12))
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == WHITE  # index 0 is transparent red -> background
    assert out.getpixel((15, 2)) == BLUE


def test_one_bit(tmp_path):
    img = Image.new("1", (20, 12), 0)
    img.paste(1, (10, 0, 20, 12))
    img.save(tmp_path / "bw.png")
    out = load_image(tmp_path / "bw.png")
    assert out.mode == "RGB" and out.getpixel((2, 2)) == BLACK and out.getpixel((15, 2)) == WHITE


def test_grey_l(tmp_path):
    Image.new("L", (20, 12), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (20, 12), (0, 0, 0, 0))
    img.paste((0, 255, 255, 0), (10, 0, 20, 12))
    img.save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"  # the file really is CMYK
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB"
    assert close(out.getpixel((2, 2)), WHITE, tol=8)
    assert close(out.getpixel((16, 6)), RED, tol=8)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535, 32768, 257 * 100]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 255, 128, 100]
    assert out.getpixel((2, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I", "<i4")])
def test_other_int_grey_modes(mode, dtype):
    # frombytes, not convert(): Pillow's own I;16 -> I;16B convert clips at 255.
    raw = np.array([[0, 65535, 32768]], dtype=dtype).tobytes()
    out = load_image(Image.frombytes(mode, (3, 1), raw))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


def test_float_mode_rule():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, -3.0]], dtype=np.float32))
    assert [load_image(unit).getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 0]
    big = Image.fromarray(np.array([[0.0, 50.0, 200.0, np.nan]], dtype=np.float32))
    assert [load_image(big).getpixel((x, 0))[0] for x in range(4)] == [0, 64, 255, 0]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_other_colour_spaces(mode):
    out = load_image(Image.new("RGB", (4, 4), (200, 30, 60)).convert(mode))
    assert out.mode == "RGB" and out.size == (4, 4)


# ---- orientation and animation ------------------------------------------------------------


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    out = load_image(save_exif_jpeg(tmp_path / "o6.jpg", 6))
    assert out.size == (12, 20)
    assert close(out.getpixel((10, 1)), RED, tol=30)  # top-left corner moved to top-right
    assert close(out.getpixel((1, 1)), WHITE, tol=30)
    assert close(out.getpixel((1, 18)), WHITE, tol=30)


def test_exif_orientation_8_rotates_counter_clockwise(tmp_path):
    out = load_image(save_exif_jpeg(tmp_path / "o8.jpg", 8))
    assert out.size == (12, 20)
    assert close(out.getpixel((1, 18)), RED, tol=30)  # top-left corner moved to bottom-left
    assert close(out.getpixel((1, 1)), WHITE, tol=30)
    assert close(out.getpixel((10, 1)), WHITE, tol=30)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 12), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(tmp_path / "a.gif").getpixel((5, 5)) == RED
    with Image.open(tmp_path / "a.gif") as img:
        img.seek(2)  # a caller's image on a later frame still gives frame 0
        assert load_image(img).getpixel((5, 5)) == RED


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP support")
def test_webp_still_and_animated(tmp_path):
    Image.new("RGB", (20, 12), BLUE).save(tmp_path / "s.webp", lossless=True)
    assert load_image(tmp_path / "s.webp").getpixel((5, 5)) == BLUE
    frames = [Image.new("RGB", (20, 12), c) for c in (RED, GREEN)]
    frames[0].save(
        tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True
    )
    out = load_image(tmp_path / "a.webp")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == RED


# ---- sizes and letterboxing ---------------------------------------------------------------


@pytest.mark.parametrize("wh", [(1, 1), (1, 500), (500, 1), (27, 332), (2, 1000)])
def test_odd_sizes_give_square_finite_pixels(tmp_path, wh):
    Image.new("RGB", wh, (10, 20, 30)).save(tmp_path / "x.png")
    px = image_to_pixels(tmp_path / "x.png", 32)
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert torch.isfinite(px).all()


def test_fit_square_letterbox_geometry():
    out = fit_square(Image.new("RGB", (1, 500), BLACK), 32)
    assert out.size == (32, 32)
    assert out.getpixel((15, 10)) == BLACK  # 1-px stripe kept, centred at (32 - 1) // 2
    assert out.getpixel((0, 10)) == WHITE and out.getpixel((31, 10)) == WHITE
    wide = fit_square(Image.new("RGB", (332, 27), BLACK), 32)  # short side round(2.6) = 3
    rows = [y for y in range(32) if wide.getpixel((16, y)) != WHITE]
    assert rows == [14, 15, 16]
    assert fit_square(Image.new("RGB", (1, 1), RED), 5).getpixel((0, 0)) == RED


def test_to_pixels_normalisation():
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    px = to_pixels(img, 2)
    assert px.shape == (3, 2, 2)
    assert torch.allclose(px[:, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))
    imnet = to_pixels(img, 2, mean=(0.5, 0.0, 0.2), std=(0.5, 1.0, 0.1))
    assert torch.allclose(imnet[:, 1, 1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_same_pixels_whatever_the_entry_point(tmp_path):
    rgba = Image.new("RGBA", (20, 12), (0, 128, 255, 100))
    rgba.putpixel((3, 3), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    for path in (tmp_path / "a.png", save_exif_jpeg(tmp_path / "o6.jpg", 6)):
        ref = image_to_pixels(path, 16)
        assert torch.equal(ref, image_to_pixels(str(path), 16))
        assert torch.equal(ref, image_to_pixels(path.read_bytes(), 16))
        with Image.open(path) as lazy:
            assert torch.equal(ref, image_to_pixels(lazy, 16))
        with Image.open(path) as loaded:
            loaded.load()
            assert torch.equal(ref, image_to_pixels(loaded, 16))
        assert torch.equal(ref, image_to_pixels(path.name, 16, root=tmp_path))


def test_caller_image_not_modified():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = load_image(img)
    assert out is not img and img.mode == "RGBA" and img.getpixel((0, 0)) == (0, 0, 0, 0)


# ---- broken inputs ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="<bytes>: empty"):
        load_image(b"")


def test_html_saved_as_jpg(tmp_path):
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>\n")
    with pytest.raises(ImageError, match=r"page\.jpg: not a recognised image") as info:
        load_image(tmp_path / "page.jpg")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)  # noise so the compressed data is long enough to cut
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: .*truncated") as info:
        load_image(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never flip the global


def test_load_truncated_global_is_not_relied_on(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(tmp_path / "ok.png")


def test_bomb_refused_from_header_without_decoding(tmp_path, monkeypatch):
    bomb = png_with_size(tmp_path / "bomb.png", 30000, 30000)

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    start = time.perf_counter()
    with pytest.raises(ImageError, match=rf"bomb\.png: .*over the limit of {DEFAULT_MAX_PIXELS}"):
        load_image(bomb)
    # 30000×30000 is also over Pillow's hard cap; a bomb under it gets our W×H message.
    png_with_size(tmp_path / "mid.png", 5000, 5000)
    with pytest.raises(ImageError, match=r"mid\.png: image is 5000×5000 = 25000000 pixels, "
                       r"over the limit of 1000000"):
        load_image(tmp_path / "mid.png", max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0


def test_pillow_bomb_warning_never_escapes(tmp_path):
    png_with_size(tmp_path / "warn.png", 10000, 10000)  # over Pillow's warning threshold
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"warn\.png: image is 10000×10000"):
            load_image(tmp_path / "warn.png")
        with pytest.raises(ImageError, match=r"<bytes>: image is 10000×10000"):
            load_image((tmp_path / "warn.png").read_bytes())
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), GREEN).save(root / "sub" / "ok.png")
    Image.new("RGB", (4, 4), RED).save(tmp_path / "secret.png")
    return root


def test_inside_root_allowed(data_root):
    assert load_image("sub/ok.png", root=data_root).getpixel((0, 0)) == GREEN
    assert load_image(data_root / "sub" / "ok.png", root=data_root).getpixel((0, 0)) == GREEN
    assert load_image("sub/../sub/ok.png", root=str(data_root)).getpixel((0, 0)) == GREEN


def test_escape_via_dotdot(data_root):
    with pytest.raises(SampleError, match=r"image path '\.\./secret\.png' escapes the data root"):
        load_image("../secret.png", root=data_root)
    with pytest.raises(SampleError, match="escapes"):
        load_image("sub/../../secret.png", root=data_root)


def test_escape_via_absolute_path(data_root):
    target = str(data_root.parent / "secret.png")
    with pytest.raises(SampleError, match="escapes") as info:
        load_image(target, root=data_root)
    assert target in str(info.value)
    sibling = data_root.parent / "root2"  # shares the prefix "root" but is outside it
    sibling.mkdir()
    Image.new("RGB", (2, 2)).save(sibling / "x.png")
    with pytest.raises(SampleError, match="escapes"):
        load_image(sibling / "x.png", root=data_root)


def test_escape_via_symlink(data_root):
    link = data_root / "link.png"
    try:
        os.symlink(data_root.parent / "secret.png", link)
    except OSError:
        pytest.skip("symlinks not supported here")
    with pytest.raises(SampleError, match=r"image path 'link\.png' escapes the data root"):
        load_image("link.png", root=data_root)


def test_unsupported_source_type():
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]
