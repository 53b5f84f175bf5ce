"""Matryoshka BatchTopK SAE: exactness of the fast paths, invariants, and checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.sae import (
    PAPER_GROUP_FRACTIONS,
    MatryoshkaSAE,
    SAEConfig,
    batch_topk,
    import_dictionary_learning,
)
from tests.tolerances import assert_codes_match

SMALL = SAEConfig(d_in=32, dict_size=256, k=4, group_fractions=(0.125, 0.25, 0.625))


def naive_matryoshka_loss(sae: MatryoshkaSAE, x_bd: torch.Tensor) -> torch.Tensor:
    """Reference: dense codes, one full decode per nested shell (what dictionary_learning does)."""
    pre_bm = torch.relu((x_bd - sae.b_dec_d) @ sae.W_enc_md.T + sae.b_enc_m)
    flat = pre_bm.flatten()
    top = flat.topk(sae.cfg.k * x_bd.shape[0])
    codes_bm = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre_bm)
    loss = x_bd.new_zeros(())
    for end in sae.cfg.group_ends:
        recon = codes_bm[:, :end] @ sae.W_dec_md[:end] + sae.b_dec_d
        loss = loss + (x_bd - recon).pow(2).sum(-1).mean()
    return loss


def _trained_like(cfg: SAEConfig, seed: int = 0) -> MatryoshkaSAE:
    sae = MatryoshkaSAE(cfg, seed=seed)
    with torch.no_grad():  # non-trivial biases so every gradient path is exercised
        sae.b_enc_m.normal_(0, 0.1)
        sae.b_dec_d.normal_(0, 0.3)
    return sae


def test_paper_group_sizes() -> None:
    cfg = SAEConfig()
    assert cfg.group_sizes == (65, 245, 491, 983, 1966, 4442)
    assert sum(cfg.group_sizes) == 8192
    assert cfg.group_ends[-1] == 8192
    assert cfg.group_fractions == PAPER_GROUP_FRACTIONS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"dict_size": 8, "k": 9}, "k"),
        ({"group_fractions": (0.5, 0.6)}, "group_fractions"),
        ({"dict_size": 16, "k": 2, "group_fractions": (0.01, 0.99)}, "empty group"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SAEConfig(**kwargs)


def test_shapes_and_dtypes() -> None:
    sae = _trained_like(SMALL)
    sae.threshold.fill_(0.1)
    x = torch.randn(10, 32)
    codes = sae.encode(x)
    assert codes.shape == (10, 256)
    assert codes.dtype == torch.float32
    assert sae.decode(codes).shape == (10, 32)
    assert sae.shell_reconstructions(codes).shape == (3, 10, 32)
    assert torch.allclose(sae.shell_reconstructions(codes)[-1], sae.decode(codes), atol=1e-5)
    assert sae(x.half()).dtype == torch.float32  # half input is upcast, not rejected


@pytest.mark.parametrize("bad", [torch.randn(4, 31), torch.randn(4), torch.zeros(4, 32, dtype=torch.long)])
def test_rejects_wrong_input(bad: torch.Tensor) -> None:
    sae = _trained_like(SMALL)
    sae.threshold.fill_(0.0)
    with pytest.raises(ConfigError, match="SAE input"):
        sae.encode(bad)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 24),
    m=st.integers(4, 64),
    k=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    spiky=st.booleans(),
)
def test_batch_topk_equals_flat_topk(b: int, m: int, k: int, seed: int, spiky: bool) -> None:
    k = min(k, m)
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(b, m, generator=gen)
    if spiky:  # one row dominates: forces the candidate-widening path
        pre[0] += 10
    sel = batch_topk(pre, k)
    flat = pre.flatten()
    ref = flat.topk(b * k).values
    ref = ref[ref > 0]
    assert torch.equal(sel.vals_k.sort().values, ref.sort().values)
    assert torch.equal(pre[sel.rows_k, sel.cols_k], sel.vals_k)
    assert len(set(zip(sel.rows_k.tolist(), sel.cols_k.tolist(), strict=True))) == len(sel.vals_k)


def test_matryoshka_loss_and_grads_equal_naive_six_decodes() -> None:
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=48, dict_size=512, k=6)  # the paper's six groups
    fast, slow = _trained_like(cfg, seed=1), _trained_like(cfg, seed=1)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(64, 48) * 2 + 0.5
    out = fast.matryoshka_loss(x)
    ref = naive_matryoshka_loss(slow, x)
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    out.loss.backward()
    ref.backward()
    for (name, p_fast), p_slow in zip(fast.named_parameters(), slow.parameters(), strict=True):
        assert torch.allclose(p_fast.grad, p_slow.grad, rtol=1e-4, atol=1e-5), name
    assert out.shell_mse_g.shape == (6,)


def test_shell_mse_matches_shell_reconstructions() -> None:
    sae = _trained_like(SMALL)
    x = torch.randn(40, 32)
    out = sae.matryoshka_loss(x)
    codes = sae.encode(x, use_threshold=False)
    shells = sae.shell_reconstructions(codes)
    expected = (x[None] - shells).pow(2).sum(-1).mean(-1)
    assert torch.allclose(out.shell_mse_g, expected, rtol=1e-5)
    assert torch.allclose(out.residual_bd, x - shells[-1], atol=1e-5)


def test_thresholded_codes_are_batch_independent() -> None:
    """One image's 196 patch codes are the same alone, in a batch of 64, or as 1 row (to float32
    rounding: the kernels' blocking depends on the batch shape; BatchTopK would change the codes)."""
    torch.manual_seed(0)
    sae = _trained_like(SAEConfig(d_in=64, dict_size=1024, k=8))
    sae.threshold.fill_(0.3)
    images = torch.randn(64, 196, 64)
    alone = sae.encode(images[17])
    in_batch = sae.encode(images.reshape(-1, 64)).view(64, 196, -1)[17]
    assert_codes_match(alone, in_batch, sae.threshold)
    assert_codes_match(sae.encode(images[17, :1]), alone[:1], sae.threshold)
    assert 0 < (alone > 0).sum(1).float().mean() < 1024


def test_encode_without_threshold_is_refused_clearly() -> None:
    sae = _trained_like(SMALL)
    with pytest.raises(CheckpointError, match="threshold"):
        sae.encode(torch.randn(3, 32))
    assert (sae.encode(torch.randn(3, 32), use_threshold=False) > 0).sum() <= 3 * SMALL.k


def test_per_concept_threshold_mode() -> None:
    torch.manual_seed(0)
    sae = _trained_like(SMALL)
    sae.threshold.fill_(0.1)
    x = torch.randn(50, 32)
    assert not sae.has_concept_thresholds
    with pytest.raises(CheckpointError, match="no per-concept thresholds"):
        sae.encode(x, threshold="concept")
    thr = torch.rand(256) * 0.5
    thr[3] = float("inf")  # a concept that never fired during training
    sae.concept_threshold_m.copy_(thr)
    assert sae.has_concept_thresholds
    pre = torch.relu((x - sae.b_dec_d) @ sae.W_enc_md.T + sae.b_enc_m)  # written out, not our code
    expected = pre * (pre > thr)
    codes = sae.encode(x, threshold="concept")
    assert torch.allclose(codes, expected, atol=1e-6)
    assert not codes[:, 3].any()
    assert_codes_match(sae.encode(x[7:8], threshold="concept"), codes[7:8], thr)  # batch-independent
    assert not torch.equal(codes, sae.encode(x))  # global mode differs
    with pytest.raises(ConfigError, match="threshold must be one of"):
        sae.encode(x, threshold="per-patch")  # type: ignore[arg-type]


def test_per_concept_thresholds_round_trip_and_old_files_load(tmp_path) -> None:
    sae = _trained_like(SMALL)
    sae.threshold.fill_(0.25)
    sae.concept_threshold_m.copy_(torch.linspace(0.1, 2.0, 256))
    back = MatryoshkaSAE.load(sae.save(tmp_path / "sae.safetensors"))
    assert torch.equal(back.concept_threshold_m, sae.concept_threshold_m)
    from safetensors.torch import load_file, save_file

    old = load_file(str(tmp_path / "sae.safetensors"))  # a file written before the thresholds existed
    old.pop("concept_threshold")
    save_file(old, str(tmp_path / "old.safetensors"))
    legacy = MatryoshkaSAE.load(tmp_path / "old.safetensors")
    assert not legacy.has_concept_thresholds
    x = torch.randn(4, 32)
    assert torch.equal(legacy.encode(x), back.encode(x))


def test_decoder_normalisation_and_parallel_grad_removal() -> None:
    sae = _trained_like(SMALL)
    with torch.no_grad():
        sae.W_dec_md.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec_md.norm(dim=1), torch.ones(256), atol=1e-6)
    sae.matryoshka_loss(torch.randn(16, 32)).loss.backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec_md.grad * sae.W_dec_md).sum(1).abs().max() < 1e-5


def test_safetensors_round_trip(tmp_path) -> None:
    sae = _trained_like(SMALL)
    sae.threshold.fill_(0.25)
    path = sae.save(tmp_path / "sae.safetensors", config_path=tmp_path / "sae.json")
    back = MatryoshkaSAE.load(path)
    assert back.cfg == sae.cfg
    for a, b in zip(sae.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(8, 32)
    assert torch.equal(sae.encode(x), back.encode(x))
    doc = json.loads((tmp_path / "sae.json").read_text())
    assert doc["group_sizes"] == list(SMALL.group_sizes)
    assert doc["k"] == 4
    from safetensors.torch import load_file

    raw = load_file(str(path))  # dictionary_learning names and layouts on disk (+ per-concept thresholds)
    dl_names = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k", "group_sizes"}
    assert set(raw) == dl_names | {"concept_threshold"}
    assert raw["W_enc"].shape == (32, 256)
    assert raw["W_dec"].shape == (256, 32)


def _dictionary_learning_state(d: int = 32, m: int = 256, k: int = 4) -> dict[str, torch.Tensor]:
    """A state dict as dictionary_learning's MatryoshkaBatchTopKSAE.state_dict() lays it out."""
    gen = torch.Generator().manual_seed(3)
    sizes = [int(f * m) for f in (0.1, 0.3)]
    sizes.append(m - sum(sizes))
    return {
        "k": torch.tensor(k, dtype=torch.int),
        "threshold": torch.tensor(0.42),
        "group_sizes": torch.tensor(sizes),
        "W_enc": torch.randn(d, m, generator=gen),
        "b_enc": torch.randn(m, generator=gen),
        "W_dec": torch.randn(m, d, generator=gen),
        "b_dec": torch.randn(d, generator=gen),
    }


def test_import_dictionary_learning_checkpoint(tmp_path) -> None:
    state = _dictionary_learning_state()
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"group_fractions": [0.1, 0.3, 0.6]}}))
    sae = import_dictionary_learning(tmp_path / "ae.pt")
    assert sae.cfg.group_sizes == (25, 76, 155)
    assert sae.cfg.k == 4
    assert torch.equal(sae.W_enc_md, state["W_enc"].T)
    assert float(sae.threshold) == pytest.approx(0.42)
    x = torch.randn(5, 32)  # reference encode/decode written the way dictionary_learning does it
    post = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    ref_codes = post * (post > state["threshold"])
    assert torch.allclose(sae.encode(x), ref_codes, atol=1e-5)
    assert torch.allclose(sae(x), ref_codes @ state["W_dec"] + state["b_dec"], atol=1e-4)
    # and the import survives our own save/load
    back = MatryoshkaSAE.load(sae.save(tmp_path / "sae.safetensors"))
    assert back.cfg.group_sizes == sae.cfg.group_sizes


def test_import_dictionary_learning_backup_with_norm_factor(tmp_path) -> None:
    """A mid-training backup holds normalised-unit weights and the norm factor: dictionary_learning
    scales biases and threshold by it before its final save, so the import does the same."""
    state = _dictionary_learning_state()
    f = 7.5
    backup = {"step": 100, "ae": state, "optimizer": {}, "config": {"k": 4}, "norm_factor": f}
    torch.save(backup, tmp_path / "ae.pt")
    sae = import_dictionary_learning(tmp_path / "ae.pt")
    assert torch.allclose(sae.b_dec_d, state["b_dec"] * f)
    assert torch.allclose(sae.b_enc_m, state["b_enc"] * f)
    assert float(sae.threshold) == pytest.approx(0.42 * f)
    x_raw = torch.randn(5, 32) * f  # raw features; the trained SAE saw x_raw / f
    post = torch.relu((x_raw / f - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    codes = post * (post > state["threshold"])
    assert torch.allclose(sae.encode(x_raw), codes * f, atol=1e-4)  # codes scale with the factor
    assert torch.allclose(sae(x_raw), (codes @ state["W_dec"] + state["b_dec"]) * f, atol=1e-3)
    # a final ae.pt has the factor folded in already: nothing is rescaled
    torch.save(state, tmp_path / "final.pt")
    assert torch.equal(import_dictionary_learning(tmp_path / "final.pt").b_dec_d, state["b_dec"])


def test_import_reads_k_from_config_json_and_half_precision(tmp_path) -> None:
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in _dictionary_learning_state().items()}
    state.pop("k")
    torch.save(state, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="'k'"):
        import_dictionary_learning(tmp_path / "ae.pt")
    trainer = {"k": 4, "group_fractions": [0.1, 0.3, 0.6]}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    sae = import_dictionary_learning(tmp_path / "ae.pt")
    assert (sae.cfg.k, sae.W_enc_md.dtype) == (4, torch.float32)
    state["threshold"] = torch.ones(256)
    torch.save(state, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="one global threshold"):
        import_dictionary_learning(tmp_path / "ae.pt")


def test_import_without_config_json_infers_group_sizes(tmp_path) -> None:
    torch.save(
        _dictionary_learning_state(m=8192, d=16, k=12)
        | {"group_sizes": torch.tensor(SAEConfig().group_sizes)},
        tmp_path / "ae.pt",
    )
    sae = import_dictionary_learning(tmp_path / "ae.pt")
    assert sae.cfg.group_sizes == SAEConfig().group_sizes


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("W_dec"), "missing"),
        (lambda s: s.update(W_dec=torch.zeros(10, 32)), "W_dec has shape"),
        (lambda s: s.update(group_sizes=torch.tensor([1, 2])), "group_sizes"),
        (lambda s: s.pop("k"), "'k'"),
        (lambda s: s["b_enc"].__setitem__(0, float("nan")), "NaN"),
    ],
)
def test_import_rejects_bad_checkpoints(tmp_path, mutate, message: str) -> None:
    state = _dictionary_learning_state()
    mutate(state)
    torch.save(state, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=message):
        import_dictionary_learning(tmp_path / "ae.pt")


class Evil:
    """An arbitrary Python object: loading it would need full unpickling."""


def test_import_refuses_pickled_objects(tmp_path) -> None:
    torch.save({"W_enc": Evil()}, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        import_dictionary_learning(tmp_path / "ae.pt")


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        MatryoshkaSAE.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors"):
        MatryoshkaSAE.load(bad)
