"""Prefix captioner: adapter, training to memorisation, decoding, save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from insight_core.errors import CheckpointError, ConfigError
from insight_core.evaluation.captions import reproduction_rate
from insight_core.models.captioner import CaptionerConfig, PrefixAdapter, SteerableCaptioner
from insight_core.models.lm import build_tiny_lm
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.training.captioner import CaptionData, CaptionTrainConfig, TrainHistory, train_captioner

D = 24
CAPTIONS = [
    "a red dog runs on the grass.",
    "two cats sleep on a blue sofa",
    "A green car parked in the street",
    "a man rides a horse near the sea",
    "a plate of food on a wooden table",
    "a boat on a calm lake at sunset",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(
        CAPTIONS * 3, tmp_path_factory.mktemp("tiny_lm"), vocab_size=300, n_embd=64, n_head=2
    )


@pytest.fixture(scope="module")
def sae() -> MatryoshkaSAE:
    sae = MatryoshkaSAE(SAEConfig(d_in=D, dict_size=64, k=4, group_fractions=(0.25, 0.75)), seed=0)
    sae.threshold.fill_(0.05)
    return sae


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(len(CAPTIONS), 14, 14, D, generator=torch.Generator().manual_seed(1))


def _cfg(lm_dir: Path, **kw) -> CaptionerConfig:
    return CaptionerConfig(d_in=D, n_layers=2, n_heads=2, d_model=32, lm=str(lm_dir), **kw)


@pytest.fixture(scope="module")
def trained(lm_dir: Path, sae: MatryoshkaSAE, feats: torch.Tensor) -> tuple[SteerableCaptioner, TrainHistory]:
    model = SteerableCaptioner.build(_cfg(lm_dir), sae)
    data = CaptionData(model.input_tokens(feats), [[c] for c in CAPTIONS])
    train_cfg = CaptionTrainConfig(epochs=80, batch_size=6, lr=5e-3, finetune_lm=True)
    return model, train_captioner(model, data, data, train_cfg, progress=False)


def test_adapter_shapes_follow_the_paper_layout(lm_dir: Path) -> None:
    cfg = CaptionerConfig(d_in=D, lm=str(lm_dir), d_model=32, n_heads=2)  # 8 layers, 10 queries, 8x8 pool
    adapter = PrefixAdapter(cfg, d_lm=64)
    assert len(adapter.layers.layers) == 8
    assert adapter.pos_pd.shape == (64, 32)
    assert adapter.queries_qd.shape == (10, 32)
    assert adapter(torch.randn(3, 14, 14, D)).shape == (3, 10, 64)


def test_training_memorises_and_decoding_is_deterministic(trained, feats: torch.Tensor) -> None:
    model, hist = trained
    assert hist.train_loss[-1] < 0.1 * hist.first_batch_loss
    assert hist.best_epoch == min(range(len(hist.val_loss)), key=hist.val_loss.__getitem__)
    greedy = model.caption(feats)
    assert reproduction_rate(greedy, [[c] for c in CAPTIONS]) == 1.0
    assert model.caption(feats, num_beams=3) == greedy
    assert model.caption(feats) == greedy  # deterministic without seeding
    assert [model.caption(feats[i])[0] for i in range(len(CAPTIONS))] == greedy  # batch-independent


def test_generation_lengths(trained, feats: torch.Tensor) -> None:
    model, _ = trained
    n_tokens = len(
        model.tokenizer(model.caption(feats[:1], min_new_tokens=12, max_new_tokens=12)[0])["input_ids"]
    )
    assert n_tokens >= 10  # 12 new tokens, none of them the end token (BPE may merge on re-encoding)
    short = model.caption(feats[:1], max_new_tokens=2)[0]
    assert len(model.tokenizer(short)["input_ids"]) <= 2
    with pytest.raises(ConfigError, match="num_beams"):
        model.caption(feats[:1], num_beams=0)
    with pytest.raises(ConfigError, match="min_new_tokens"):
        model.caption(feats[:1], min_new_tokens=30, max_new_tokens=20)


def test_save_load_roundtrip_safetensors_only(
    trained, sae: MatryoshkaSAE, feats: torch.Tensor, tmp_path: Path
) -> None:
    model, _ = trained
    model.save(tmp_path / "captioner", save_lm=True, extra={"note": "test"})
    files = {
        p.relative_to(tmp_path / "captioner").as_posix()
        for p in (tmp_path / "captioner").rglob("*")
        if p.is_file()
    }
    assert {"config.json", "adapter.safetensors", "lm/model.safetensors", "lm/tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    doc = json.loads((tmp_path / "captioner" / "config.json").read_text())
    assert doc["config"]["lm"] == "lm"
    assert doc["note"] == "test"
    assert doc["config"]["n_queries"] == 10
    loaded = SteerableCaptioner.load(tmp_path / "captioner", sae)
    assert loaded.caption(feats) == model.caption(feats)


def test_load_errors(trained, sae: MatryoshkaSAE, lm_dir: Path, tmp_path: Path) -> None:
    model, _ = trained
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        SteerableCaptioner.load(tmp_path / "nothing", sae)
    model.save(tmp_path / "c", save_lm=False)
    doc = json.loads((tmp_path / "c" / "config.json").read_text())
    assert doc["config"]["lm"] == str(lm_dir)  # referenced by name, not copied
    doc["config"]["n_layers"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="adapter tensors do not match"):
        SteerableCaptioner.load(tmp_path / "c", sae)
    (tmp_path / "c" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read adapter weights"):
        SteerableCaptioner.load(tmp_path / "c", sae)


def test_insight_reads_reconstructions_dense_reads_features(
    lm_dir: Path, sae: MatryoshkaSAE, feats: torch.Tensor
) -> None:
    insight = SteerableCaptioner.build(_cfg(lm_dir), sae)
    expected = sae.decode(sae.encode(feats.reshape(-1, D))).reshape(feats.shape)
    assert torch.allclose(insight.input_tokens(feats), expected)
    dense = SteerableCaptioner.build(_cfg(lm_dir, source="dense"), None)
    assert torch.equal(dense.input_tokens(feats), feats)
    with pytest.raises(ConfigError, match="source='insight' needs the SAE"):
        SteerableCaptioner.build(_cfg(lm_dir), None)


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"n_queries": 0}, "n_queries"), ({"d_model": 30, "n_heads": 4}, "d_model"),
     ({"source": "pixels"}, "source"), ({"pooled_grid": (8,)}, "pooled_grid"), ({"dropout": 1.0}, "dropout"),
     ({"lm": ""}, "lm")],
)  # fmt: skip
def test_config_errors_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"CaptionerConfig.{field} must be"):
        CaptionerConfig(**kw)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": "other", "config": {}}, r"config\.json: format: Input should be 'insight-captioner'"),
        ({"format": "insight-captioner"}, r"config\.json: config: Field required"),
        ({"format": "insight-captioner", "config": {"n_layers": "8"}},
         r"config\.json: config: n_layers: Input should be a valid integer"),
        ({"format": "insight-captioner", "config": {"grid": [14]}}, r"config\.json: config: grid\.1"),
        ({"format": "insight-captioner", "config": {"n_heads": 0}},
         r"config\.json: config: \(document\): CaptionerConfig\.n_heads must be >= 1"),
    ],
)  # fmt: skip
def test_a_malformed_config_json_names_the_file_and_field(tmp_path: Path, doc: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=message):  # before any LM or weights are loaded
        SteerableCaptioner.load(tmp_path)


def test_config_round_trips_through_json() -> None:
    cfg = CaptionerConfig(grid=(7, 7), pooled_grid=(4, 4), n_layers=2, d_model=32, n_heads=4, source="dense")
    assert CaptionerConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
