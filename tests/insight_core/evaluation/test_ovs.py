"""Open-vocabulary segmentation on a planted world (ground-truth masks), its scoring and explanations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.data.masks import MaskLabels, open_masks
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.evaluation.ovs import (
    OvsAccumulator,
    OvsClasses,
    OvsConfig,
    class_prompts,
    embeddings_from_file,
    iou_from_confusion,
    patch_scores,
    predict_maps,
    run_ovs,
    segment_contributions,
)
from insight_core.io import write_npz
from insight_core.planted import make_world, sample_images, write_feature_shards
from insight_core.planted.masks import planted_label_maps, write_planted_masks
from precompute.synth import oracle_sae
from tests.insight_core.planted.worlds import SMALL


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ovs")
    world = make_world(SMALL)
    sample = sample_images(world, 40, seed=5)
    write_feature_shards(sample, root / "features", shard_size=16, dtype=np.float32)
    write_planted_masks(world, sample.layout, root / "features", root / "masks")
    vocab = root / "vocab.npz"
    write_npz(vocab, words=np.array(world.vocab_words), embeddings=world.vocab_emb_wd)
    return root, world, sample, vocab


def _classes(ms, vocab: Path, cfg: OvsConfig) -> OvsClasses:
    names, prompts, values = zip(*class_prompts(ms.labels, cfg), strict=True)
    return OvsClasses(names, prompts, values, embeddings_from_file(vocab, prompts))


def test_oracle_sae_segments_objects_and_backgrounds(planted, tmp_path: Path) -> None:
    root, world, sample, vocab = planted
    ms = open_masks(root / "masks", root / "features")
    assert ms.labels.names[: len(world.atoms_of_kind("object"))] == tuple(
        world.names[a] for a in world.atoms_of_kind("object")
    )
    np.testing.assert_array_equal(
        np.load(root / "masks" / "masks_00000.npy")[:3], planted_label_maps(world, sample.layout, [0, 1, 2])
    )
    cfg = OvsConfig()
    classes = _classes(ms, vocab, cfg)
    acc, stats = run_ovs(
        ms,
        oracle_sae(world),
        classes,
        cfg,
        partial=tmp_path / "p",
        key="k",
        part_path=lambda s: tmp_path / f"part{s}.parquet",
        progress=False,
    )
    result = acc.result()
    assert result["insight"]["miou"] >= 0.9, result["insight"]
    assert result["dense"]["miou"] >= 0.9
    assert stats.n_images == 40
    assert sorted(p.name for p in tmp_path.glob("part*")) == [
        "part0.parquet",
        "part1.parquet",
        "part2.parquet",
    ]
    # each object class is explained first by its own atom (the oracle's concept id = the atom id)
    for row in result["per_class"][: len(world.atoms_of_kind("object"))]:
        assert row["top_concepts"][0] == world.names.index(row["class"])
    # negative control: shuffled class embeddings must fail
    perm = np.roll(np.arange(classes.n), 1)
    wrong = OvsClasses(classes.names, classes.prompts, classes.values, classes.emb_cd[perm])
    acc_wrong, _ = run_ovs(ms, oracle_sae(world), wrong, cfg, partial=tmp_path / "q", key="k", progress=False)
    assert acc_wrong.result()["insight"]["miou"] < 0.2


def test_contributions_add_up_to_the_class_score(planted) -> None:
    root, world, sample, vocab = planted
    ms = open_masks(root / "masks", root / "features")
    classes = _classes(ms, vocab, OvsConfig())
    sae = oracle_sae(world)
    with torch.no_grad():
        sae.b_dec_d.add_(0.3)  # a bias with a component along the classes
    text = torch.from_numpy(classes.emb_cd)
    feats = torch.from_numpy(sample.feats_npd[:3].reshape(-1, world.config.d))
    sc = patch_scores(sae, feats, text)
    pred = sc.insight_nc.argmax(-1)
    image = torch.arange(3).repeat_interleave(196)
    seg = segment_contributions(sae, sc.codes_nm, pred, image, text, top_k=3)
    total = torch.zeros_like(seg.dot_s).index_add_(0, seg.pair_segment_e, seg.pair_contrib_e)
    torch.testing.assert_close(seg.dot_s, seg.bias_s + total, rtol=1e-12, atol=1e-12)
    assert int(seg.n_patches_s.sum()) == 3 * 196
    # ... and equal the score of the decoded reconstruction, computed independently in float64
    recon = sc.codes_nm.double() @ sae.W_dec_md.detach().double() + sae.b_dec_d.detach().double()
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    for s in range(seg.n):
        on = (image == seg.image_s[s]) & (pred == seg.class_s[s])
        assert float(seg.dot_s[s]) == pytest.approx(float((recon[on] @ t[seg.class_s[s]]).sum()), rel=1e-5)
    assert (seg.top_contrib_sk[:, 0] >= seg.top_contrib_sk[:, 1]).all()  # sorted, largest first


def test_iou_and_miou_follow_the_mmseg_definition() -> None:
    conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2 never occurs nor is predicted
    iou = iou_from_confusion(conf, [0, 1, 2])
    assert iou[0] == pytest.approx(5 / 8)
    assert iou[1] == pytest.approx(3 / 6)
    assert np.isnan(iou[2])


def test_background_pixels_are_scored_only_with_the_background_prompt() -> None:
    labels = MaskLabels(names=("background", "cat", "dog"), size=(2, 2), background=0, ignore=255)
    emb = np.eye(3, 4, dtype=np.float32)
    gt = torch.tensor([[[0, 1], [2, 255]]])
    no_bg = OvsAccumulator(labels, OvsClasses(("cat", "dog"), ("cat", "dog"), (1, 2), emb[1:]), m=4)
    assert no_bg.valid(gt).tolist() == [[[False, True], [True, False]]]
    with_bg = OvsAccumulator(
        labels, OvsClasses(("background", "cat", "dog"), ("background", "cat", "dog"), (0, 1, 2), emb), m=4
    )
    assert with_bg.valid(gt).tolist() == [[[True, True], [True, False]]]
    cfg = OvsConfig(background_prompt=True, background_text="stuff")
    assert class_prompts(labels, cfg)[0] == ("background", "stuff", 0)
    with pytest.raises(ConfigError, match="needs a background value"):
        class_prompts(MaskLabels(names=("a",), size=(1, 1)), cfg, "x/labels.json")


def test_predictions_upsample_bilinear_or_by_patch() -> None:
    scores = torch.zeros(1, 4, 2)
    scores[0, :, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    scores[0, :, 0] = 0.5
    nearest = predict_maps(scores, (2, 2), (4, 4), "nearest")
    assert nearest[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    bilinear = predict_maps(scores, (2, 2), (4, 4), "bilinear")
    assert bilinear[0, 0, 0] == 1
    assert bilinear[0, 3, 3] == 0
    assert bilinear[0, 1, 1] == 1
    assert predict_maps(scores, (2, 2), (2, 2), "bilinear")[0].tolist() == [[1, 0], [0, 0]]


def test_class_embedding_files_must_hold_every_class(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    write_npz(path, words=np.array(["cat", "dog"]), embeddings=np.eye(2, 4, dtype=np.float32))
    assert embeddings_from_file(path, ["dog"]).tolist() == [[0, 1, 0, 0]]
    with pytest.raises(FeatureFileError, match=r"c\.npz: no embedding for the classes \['bird'\]"):
        embeddings_from_file(path, ["dog", "bird"])
    with pytest.raises(ConfigError, match="--templates"):
        OvsConfig(templates="fancy")


def test_sparse_decode_equals_the_dense_decoder() -> None:
    from insight_core.evaluation.ovs import sparse_decode
    from insight_core.models.sae import MatryoshkaSAE, SAEConfig

    sae = MatryoshkaSAE(SAEConfig(d_in=16, dict_size=64, k=3, group_fractions=(1.0,)), seed=0)
    with torch.no_grad():
        sae.b_dec_d.normal_()
    codes = torch.relu(torch.randn(50, 64) - 1.8)  # ~4 % active: the sparse path
    assert 0 < int((codes > 0).sum()) * 8 < codes.numel()
    torch.testing.assert_close(sparse_decode(sae, codes), sae.decode(codes), rtol=1e-5, atol=1e-5)
    dense = torch.relu(torch.randn(50, 64))  # half active: the dense path
    torch.testing.assert_close(sparse_decode(sae, dense), sae.decode(dense), rtol=1e-5, atol=1e-5)
