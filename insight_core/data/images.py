"""Robust image loading shared by every pipeline stage and the app.

:func:`load_image` turns a path, raw bytes, a binary file object or a PIL image into a fully loaded
8-bit RGB image with EXIF orientation applied, and reports every kind of bad input (missing,
empty, not an image, a format not allowed, truncated, too large, zero-size) as
:class:`~insight_core.errors.ImageLoadError`. :func:`iter_images` wraps it for batch jobs that skip
and count bad images; :func:`open_image` is the header-only open for readers that need the raw mode
(label maps).

Every image is untrusted: only the Pillow decoders in :data:`ALLOWED_FORMATS` ever see its bytes,
chosen by content, never by file name. Pillow's EPS reader, for one, runs Ghostscript. As a second
line, importing this module tells Pillow there is no Ghostscript (:func:`forbid_ghostscript`), so a
decode outside this module (a third-party library's own ``Image.open``) cannot start it either.
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
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps, UnidentifiedImageError

from insight_core.errors import ConfigError, ImageLoadError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image
"""Anything :func:`load_image` accepts."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Refuse images with more pixels than this (decompression-bomb guard, about 7000x7000)."""

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
"""Pillow formats an untrusted image may have; any other is refused before a byte is decoded.

These decode in-process (Pillow's own code, libjpeg, libpng/zlib, libwebp, libtiff) and never start
another program, unlike EPS/PostScript (Pillow runs Ghostscript on them, a long record of
remote-code-execution bugs). MPO is here because Pillow opens camera JPEGs that carry a
multi-picture index (depth maps, previews) as MPO: same JPEG decoder. Pillow's other readers (PSD,
ICO, TGA, JPEG 2000, AVIF, FITS, ...) are refused too: no photo collection needs them and each is
more decoder surface. Content decides, never the file name: ``Image.open`` tries only these plugins."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Lower-case file suffixes that :func:`list_image_files` treats as images."""

REFUSED_EXTENSIONS = frozenset(
    {".eps", ".epsf", ".epsi", ".ps", ".ai", ".pdf", ".psd", ".ico", ".icns", ".tga", ".jp2", ".j2k"}
    | {".jpx", ".avif", ".heic", ".heif", ".pcx", ".ppm", ".pgm", ".pbm", ".pnm", ".sgi", ".dds"}
)
"""Suffixes of image formats that are not allowed. :func:`list_image_files` lists these files too, so
that batch jobs report them as refused (with the format) instead of silently leaving them out; their
content still decides (a PNG named ``x.eps`` loads)."""

_OPENERS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The Pillow plugins ``Image.open`` may try: :data:`ALLOWED_FORMATS` less MPO, which has no opener
of its own (the JPEG plugin returns an MPO image when it finds the multi-picture index)."""

_SIGNATURES = ((b"%PDF", "PDF"), (b"%!", "PostScript"), (b"<?xml", "XML/SVG"), (b"<svg", "SVG"))
"""Formats Pillow cannot open but people upload as images, named in the refusal message."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WHITE = (255, 255, 255)


def forbid_ghostscript() -> None:
    """Make Pillow's EPS reader fail ("Unable to locate Ghostscript") instead of running ``gs``.

    Called when this module is imported (every stage and the app import it). Pillow caches whether
    it found ``gs`` in ``EpsImagePlugin.gs_binary``; ``False`` means "looked, none", so it never
    searches PATH again.
    """
    EpsImagePlugin.gs_binary = False


forbid_ghostscript()


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
        check_pil_format(source, label)  # a lazy image of another format would decode it on .load()
        return _decode(source, label, max_pixels)
    label, img = _open_checked(source, name, max_pixels)
    with img:
        return _decode(img, label, max_pixels)


def open_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Open an untrusted image, header only, with the checks of :func:`load_image` but no decoding.

    For readers that need the stored mode (label maps); close the result (``with open_image(...)``).
    Its format is one of :data:`ALLOWED_FORMATS` (content sniffed, whatever the file name) and
    ``width * height <= max_pixels``.

    Raises
    ------
    ImageLoadError
        The input is missing, empty, not an image, of a format not allowed, too large or zero-size.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive int, got {max_pixels!r}")
    return _open_checked(source, name, max_pixels)[1]


def check_pil_format(img: Image.Image, label: str) -> None:
    """Refuse a PIL image read by a decoder outside :data:`ALLOWED_FORMATS`, before ``.load()`` runs it.

    Images made in memory (``Image.new``, ``fromarray``, ``convert`` ...) have no decoder behind them
    and pass.

    Raises
    ------
    ImageLoadError
        ``img`` came from a reader that is not allowed (``label`` names it in the message).
    """
    if not isinstance(img, ImageFile.ImageFile):
        return  # only a plugin's ImageFile decodes anything on .load()
    for fmt in (img.format, type(img).format):  # the plugin class decides what .load() runs
        if fmt not in ALLOWED_FORMATS:
            raise ImageLoadError(_refusal(label, fmt or f"unknown ({type(img).__name__})"))


def is_image_name(name: str | os.PathLike) -> bool:
    """True for a file name whose suffix (any case) is in :data:`IMAGE_EXTENSIONS` or
    :data:`REFUSED_EXTENSIONS`: what folder and tar-shard sources list (content decides later)."""
    suffix = Path(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in REFUSED_EXTENSIONS


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files in ``folder`` (:func:`is_image_name`: the suffix of an allowed or a refused
    image format, any case; refused ones are listed so that loading reports them by format).

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
    return sorted(p for p in candidates if is_image_name(p) and p.is_file())


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


def _open_checked(source: object, name: str | None, max_pixels: int) -> tuple[str, Image.Image]:
    """``(label, header-only image)`` of a path/bytes/file source: allowed format, sane size."""
    label, fp = _prepare_source(source, name)
    img = _open(fp, label)
    try:
        _check_size(img, label, max_pixels)
    except ImageLoadError:
        img.close()
        raise
    return label, img


def _refusal(label: str, fmt: str) -> str:
    allowed = ", ".join(ALLOWED_FORMATS)
    return (
        f"{label}: {fmt} image (detected from the content, not the file name); the {fmt} format is "
        f"not allowed, only {allowed}"
    )


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
    """``Image.open`` (header only, allowed formats only) with every failure mapped to
    :class:`ImageLoadError`."""
    try:
        img = Image.open(fp, formats=_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning counts only when the caller escalated warnings to errors).
        raise ImageLoadError(f"{label}: image too large, possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError:
        raise ImageLoadError(_unidentified(fp, label)) from None
    except OSError as exc:
        raise ImageLoadError(f"{label}: cannot read file ({exc})") from exc
    except Exception as exc:  # plugins raise assorted types on malformed headers
        raise ImageLoadError(f"{label}: corrupt image header ({type(exc).__name__}: {exc})") from exc
    try:
        check_pil_format(img, label)  # belt and braces: a plugin factory could hand back another class
    except ImageLoadError:
        img.close()
        raise
    return img


def _unidentified(fp: Path | io.BytesIO, label: str) -> str:
    """Why no allowed decoder took the data: a named format that is not allowed, or not an image."""
    try:
        if isinstance(fp, Path):
            with fp.open("rb") as f:
                head = f.read(16)
        else:
            head = fp.getvalue()[:16]
    except OSError:
        head = b""
    fmt = sniff_format(head)
    if fmt is None:
        return f"{label}: not a recognised image format (expected {', '.join(ALLOWED_FORMATS)})"
    if fmt in ALLOWED_FORMATS:
        return f"{label}: corrupt {fmt} image header"
    return _refusal(label, fmt)


def sniff_format(head: bytes) -> str | None:
    """The image format that the first bytes of a file announce, or None when none does.

    Asks every Pillow plugin's signature check (pure byte comparisons: nothing is opened or decoded),
    then a few formats Pillow cannot read (PDF, PostScript, SVG). Used to name a refused format.
    """
    Image.init()  # register every plugin: a format we refuse is usually not imported yet
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is None:
            continue  # these plugins can only tell by trying to open the file: never for refused data
        try:
            if accept(head[:16]):
                return fmt
        except Exception:  # some checks index past a short prefix
            continue
    for magic, fmt in _SIGNATURES:
        if head.lstrip()[: len(magic)] == magic:
            return fmt
    return None


def _check_size(img: Image.Image, label: str, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, more than "
            f"max_pixels={max_pixels:,} (possible decompression bomb)"
        )


def _decode(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Check the header size, decode pixels, apply EXIF orientation and convert to RGB."""
    _check_size(img, label, max_pixels)
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
