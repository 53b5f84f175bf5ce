"""Converters: COCO json (polygons, RLE, overlaps, ignore categories) and folders of PNG label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insight_core.data.mask_sources import CocoLabels, PngLabels, image_key
from insight_core.errors import ConfigError, MaskFileError


def _coco(path: Path, images: list[dict], anns: list[dict], cats: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _poly(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    from pycocotools import mask as mask_utils

    crowd = np.zeros((20, 30), np.uint8, order="F")
    crowd[15:20, 0:5] = 1
    rle = mask_utils.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.jpg", "height": 10, "width": 10},
    ]
    anns = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 5,
            "area": 40.0,
            "segmentation": _poly(2, 2, 12, 6),
            "iscrowd": 0,
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 3,
            "area": 300.0,
            "segmentation": _poly(0, 0, 20, 15),
            "iscrowd": 0,
        },
        {"id": 12, "image_id": 1, "category_id": 9, "area": 25.0, "segmentation": rle, "iscrowd": 1},
    ]
    cats = [{"id": 3, "name": "car"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "other"}]
    return _coco(tmp_path / "instances.json", images, anns, cats)


def test_coco_paints_small_regions_over_large_ones(coco_json: Path) -> None:
    src = CocoLabels([coco_json])
    assert src.names == ["background", "car", "dog", "other"]
    assert src.background == 0
    lab = src.label_map("sub/a.jpg")  # matched by file name
    assert lab.shape == (20, 30)
    assert lab[4, 6] == 2  # the small dog lies on top of the big car despite coming first
    assert lab[10, 15] == 1
    assert lab[18, 25] == 0
    assert lab[17, 2] == 3  # RLE annotation
    assert (src.label_map("b.jpg") == 0).all()  # an image without annotations is all background


def test_coco_ignore_categories_unlabelled_and_missing(coco_json: Path) -> None:
    src = CocoLabels([coco_json], unlabelled="ignore", ignore_categories=("other",), ignore=255)
    assert src.names == ["car", "dog"]
    assert src.background is None
    lab = src.label_map("a.jpg")
    assert lab[17, 2] == 255
    assert lab[18, 25] == 255
    assert lab[10, 15] == 0
    with pytest.raises(MaskFileError, match=r"image 'zzz\.jpg' is in none of .*--missing ignore"):
        src.label_map("zzz.jpg")
    lenient = CocoLabels([coco_json], missing="ignore")
    assert (lenient.label_map("zzz.jpg") == 255).all()
    with pytest.raises(ConfigError, match="not categories"):
        CocoLabels([coco_json], ignore_categories=("unicorn",))


def test_coco_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(MaskFileError, match="not found"):
        CocoLabels([tmp_path / "nope.json"])
    bad = _coco(tmp_path / "nocats.json", [], [], [])
    with pytest.raises(
        MaskFileError, match=r"nocats\.json: 'categories' \(the class list\) is missing or empty"
    ):
        CocoLabels([bad])
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(MaskFileError, match=r"x\.json: not a COCO annotation file"):
        CocoLabels([tmp_path / "x.json"])


def test_coco_mini_instances(shared_data: Path) -> None:
    path = shared_data / "coco-mini" / "annotations" / "instances_val2017.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    src = CocoLabels([path])
    assert len(src.names) == 81
    assert src.names[:2] == ["background", "person"]
    doc = json.loads(path.read_text())
    im = next(i for i in doc["images"] if any(a["image_id"] == i["id"] for a in doc["annotations"]))
    lab = src.label_map(im["file_name"])
    assert lab.shape == (im["height"], im["width"])
    assert lab.max() > 0
    assert lab.max() < 81


def _png(path: Path, arr: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
        img = Image.frombytes("P", img.size, arr.astype(np.uint8).tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    img.save(path)


def test_png_labels_match_by_path_or_stem_with_suffix_rules(tmp_path: Path) -> None:
    arr = np.array([[0, 1], [2, 255]])
    _png(tmp_path / "gt" / "city" / "x_gtFine_labelTrainIds.png", arr)
    _png(tmp_path / "gt" / "other" / "y.png", arr, mode="L")
    src = PngLabels(
        tmp_path / "gt",
        ["road", "car", "person"],
        image_suffix="_leftImg8bit",
        png_suffix="_gtFine_labelTrainIds",
    )
    np.testing.assert_array_equal(src.label_map("city/x_leftImg8bit.png"), arr)
    plain = PngLabels(tmp_path / "gt", ["road", "car", "person"])
    np.testing.assert_array_equal(plain.label_map("photos/y.jpg"), arr)  # by stem
    with pytest.raises(MaskFileError, match=r"no label PNG for image 'q\.jpg'"):
        plain.label_map("q.jpg")


def test_png_reduce_zero_label_and_bad_pngs(tmp_path: Path) -> None:
    _png(tmp_path / "ade" / "a.png", np.array([[0, 1], [3, 255]]), mode="L")
    src = PngLabels(tmp_path / "ade", ["wall", "floor", "tree"], reduce_zero_label=True)
    np.testing.assert_array_equal(src.label_map("a.jpg"), [[255, 0], [2, 255]])
    strict = PngLabels(tmp_path / "ade", ["wall", "floor"])
    with pytest.raises(
        MaskFileError, match=r"a\.png: unknown label values \[3\]; the class list has 2 names"
    ):
        strict.label_map("a.jpg")
    Image.new("RGB", (2, 2)).save(tmp_path / "ade" / "rgb.png")
    with pytest.raises(MaskFileError, match=r"rgb\.png: a RGB image; expected a label map"):
        PngLabels(tmp_path / "ade", ["wall"]).label_map("rgb.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskFileError, match=r"no \.png label maps"):
        PngLabels(tmp_path / "empty", ["x"])


def test_image_key_strips_tar_prefixes() -> None:
    assert image_key("shards/a.tar::x/y.jpg") == "x/y.jpg"
    assert image_key("a/b.jpg") == "a/b.jpg"


def test_png_label_that_is_really_eps_is_refused_without_ghostscript(tmp_path: Path, fake_gs) -> None:
    from tests import hostile

    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "a.png").write_bytes(hostile.eps())  # named .png: the content decides
    with pytest.raises(MaskFileError, match=r"a\.png: EPS image .* not allowed"):
        PngLabels(tmp_path / "gt", ["x"]).label_map("a.jpg")
    assert fake_gs.started() == []
