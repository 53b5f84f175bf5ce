"""Concept steering on a planted world where one concept ("red") is tied to one caption word.

Every image has one object (dog/cat/car/boat) in a rectangle on a background (grass/water). The
"red" concept is planted on the object's patches strongly (caption "a red dog on grass"), weakly
(caption without "red": below what the captioner should mention) or not at all. The SAE is an
oracle (decoder rows = the planted orthonormal atoms), so codes recover the planted activations.
A tiny captioner trained on these captions must then drop "red" when the concept is zeroed,
mention it when a weak "red" is amplified or when "red" is added, and be unchanged by no-op edits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from insight_core.concepts.steering import MAX_SCALE, ConceptEdit, ConceptNames, Steerer
from insight_core.errors import ConfigError, ImageLoadError, InsightError
from insight_core.models.captioner import CaptionerConfig, SteerableCaptioner
from insight_core.models.lm import build_tiny_lm
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.training.captioner import CaptionData, CaptionTrainConfig, train_captioner

D, GRID = 32, 14
OBJECTS = ("dog", "cat", "car", "boat")
BACKGROUNDS = ("grass", "water")
RED = len(OBJECTS) + len(BACKGROUNDS)  # concept id of "red"
NAMES = {**dict(enumerate(OBJECTS)), 4: "grass", 5: "water", RED: "red", 7: "unused"}
WEAK = 0.15  # weak "red": present but not captioned


@dataclasses.dataclass
class World:
    feats_bhwd: torch.Tensor
    captions: list[str]
    red: list[str]  # "strong" | "weak" | "none"
    masks: list[np.ndarray]  # object region (GRID, GRID) bool


def make_world(n: int, seed: int, atoms_md: torch.Tensor) -> World:
    rng = np.random.default_rng(seed)
    feats, caps, reds, masks = [], [], [], []
    for i in range(n):
        obj, bg = rng.integers(len(OBJECTS)), rng.integers(len(BACKGROUNDS))
        red = ("strong", "weak", "none")[i % 3]
        h, w = rng.integers(5, 10, size=2)
        r0, c0 = rng.integers(0, GRID - h + 1), rng.integers(0, GRID - w + 1)
        mask = np.zeros((GRID, GRID), bool)
        mask[r0 : r0 + h, c0 : c0 + w] = True
        codes = np.zeros((GRID, GRID, atoms_md.shape[0]), np.float32)
        codes[..., len(OBJECTS) + bg] = np.where(mask, 0.0, 1.0)
        codes[..., obj] = np.where(mask, 1.0 + 0.2 * rng.random((GRID, GRID)), 0.0)
        codes[..., RED] = np.where(mask, {"strong": 1.0, "weak": WEAK, "none": 0.0}[red], 0.0)
        x = torch.from_numpy(codes) @ atoms_md + 0.01 * torch.from_numpy(rng.standard_normal((GRID, GRID, D)))
        feats.append(x.float())
        caps.append(f"a {'red ' if red == 'strong' else ''}{OBJECTS[obj]} on {BACKGROUNDS[bg]}")
        reds.append(red)
        masks.append(mask)
    return World(torch.stack(feats), caps, reds, masks)


def oracle_sae(atoms_md: torch.Tensor) -> MatryoshkaSAE:
    m = atoms_md.shape[0]
    sae = MatryoshkaSAE(SAEConfig(d_in=D, dict_size=m, k=3, group_fractions=(0.5, 0.5)))
    with torch.no_grad():
        sae.W_dec_md.copy_(atoms_md)
        sae.W_enc_md.copy_(atoms_md)
        sae.b_enc_m.zero_()
        sae.b_dec_d.zero_()
        sae.threshold.fill_(0.05)
    return sae


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A captioner trained on 240 planted images (about 20 s on 2 CPU cores) + 120 held-out images."""
    atoms_md = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0][
        :8
    ].contiguous()
    train = make_world(240, seed=1, atoms_md=atoms_md)
    held = make_world(120, seed=2, atoms_md=atoms_md)
    lm_dir = build_tiny_lm(train.captions, tmp_path_factory.mktemp("lm"), vocab_size=300, n_embd=64, n_head=2)
    cfg = CaptionerConfig(d_in=D, n_layers=2, n_heads=2, d_model=64, lm=str(lm_dir))
    model = SteerableCaptioner.build(cfg, oracle_sae(atoms_md))
    data = CaptionData(model.input_tokens(train.feats_bhwd), [[c] for c in train.captions])
    hist = train_captioner(
        model,
        data,
        None,
        CaptionTrainConfig(epochs=30, batch_size=48, lr=3e-3, finetune_lm=True),
        progress=False,
    )
    return {"model": model, "held": held, "hist": hist, "atoms": atoms_md}


def _has_red(caption: str) -> bool:
    return "red" in caption.split()


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def test_planted_captioner_learns_the_word(planted: dict) -> None:
    model, held = planted["model"], planted["held"]
    preds = model.caption(held.feats_bhwd)
    assert planted["hist"].train_loss[-1] < 0.2 * planted["hist"].first_batch_loss
    exact = _rate([p == c for p, c in zip(preds, held.captions, strict=False)])
    assert exact >= 0.9, f"held-out exact caption rate {exact:.2f}"


@pytest.mark.parametrize("keep_error", [True, False])
def test_zeroing_red_removes_the_word(planted: dict, keep_error: bool) -> None:
    steerer = Steerer(planted["model"], names=NAMES, keep_error=keep_error)
    held = planted["held"]
    strong = [i for i, r in enumerate(held.red) if r == "strong"]
    results = [steerer.steer(held.feats_bhwd[i], [ConceptEdit.remove("red")]) for i in strong]
    had = _rate([_has_red(r.unsteered_caption) for r in results])
    removed = _rate([not _has_red(r.caption) for r in results])
    print(f"keep_error={keep_error}: unsteered has 'red' {had:.3f}, zeroed removes it {removed:.3f}")
    assert had >= 0.95
    assert removed >= 0.95
    assert all(r.edits[0].concept_ids == (RED,) and r.edits[0].activation_after == 0 for r in results)


def test_amplifying_weak_red_brings_the_word_in(planted: dict) -> None:
    steerer = Steerer(planted["model"], names=NAMES)
    held = planted["held"]
    weak = [i for i, r in enumerate(held.red) if r == "weak"]
    results = [steerer.steer(held.feats_bhwd[i], [ConceptEdit.scale(RED, 1 / WEAK)]) for i in weak]
    absent = _rate([not _has_red(r.unsteered_caption) for r in results])
    brought = _rate([_has_red(r.caption) for r in results])
    print(f"weak red: unsteered lacks 'red' {absent:.3f}, amplified x{1 / WEAK:.2f} has it {brought:.3f}")
    assert absent >= 0.95
    assert brought >= 0.95


def test_adding_red_in_the_object_region_brings_the_word_in(planted: dict) -> None:
    steerer = Steerer(planted["model"], names=NAMES)
    held = planted["held"]
    none = [i for i, r in enumerate(held.red) if r == "none"]
    added = [steerer.steer(held.feats_bhwd[i], [ConceptEdit.add("red", 1.0, held.masks[i])]) for i in none]
    rate = _rate([_has_red(r.caption) for r in added])
    print(f"add red in object region: word appears {rate:.3f}")
    assert rate >= 0.95
    # zeroing only where red is not planted (the background) changes nothing at all
    strong = next(i for i, r in enumerate(held.red) if r == "strong")
    outside = steerer.steer(held.feats_bhwd[strong], [ConceptEdit.remove(RED, ~held.masks[strong])])
    assert outside.edits[0].activation_before == 0
    assert outside.caption == outside.unsteered_caption
    assert _has_red(outside.caption)
    inside = steerer.steer(held.feats_bhwd[strong], [ConceptEdit.remove(RED, held.masks[strong])])
    assert not _has_red(inside.caption)


def test_no_op_edits_give_the_identical_caption(planted: dict) -> None:
    model, held = planted["model"], planted["held"]
    for keep_error in (True, False):
        steerer = Steerer(model, names=NAMES, keep_error=keep_error)
        for i in range(0, 120, 7):
            x = held.feats_bhwd[i]
            base, same, _ = steerer.steered_inputs(
                x, [ConceptEdit.scale(RED, 1.0), ConceptEdit.add("dog", 0.0)]
            )
            assert torch.equal(base, same)  # bitwise: the reconstruction error term cancels exactly
            res = steerer.steer(
                x, [ConceptEdit.scale("red", 1.0), ConceptEdit.scale(7, 3.0)]
            )  # 7 never fires
            assert res.caption == res.unsteered_caption
            assert res.unsteered_caption == model.generate(base)[0]
    # the default (keep_error=False, the paper's bottleneck) feeds exactly the INSIGHT captioner's input
    steerer = Steerer(model)
    assert not steerer.keep_error
    x = held.feats_bhwd[0]
    assert steerer.steer(x, []).unsteered_caption == model.caption(x)[0]
    base, _, _ = steerer.steered_inputs(x, [])
    x_nd = x.reshape(-1, x.shape[-1])
    assert torch.equal(base.reshape(x_nd.shape), model.sae.decode(model.sae.encode(x_nd)))


def test_names_resolve_case_insensitively_and_to_all_matches(planted: dict) -> None:
    names = ConceptNames({0: "Dog", 1: "dog", 2: "car"})
    assert names.ids_of(" DOG ") == [0, 1]
    steerer = Steerer(planted["model"], names=names)
    assert steerer.resolve("dog") == [0, 1]
    assert steerer.resolve(2) == [2]
    assert steerer.resolve("3") == [3]
    res = steerer.steer(planted["held"].feats_bhwd[0], [ConceptEdit.remove("dog")])
    assert res.edits[0].concept_ids == (0, 1)
    assert res.edits[0].names == ("Dog", "dog")


def test_names_from_concepts_parquet(tmp_path, planted: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [0, 6], "name": ["dog", "red"]}), tmp_path / "concepts.parquet")
    steerer = Steerer(planted["model"], names=tmp_path / "concepts.parquet")
    assert steerer.resolve("red") == [RED]
    pq.write_table(pa.table({"id": [0, 6]}), tmp_path / "no_names.parquet")
    with pytest.raises(ConfigError, match="no concept names are loaded"):
        Steerer(planted["model"], names=tmp_path / "no_names.parquet").resolve("red")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (ConceptEdit.remove(8), r"concept 8: unknown concept id, expected 0 <= id < 8"),
        (ConceptEdit.remove(-1), r"concept -1: unknown concept id"),
        (ConceptEdit.remove("zebra"), r"concept 'zebra': no concept has this name"),
        (ConceptEdit.remove("rde"), r"close matches: \['red'\]"),
        (ConceptEdit.remove(1.5), r"expected an int id or a str name"),  # type: ignore[arg-type]
        (ConceptEdit.scale(RED, -0.5), r"edits\[0\]\.value: scale -0.5 out of range"),
        (ConceptEdit.scale(RED, MAX_SCALE + 1), r"scale 101.0 out of range"),
        (ConceptEdit.scale(RED, math.nan), r"expected a finite number"),
        (ConceptEdit.add(RED, -1.0), r"add -1.0 out of range"),
        (ConceptEdit(RED, "mul", 2.0), r"op: expected 'scale' or 'add'"),  # type: ignore[arg-type]
        (ConceptEdit.remove(RED, np.zeros((GRID, GRID), bool)), r"edits\[0\]\.region: selects no patch"),
        (ConceptEdit.remove(RED, np.ones((3, 3), bool)), r"region: boolean mask must have shape"),
        (ConceptEdit.remove(RED, [0, 196]), r"patch indices must be in \[0, 196\)"),
    ],
)
def test_bad_edits_raise_insight_errors_naming_the_input(
    planted: dict, edit: ConceptEdit, match: str
) -> None:
    steerer = Steerer(planted["model"], names=NAMES)
    with pytest.raises(InsightError, match=match):
        steerer.steer(planted["held"].feats_bhwd[0], [edit])


def test_bad_patches_and_images(planted: dict) -> None:
    steerer = Steerer(planted["model"], names=NAMES)
    with pytest.raises(ConfigError, match="patches: empty tensor"):
        steerer.steer(torch.empty(0, GRID, GRID, D), [])
    with pytest.raises(ConfigError, match=r"patches: expected float patch features shaped"):
        steerer.steer(torch.zeros(GRID, GRID, D + 1), [])
    with pytest.raises(ConfigError, match="contains NaN"):
        steerer.steer(torch.full((GRID, GRID, D), math.nan), [])
    with pytest.raises(ConfigError, match="has no backbone"):
        steerer.steer_image(b"", [])

    class _NoBackbone:  # the image must fail to load before any model runs
        def dense_features(self, images):  # pragma: no cover - must not be reached
            raise AssertionError("backbone called on a bad image")

    steerer.backbone = _NoBackbone()
    with pytest.raises(ImageLoadError, match="empty"):
        steerer.steer_image(b"", [])


def test_steer_image_runs_the_atlas_feature_path(planted: dict) -> None:
    """With a DINOiser pool the image goes through one backbone pass that also returns the tokens the
    released head reads; the pooled features are what steering edits."""
    from PIL import Image

    from insight_core.models.backbone import DenseFeatures
    from insight_core.models.dinoiser import Dinoiser, DinoiserConfig

    calls: list[int | None] = []
    feats = planted["held"].feats_bhwd[:1]
    inter = torch.randn(1, GRID, GRID, 24, generator=torch.Generator().manual_seed(0))

    class _Backbone:
        def dense_features(self, images, *, intermediate=None):
            calls.append(intermediate)
            return DenseFeatures(feats, torch.zeros(1, D), inter if intermediate is not None else None)

    torch.manual_seed(0)
    pool = Dinoiser(DinoiserConfig(in_dim=24, head_dim=8), mode="head", trained=True)
    steerer = Steerer(planted["model"], names=NAMES, backbone=_Backbone(), pool=pool)
    patches = steerer.image_patches(Image.new("RGB", (40, 30), "red"))
    assert calls == [-3]
    with torch.no_grad():
        torch.testing.assert_close(patches, pool(feats, inter)[0])
