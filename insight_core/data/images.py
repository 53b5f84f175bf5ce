"""Robust image loading shared by every pipeline stage and the app.

:func:`load_image` turns a path, raw bytes, a binary file object or a PIL image into a fully loaded
8-bit RGB image with EXIF orientation applied, and reports every kind of bad input (missing,
empty, not an image, truncated, too large, zero-size) as :class:`~insight_core.errors.ImageLoadError`.
:func:`iter_images` wraps it for batch jobs that skip and count bad images.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from insight_core.errors import ConfigError, ImageLoadError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image
"""Anything :func:`load_image` accepts."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Refuse images with more pixels than this (decompression-bomb guard, about 7000x7000)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Lower-case file suffixes that :func:`list_image_files` treats as images."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WHITE = (255, 255, 255)


@dataclasses.dataclass(slots=True)
class LoadReport:
    """Mutable tally that :func:`iter_images` fills in, so batch jobs can report skipped images."""

    ok: int = 0
    """Images loaded successfully."""
    skipped: int = 0
    """Images skipped because they could not be loaded."""
    failures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    """``(path, reason)`` for every skipped image, in input order."""


def load_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Load an image as a fully decoded 8-bit RGB ``PIL.Image`` with EXIF orientation applied.

    Parameters
    ----------
    source
        A file path, raw encoded bytes, a binary file object, or an already open PIL image (it is
        loaded if still lazy, but never changed or closed).
    max_pixels
        Refuse images whose header claims more than ``width * height`` pixels, before decoding.
        Pillow's own guard (``2 * Image.MAX_IMAGE_PIXELS``) still applies above that.
    name
        How to name the input in error messages (defaults to the path, or ``"<bytes>"``).

    Returns
    -------
    PIL.Image.Image
        A new RGB image; transparency is composited onto white, animations give their first frame.

    Raises
    ------
    ImageLoadError
        The input is missing, empty, not an image, truncated/corrupt, too large or zero-size.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "<PIL.Image>"
        return _decode(source, label, max_pixels)
    label, fp = _prepare_source(source, name)
    with _open(fp, label) as img:
        return _decode(img, label, max_pixels)


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files in ``folder`` (suffix in :data:`IMAGE_EXTENSIONS`, any case).

    Raises
    ------
    ImageLoadError
        ``folder`` does not exist or is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise ImageLoadError(f"{folder}: image folder {what}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def iter_images(
    paths: Iterable[str | os.PathLike],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_error: Literal["skip", "raise"] = "skip",
    report: LoadReport | None = None,
) -> Iterator[tuple[Path, Image.Image]]:
    """Yield ``(path, rgb_image)`` for each path, skipping (and logging) unreadable images.

    Parameters
    ----------
    paths
        Image files, loaded lazily in order.
    max_pixels
        Passed to :func:`load_image`.
    on_error
        ``"skip"`` logs a WARNING and moves on; ``"raise"`` re-raises the :class:`ImageLoadError`.
    report
        Optional :class:`LoadReport` updated with the ok/skipped counts and failure reasons.
    """
    if on_error not in ("skip", "raise"):
        raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    # Validate eagerly, then hand back a generator (a bare generator would defer the check).
    return _iter_images(paths, max_pixels, on_error, report if report is not None else LoadReport())


def _iter_images(
    paths: Iterable[str | os.PathLike], max_pixels: int, on_error: str, report: LoadReport
) -> Iterator[tuple[Path, Image.Image]]:
    for raw_path in paths:
        path = Path(raw_path)
        try:
            img = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            if on_error == "raise":
                raise
            logger.warning("skipping image: %s", exc)
            report.skipped += 1
            report.failures.append((path, str(exc)))
            continue
        report.ok += 1
        yield path, img


def _prepare_source(source: object, name: str | None) -> tuple[str, Path | io.BytesIO]:
    """Check a path/bytes/file source cheaply and return ``(label, thing for Image.open)``."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        _check_file(path, label)
        return label, path
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = name or "<bytes>", bytes(source)
    elif hasattr(source, "read"):
        label = name or str(getattr(source, "name", "") or "<file object>")
        data = _read_stream(cast(BinaryIO, source), label)
    else:
        raise TypeError(
            f"image source must be a path, bytes, a binary file object or a PIL image, "
            f"got {type(source).__name__}"
        )
    if not data:
        raise ImageLoadError(f"{label}: empty image data (0 bytes)")
    return label, io.BytesIO(data)


def _check_file(path: Path, label: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: file not found") from None
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read file ({exc})") from exc
    if path.is_dir():
        raise ImageLoadError(f"{label}: is a directory, expected an image file")
    if size == 0:
        raise ImageLoadError(f"{label}: empty file (0 bytes)")


def _read_stream(stream: BinaryIO, label: str) -> bytes:
    # Read it all: uploads are small, and PIL needs a seekable stream anyway.
    try:
        data = stream.read()
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read file object ({exc})") from exc
    if not isinstance(data, (bytes, bytearray)):
        raise ImageLoadError(
            f"{label}: file object returned {type(data).__name__}, expected bytes (open it in binary mode)"
        )
    return bytes(data)


def _open(fp: Path | io.BytesIO, label: str) -> Image.Image:
    """``Image.open`` (header only) with every failure mapped to :class:`ImageLoadError`."""
    try:
        return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning counts only when the caller escalated warnings to errors).
        raise ImageLoadError(f"{label}: image too large, possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{label}: not a recognised image format (expected e.g. JPEG, PNG, WebP, BMP, GIF, TIFF)"
        ) from None
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read file ({exc})") from exc
    except Exception as exc:  # plugins raise assorted types on malformed headers
        raise ImageLoadError(f"{label}: corrupt image header ({type(exc).__name__}: {exc})") from exc


def _decode(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Check the header size, decode pixels, apply EXIF orientation and convert to RGB."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, more than "
            f"max_pixels={max_pixels:,} (possible decompression bomb)"
        )
    try:
        img.load()  # LOAD_TRUNCATED_IMAGES stays off, so truncation raises here
    except Exception as exc:  # OSError, SyntaxError, zlib/struct errors... depending on the plugin
        raise ImageLoadError(f"{label}: truncated or corrupt image data ({exc})") from exc
    img = _exif_transpose(img, label)
    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageLoadError(f"{label}: cannot convert colour mode {img.mode!r} to RGB ({exc})") from exc


def _exif_transpose(img: Image.Image, label: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block should not cost us otherwise good pixels
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to a new 8-bit RGB image; transparency is composited onto white."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _scale_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # also resolves palette / colour-key transparency
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # a copy even when already RGB, so callers never share pixels


def _scale_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8-bit ``L``.

    Pillow's own ``convert`` clips these to 255 instead of scaling. Integer modes are taken as
    16-bit data (0..65535 -> 0..255, i.e. divide by 257); floats in [0, 1] are multiplied by 255
    and any other float range is min-max stretched (non-finite values become the minimum).
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode != "F":
        scaled = np.clip(arr, 0, 65535) / 257
    else:
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        arr = np.where(finite, arr, lo)
        if lo >= 0 and hi <= 1:
            scaled = arr * 255
        else:
            scaled = (arr - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(scaled).astype(np.uint8))
