"""Safe image opening, RGB conversion and pad-to-square: `pytest tests/data/test_images.py`.

Every kind of file is built in tmp_path with known pixel values; the tests check the error kind or the RGB
values that a person would expect (16-bit 65535 -> 255, CMYK (0,0,0,0) -> white, transparent -> white).
"""

from __future__ import annotations

import builtins
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava.data.images import (
    ImageLoadError,
    expand2square,
    load_image_rgb,
    open_image_rgb,
    resolve_image_path,
    to_rgb,
)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def _kind(call, *args, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        call(*args, **kwargs)
    return info.value


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height but which holds no pixel data (costs a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --- mode conversion ---------------------------------------------------------------------------------


def test_rgb_is_returned_unchanged_and_outlives_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "a.png")
    image, notes = open_image_rgb(tmp_path / "a.png")
    assert notes == []
    assert image.size == (3, 2)
    assert (_pixels(image) == [10, 20, 30]).all()


def test_grayscale_l(tmp_path: Path) -> None:
    Image.new("L", (2, 2), 100).save(tmp_path / "l.png")
    image, notes = open_image_rgb(tmp_path / "l.png")
    assert (_pixels(image) == 100).all()
    assert notes == ["converted from L"]


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 1))
    image.putpalette([255, 0, 0, 0, 0, 0] + [0] * (254 * 3))  # index 0 red, index 1 black (transparent)
    image.putdata([0, 0, 1, 1])
    image.save(tmp_path / "p.png", transparency=1)
    rgb, notes = open_image_rgb(tmp_path / "p.png")
    assert _pixels(rgb)[0].tolist() == [[255, 0, 0], [255, 0, 0], [255, 255, 255], [255, 255, 255]]
    assert "alpha composited on white" in notes[0] and "P" in notes[0]


def test_palette_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (1, 1))
    image.putpalette([0, 128, 255] + [0] * (255 * 3))
    image.save(tmp_path / "p.png")
    rgb, _ = open_image_rgb(tmp_path / "p.png")
    assert _pixels(rgb)[0, 0].tolist() == [0, 128, 255]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 255, 255), (0, 0, 0, 0), (255, 0, 0, 128)])
    image.save(tmp_path / "rgba.png")
    rgb, notes = open_image_rgb(tmp_path / "rgba.png")
    px = _pixels(rgb)[0]
    assert px[0].tolist() == [0, 0, 255]  # opaque: unchanged
    assert px[1].tolist() == [255, 255, 255]  # fully transparent black: white, not black
    assert px[2][0] == 255 and abs(px[2][1] - 127) <= 1 and abs(px[2][2] - 127) <= 1  # half red over white
    assert notes == ["converted from RGBA (alpha composited on white)"]


def test_la(tmp_path: Path) -> None:
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 255), (0, 0)])
    image.save(tmp_path / "la.png")
    rgb, _ = open_image_rgb(tmp_path / "la.png")
    assert _pixels(rgb)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_cmyk(tmp_path: Path) -> None:
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])
    image.save(tmp_path / "cmyk.tif")
    rgb, notes = open_image_rgb(tmp_path / "cmyk.tif")
    assert _pixels(rgb)[0].tolist() == [[255, 255, 255], [0, 0, 0], [0, 255, 255]]
    assert notes == ["converted from CMYK"]


def test_16_bit_gradient_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")  # the file really is 16-bit
    rgb, notes = open_image_rgb(tmp_path / "g16.png")
    assert _pixels(rgb)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (_pixels(rgb)[0, :, 0] == _pixels(rgb)[0, :, 2]).all()
    assert "scaled to 8-bit" in notes[0]


def test_16_bit_full_ramp_is_monotonic(tmp_path: Path) -> None:
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    gray = _pixels(open_image_rgb(tmp_path / "ramp.png")[0])[..., 0].ravel()
    assert gray[0] == 0 and gray[-1] == round(65280 * 255 / 65535)
    assert (np.diff(gray) >= 0).all() and len(set(gray.tolist())) > 200  # not clipped to a few levels


def test_32_bit_integer_and_float_modes() -> None:
    wide = Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32))  # mode I, fits no usual range
    rgb, notes = to_rgb(wide)
    assert _pixels(rgb)[0, :, 0].tolist() == [0, 64, 255]  # stretched: (0 + 1000) / 4000 * 255 = 63.75
    assert "stretched" in notes[0]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _pixels(to_rgb(unit)[0])[0, :, 0].tolist() == [0, 128, 255]


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (2, 1))
    image.putdata([0, 1])
    image.save(tmp_path / "bw.png")
    rgb, notes = open_image_rgb(tmp_path / "bw.png")
    assert _pixels(rgb)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    assert notes == ["converted from 1"]


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgb, notes = open_image_rgb(tmp_path / "anim.gif")
    assert (_pixels(rgb) == [255, 0, 0]).all()
    assert notes[0] == "animated: first frame of 3"


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{suffix}"
    Image.fromarray(noise).save(whole, fmt)
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    error = _kind(open_image_rgb, cut)
    assert error.kind == "truncated" and str(cut) in str(error)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "page.jpg").write_text("<html>404 Not Found</html>")
    error = _kind(open_image_rgb, tmp_path / "page.jpg")
    assert error.kind == "unreadable" and "page.jpg" in str(error)


def test_too_large_is_refused_from_the_header(tmp_path: Path) -> None:
    # The file holds no pixel data: decoding it would fail as truncated, so "too_large" proves no decode ran.
    header = _png_header_only(tmp_path / "big.png", 5000, 5000)
    error = _kind(open_image_rgb, header, max_pixels=1_000_000)
    assert error.kind == "too_large" and "5000x5000" in str(error) and "max_pixels" in str(error)
    assert _kind(open_image_rgb, header).kind in {"truncated", "unreadable"}  # under the default limit


def test_pil_decompression_bomb_error_becomes_too_large(tmp_path: Path) -> None:
    header = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    max_before = Image.MAX_IMAGE_PIXELS
    assert _kind(open_image_rgb, header, max_pixels=10**12).kind == "too_large"
    assert Image.MAX_IMAGE_PIXELS == max_before


def test_missing_file_suggests_the_other_extension(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "cat.gif")
    error = _kind(load_image_rgb, tmp_path, "cat.jpg")
    assert error.kind == "missing"
    assert "cat.jpg" in str(error) and str(tmp_path) in str(error) and "cat.gif" in str(error)
    assert _kind(open_image_rgb, tmp_path / "nope.png").kind == "missing"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "sub.png").mkdir()
    assert _kind(resolve_image_path, tmp_path, "sub.png").kind == "not_a_file"
    assert _kind(open_image_rgb, tmp_path / "sub.png").kind in {"not_a_file", "unreadable"}


# --- path confinement --------------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/images/{a.png, sub/b.png, inside_link.png -> a.png, escape.png -> ../outside/secret.png, out -> ../outside}."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    for path in (images / "a.png", images / "sub" / "b.png", outside / "secret.png", tmp_path / "x.png"):
        Image.new("RGB", (2, 2), (1, 2, 3)).save(path)
    (images / "inside_link.png").symlink_to("a.png")
    (images / "escape.png").symlink_to(outside / "secret.png")
    (images / "out").symlink_to(outside, target_is_directory=True)
    return images


def test_paths_inside_the_folder_resolve(layout: Path) -> None:
    assert resolve_image_path(layout, "a.png") == (layout / "a.png").resolve()
    assert resolve_image_path(str(layout), "sub/../sub/b.png") == (layout / "sub" / "b.png").resolve()
    assert resolve_image_path(layout, "inside_link.png") == (layout / "a.png").resolve()
    image, _ = load_image_rgb(layout, "sub/b.png")
    assert (_pixels(image) == [1, 2, 3]).all()


@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        ("../x.png", "outside_folder"),
        ("sub/../../x.png", "outside_folder"),
        ("escape.png", "outside_folder"),
        ("out/secret.png", "outside_folder"),
        ("/etc/passwd", "absolute_path"),
        ("C:\\images\\a.png", "absolute_path"),
        ("", "invalid_path"),
        ("a\0.png", "invalid_path"),
        ("nope.png", "missing"),
    ],
)
def test_refused_paths(layout: Path, rel: str, kind: str) -> None:
    error = _kind(load_image_rgb, layout, rel)
    assert error.kind == kind
    assert str(layout) in str(error)


def test_absolute_path_to_a_file_inside_the_folder_is_still_refused(layout: Path) -> None:
    assert _kind(resolve_image_path, layout, str(layout / "a.png")).kind == "absolute_path"


def test_refusal_opens_nothing(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_open(*args, **kwargs):
        raise AssertionError("a file was opened")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    monkeypatch.setattr(Image, "open", no_open)
    for rel in ("../x.png", "escape.png", "out/secret.png", "/etc/passwd"):
        with pytest.raises(ImageLoadError):
            resolve_image_path(layout, rel)
    assert resolve_image_path(layout, "a.png").name == "a.png"


def test_missing_image_folder(tmp_path: Path) -> None:
    error = _kind(resolve_image_path, tmp_path / "no_such_folder", "a.png")
    assert error.kind == "missing" and "image_folder" in str(error)


# --- pad to square -----------------------------------------------------------------------------------


def test_expand2square_wide_tall_odd_and_square() -> None:
    blue = (0, 0, 255)
    wide = expand2square(Image.new("RGB", (4, 2), (255, 0, 0)), blue)
    assert wide.size == (4, 4)
    rows = _pixels(wide)[:, 0].tolist()
    assert rows == [list(blue), [255, 0, 0], [255, 0, 0], list(blue)]

    tall = expand2square(Image.new("RGB", (2, 4), (255, 0, 0)), blue)
    assert _pixels(tall)[0].tolist() == [list(blue), [255, 0, 0], [255, 0, 0], list(blue)]

    odd = expand2square(Image.new("RGB", (5, 2), (255, 0, 0)), blue)  # offset (5 - 2) // 2 = 1
    assert [row[0] for row in _pixels(odd).tolist()] == [list(blue), [255, 0, 0], [255, 0, 0], list(blue), list(blue)]

    square = Image.new("RGB", (3, 3))
    assert expand2square(square, blue) is square


def test_rgb_with_colour_key_transparency(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 1))
    image.putdata([(0, 0, 0), (10, 20, 30)])
    image.save(tmp_path / "key.png", transparency=(0, 0, 0))
    rgb, notes = open_image_rgb(tmp_path / "key.png")
    assert _pixels(rgb)[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    assert notes == ["converted from RGB (alpha composited on white)"]
