"""Image sources for ``extract``: an image folder, webdataset tar shards, or a Hugging Face dataset.

Kept as one module (~530 lines): the three sources (~150 lines each) implement one small contract,
:class:`ImageSource` and the id scheme below, that :func:`open_source` dispatches on.

A source plans its images into fixed shards (shard k always holds the same images, so an
interrupted extract resumes shard by shard), gives each image a stable string id, and can fetch
images by id again later (``index`` uses that for thumbnails, so the app never needs the source).
Its JSON description is stored as ``source`` in the feature manifest; :func:`open_source` rebuilds
the source from it.

Image ids:

- folder: the path relative to the folder (``n01440764/img_001.jpg``);
- webdataset: ``<tar path relative to the shard folder>::<member name>`` (``train-0003.tar::000123.jpg``);
- Hugging Face dataset: ``<split>[<row index>]`` in stream order (``train[1234]``).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from insight_core.data.images import DEFAULT_MAX_PIXELS, is_image_name, list_image_files, load_image
from insight_core.errors import ConfigError, ImageLoadError

log = logging.getLogger(__name__)

Loaded = tuple[str, Image.Image | ImageLoadError]
"""An image id and its decoded image, or the error that stopped it from loading."""

MAX_MEMBER_BYTES = 256 * 2**20
"""Tar members larger than this are refused before reading (a sample image is rarely > 50 MB)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One planned image: its stable id and how to load it (raises :class:`ImageLoadError`)."""

    id: str
    load: Callable[[], Image.Image]
    """Call it before advancing the iterator that yielded the record (tar members are read in place)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedShard:
    """Shard ``index`` of a source's plan; ``key`` changes whenever its images could have changed."""

    index: int
    key: str
    n_planned: int
    records: Callable[[], Iterator[Record]]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImageSource(abc.ABC):
    """Where images come from; see the module docstring."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON description (``kind`` plus what :func:`open_source` needs to reopen it)."""

    @abc.abstractmethod
    def shards(self, shard_size: int, max_images: int | None = None) -> Iterator[PlannedShard]:
        """The plan, in order. Skipping a shard (not calling ``records``) is allowed."""

    @abc.abstractmethod
    def fetch(self, ids: Sequence[str], workers: int = 4) -> Iterator[Loaded]:
        """Decode the images ``ids`` again (any order); unknown or unreadable ids give an error."""

    def n_total(self, max_images: int | None = None) -> int | None:
        """Number of images the plan will hold, when known without reading the data."""
        return max_images

    def modified_ns(self, image_id: str) -> int | None:
        """Modification time of the image's file, when it has one (thumbnail reuse)."""
        return None


def _check_shard_size(shard_size: int) -> None:
    if shard_size <= 0:
        raise ConfigError(f"shard size must be positive, got {shard_size}")


# --------------------------------------------------------------------------------------------------
# Image folder


class FolderSource(ImageSource):
    """Image files under ``root`` (recursive), sorted by path."""

    def __init__(self, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise ImageLoadError(f"{self.root}: image folder not found")
        self._paths: list[Path] | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.root)}

    def paths(self) -> list[Path]:
        if self._paths is None:
            self._paths = list_image_files(self.root)
            if not self._paths:
                raise ImageLoadError(f"{self.root}: no images found")
        return self._paths

    def n_total(self, max_images: int | None = None) -> int | None:
        n = len(self.paths())
        return n if max_images is None else min(n, max_images)

    def shards(self, shard_size: int, max_images: int | None = None) -> Iterator[PlannedShard]:
        _check_shard_size(shard_size)
        paths = self.paths()[:max_images]
        for k, start in enumerate(range(0, len(paths), shard_size)):
            chunk = paths[start : start + shard_size]
            stats = [(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in chunk]
            yield PlannedShard(k, _hash("folder", stats), len(chunk), self._records(chunk))

    def _records(self, chunk: list[Path]) -> Callable[[], Iterator[Record]]:
        def records() -> Iterator[Record]:
            for p in chunk:
                yield Record(
                    str(p.relative_to(self.root)),
                    functools.partial(load_image, p, max_pixels=self.max_pixels),
                )

        return records

    def _load(self, image_id: str) -> Loaded:
        path = self.root / image_id
        try:
            if Path(image_id).is_absolute() or ".." in Path(image_id).parts:  # ids are relative paths
                raise ImageLoadError(f"{image_id}: not a path inside {self.root}")
            return image_id, load_image(path, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            return image_id, err

    def fetch(self, ids: Sequence[str], workers: int = 4) -> Iterator[Loaded]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            yield from pool.map(self._load, ids)

    def modified_ns(self, image_id: str) -> int | None:
        try:
            return (self.root / image_id).stat().st_mtime_ns
        except OSError:
            return None


# --------------------------------------------------------------------------------------------------
# webdataset tar shards

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TAR_SEP = "::"


def expand_braces(pattern: str) -> list[str]:
    """webdataset-style brace ranges: ``train-{000..002}.tar`` -> three names (zero padding kept)."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ConfigError(f"{pattern!r}: brace range {{{lo}..{hi}}} is empty")
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(f"{head}{i:0{width}d}{tail}")
    return out


def resolve_tars(spec: str | Path) -> tuple[Path, list[Path]]:
    """(base folder, tar files) for a folder of ``.tar`` files, one tar, a glob or a brace pattern."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        tars = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz"))
        )
        base = path
    else:
        names = [
            n
            for pat in expand_braces(text)
            for n in (sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat])
        ]
        tars = [Path(n) for n in names]
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise ImageLoadError(f"{text}: webdataset shard(s) not found: {', '.join(missing[:3])}")
        base = Path(text.split("{")[0]).parent if "{" in text else tars[0].parent if tars else path.parent
    if not tars:
        raise ImageLoadError(f"{text}: no webdataset .tar shards found")
    return base, tars


def _is_image_member(member: tarfile.TarInfo) -> bool:
    return member.isfile() and is_image_name(member.name)


class WebDatasetSource(ImageSource):
    """Image members of webdataset tar shards (``key.jpg`` next to ``key.cls`` / ``key.json``; non-image
    members are ignored), in shard order then member order."""

    def __init__(self, spec: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = str(spec)
        self.max_pixels = max_pixels
        self.base, self.tars = resolve_tars(spec)
        self._members: list[tuple[Path, tarfile.TarInfo]] = []
        self._complete = False  # _members holds every image member (not just a prefix)

    def describe(self) -> dict[str, Any]:
        return {"kind": "webdataset", "path": self.spec}

    def _rel(self, tar: Path) -> str:
        try:
            return str(tar.relative_to(self.base))
        except ValueError:
            return str(tar)

    def _tar_path(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() else self.base / path

    def members(self, limit: int | None = None) -> list[tuple[Path, tarfile.TarInfo]]:
        """Every image member (tar, header); reads only tar headers."""
        if not self._complete and (limit is None or len(self._members) < limit):
            found: list[tuple[Path, tarfile.TarInfo]] = []
            for tar in self.tars:
                try:
                    with tarfile.open(tar, "r:*") as tf:
                        for member in tf:
                            if _is_image_member(member):
                                found.append((tar, member))
                                if limit is not None and len(found) >= limit:
                                    break
                except (tarfile.TarError, OSError, EOFError) as err:
                    raise ImageLoadError(f"{tar}: unreadable webdataset shard ({err})") from err
                if limit is not None and len(found) >= limit:
                    break
            else:
                self._complete = True
            self._members = found
        return self._members if limit is None else self._members[:limit]

    def n_total(self, max_images: int | None = None) -> int | None:
        return len(self.members(max_images))

    def shards(self, shard_size: int, max_images: int | None = None) -> Iterator[PlannedShard]:
        _check_shard_size(shard_size)
        members = self.members(max_images)
        if not members:
            raise ImageLoadError(f"{self.spec}: the tar shards hold no images")
        for k, start in enumerate(range(0, len(members), shard_size)):
            chunk = members[start : start + shard_size]
            tar_stats = {self._rel(t): (t.stat().st_size, t.stat().st_mtime_ns) for t, _ in chunk}
            key = _hash("webdataset", tar_stats, [(self._rel(t), m.name, m.size) for t, m in chunk])
            yield PlannedShard(k, key, len(chunk), self._records(chunk))

    def _image_id(self, tar: Path, member: tarfile.TarInfo) -> str:
        return f"{self._rel(tar)}{_TAR_SEP}{member.name}"

    def _read(self, tf: tarfile.TarFile, member: tarfile.TarInfo, image_id: str) -> Image.Image:
        if member.size > MAX_MEMBER_BYTES:
            raise ImageLoadError(
                f"{image_id}: {member.size / 2**20:.0f} MB member, larger than any sane image"
            )
        fp = tf.extractfile(member)
        if fp is None:
            raise ImageLoadError(f"{image_id}: not a regular file in the tar")
        return load_image(fp.read(), max_pixels=self.max_pixels, name=image_id)

    def _records(self, chunk: list[tuple[Path, tarfile.TarInfo]]) -> Callable[[], Iterator[Record]]:
        def records() -> Iterator[Record]:
            for tar, group in itertools.groupby(chunk, key=lambda tm: tm[0]):
                with tarfile.open(tar, "r:*") as tf:
                    for _, member in group:
                        image_id = self._image_id(tar, member)
                        yield Record(image_id, functools.partial(self._read, tf, member, image_id))

        return records

    def fetch(self, ids: Sequence[str], workers: int = 4) -> Iterator[Loaded]:
        by_tar: dict[str, list[str]] = {}
        for image_id in ids:
            rel, sep, _ = image_id.rpartition(_TAR_SEP)
            if not sep:
                yield image_id, ImageLoadError(f"{image_id}: not a webdataset image id (tar{_TAR_SEP}member)")
                continue
            by_tar.setdefault(rel, []).append(image_id)
        for rel, wanted in by_tar.items():
            yield from self._fetch_from(rel, wanted)

    def _fetch_from(self, rel: str, wanted: list[str]) -> Iterator[Loaded]:
        tar = self._tar_path(rel)
        try:
            with tarfile.open(tar, "r:*") as tf:
                names = {i.rpartition(_TAR_SEP)[2]: i for i in wanted}
                for member in tf:
                    image_id = names.pop(member.name, None)
                    if image_id is not None:
                        try:
                            yield image_id, self._read(tf, member, image_id)
                        except ImageLoadError as err:
                            yield image_id, err
                    if not names:
                        break
        except (tarfile.TarError, OSError, EOFError) as err:
            names = {i.rpartition(_TAR_SEP)[2]: i for i in wanted}
            log.warning("%s: unreadable webdataset shard (%s)", tar, err)
        for image_id in names.values():
            yield image_id, ImageLoadError(f"{image_id}: not found in {tar}")

    def modified_ns(self, image_id: str) -> int | None:
        try:
            return self._tar_path(image_id.rpartition(_TAR_SEP)[0]).stat().st_mtime_ns
        except OSError:
            return None


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets

_HF_ID = re.compile(r"^(?P<split>.+)\[(?P<row>\d+)\]$")


@dataclasses.dataclass(frozen=True, slots=True)
class HFDatasetSpec:
    """A Hugging Face dataset split, read in streaming mode (nothing is downloaded up front)."""

    name: str
    """Hub name (``ILSVRC/imagenet-1k``), a local dataset folder, or a builder (``imagefolder``)."""
    split: str = "train"
    """Split to read."""
    config: str | None = None
    """Dataset configuration (subset) name."""
    image_column: str | None = None
    """Column with the images; default: the first column of the ``Image`` feature type."""
    revision: str | None = None
    """Git revision (commit, tag or branch) of a Hub dataset; pin it for reproducible atlases."""
    data_dir: str | None = None
    """``data_dir`` for builders such as ``imagefolder``."""


class HFDatasetSource(ImageSource):
    """Rows of a ``datasets`` split, streamed in order. Shard k is rows ``[k*S, (k+1)*S)``; a resumed
    run streams past finished shards without decoding their images."""

    def __init__(self, spec: HFDatasetSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self._column: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf-dataset", **dataclasses.asdict(self.spec)}

    def _stream(self) -> Any:
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a requirement
            raise ConfigError("reading a Hugging Face dataset needs `pip install datasets`") from err
        spec = self.spec
        try:
            ds = datasets.load_dataset(
                spec.name,
                spec.config,
                split=spec.split,
                streaming=True,
                revision=spec.revision,
                data_dir=spec.data_dir,
            )
        except Exception as err:  # datasets raises many types (hub, network, missing split)
            raise ImageLoadError(f"dataset {spec.name!r} split {spec.split!r}: cannot open ({err})") from err
        column = self._image_column(ds)
        return ds.select_columns([column]).cast_column(column, datasets.Image(decode=False)), column

    def _image_column(self, ds: Any) -> str:
        import datasets

        features = ds.features or {}
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        column = self.spec.image_column
        if column is None:
            if not images:
                raise ConfigError(
                    f"dataset {self.spec.name!r}: no Image column among {list(features)};"
                    " pass --hf-image-column"
                )
            return images[0]
        if column not in features:
            raise ConfigError(f"dataset {self.spec.name!r}: no column {column!r} (columns: {list(features)})")
        if not isinstance(features[column], datasets.Image):
            raise ConfigError(
                f"dataset {self.spec.name!r}: column {column!r} is {features[column]}, not an Image"
            )
        return column

    def _decode(self, value: Any, image_id: str) -> Image.Image:
        return load_hf_image(value, image_id, max_pixels=self.max_pixels)

    def shards(self, shard_size: int, max_images: int | None = None) -> Iterator[PlannedShard]:
        _check_shard_size(shard_size)
        ds, column = self._stream()
        rows: Iterator[tuple[int, Any]] = enumerate(ds)
        if max_images is not None:
            rows = itertools.islice(rows, max_images)
        ident = self.describe()
        for k in itertools.count():
            n_planned = shard_size if max_images is None else min(shard_size, max_images - k * shard_size)
            pending = list(itertools.islice(rows, 1)) if n_planned > 0 else []
            if not pending:
                return
            chunk = itertools.chain(pending, itertools.islice(rows, n_planned - 1))
            yield PlannedShard(
                k, _hash(ident, k, shard_size, n_planned), n_planned, self._records(chunk, column)
            )
            for _ in chunk:  # the rest of a skipped (finished) shard: stream past it, nothing is decoded
                pass

    def _records(self, chunk: Iterator[tuple[int, Any]], column: str) -> Callable[[], Iterator[Record]]:
        def records() -> Iterator[Record]:
            for row, example in chunk:
                image_id = f"{self.spec.split}[{row}]"
                yield Record(image_id, functools.partial(self._decode, example[column], image_id))

        return records

    def fetch(self, ids: Sequence[str], workers: int = 4) -> Iterator[Loaded]:
        wanted: dict[int, str] = {}
        for image_id in ids:
            m = _HF_ID.match(image_id)
            if m is None or m.group("split") != self.spec.split:
                yield image_id, ImageLoadError(f"{image_id}: not a row of split {self.spec.split!r}")
            else:
                wanted[int(m.group("row"))] = image_id
        if not wanted:
            return
        ds, column = self._stream()
        last = max(wanted)
        for row, example in enumerate(ds):  # one pass, stopping after the last wanted row
            found = wanted.pop(row) if row in wanted else None
            if found is not None:
                image_id = found
                try:
                    yield image_id, self._decode(example[column], image_id)
                except ImageLoadError as err:
                    yield image_id, err
            if row >= last:
                break
        for image_id in wanted.values():
            yield image_id, ImageLoadError(f"{image_id}: the stream ended before this row")


def load_hf_image(value: Any, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one cell of a ``datasets`` image column read with ``Image(decode=False)``.

    The bytes always reach our own :func:`load_image` (format allow-list): ``datasets``' decoder
    would hand them to every Pillow plugin, EPS (Ghostscript) included. A remote path is fetched
    with ``datasets``' own file opener (at most :data:`MAX_MEMBER_BYTES`) and checked the same way.
    A plain path or bytes cell (a non-Image column) is loaded as is.

    Raises
    ------
    ImageLoadError
        Empty cell, unreadable file, or anything :func:`load_image` refuses (``name`` names the row).
    """
    if isinstance(value, (str, bytes, bytearray)):
        value = {"path": value} if isinstance(value, str) else {"bytes": value}
    if not isinstance(value, dict):
        what = "empty image cell" if value is None else f"image cell is a {type(value).__name__}"
        raise ImageLoadError(f"{name}: {what}, expected encoded bytes or a path (Image(decode=False))")
    data = value.get("bytes")
    if data:
        if not isinstance(data, (bytes, bytearray, memoryview)):  # a str here would be read as a path
            raise ImageLoadError(f"{name}: image bytes are a {type(data).__name__}, expected bytes")
        return load_image(data, max_pixels=max_pixels, name=name)
    path = value.get("path")
    if path and Path(path).is_file():
        return load_image(path, max_pixels=max_pixels, name=name)
    if path:
        return load_image(_read_remote(str(path), name), max_pixels=max_pixels, name=name)
    raise ImageLoadError(f"{name}: image cell has neither bytes nor a path")


def _read_remote(path: str, name: str) -> bytes:
    """The bytes of a remote (hub, http, archive) image file, read with ``datasets``' opener."""
    from datasets.download.download_config import DownloadConfig
    from datasets.utils.file_utils import xopen

    try:
        with xopen(path, "rb", download_config=DownloadConfig()) as f:
            data = f.read(MAX_MEMBER_BYTES + 1)
    except Exception as err:  # fsspec, hub and network errors have many types
        raise ImageLoadError(f"{name}: cannot read {path} ({err})") from err
    if len(data) > MAX_MEMBER_BYTES:
        raise ImageLoadError(f"{name}: {path} is larger than {MAX_MEMBER_BYTES // 2**20} MB")
    return bytes(data)


# --------------------------------------------------------------------------------------------------


def open_source(description: dict[str, Any] | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSource:
    """Reopen a source from its :meth:`ImageSource.describe` (a bare string is an image folder)."""
    if isinstance(description, str):
        return FolderSource(description, max_pixels)
    if not isinstance(description, dict):
        raise ConfigError(f"image source description must be a dict, got {type(description).__name__}")
    desc = dict(description)
    kind = desc.pop("kind", None)
    if kind == "folder":
        return FolderSource(desc["path"], max_pixels)
    if kind == "webdataset":
        return WebDatasetSource(desc["path"], max_pixels)
    if kind == "hf-dataset":
        fields = {f.name for f in dataclasses.fields(HFDatasetSpec)}
        return HFDatasetSource(HFDatasetSpec(**{k: v for k, v in desc.items() if k in fields}), max_pixels)
    raise ConfigError(f"unknown image source kind {kind!r} (expected folder, webdataset or hf-dataset)")


def make_source(
    images: Path | None = None,
    webdataset: str | None = None,
    hf: HFDatasetSpec | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSource:
    """The one source named by the command-line options; exactly one must be given."""
    given = [
        name for name, v in (("--images", images), ("--webdataset", webdataset), ("--hf-dataset", hf)) if v
    ]
    if len(given) != 1:
        raise ConfigError(
            "give exactly one image source: --images FOLDER, --webdataset SHARDS or --hf-dataset NAME"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if images is not None:
        return FolderSource(images, max_pixels)
    if webdataset is not None:
        return WebDatasetSource(webdataset, max_pixels)
    assert hf is not None
    return HFDatasetSource(hf, max_pixels)
