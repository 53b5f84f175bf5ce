"""compare-saes on a planted world: a permuted, rescaled copy of the oracle SAE matches it perfectly and
fires with it; a random SAE does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from insight_core.atlas import SynthLayout
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae
from precompute.__main__ import main

WORLD = (
    "--world.d 64 --world.n-objects 5 --world.n-attributes 4 --world.n-backgrounds 3 --world.n-distractors 20"
)
WORLD += " --world.grid 6"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted-compare")
    assert main(["synth", "--out", str(out), "--n-images", "40", *WORLD.split()]) == 0
    return out


def _permuted_copy(sae: MatryoshkaSAE, path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(sae.cfg.dict_size, generator=gen)
    scale = torch.rand(sae.cfg.dict_size, 1, generator=gen) * 3 + 0.5
    with torch.no_grad():
        sae.W_dec_md.copy_(sae.W_dec_md[perm] * scale)  # directions kept, norms changed
        sae.W_enc_md.copy_(sae.W_enc_md[perm])
        sae.b_enc_m.copy_(sae.b_enc_m[perm])
    return sae.save(path)


def test_permuted_rescaled_copy_and_random_sae(planted: Path, tmp_path: Path) -> None:
    s = SynthLayout(planted)
    copy = _permuted_copy(load_sae(s.oracle_atlas.sae), tmp_path / "copy.safetensors")
    out = tmp_path / "same.json"
    assert main(["compare-saes", str(s.oracle_atlas.root), str(copy), "--features", str(s.features.root),
                 "--out", str(out)]) == 0  # fmt: skip
    rep = json.loads(out.read_text())
    assert rep["mean_matched_cosine"] >= 0.99  # acceptance
    assert rep["share_matched_above_0.9"] == 1.0
    assert rep["co_firing"]["mean_co_firing"] == pytest.approx(1.0)
    rand = MatryoshkaSAE(load_sae(s.oracle_atlas.sae).cfg, seed=7).save(tmp_path / "random.safetensors")
    out2 = tmp_path / "random.json"
    assert main(["compare-saes", str(s.oracle_atlas.sae), str(rand), "--out", str(out2)]) == 0
    rep2 = json.loads(out2.read_text())
    assert rep2["mean_matched_cosine"] < 0.5  # acceptance: low
    assert rep2["share_matched_above_0.9"] == 0.0
    assert "co_firing" not in rep2


def test_missing_sae_is_a_clear_error(tmp_path: Path, caplog) -> None:
    assert main(["compare-saes", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "no SAE there" in caplog.text
