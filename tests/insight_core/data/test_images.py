"""Tests for insight_core.data.images: every odd input is generated on the fly with PIL/numpy."""

from __future__ import annotations

import io
import logging
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from insight_core.data.images import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    REFUSED_EXTENSIONS,
    LoadReport,
    check_pil_format,
    forbid_ghostscript,
    iter_images,
    list_image_files,
    load_image,
    open_image,
    sniff_format,
)
from insight_core.errors import ConfigError, ImageLoadError
from tests import hostile
from tests.hostile import FakeGhostscript

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- helpers


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A hand-built PNG, for headers and bit depths Pillow will not write (raw = filtered rows)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _noise_jpeg() -> bytes:
    return _encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG", quality=95)


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert img.mode == "RGB"
    assert img.size == size


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decoding of a file-backed image fail loudly."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ---------------------------------------------------------------- input kinds


def test_path_str_bytes_and_file_objects_give_the_same_rgb(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (5, 3), RED), "PNG")
    path = _write(tmp_path / "red.png", data)
    with path.open("rb") as fh:
        from_file = load_image(fh)
    for img in (
        load_image(path),
        load_image(str(path)),
        load_image(data),
        load_image(io.BytesIO(data)),
        from_file,
    ):
        _assert_rgb(img, (5, 3))
        assert img.getpixel((4, 2)) == RED


def test_result_is_fully_loaded_and_detached_from_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jpg", _noise_jpeg())
    img = load_image(path)
    path.unlink()
    assert not isinstance(img, ImageFile.ImageFile)  # a plain in-memory image, no lazy file handle
    assert np.asarray(img).shape == (64, 64, 3)


def test_pil_image_input_is_converted_without_touching_the_original() -> None:
    original = Image.new("LA", (2, 2), (0, 0))
    out = load_image(original)
    assert out is not original
    assert original.mode == "LA"
    assert out.getpixel((0, 0)) == WHITE


def test_one_by_one_image_is_valid() -> None:
    img = load_image(_encode(Image.new("RGB", (1, 1), BLUE), "PNG"))
    _assert_rgb(img, (1, 1))
    assert img.getpixel((0, 0)) == BLUE


def test_unsupported_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="image source must be"):
        load_image(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_pixels_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_pixels"):
        load_image(b"x", max_pixels=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: empty file \(0 bytes\)"):
        load_image(path)


def test_empty_bytes_and_empty_stream_are_named() -> None:
    with pytest.raises(ImageLoadError, match=r"<bytes>: empty image data"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match=r"upload\.png: empty image data"):
        load_image(io.BytesIO(b""), name="upload.png")


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.jpg", b"hello, I am definitely a JPEG\n" * 10)
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not a recognised image format"):
        load_image(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path / "dir.png")


def test_text_mode_file_object_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.png", _encode(Image.new("RGB", (2, 2)), "PNG"))
    with path.open("r", encoding="latin-1") as fh, pytest.raises(ImageLoadError, match="binary mode"):
        load_image(fh)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_is_refused(tmp_path: Path, fmt: str) -> None:
    data = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), fmt)
    path = _write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # we must not flip Pillow's global switch


def test_corrupt_png_crc_is_refused() -> None:
    data = bytearray(_encode(Image.effect_noise((32, 32), 60), "PNG"))
    data[-20] ^= 0xFF  # inside the last IDAT chunk / its CRC
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(bytes(data), name="crc.png")


def test_zero_size_images_are_refused() -> None:
    with pytest.raises(ImageLoadError, match=r"zero size \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    # Pillow already refuses a PNG header with width 0 when identifying the file.
    with pytest.raises(ImageLoadError, match=r"zero\.png: corrupt PNG image header"):
        load_image(_png(0, 4, 8, 0, b""), name="zero.png")


# ---------------------------------------------------------------- decompression bombs


def test_real_large_image_is_refused_from_the_header_without_decoding(
    tmp_path: Path, no_decoding: None
) -> None:
    # A genuine 6000x6000 1-bit PNG: 36 M pixels but only a few kB on disk.
    row = b"\x00" + b"\x00" * (6000 // 8)
    path = _write(tmp_path / "bomb.png", _png(6000, 6000, 1, 0, row * 6000))
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    expected = r"6000x6000 = 36,000,000 pixels, more than max_pixels=1,000,000"
    with pytest.raises(ImageLoadError, match=expected):
        load_image(path, max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.5


def test_lying_header_is_refused_before_any_pixel_data_is_read(no_decoding: None) -> None:
    # The header claims 9000x9000 but there is a single byte of pixel data: decoding would fail
    # as "truncated", so the bomb message proves the check ran on the header alone.
    with pytest.raises(ImageLoadError, match="possible decompression bomb"):
        load_image(_png(9000, 9000, 8, 0, b"\x00"), name="liar.png")


def test_pillow_own_bomb_error_is_mapped() -> None:
    # 10^10 pixels is above 2 * Image.MAX_IMAGE_PIXELS: Pillow raises inside Image.open.
    with pytest.raises(ImageLoadError, match=r"huge\.png: image too large"):
        load_image(_png(100_000, 100_000, 8, 0, b"\x00"), name="huge.png", max_pixels=10**11)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_escalated_to_error_is_mapped() -> None:
    # 10^8 pixels only triggers Pillow's warning; escalated, it must still become ImageLoadError.
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(_png(10_000, 10_000, 8, 0, b"\x00"), name="big.png", max_pixels=10**9)


def test_pillow_bomb_warning_alone_still_refused_by_max_pixels() -> None:
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(_png(10_000, 10_000, 8, 0, b"\x00"), name="big.png")


# ---------------------------------------------------------------- colour modes


def test_16bit_greyscale_png_is_scaled_not_clipped() -> None:
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    values[0, 1] = 1000  # Pillow's convert("RGB") would clip this to 255
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    img = load_image(_encode(src, "PNG"))
    out = np.asarray(img)
    expected = np.round(values / 257).astype(np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert img.getpixel((1, 0)) == (4, 4, 4)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_16bit_integer_modes_are_divided_by_257(mode: str) -> None:
    values = np.array([[0, 257, 1000, 65535]], dtype=np.uint16)
    dtype = {"I;16B": ">u2", "I;16L": "<u2", "I": "<i4"}[mode]
    src = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    out = np.asarray(load_image(src))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 1, 4, 255])


def test_float_images_are_scaled() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(unit))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0, np.nan]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(wide))[0, :, 0], [0, 128, 255, 0])


def test_16bit_rgb_and_la_pngs() -> None:
    # Pillow opens 16-bit RGB as 8-bit RGB (high byte) and 16-bit LA as RGBA.
    rgb = _png(1, 1, 16, 2, b"\x00" + struct.pack(">3H", 0x1234, 0x8000, 0xFFFF))
    assert load_image(rgb).getpixel((0, 0)) == (0x12, 0x80, 0xFF)
    la = _png(1, 1, 16, 4, b"\x00" + struct.pack(">2H", 0x0000, 0x8000))  # black, half transparent
    assert _close(load_image(la).getpixel((0, 0)), (127, 127, 127), tol=1)


def test_cmyk_jpeg_becomes_correct_rgb() -> None:
    data = _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert _close(load_image(data).getpixel((4, 4)), RED, tol=3)


def test_ycbcr_becomes_rgb() -> None:
    src = Image.new("RGB", (2, 2), (200, 10, 10)).convert("YCbCr")
    assert _close(load_image(src).getpixel((0, 0)), (200, 10, 10), tol=4)


def test_rgba_png_is_composited_onto_white() -> None:
    src = Image.new("RGBA", (3, 1))
    src.putdata([(0, 0, 255, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img = load_image(_encode(src, "PNG"))
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == BLUE
    assert _close(img.getpixel((2, 0)), (127, 127, 127), tol=1)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_onto_white(fmt: str) -> None:
    src = Image.new("P", (2, 1))
    src.putpalette([*RED, *BLUE])
    src.putdata([0, 1])
    data = _encode(src, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    img = load_image(data)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == BLUE


def test_colour_key_transparency_in_rgb_png() -> None:
    src = Image.new("RGB", (2, 1), RED)
    src.putpixel((1, 0), BLUE)
    img = load_image(_encode(src, "PNG", transparency=RED))
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == BLUE


@pytest.mark.parametrize(("mode", "value", "expected"), [("1", 1, WHITE), ("L", 77, (77, 77, 77))])
def test_bilevel_and_greyscale_become_rgb(mode: str, value: int, expected: tuple[int, int, int]) -> None:
    img = load_image(_encode(Image.new(mode, (3, 2), value), "PNG"))
    _assert_rgb(img, (3, 2))
    assert img.getpixel((2, 1)) == expected


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), RED)
    src.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img = load_image(_encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    _assert_rgb(img, (20, 40))
    assert _close(img.getpixel((10, 5)), RED, tol=8)  # the left edge is now the top
    assert _close(img.getpixel((10, 35)), BLUE, tol=8)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 255, 0), BLUE)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as src:
        assert getattr(src, "n_frames", 1) == 3
    img = load_image(data)
    _assert_rgb(img, (8, 8))
    assert _close(img.getpixel((4, 4)), RED, tol=4)


# ---------------------------------------------------------------- folders and batches


def _make_folder(root: Path) -> None:
    (root / "sub").mkdir()
    png = _encode(Image.new("RGB", (2, 2), RED), "PNG")
    for rel in ("b.png", "A.JPG", "sub/c.TiFf", "sub/d.webp"):
        _write(root / rel, png)  # content does not matter for listing
    _write(root / "readme.txt", b"not an image")
    (root / "folder.png").mkdir()  # a directory with an image suffix is not a file


def test_image_extensions_are_lowercase_suffixes() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_list_image_files(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    assert list_image_files(tmp_path) == [
        tmp_path / "A.JPG",
        tmp_path / "b.png",
        tmp_path / "sub" / "c.TiFf",
        tmp_path / "sub" / "d.webp",
    ]
    assert list_image_files(tmp_path, recursive=False) == [tmp_path / "A.JPG", tmp_path / "b.png"]


def test_list_image_files_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="does not exist"):
        list_image_files(tmp_path / "missing")
    with pytest.raises(ImageLoadError, match="is not a directory"):
        list_image_files(_write(tmp_path / "file.png", b"x"))


def test_iter_images_skips_and_counts_bad_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good1 = _write(tmp_path / "1_good.png", _encode(Image.new("L", (4, 4), 9), "PNG"))
    cut = _noise_jpeg()
    bad_cut = _write(tmp_path / "2_cut.jpg", cut[: len(cut) // 2])
    bad_text = _write(tmp_path / "3_text.jpg", b"plain text")
    bad_empty = _write(tmp_path / "4_empty.png", b"")
    good2 = _write(tmp_path / "5_good.jpg", _noise_jpeg())
    missing = tmp_path / "6_missing.png"

    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="insight_core.data.images"):
        loaded = list(iter_images([*list_image_files(tmp_path), missing], report=report))

    assert [p for p, _ in loaded] == [good1, good2]
    assert all(img.mode == "RGB" for _, img in loaded)
    assert (report.ok, report.skipped) == (2, 4)
    assert [p for p, _ in report.failures] == [bad_cut, bad_text, bad_empty, missing]
    reasons = [r for _, r in report.failures]
    assert "truncated" in reasons[0]
    assert "not a recognised image format" in reasons[1]
    assert "empty file" in reasons[2]
    assert "file not found" in reasons[3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert str(bad_cut) in warnings[0].getMessage()


def test_iter_images_raise_mode(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.png", _encode(Image.new("RGB", (2, 2)), "PNG"))
    bad = _write(tmp_path / "bad.png", b"nope")
    it = iter_images([good, bad], on_error="raise")
    assert next(it)[0] == good
    with pytest.raises(ImageLoadError, match=r"bad\.png"):
        next(it)


def test_iter_images_checks_on_error_eagerly() -> None:
    with pytest.raises(ConfigError, match="on_error"):
        iter_images([], on_error="ignore")  # type: ignore[arg-type]


def test_iter_images_passes_max_pixels(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.png", _encode(Image.new("RGB", (100, 100)), "PNG"))
    report = LoadReport()
    assert list(iter_images([path], max_pixels=5_000, report=report)) == []
    assert report.skipped == 1
    assert "max_pixels=5,000" in report.failures[0][1]


# ---------------------------------------------------------------- real photos


def test_real_photos_including_greyscale_come_back_rgb(imagenet_samples: list[Path]) -> None:
    headers = {}
    for path in imagenet_samples:  # header only: cheap
        with Image.open(path) as img:
            headers[path] = (img.mode, img.size)
    grey = [p for p, (mode, _) in headers.items() if mode != "RGB"]
    assert grey, "expected some greyscale photos among the samples"
    report = LoadReport()
    for path, img in iter_images([*imagenet_samples[:10], *grey], report=report):
        assert img.mode == "RGB"
        assert img.size == headers[path][1]
        if path in grey:
            arr = np.asarray(img)
            assert np.array_equal(arr[..., 0], arr[..., 1])
            assert np.array_equal(arr[..., 1], arr[..., 2])
    assert (report.ok, report.skipped) == (10 + len(grey), 0)


def test_no_decoding_fixture_really_blocks_decoding(no_decoding: None) -> None:
    with pytest.raises(ImageLoadError, match="pixels were decoded"):
        load_image(_encode(Image.new("RGB", (2, 2)), "PNG"))


# ---------------------------------------------------------------- formats that are not allowed (issue 19)


def test_fake_ghostscript_trap_really_fires(fake_gs: FakeGhostscript, tmp_path: Path) -> None:
    """Without the allow-list Pillow itself runs ``gs`` on the EPS: the tests below can fail."""
    path = _write(tmp_path / "x.eps", hostile.eps())
    with pytest.raises(OSError, match="cannot identify"), Image.open(path) as img:
        img.load()  # the fake gs wrote no pixels for Pillow to read back
    assert fake_gs.marker.exists()
    assert any("gs" in str(c) for c in fake_gs.started())


@pytest.mark.parametrize("make", [hostile.eps, hostile.dos_eps], ids=["eps", "dos-eps"])
@pytest.mark.parametrize("kind", ["path.eps", "path.jpg", "bytes", "file-object", "lazy-pil"])
def test_eps_is_refused_by_name_and_never_reaches_ghostscript(
    fake_gs: FakeGhostscript, tmp_path: Path, make: Callable[[], bytes], kind: str
) -> None:
    data = make()
    path = _write(tmp_path / ("photo.jpg" if kind == "path.jpg" else "x.eps"), data)
    source: object = {
        "path.eps": path,
        "path.jpg": path,  # content decides, not the suffix
        "bytes": data,
        "file-object": io.BytesIO(data),
        "lazy-pil": Image.open(path),  # an unrestricted open is still lazy: no gs yet
    }[kind]
    name = None if kind.startswith("path") else "upload"
    with pytest.raises(ImageLoadError) as info:
        load_image(source, name=name)  # type: ignore[arg-type]
    message = str(info.value)
    assert "EPS" in message
    assert "not allowed" in message
    assert (str(path) if name is None else "upload") in message
    assert fake_gs.started() == []


def test_open_image_refuses_eps_and_keeps_the_mode_of_allowed_ones(
    fake_gs: FakeGhostscript, tmp_path: Path
) -> None:
    with pytest.raises(ImageLoadError, match=r"labels\.png: EPS image .* not allowed"):
        open_image(_write(tmp_path / "labels.png", hostile.eps()))
    with open_image(_encode(Image.new("P", (3, 2), 4), "PNG"), name="map") as img:
        assert (img.mode, img.size, img.format) == ("P", (3, 2), "PNG")
    assert fake_gs.started() == []


def test_pdf_and_postscript_are_named() -> None:
    with pytest.raises(ImageLoadError, match=r"doc\.jpg: PDF image .* not allowed"):
        load_image(hostile.pdf(), name="doc.jpg")
    with pytest.raises(ImageLoadError, match=r"PostScript image .* not allowed"):
        load_image(b"%!\n/Times findfont 12 scalefont setfont\n", name="plain.ps")


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "SGI", "DDS"])
def test_other_pillow_formats_are_refused_by_name(fmt: str) -> None:
    data = _encode(Image.new("RGB", (8, 8), RED), fmt)
    with pytest.raises(ImageLoadError, match=rf"in\.img: {fmt} image .* not allowed, only JPEG, PNG"):
        load_image(data, name="in.img")


def test_pil_image_of_a_refused_format_is_refused_even_when_loaded() -> None:
    img = Image.open(io.BytesIO(_encode(Image.new("RGB", (4, 4), RED), "PPM")))
    img.load()
    with pytest.raises(ImageLoadError, match="PPM image"):
        load_image(img, name="given")
    check_pil_format(Image.new("RGB", (2, 2)), "in memory")  # no format: nothing to decode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format_loads(fmt: str) -> None:
    assert fmt in ALLOWED_FORMATS
    img = load_image(_encode(Image.new("RGB", (6, 4), BLUE), fmt))
    _assert_rgb(img, (6, 4))
    assert _close(img.getpixel((3, 2)), BLUE, 8)


def test_camera_jpeg_with_a_multi_picture_index_loads() -> None:
    """Pillow opens such JPEGs as MPO (phones store depth maps/previews that way): allowed."""
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.format == "MPO"
    img = load_image(data)
    assert _close(img.getpixel((4, 4)), RED, 8)


def test_sniff_format_names_without_opening() -> None:
    assert sniff_format(hostile.eps()[:16]) == "EPS"
    assert sniff_format(hostile.dos_eps()[:16]) == "EPS"
    assert sniff_format(hostile.pdf()[:16]) == "PDF"
    assert sniff_format(_encode(Image.new("RGB", (2, 2)), "PNG")[:16]) == "PNG"
    assert sniff_format(b"hello, world") is None
    assert sniff_format(b"") is None


def test_folders_list_refused_formats_so_they_are_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.jpg", _noise_jpeg())
    _write(tmp_path / "b.EPS", hostile.eps())
    _write(tmp_path / "c.pdf", hostile.pdf())
    _write(tmp_path / "d.txt", b"notes")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.EPS", "c.pdf"]
    report = LoadReport()
    assert [p.name for p, _ in iter_images(list_image_files(tmp_path), report=report)] == ["a.jpg"]
    assert [("EPS" in r, "PDF" in r) for _, r in report.failures] == [(True, False), (False, True)]
    assert all(ext in REFUSED_EXTENSIONS for ext in (".eps", ".ps", ".pdf"))
    assert not REFUSED_EXTENSIONS & IMAGE_EXTENSIONS


def test_pillow_itself_cannot_run_ghostscript_once_the_loader_is_imported(
    fake_gs: FakeGhostscript, tmp_path: Path
) -> None:
    """The second line: a third-party ``Image.open(...).load()`` of an EPS fails without starting gs."""
    forbid_ghostscript()  # what importing insight_core.data.images did (fake_gs undid it)
    path = _write(tmp_path / "x.eps", hostile.eps())
    with pytest.raises(OSError, match="Ghostscript"), Image.open(path) as img:
        img.load()
    assert fake_gs.started() == []
