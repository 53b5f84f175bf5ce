"""Image labels for probes: which image of a feature folder belongs to which class.

A labels file is a CSV with (at least) the columns ``image`` and ``label``:

- ``image`` is the image id exactly as the feature shards' ids files write it (``extract`` writes
  ``shard_XXXXX.ids.json`` beside each ``shard_XXXXX.npy``: a path relative to the image folder,
  ``<tar>::<member>`` or ``<split>[<row>]``); for feature folders without ids files (your own
  ``.npy`` arrays, ``synth``), it is the 0-based index of the image across the files in file-name
  order (the order every reader of the folder uses);
- ``label`` is the class name (any non-empty string).

Every problem (no such file, missing columns, no rows, an empty label, an image the features do not
have, one image labelled twice, a single class) raises :class:`~insight_core.errors.LabelsError`
naming the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from insight_core.atlas.layout import FeaturesLayout
from insight_core.data.features import FeatureSet
from insight_core.errors import FeatureFileError, LabelsError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


@dataclasses.dataclass(frozen=True)
class FeatureImages:
    """The images of a feature folder, in the order of its rows (files in name order)."""

    ids: list[str]
    """Image id of every image (the ids files' ids, or ``"0"``, ``"1"``, ... without ids files)."""
    has_ids: bool
    """Whether the folder has ids files (else an image is named by its 0-based index)."""
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Images extract skipped (unreadable), with the reason: not in the features."""
    where: str = ""
    """The folder (for messages)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {image_id: row for row, image_id in enumerate(self.ids)})

    @property
    def n(self) -> int:
        return len(self.ids)

    def row_of(self, image_id: str) -> int | None:
        """The feature row of an image id (None when the features do not have it)."""
        return self._row.get(image_id)  # type: ignore[attr-defined]


def _read_ids(path: Path, n_expected: int) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeatureFileError(f"{path}: unreadable ids file ({err})") from err
    ids = doc.get("ids") if isinstance(doc, dict) else doc
    if not isinstance(ids, list):
        raise FeatureFileError(f"{path}: expected a JSON list of image ids or an object with 'ids'")
    if n_expected >= 0 and len(ids) != n_expected:
        raise FeatureFileError(f"{path}: {len(ids)} image ids but its shard has {n_expected} images")
    skipped = doc.get("skipped", []) if isinstance(doc, dict) else []
    pairs = [
        (str(s[0]), str(s[1]) if len(s) > 1 else "skipped") for s in skipped if isinstance(s, list) and s
    ]
    return [str(i) for i in ids], pairs


def feature_images(features: FeatureSet, where: str | Path = "") -> FeatureImages:
    """The image ids of a scanned feature folder (see the module docstring)."""
    id_files = [FeaturesLayout.ids_of(f.path) for f in features.files]
    present = [p.is_file() for p in id_files]
    if not any(present):
        n = sum(f.n_units for f in features.files)
        return FeatureImages([str(i) for i in range(n)], False, {}, str(where))
    if not all(present):
        missing = next(f.path for f, ok in zip(features.files, present, strict=True) if not ok)
        raise FeatureFileError(
            f"{missing}: no ids file beside it ({FeaturesLayout.ids_of(missing).name}) while other shards "
            "have one; every shard needs its ids file (or none does: images are then numbered 0, 1, ...)"
        )
    ids: list[str] = []
    owner: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for f, path in zip(features.files, id_files, strict=True):
        shard_ids, shard_skipped = _read_ids(path, f.n_units)
        for image_id in shard_ids:
            if image_id in owner:
                raise FeatureFileError(
                    f"{path}: image id {image_id!r} also appears in {owner[image_id]}; ids must be unique"
                )
            owner[image_id] = path
        ids += shard_ids
        skipped.update(shard_skipped)
    for folder in {f.path.parent for f in features.files}:  # shards whose images were all unreadable
        for extra in FeaturesLayout(folder).ids_files():
            if extra not in id_files:
                skipped.update(_read_ids(extra, -1)[1])
    return FeatureImages(ids, True, skipped, str(where))


@dataclasses.dataclass(frozen=True)
class Labels:
    """Labelled images of a feature folder."""

    path: Path
    """The labels file."""
    rows: np.ndarray
    """(n,) int64 feature row of each labelled image (file order of the labels file)."""
    y: np.ndarray
    """(n,) int64 class index of each labelled image."""
    classes: list[str]
    """Class names; ``y`` indexes this list."""
    lines: np.ndarray
    """(n,) line number in the labels file of each labelled image (for messages)."""
    image_ids: list[str]
    """Image id of each labelled image."""

    @property
    def n(self) -> int:
        return int(self.rows.size)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=len(self.classes))


def read_labels(
    path: str | Path,
    images: FeatureImages,
    *,
    classes: Sequence[str] | None = None,
    min_classes: int = 2,
    column: str = LABEL_COLUMN,
) -> Labels:
    """Read a labels CSV against the images of a feature folder.

    ``classes``: the class list to index into (a validation file must use the training classes);
    by default the sorted distinct labels of the file, of which there must be ``min_classes``.
    ``column``: the column holding the class (``label``; ``eval-bias`` reads ``attribute``).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: labels file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            parsed = list(_rows(fh, path, column))
    except UnicodeDecodeError as err:
        raise LabelsError(f"{path}: not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise LabelsError(f"{path}: not a valid CSV file ({err})") from err
    if not parsed:
        raise LabelsError(f"{path}: no labelled images (expected rows 'image,label' after the header)")
    rows, names, lines, ids = [], [], [], []
    seen: dict[int, int] = {}
    for line, image, label in parsed:
        row = _row_of(path, line, image, images)
        if row in seen:
            raise LabelsError(f"{path} line {line}: image {image!r} is already labelled on line {seen[row]}")
        seen[row] = line
        rows.append(row)
        names.append(label)
        lines.append(line)
        ids.append(image)
    if classes is None:
        class_list = sorted(set(names))
        if len(class_list) < min_classes:
            raise LabelsError(
                f"{path}: {len(class_list)} class(es) ({', '.join(map(repr, class_list))}); a classifier "
                f"needs at least {min_classes} classes"
            )
    else:
        class_list = list(classes)
        known = set(class_list)
        for line, label in zip(lines, names, strict=True):
            if label not in known:
                raise LabelsError(
                    f"{path} line {line}: class {label!r} is not one of the {len(class_list)} training "
                    "classes"
                )
    index = {c: i for i, c in enumerate(class_list)}
    return Labels(
        path=path,
        rows=np.asarray(rows, dtype=np.int64),
        y=np.asarray([index[n] for n in names], dtype=np.int64),
        classes=class_list,
        lines=np.asarray(lines, dtype=np.int64),
        image_ids=ids,
    )


def _rows(fh, path: Path, column: str = LABEL_COLUMN):
    """(line number, image, label) of every data row; header and cell checks."""
    reader = csv.DictReader(fh)
    fields = [str(f).strip().lower() for f in (reader.fieldnames or [])]
    if IMAGE_COLUMN not in fields or column not in fields:
        raise LabelsError(
            f"{path} line 1: header {reader.fieldnames or '(empty file)'} lacks the columns "
            f"'{IMAGE_COLUMN}' and '{column}' (expected a first line '{IMAGE_COLUMN},{column}')"
        )
    reader.fieldnames = fields
    for record in reader:
        line = reader.line_num
        image = (record.get(IMAGE_COLUMN) or "").strip()
        label = (record.get(column) or "").strip()
        if not image:
            raise LabelsError(f"{path} line {line}: empty image id")
        if not label:
            raise LabelsError(f"{path} line {line}: image {image!r} has an empty label")
        yield line, image, label


def _row_of(path: Path, line: int, image: str, images: FeatureImages) -> int:
    row = images.row_of(image)
    if row is not None:
        return row
    where = f"the features in {images.where}" if images.where else "the features"
    if images.has_ids:
        if image in images.skipped:
            raise LabelsError(
                f"{path} line {line}: image {image!r} was skipped when the features were extracted "
                f"({images.skipped[image]}); {where} do not have it"
            )
        raise LabelsError(
            f"{path} line {line}: unknown image id {image!r}; {where} have {images.n} images whose ids are "
            f"those in the shards' .ids.json files (e.g. {images.ids[0]!r})"
        )
    try:
        index = int(image)
    except ValueError:
        raise LabelsError(
            f"{path} line {line}: image {image!r} is not an index; {where} have no ids files, so images "
            f"are named by their 0-based index across the shards (0..{images.n - 1})"
        ) from None
    if 0 <= index < images.n:  # "007" names image 7
        return index
    raise LabelsError(
        f"{path} line {line}: image index {index} is out of range; {where} have {images.n} images "
        f"(0..{images.n - 1})"
    )
