"""Image sources of ``extract``: webdataset tar shards and (streamed) Hugging Face datasets give the
same features as the image folder they were made from; resume; ids; fetch by id; clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from insight_core.data.features import scan_features
from insight_core.data.images import load_image
from insight_core.data.sources import (
    FolderSource,
    HFDatasetSource,
    HFDatasetSpec,
    WebDatasetSource,
    expand_braces,
    load_hf_image,
    make_source,
    open_source,
)
from insight_core.errors import ConfigError, ImageLoadError
from precompute.__main__ import main
from tests import hostile
from tests.tolerances import assert_fp16_features_close

EXAMPLES = Path(__file__).resolve().parents[3] / "assets" / "examples"
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))


def _extract(out: Path, *source_args: str, shard_size: int = 2) -> dict:
    args = ["extract", *source_args, "--out", str(out), "--pretrained", "none"]
    args += ["--shard-size", str(shard_size), "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    return json.loads((out / "manifest.json").read_text())


def _features_by_id(out: Path) -> dict[str, np.ndarray]:
    feats = {}
    for shard in sorted(out.glob("shard_*.ids.json")):
        entry = json.loads(shard.read_text())
        if entry["n_images"]:
            arr = np.load(out / entry["file"])
            feats.update(zip(entry["ids"], arr, strict=True))
    return feats


@pytest.fixture(scope="module")
def folder_features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Reference: the example photos extracted from their folder, keyed by file name."""
    out = tmp_path_factory.mktemp("folder") / "feats"
    _extract(out, "--images", str(EXAMPLES))
    return _features_by_id(out)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def tar_shards(tmp_path: Path) -> Path:
    """Two webdataset shards: 3 + 3 photos with .cls side members, and one truncated JPEG."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for s, photos in enumerate((PHOTOS[:3], PHOTOS[3:])):
        with tarfile.open(folder / f"train-{s:04d}.tar", "w") as tf:
            for i, p in enumerate(photos):
                _add(tf, f"{p.stem}.jpg", p.read_bytes())
                _add(tf, f"{p.stem}.cls", str(i).encode())
            if s == 1:
                _add(tf, "broken.jpg", PHOTOS[0].read_bytes()[:400])
    return folder


def test_webdataset_extract_matches_folder(tar_shards: Path, tmp_path: Path, folder_features: dict) -> None:
    out = tmp_path / "feats"
    manifest = _extract(out, "--webdataset", str(tar_shards / "train-{0000..0001}.tar"))
    assert manifest["source"] == {"kind": "webdataset", "path": str(tar_shards / "train-{0000..0001}.tar")}
    assert (manifest["n_images"], manifest["n_skipped"]) == (6, 1)
    feats = _features_by_id(out)
    assert next(iter(feats)) == f"train-0000.tar::{PHOTOS[0].stem}.jpg"
    for image_id, arr in feats.items():  # 3 + 3 images per shard here, 2 per shard there: other batches
        assert_fp16_features_close(arr, folder_features[image_id.split("::")[1]], image_id)
    skipped = [s for f in out.glob("*.ids.json") for s in json.loads(f.read_text())["skipped"]]
    assert skipped[0][0] == "train-0001.tar::broken.jpg"
    assert "broken.jpg" in skipped[0][1]
    assert scan_features(out).n_rows == 6 * 196


def test_webdataset_fetch_by_id_and_bad_ids(tar_shards: Path) -> None:
    source = open_source({"kind": "webdataset", "path": str(tar_shards)})
    ids = [f"train-0001.tar::{PHOTOS[4].stem}.jpg", "train-0000.tar::nope.jpg", "no-separator"]
    got = dict(source.fetch(ids))
    assert got[ids[0]].size == FolderSource(EXAMPLES).fetch([PHOTOS[4].name]).__next__()[1].size
    assert isinstance(got[ids[1]], ImageLoadError)
    assert "not found" in str(got[ids[1]])
    assert isinstance(got[ids[2]], ImageLoadError)


def test_brace_expansion_and_missing_shards(tmp_path: Path) -> None:
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{1..2}/{0..1}.tar") == ["1/0.tar", "1/1.tar", "2/0.tar", "2/1.tar"]
    with pytest.raises(ImageLoadError, match="not found"):
        WebDatasetSource(tmp_path / "x-{0..3}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no webdataset"):
        WebDatasetSource(tmp_path / "empty")


def _parquet_dataset(folder: Path, rows: list[dict]) -> Path:
    """A local Hugging Face dataset folder (parquet, Image feature with embedded bytes)."""
    from datasets import Dataset, Features, Image, Value

    data = folder / "data"
    data.mkdir(parents=True)
    features = Features({"label": Value("int64"), "img": Image()})
    Dataset.from_list(rows, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture
def hf_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"label": i, "img": {"bytes": p.read_bytes(), "path": p.name}} for i, p in enumerate(PHOTOS)]
    rows.insert(2, {"label": 99, "img": {"bytes": b"not an image", "path": "junk.jpg"}})
    return _parquet_dataset(tmp_path / "hfds", rows)


def test_hf_dataset_extract_matches_folder_and_resumes(
    hf_dataset: Path, tmp_path: Path, folder_features: dict
) -> None:
    out = tmp_path / "feats"
    manifest = _extract(out, "--hf-dataset", str(hf_dataset), shard_size=3)
    assert manifest["source"]["kind"] == "hf-dataset"
    assert manifest["source"]["split"] == "train"
    assert (manifest["n_images"], manifest["n_skipped"], len(manifest["shards"])) == (6, 1, 3)
    feats = _features_by_id(out)
    assert list(feats) == [f"train[{r}]" for r in (0, 1, 3, 4, 5, 6)]
    for row, photo in zip((0, 1, 3, 4, 5, 6), PHOTOS, strict=True):  # batched otherwise than the folder
        assert_fp16_features_close(feats[f"train[{row}]"], folder_features[photo.name], f"train[{row}]")
    # an interrupted run lost shard 1's completion record: only shard 1 is extracted again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    (out / "shard_00001.ids.json").unlink()
    assert _extract(out, "--hf-dataset", str(hf_dataset), shard_size=3) == manifest
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    assert after["shard_00000.npy"] == stamps["shard_00000.npy"]
    assert after["shard_00002.npy"] == stamps["shard_00002.npy"]
    assert after["shard_00001.npy"] != stamps["shard_00001.npy"]
    # the manifest reopens the source; rows come back by id
    source = open_source(manifest["source"])
    got = dict(source.fetch(["train[5]", "train[2]", "val[0]", "train[40]"]))
    assert got["train[5]"].size == dict(FolderSource(EXAMPLES).fetch([PHOTOS[4].name]))[PHOTOS[4].name].size
    assert all(isinstance(got[i], ImageLoadError) for i in ("train[2]", "val[0]", "train[40]"))


def test_hf_dataset_max_images_and_columns(hf_dataset: Path) -> None:
    source = HFDatasetSource(HFDatasetSpec(name=str(hf_dataset)))
    shards = [(s.index, s.n_planned, [r.id for r in s.records()]) for s in source.shards(2, max_images=5)]
    assert shards == [
        (0, 2, ["train[0]", "train[1]"]),
        (1, 2, ["train[2]", "train[3]"]),
        (2, 1, ["train[4]"]),
    ]
    keys = [s.key for s in source.shards(2, max_images=5)]
    assert len(set(keys)) == 3
    assert keys == [s.key for s in source.shards(2, max_images=5)]
    with pytest.raises(ConfigError, match="'label' is"):
        list(HFDatasetSource(HFDatasetSpec(name=str(hf_dataset), image_column="label")).shards(2))
    with pytest.raises(ConfigError, match="no column 'photo'"):
        list(HFDatasetSource(HFDatasetSpec(name=str(hf_dataset), image_column="photo")).shards(2))
    with pytest.raises(ImageLoadError, match="cannot open"):
        list(HFDatasetSource(HFDatasetSpec(name=str(hf_dataset), split="nosuchsplit")).shards(2))


def test_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one image source"):
        make_source()
    with pytest.raises(ConfigError, match="--images, --webdataset"):
        make_source(images=EXAMPLES, webdataset=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown image source kind"):
        open_source({"kind": "ftp", "path": "x"})
    assert isinstance(open_source(str(EXAMPLES)), FolderSource)  # manifests from before source kinds


def test_cli_reports_missing_source(tmp_path: Path) -> None:
    assert main(["extract", "--out", str(tmp_path / "f"), "--pretrained", "none", "--no-progress"]) == 2
    assert main(["extract", "--webdataset", str(tmp_path / "x.tar"), "--out", str(tmp_path / "f")]) == 2


def test_folder_fetch_follows_symlinks_but_refuses_escapes(tmp_path: Path) -> None:
    """The demo links photos into one tree: links are followed; ids escaping the folder are refused."""
    (tmp_path / "tree" / "examples").mkdir(parents=True)
    (tmp_path / "tree" / "examples" / "a.jpg").symlink_to(PHOTOS[0])
    source = FolderSource(tmp_path / "tree")
    got = dict(source.fetch(["examples/a.jpg", "../tree/examples/a.jpg", str(PHOTOS[0])]))
    assert (
        got["examples/a.jpg"].size
        == dict(FolderSource(EXAMPLES).fetch([PHOTOS[0].name]))[PHOTOS[0].name].size
    )
    assert isinstance(got["../tree/examples/a.jpg"], ImageLoadError)
    assert isinstance(got[str(PHOTOS[0])], ImageLoadError)


def test_webdataset_member_listing_prefix_then_all(tar_shards: Path) -> None:
    """A listing limited to a prefix must not be mistaken for the whole listing later."""
    source = WebDatasetSource(tar_shards)
    assert len(source.members(2)) == 2
    assert len(source.members()) == 7  # 6 photos + the truncated one (decoded only at extract time)
    assert source.n_total(100) == 7


# ---------------------------------------------------------------- untrusted formats (issue 19)


def _assert_eps_refused(result: object, image_id: str) -> None:
    assert isinstance(result, ImageLoadError), f"{image_id} loaded: {result!r}"
    assert image_id in str(result)
    assert "EPS image" in str(result)
    assert "not allowed" in str(result)


def test_folder_source_reports_eps_files_and_renamed_ones(tmp_path: Path, fake_gs) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a_good.jpg").write_bytes(PHOTOS[0].read_bytes())
    (root / "b_vector.eps").write_bytes(hostile.eps())
    (root / "c_renamed.jpg").write_bytes(hostile.dos_eps())
    source = FolderSource(root)
    records = [r for s in source.shards(10) for r in s.records()]
    assert [r.id for r in records] == ["a_good.jpg", "b_vector.eps", "c_renamed.jpg"]
    results: dict[str, object] = {}
    for r in records:
        try:
            results[r.id] = r.load()
        except ImageLoadError as err:
            results[r.id] = err
    assert results["a_good.jpg"].size == load_image(PHOTOS[0]).size  # type: ignore[union-attr]
    _assert_eps_refused(results["b_vector.eps"], "b_vector.eps")
    _assert_eps_refused(results["c_renamed.jpg"], "c_renamed.jpg")
    _assert_eps_refused(dict(source.fetch(["c_renamed.jpg"]))["c_renamed.jpg"], "c_renamed.jpg")
    assert fake_gs.started() == []


def test_tar_shard_eps_members_are_refused(tmp_path: Path, fake_gs) -> None:
    with tarfile.open(tmp_path / "s-0000.tar", "w") as tf:
        _add(tf, "000.jpg", PHOTOS[0].read_bytes())
        _add(tf, "001.jpg", hostile.eps())  # an EPS under an image name
        _add(tf, "002.eps", hostile.eps())
    source = WebDatasetSource(tmp_path / "s-0000.tar")
    ids = [f"s-0000.tar::{n}" for n in ("000.jpg", "001.jpg", "002.eps")]
    got = dict(source.fetch(ids))
    assert not isinstance(got[ids[0]], ImageLoadError)
    _assert_eps_refused(got[ids[1]], ids[1])
    _assert_eps_refused(got[ids[2]], ids[2])
    errors = []
    for shard in source.shards(10):
        for record in shard.records():  # tar members are read in place: load before advancing
            try:
                record.load()
            except ImageLoadError as err:
                errors.append(record.id)
                _assert_eps_refused(err, record.id)
    assert errors == ids[1:]
    assert fake_gs.started() == []


def test_hf_dataset_eps_row_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gs) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [
        {"label": 0, "img": {"bytes": PHOTOS[0].read_bytes(), "path": "a.jpg"}},
        {"label": 1, "img": {"bytes": hostile.eps(), "path": "evil.jpg"}},
    ]
    source = HFDatasetSource(HFDatasetSpec(name=str(_parquet_dataset(tmp_path / "hfds", rows))))
    got = dict(source.fetch(["train[0]", "train[1]"]))
    assert not isinstance(got["train[0]"], ImageLoadError)
    _assert_eps_refused(got["train[1]"], "train[1]")
    assert fake_gs.started() == []


def test_hf_cells_from_a_path_or_a_remote_url_use_the_same_loader(tmp_path: Path, fake_gs) -> None:
    pytest.importorskip("datasets")
    import zipfile

    evil = tmp_path / "evil.png"
    evil.write_bytes(hostile.eps())
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:  # a path that `datasets` opens itself
        zf.writestr("d/evil.png", hostile.eps())
        zf.writestr("d/ok.jpg", PHOTOS[0].read_bytes())
    remote = f"zip://d/evil.png::{tmp_path / 'imgs.zip'}"
    for cell in ({"path": str(evil), "bytes": None}, {"path": remote, "bytes": None}, str(evil)):
        with pytest.raises(ImageLoadError, match=r"row\[7\]: EPS image .* not allowed"):
            load_hf_image(cell, "row[7]")
    ok = load_hf_image({"path": f"zip://d/ok.jpg::{tmp_path / 'imgs.zip'}", "bytes": None}, "ok")
    assert ok.size == load_image(PHOTOS[0]).size
    with pytest.raises(ImageLoadError, match=r"row\[8\]: image cell is a int"):
        load_hf_image(3, "row[8]")
    with pytest.raises(ImageLoadError, match=r"row\[8\]: image bytes are a str"):
        load_hf_image({"bytes": str(evil), "path": None}, "row[8]")
    with pytest.raises(ImageLoadError, match=r"row\[9\]: cannot read"):
        load_hf_image({"path": f"zip://d/gone.jpg::{tmp_path / 'imgs.zip'}", "bytes": None}, "row[9]")
    assert fake_gs.started() == []
