"""Converters from common segmentation annotations to the mask format (:mod:`insight_core.data.masks`).

Two sources cover the usual benchmarks:

- :class:`CocoLabels`: COCO json files (``instances_*.json``, ``stuff_*.json``; polygons and RLE, via
  pycocotools). Categories of all files become contiguous label values in category-id order; with
  ``unlabelled="background"`` value 0 is ``"background"`` (COCO-Object style), with ``"ignore"``
  unannotated pixels are not scored (COCO-Stuff style). Each file's annotations are painted in
  decreasing area, so smaller regions lie on top of the larger ones they overlap; files are painted
  in the order given (stuff first, then things, for COCO-Stuff). Categories named in
  ``ignore_categories`` (e.g. COCO-Stuff's ``other``) are painted as ignore.
- :class:`PngLabels`: a folder of PNG label maps (palette or greyscale, one value per pixel) plus a
  class list: PASCAL VOC / Context, ADE20K (``reduce_zero_label``: 0 -> ignore, v -> v-1), Cityscapes
  (``*_gtFine_labelTrainIds.png`` with ``image_suffix="_leftImg8bit"``), PartImageNet-style maps.

Both find an image's annotation from its feature image id (``extract``'s id: a path relative to the
image folder, or ``<tar>::<member>``): COCO by file name, PNGs by relative path, then by file stem.
Annotations are in the stored image's pixel grid; images whose EXIF orientation rotates them are
not corrected for (COCO and the PNG benchmarks ship without EXIF rotations).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from insight_core.data.images import open_image
from insight_core.errors import ConfigError, ImageLoadError, MaskFileError

log = logging.getLogger(__name__)

UNLABELLED_MODES = ("background", "ignore")


def image_key(image_id: str) -> str:
    """The file part of a feature image id: ``a/b.jpg`` -> ``a/b.jpg``, ``x.tar::a/b.jpg`` -> ``a/b.jpg``."""
    member = str(image_id).split("::")[-1]
    return PurePosixPath(member.replace("\\", "/")).as_posix()


class CocoLabels:
    """Label maps from one or more COCO annotation files (see the module docstring).

    Parameters
    ----------
    json_paths:
        COCO json files (instances and/or stuff), painted in this order.
    unlabelled:
        ``"background"``: unannotated pixels get value 0 named ``"background"``; ``"ignore"``: they
        get ``ignore`` and are not scored.
    ignore: the ignore value (outside the label values).
    ignore_categories: category names painted as ignore (e.g. ``("other",)`` for COCO-Stuff).
    missing: ``"error"`` or ``"ignore"``: an image absent from every file is an error, or all ignore.
    """

    def __init__(
        self,
        json_paths: Sequence[str | Path],
        *,
        unlabelled: str = "background",
        ignore: int = 255,
        ignore_categories: Sequence[str] = (),
        missing: str = "error",
    ) -> None:
        if not json_paths:
            raise ConfigError("--coco: give at least one COCO annotation json")
        if unlabelled not in UNLABELLED_MODES:
            raise ConfigError(f"--unlabelled must be one of {UNLABELLED_MODES}, got {unlabelled!r}")
        if missing not in ("error", "ignore"):
            raise ConfigError(f"--missing must be 'error' or 'ignore', got {missing!r}")
        from pycocotools import mask as mask_utils

        self._mask_utils = mask_utils
        self.paths = [Path(p) for p in json_paths]
        self.unlabelled, self.ignore, self.missing = unlabelled, int(ignore), missing
        self._docs = [_read_coco(p) for p in self.paths]
        cats: dict[int, str] = {}
        for path, doc in zip(self.paths, self._docs, strict=True):
            for c in doc["categories"]:
                if cats.setdefault(int(c["id"]), str(c["name"])) != str(c["name"]):
                    raise MaskFileError(
                        f"{path}: category id {c['id']} is {c['name']!r} here but "
                        f"{cats[int(c['id'])]!r} in an earlier file"
                    )
        skip = set(ignore_categories)
        unknown = skip - set(cats.values())
        if unknown:
            raise ConfigError(f"--ignore-categories {sorted(unknown)} are not categories of {self.paths}")
        kept = [cid for cid in sorted(cats) if cats[cid] not in skip]
        if not kept:
            raise MaskFileError(f"{self.paths}: no categories (the class list would be empty)")
        first = 1 if unlabelled == "background" else 0
        self.names = (["background"] if first else []) + [cats[c] for c in kept]
        if len(set(self.names)) != len(self.names):
            raise MaskFileError(f"{self.paths}: duplicate category names; cannot name label values uniquely")
        self.background = 0 if first else None
        self._value = {cid: first + i for i, cid in enumerate(kept)}
        self._value.update({cid: self.ignore for cid in cats if cats[cid] in skip})
        self._entries: list[dict[str, dict]] = []  # per file: image file name -> image entry
        self._anns: list[dict[int, list[dict]]] = []  # per file: image id -> its annotations
        self._by_stem: dict[str, set[str]] = {}
        for doc in self._docs:
            anns: dict[int, list[dict]] = {}
            for a in doc["annotations"]:
                anns.setdefault(int(a["image_id"]), []).append(a)
            self._anns.append(anns)
            self._entries.append({image_key(im["file_name"]): im for im in doc["images"]})
            for name in self._entries[-1]:
                self._by_stem.setdefault(PurePosixPath(name).name, set()).add(name)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "coco",
            "files": [str(p) for p in self.paths],
            "unlabelled": self.unlabelled,
            "ignore_categories": sorted(k for k, v in self._value.items() if v == self.ignore),
        }

    def _find(self, image_id: str) -> str | None:
        key = image_key(image_id)
        if any(key in entries for entries in self._entries):
            return key
        cands = self._by_stem.get(PurePosixPath(key).name, set())
        return next(iter(cands)) if len(cands) == 1 else None

    def label_map(self, image_id: str) -> np.ndarray:
        """The full-resolution (height, width) int32 label map of one image."""
        name = self._find(image_id)
        if name is None:
            if self.missing == "ignore":
                return np.full((1, 1), self.ignore, dtype=np.int32)
            raise MaskFileError(
                f"image {image_id!r} is in none of {[str(p) for p in self.paths]}; pass --missing ignore to "
                "leave unannotated images unscored"
            )
        im = next(entries[name] for entries in self._entries if name in entries)
        h, w = int(im["height"]), int(im["width"])
        fill = 0 if self.unlabelled == "background" else self.ignore
        out = np.full((h, w), fill, dtype=np.int32)
        for k, doc_anns in enumerate(self._anns):
            entry = self._entries[k].get(name)
            if entry is None:
                continue
            if (int(entry["height"]), int(entry["width"])) != (h, w):
                raise MaskFileError(
                    f"{self.paths[k]}: image {name} is {entry['width']}x{entry['height']} here "
                    f"but {w}x{h} in another file"
                )
            anns = sorted(doc_anns.get(int(entry["id"]), []), key=lambda a: -float(a.get("area", 0.0)))
            for a in anns:
                value = self._value.get(int(a["category_id"]))
                if value is None:
                    raise MaskFileError(
                        f"{self.paths[k]}: annotation {a.get('id')} has unknown category {a['category_id']}"
                    )
                out[self._raster(a, h, w)] = value
        return out

    def _raster(self, ann: dict, h: int, w: int) -> np.ndarray:
        seg = ann["segmentation"]
        mu = self._mask_utils
        if isinstance(seg, list):  # polygons
            rle = mu.merge(mu.frPyObjects(seg, h, w)) if seg else None
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mu.frPyObjects(seg, h, w)
        else:
            rle = seg
        if rle is None:
            return np.zeros((h, w), dtype=bool)
        with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            return mu.decode(rle).astype(bool)


def _read_coco(path: Path) -> dict:
    import json

    if not path.is_file():
        raise MaskFileError(f"{path}: COCO annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MaskFileError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations")):
        raise MaskFileError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    if not doc.get("categories"):
        raise MaskFileError(f"{path}: 'categories' (the class list) is missing or empty")
    return doc


class PngLabels:
    """Label maps from a folder of PNGs (see the module docstring).

    Parameters
    ----------
    root: the folder of label PNGs (searched recursively).
    names: class names; the position of a name is its label value (after ``reduce_zero_label``).
    background: the background value, or None.
    ignore: the ignore value (VOC, Cityscapes train ids: 255).
    reduce_zero_label: ADE20K convention: 0 becomes ignore and every other value v becomes v - 1.
    image_suffix: removed from an image's stem before matching (Cityscapes ``_leftImg8bit``).
    png_suffix: appended to the stem to get the PNG's (Cityscapes ``_gtFine_labelTrainIds``).
    missing: ``"error"`` or ``"ignore"`` for images without a PNG.
    """

    def __init__(
        self,
        root: str | Path,
        names: Sequence[str],
        *,
        background: int | None = None,
        ignore: int = 255,
        reduce_zero_label: bool = False,
        image_suffix: str = "",
        png_suffix: str = "",
        missing: str = "error",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MaskFileError(f"{self.root}: label PNG folder not found")
        if missing not in ("error", "ignore"):
            raise ConfigError(f"--missing must be 'error' or 'ignore', got {missing!r}")
        self.names, self.background, self.ignore = list(names), background, int(ignore)
        self.reduce_zero_label, self.missing = reduce_zero_label, missing
        self.image_suffix, self.png_suffix = image_suffix, png_suffix
        self._by_rel = {
            p.relative_to(self.root).with_suffix("").as_posix(): p for p in self.root.rglob("*.png")
        }
        if not self._by_rel:
            raise MaskFileError(f"{self.root}: no .png label maps found")
        self._by_stem: dict[str, list[Path]] = {}
        for rel, p in self._by_rel.items():
            self._by_stem.setdefault(PurePosixPath(rel).name, []).append(p)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "png",
            "root": str(self.root),
            "reduce_zero_label": self.reduce_zero_label,
            "image_suffix": self.image_suffix,
            "png_suffix": self.png_suffix,
        }

    def find(self, image_id: str) -> Path | None:
        """The PNG of an image id: same relative path (suffix rules applied), else a unique file stem."""
        key = PurePosixPath(image_key(image_id))
        stem = key.stem
        if self.image_suffix and stem.endswith(self.image_suffix):
            stem = stem[: -len(self.image_suffix)]
        stem += self.png_suffix
        rel = (key.parent / stem).as_posix() if str(key.parent) != "." else stem
        if rel in self._by_rel:
            return self._by_rel[rel]
        cands = self._by_stem.get(stem, [])
        if len(cands) > 1:
            raise MaskFileError(
                f"{self.root}: {len(cands)} PNGs named {stem}.png ({cands[:2]}); cannot tell "
                f"which belongs to image {image_id!r}"
            )
        return cands[0] if cands else None

    def label_map(self, image_id: str) -> np.ndarray:
        """The full-resolution (height, width) int32 label map of one image (values checked later)."""
        path = self.find(image_id)
        if path is None:
            if self.missing == "ignore":
                return np.full((1, 1), self.ignore, dtype=np.int32)
            raise MaskFileError(
                f"{self.root}: no label PNG for image {image_id!r}; pass --missing ignore to "
                "leave it unscored"
            )
        try:
            with open_image(path) as im:  # allowed formats only: a label file is untrusted input
                if im.mode not in ("P", "L", "I", "I;16", "I;16B", "1"):
                    raise MaskFileError(
                        f"{path}: a {im.mode} image; expected a label map (palette or greyscale "
                        "PNG, one class value per pixel)"
                    )
                arr = np.array(im).astype(np.int64)
        except ImageLoadError as err:  # names the path (and a refused format) already
            raise MaskFileError(f"cannot read the label PNG: {err}") from err
        except (OSError, ValueError) as err:
            raise MaskFileError(f"{path}: cannot read the label PNG ({err})") from err
        if self.reduce_zero_label:
            arr = np.where(arr == 0, self.ignore, np.where(arr == self.ignore, self.ignore, arr - 1))
        bad = (arr < 0) | (arr >= len(self.names))
        bad &= arr != self.ignore
        if bad.any():
            values = sorted({int(v) for v in np.unique(arr[bad])})[:8]
            raise MaskFileError(
                f"{path}: unknown label values {values}; the class list has {len(self.names)} "
                f"names (0..{len(self.names) - 1}) and ignore={self.ignore}"
            )
        return arr.astype(np.int32)
