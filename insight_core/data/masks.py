"""The one segmentation-mask format of every evaluation (OVS, concept metrics), aligned with features.

A mask folder (:class:`~insight_core.atlas.layout.MasksLayout`) holds, for every feature shard
``shard_XXXXX.npy`` of a feature folder, ``masks_XXXXX.npy``: int32 label maps ``(n_images, H, W)``
of the same images in the same order, ``masks_XXXXX.ids.json`` their image ids (copied from the
shard's ``.ids.json`` when it has one), and one ``labels.json``::

    {"format": "insight-masks", "version": 1,
     "names": ["background", "person", ...],   # value v of a label map means names[v]
     "background": 0,                          # the background value (or null)
     "ignore": 255,                            # pixels never scored (or null); outside 0..len(names)-1
     "size": [224, 224],                       # H, W of every label map
     "resize": "squash", "grid": [14, 14],     # the geometry of the features they were fitted to
     "source": {...}, "shards": [{"file": "masks_00000.npy", "n_images": 1024}, ...]}

Geometry. Converters fit each image's label map with the resize the features used (the feature
folder's ``manifest.json`` records ``resize``): ``"squash"`` resizes the whole map to ``size x size``;
``"crop"`` resizes its shorter side to ``size`` and centre-crops, exactly as open_clip's eval
transform does for the image (the same torchvision functions, so the crop box is identical). Label
maps are resampled with nearest-exact (pixel-centre) sampling, never interpolated. ``H x W`` is
either the model's input resolution (224 for ViT-B/16: one label per input pixel, the default) or
the patch grid itself (14: one label per patch).

Concept maps are upsampled to the mask resolution by **patch footprint**: pixel ``(y, x)`` of an
``H x W`` map belongs to patch ``(floor(y * gh / H), floor(x * gw / W))`` of the ``gh x gw`` grid and
takes that patch's value (nearest upsampling; at 224 px each ViT-B/16 patch covers its own 16 x 16
block). Binary concept maps are binarised on the patch grid first (SAE inference rule: the
thresholded code is > 0) and then upsampled, so a concept's region is a union of patch footprints.
:func:`patch_label_counts` computes, per patch, how many of its pixels carry each label, which is
all the concept metrics need (intersections and areas in pixels, without materialising maps).

Reading (:func:`open_masks`) validates a mask folder against its features: a missing ``labels.json``
or an empty class list, a missing masks file, a count or order (image ids) that differs from the
shard, a resolution that differs from ``labels.json``, and (while streaming) label values outside
the names and the ignore value all raise :class:`~insight_core.errors.MaskFileError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from insight_core.atlas.layout import FeaturesLayout, MasksLayout
from insight_core.atlas.records import read_json_data, read_json_dict
from insight_core.data.features import FeatureFile, inspect_file
from insight_core.errors import ConfigError, FeatureFileError, MaskFileError
from insight_core.io import write_json, write_npy
from insight_core.progress import tqdm

log = logging.getLogger(__name__)

MASKS_FORMAT = "insight-masks"
MASKS_VERSION = 1
RESIZE_MODES = ("squash", "crop")
_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------------------------------
# labels.json


@dataclasses.dataclass(frozen=True, slots=True)
class MaskLabels:
    """What the values of a mask folder mean, and the geometry of its label maps."""

    names: tuple[str, ...]
    """Label names; value ``v`` of a label map means ``names[v]``."""
    size: tuple[int, int]
    """(H, W) of every label map."""
    background: int | None = None
    """The background value (scored as one more bin by impurity; a class for OVS only with the
    background prompt), or None when every value is a named region."""
    ignore: int | None = 255
    """Pixels with this value are never scored (unlabelled, crowd, void); outside ``0..len(names)-1``."""
    resize: str | None = None
    """How the label maps were fitted to the features (``"squash"``/``"crop"``; None: already on the grid)."""
    grid: tuple[int, int] | None = None
    """The feature patch grid (gh, gw) the maps were made for."""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Where the labels came from (converter and its settings)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if not self.names:
            raise ConfigError("mask labels: the class list is empty; give at least one label name")
        bad = next((n for n in self.names if not isinstance(n, str) or not n.strip()), None)
        if bad is not None:
            raise ConfigError(f"mask labels: label names must be non-empty strings, got {bad!r}")
        if len(set(self.names)) != len(self.names):
            dups = sorted({n for n in self.names if self.names.count(n) > 1})[:5]
            raise ConfigError(f"mask labels: duplicate label names {dups}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"mask labels: size must be (H, W) >= 1, got {self.size}")
        if self.background is not None and not 0 <= self.background < len(self.names):
            raise ConfigError(
                f"mask labels: background value {self.background} is not a label (0..{len(self.names) - 1})"
            )
        if self.ignore is not None and (
            0 <= self.ignore < len(self.names) or not -1 <= self.ignore <= _INT32_MAX
        ):
            raise ConfigError(
                f"mask labels: ignore value {self.ignore} must lie outside the labels "
                f"0..{len(self.names) - 1} "
                "(e.g. 255 or -1)"
            )
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"mask labels: resize must be one of {RESIZE_MODES} or None, got {self.resize!r}"
            )

    @property
    def n_labels(self) -> int:
        return len(self.names)

    @property
    def foreground(self) -> list[int]:
        """The label values other than the background."""
        return [v for v in range(self.n_labels) if v != self.background]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MASKS_FORMAT,
            "version": MASKS_VERSION,
            "names": list(self.names),
            "background": self.background,
            "ignore": self.ignore,
            "size": list(self.size),
            "resize": self.resize,
            "grid": list(self.grid) if self.grid else None,
            "source": self.source,
        }


def read_labels(path: str | Path) -> tuple[MaskLabels, dict[str, Any]]:
    """``labels.json`` of a mask folder -> (labels, the whole document). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(
            f"{path}: not found; a mask folder needs labels.json (run `python -m precompute masks`)"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MaskFileError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != MASKS_FORMAT:
        raise MaskFileError(f"{path}: not a mask labels file (format {MASKS_FORMAT!r})")
    if doc.get("version") != MASKS_VERSION:
        raise MaskFileError(
            f"{path}: version {doc.get('version')} differs from {MASKS_VERSION}; rerun `precompute masks`"
        )
    names = doc.get("names")
    if not isinstance(names, list) or not names:
        raise MaskFileError(f"{path}: 'names' (the class list) is missing or empty")
    try:
        labels = MaskLabels(
            names=tuple(names),
            size=tuple(doc.get("size") or ()),
            background=doc.get("background"),
            ignore=doc.get("ignore"),
            resize=doc.get("resize"),
            grid=tuple(doc["grid"]) if doc.get("grid") else None,
            source=doc.get("source") or {},
        )
    except (ConfigError, TypeError, ValueError) as err:
        raise MaskFileError(f"{path}: {err}") from err
    return labels, doc


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a ``.json`` list or a text file (one name per line; blank and ``#`` lines skipped).

    The position of a name is its label value. An empty list raises :class:`MaskFileError` naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MaskFileError(f"class list {path}: cannot read ({err})") from err
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except ValueError as err:
            raise MaskFileError(f"class list {path}: not valid JSON ({err})") from err
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MaskFileError(f"class list {path}: expected a JSON list of names")
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise MaskFileError(f"class list {path}: empty; expected one class name per label value")
    return names


# --------------------------------------------------------------------------------------------------
# Feature shards the masks align with


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureShard:
    """One ``shard_XXXXX.npy`` of a feature folder with its image ids (None when it has no ids file)."""

    index: int
    file: FeatureFile
    ids: tuple[str, ...] | None

    @property
    def n_images(self) -> int:
        return self.file.n_units


def feature_shards(features_dir: str | Path) -> list[FeatureShard]:
    """The feature shards of a folder (``shard_XXXXX.npy``, 3-D), in index order, with their ids."""
    layout = FeaturesLayout(Path(features_dir))
    if not layout.root.is_dir():
        raise FeatureFileError(f"{layout.root}: feature folder not found")
    out = []
    for path in layout.shard_arrays():
        f = inspect_file(path)
        if len(f.shape) != 3:
            raise FeatureFileError(f"{path}: shape {f.shape}; masks need (n_images, n_patches, d) shards")
        index = FeaturesLayout.shard_index(path)
        assert index is not None
        doc = read_json_data(FeaturesLayout.ids_of(path), "feature ids", FeatureFileError)
        ids = doc.get("ids") if isinstance(doc.get("ids"), list) else None
        if ids is not None and len(ids) != f.n_units:
            raise FeatureFileError(
                f"{FeaturesLayout.ids_of(path)}: lists {len(ids)} images but {path.name} holds {f.n_units}"
            )
        out.append(FeatureShard(index, f, tuple(str(i) for i in ids) if ids is not None else None))
    if not out:
        raise FeatureFileError(f"{layout.root}: no shard_XXXXX.npy feature shards")
    return out


def feature_geometry(features_dir: str | Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(resize, grid, arch) recorded by ``extract`` in the feature folder's manifest (None when absent)."""
    doc = read_json_data(FeaturesLayout(Path(features_dir)).manifest, "feature manifest", FeatureFileError)
    bb: dict[str, Any] = doc["backbone"] if isinstance(doc.get("backbone"), dict) else {}
    grid = (int(bb["grid"][0]), int(bb["grid"][1])) if bb.get("grid") else None
    return bb.get("resize"), grid, bb.get("arch")


def model_input_size(arch: str | None, grid: tuple[int, int] | None) -> int:
    """The square input resolution of an open_clip architecture (224 for ViT-B-16), without weights."""
    if arch:
        import open_clip

        cfg = open_clip.get_model_config(arch) or {}
        size = cfg.get("vision_cfg", {}).get("image_size")
        if isinstance(size, int):
            return size
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            return int(size[0])
    if grid:
        log.warning("input size of %r unknown; assuming 16-pixel patches (%d px)", arch, 16 * grid[0])
        return 16 * int(grid[0])
    raise ConfigError("cannot tell the model input size (no backbone in the feature manifest); pass --size")


# --------------------------------------------------------------------------------------------------
# Geometry


def fit_label_map(label_hw: np.ndarray, resize: str, size: int) -> np.ndarray:
    """Fit one full-image label map to the model input exactly as the image was (see module docstring).

    ``"squash"``: resize to ``size x size``; ``"crop"``: resize the shorter side to ``size`` (the longer
    to ``int(size * long / short)``, torchvision's rule) and centre-crop ``size x size``. Nearest-exact
    sampling; returns int32.
    """
    if resize not in RESIZE_MODES:
        raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    arr = np.asarray(label_hw)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ConfigError(f"a label map must be 2-D (H, W), got shape {arr.shape}")
    if arr.shape == (size, size):
        return arr.astype(np.int32, copy=False)
    # float64 holds every int32 exactly; nearest sampling never mixes values
    t = torch.from_numpy(arr.astype(np.float64))[None]
    if resize == "squash":
        t = TF.resize(t, [size, size], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    else:
        t = TF.resize(t, size, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
        t = TF.center_crop(t, [size, size])
    return t[0].numpy().astype(np.int32)


def patch_of_pixels(size_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column patch index of every pixel row / column of an ``H x W`` map (patch footprint)."""
    (h, w), (gh, gw) = size_hw, grid_hw
    if h < gh or w < gw:
        raise ConfigError(f"mask resolution {h}x{w} is smaller than the {gh}x{gw} patch grid")
    return (np.arange(h) * gh // h).astype(np.int64), (np.arange(w) * gw // w).astype(np.int64)


def upsample_patches(
    values_bp: np.ndarray | torch.Tensor, grid_hw: tuple[int, int], size_hw: tuple[int, int]
):
    """Per-patch values (B, gh*gw) -> (B, H, W) maps by patch footprint (nearest; see module docstring)."""
    rows, cols = patch_of_pixels(size_hw, grid_hw)
    flat = rows[:, None] * grid_hw[1] + cols[None, :]
    if isinstance(values_bp, torch.Tensor):
        return values_bp[:, torch.from_numpy(flat).to(values_bp.device)]
    return np.asarray(values_bp)[:, flat]


def patch_label_counts(
    labels_bhw: np.ndarray | torch.Tensor, grid_hw: tuple[int, int], n_labels: int, ignore: int | None
) -> torch.Tensor:
    """``counts_bpl[b, p, l]``: pixels of label ``l`` inside patch ``p``'s footprint (ignore pixels dropped).

    int64 (B, gh*gw, n_labels), on the labels' device. Values must already be checked (0..n_labels-1
    or ``ignore``).
    """
    lab = torch.as_tensor(labels_bhw)
    b, h, w = lab.shape
    gh, gw = grid_hw
    rows, cols = patch_of_pixels((h, w), (gh, gw))
    patch_hw = torch.from_numpy(rows[:, None] * gw + cols[None, :]).to(lab.device)
    lab = lab.long()
    valid = lab != ignore if ignore is not None else torch.ones_like(lab, dtype=torch.bool)
    p = gh * gw
    key = (torch.arange(b, device=lab.device)[:, None, None] * p + patch_hw[None]) * n_labels + lab.clamp_min(
        0
    )
    counts = torch.bincount(key[valid], minlength=b * p * n_labels)
    return counts.view(b, p, n_labels)


# --------------------------------------------------------------------------------------------------
# Reading, aligned with the features


@dataclasses.dataclass(frozen=True)
class MaskBatch:
    """Whole images of one shard: features, label maps and where they are."""

    shard: int
    """Feature shard index."""
    start: int
    """Position of the first image in the shard."""
    image_index: np.ndarray
    """Global image index (position across all shards, in order) of every image, int64 (B,)."""
    feats_bpd: np.ndarray
    """float32 (B, patches, d)."""
    labels_bhw: np.ndarray
    """int32 (B, H, W), values checked."""
    ids: tuple[str, ...] | None
    """Image ids, when the features have them."""


@dataclasses.dataclass(frozen=True)
class MaskSet:
    """A mask folder validated against its feature folder."""

    layout: MasksLayout
    labels: MaskLabels
    shards: tuple[FeatureShard, ...]

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.shards)

    @property
    def n_patches(self) -> int:
        return sum(s.n_images * s.file.rows_per_unit for s in self.shards)

    @property
    def d(self) -> int:
        return self.shards[0].file.d

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The patch grid: from labels.json, else the square root of the patch count."""
        if self.labels.grid:
            return self.labels.grid
        p = self.shards[0].file.rows_per_unit
        g = round(p**0.5)
        if g * g != p:
            raise MaskFileError(f"{self.layout.labels}: no 'grid' and {p} patches per image is not a square")
        return g, g

    def files(self) -> list[Path]:
        """Every input file (features, masks, labels), for stage fingerprints."""
        out = [self.layout.labels]
        for s in self.shards:
            out += [s.file.path, self.layout.masks(s.index)]
        return out

    def iter_batches(self, images_per_batch: int, *, first_shard: int = 0) -> Iterator[MaskBatch]:
        """Aligned (features, label maps) of whole images, shard by shard, from position ``first_shard``."""
        if images_per_batch < 1:
            raise ConfigError(f"images_per_batch must be >= 1, got {images_per_batch}")
        offset = sum(s.n_images for s in self.shards[:first_shard])
        for shard in self.shards[first_shard:]:
            path = self.layout.masks(shard.index)
            masks = np.load(path, mmap_mode="r", allow_pickle=False)
            per, f = shard.file.rows_per_unit, shard.file
            for start in range(0, shard.n_images, images_per_batch):
                end = min(start + images_per_batch, shard.n_images)
                labels = np.array(masks[start:end], dtype=np.int32)
                self._check_values(labels, path, start)
                # checked finite; int8 dequantised
                block = f.read_rows(slice(start * per, end * per)).reshape(end - start, per, f.d)
                yield MaskBatch(
                    shard=shard.index,
                    start=start,
                    image_index=np.arange(offset + start, offset + end, dtype=np.int64),
                    feats_bpd=block,
                    labels_bhw=labels,
                    ids=shard.ids[start:end] if shard.ids is not None else None,
                )
            offset += shard.n_images

    def _check_values(self, labels: np.ndarray, path: Path, start: int) -> None:
        lab = self.labels
        bad = (labels < 0) | (labels >= lab.n_labels)
        if lab.ignore is not None:
            bad &= labels != lab.ignore
        if bad.any():
            img = int(np.argwhere(bad)[0, 0])
            values = sorted({int(v) for v in np.unique(labels[bad])})[:8]
            raise MaskFileError(
                f"{path}: unknown label values {values} in image {start + img}; {self.layout.labels} names "
                f"{lab.n_labels} labels (0..{lab.n_labels - 1}) and ignore={lab.ignore}"
            )


def open_masks(masks_dir: str | Path, features_dir: str | Path) -> MaskSet:
    """Validate a mask folder against a feature folder (see the module docstring for what is checked)."""
    layout = MasksLayout(Path(masks_dir))
    if not layout.root.is_dir():
        raise MaskFileError(f"{layout.root}: mask folder not found (run `python -m precompute masks`)")
    labels, _ = read_labels(layout.labels)
    shards = feature_shards(features_dir)
    known = {s.index for s in shards}
    stray = [p.name for p in layout.mask_files() if layout.mask_index(p) not in known]
    if stray:
        raise MaskFileError(
            f"{layout.root}: {stray[:3]} have no feature shard in {features_dir}; the masks were made for "
            "other features (rerun `python -m precompute masks`)"
        )
    for shard in shards:
        _check_shard(layout, labels, shard)
    return MaskSet(layout, labels, tuple(shards))


def _check_shard(layout: MasksLayout, labels: MaskLabels, shard: FeatureShard) -> None:
    path = layout.masks(shard.index)
    if not path.is_file():
        raise MaskFileError(f"{path}: missing; every feature shard ({shard.file.path.name}) needs its masks")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise MaskFileError(f"{path}: not a readable .npy array ({err})") from err
    if arr.dtype != np.int32 or arr.ndim != 3:
        raise MaskFileError(f"{path}: {arr.dtype} {arr.shape}; expected int32 label maps (n_images, H, W)")
    if arr.shape[0] != shard.n_images:
        raise MaskFileError(
            f"{path}: holds {arr.shape[0]} label maps but {shard.file.path} holds {shard.n_images} images; "
            "masks must align one-to-one with the feature shards"
        )
    if tuple(arr.shape[1:]) != labels.size:
        raise MaskFileError(
            f"{path}: maps are {arr.shape[1]}x{arr.shape[2]} but {layout.labels} says {labels.size}"
        )
    ids_doc = read_json_data(layout.mask_ids(shard.index), "mask ids", MaskFileError)
    mask_ids = ids_doc.get("ids")
    if shard.ids is None or not isinstance(mask_ids, list):
        if shard.ids is not None or isinstance(mask_ids, list):
            log.warning("%s: image ids on one side only; checking the image count, not the order", path)
        return
    if tuple(str(i) for i in mask_ids) != shard.ids:
        pos = next(
            (i for i, (a, b) in enumerate(zip(mask_ids, shard.ids, strict=False)) if str(a) != b),
            min(len(mask_ids), len(shard.ids)),
        )
        got = mask_ids[pos] if pos < len(mask_ids) else "(none)"
        want = shard.ids[pos] if pos < len(shard.ids) else "(none)"
        raise MaskFileError(
            f"{path}: image {pos} is {got!r} in the masks but {want!r} in {shard.file.path.name}; the masks' "
            "image order differs from the features (rerun `python -m precompute masks`)"
        )


# --------------------------------------------------------------------------------------------------
# Writing


LabelMapsFn = Callable[[FeatureShard], np.ndarray]
"""``fn(shard) -> (shard.n_images, H, W)`` label maps of the shard's images, in order."""


def write_masks(
    out_dir: str | Path,
    shards: Sequence[FeatureShard],
    labels: MaskLabels,
    label_maps: LabelMapsFn,
    *,
    key: str = "",
    progress: bool = True,
) -> MasksLayout:
    """Write one ``masks_XXXXX.npy`` (+ ids) per feature shard, then ``labels.json`` (last, atomically).

    A shard whose ids file carries the same ``key`` (the converter's settings) and whose masks file
    exists is kept (resume). Values are checked before writing; stale masks files of other shards
    are removed.
    """
    layout = MasksLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    labels_path = layout.labels
    labels_path.unlink(missing_ok=True)  # the folder is incomplete until labels.json is back
    known = {s.index for s in shards}
    for stale in layout.mask_files():
        if layout.mask_index(stale) not in known:
            log.warning("removing stale masks file %s", stale)
            stale.unlink()
            layout.mask_ids(layout.mask_index(stale) or 0).unlink(missing_ok=True)
    entries = []
    bar = tqdm(total=sum(s.n_images for s in shards), disable=not progress, unit="img", desc="masks")
    checker = MaskSet(layout, labels, tuple(shards))
    for shard in shards:
        path, ids_path = layout.masks(shard.index), layout.mask_ids(shard.index)
        if read_json_dict(ids_path).get("key") == key and key and path.is_file():
            bar.update(shard.n_images)
            entries.append({"file": path.name, "n_images": shard.n_images})
            continue
        maps = np.asarray(label_maps(shard))
        if maps.shape != (shard.n_images, *labels.size):
            raise MaskFileError(
                f"{path}: converter produced {maps.shape}, expected ({shard.n_images}, {labels.size[0]}, "
                f"{labels.size[1]})"
            )
        maps = maps.astype(np.int32, copy=False)
        checker._check_values(maps, path, 0)
        write_npy(path, np.ascontiguousarray(maps))
        write_json(ids_path, {"key": key, "ids": list(shard.ids) if shard.ids is not None else None})
        entries.append({"file": path.name, "n_images": shard.n_images})
        bar.update(shard.n_images)
    bar.close()
    write_json(labels_path, {**labels.to_json(), "shards": entries})
    return layout
