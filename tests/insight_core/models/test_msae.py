"""MSAE: config, TopK inference, the multi-level loss, folding the input normalisation, file format,
the SAE-kind registry and the importer of the public MSAE checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.msae import (
    MSAE,
    MSAEConfig,
    default_nesting,
    import_msae_checkpoint,
    parse_msae_filename,
    topk_codes,
)
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.models.sae_kinds import build_sae, kind_of, load_sae, sae_kind
from tests.tolerances import CODE_ATOL


def planted(n: int, d: int = 24, n_atoms: int = 40, active: int = 3, seed: int = 0) -> torch.Tensor:
    atoms = torch.nn.functional.normalize(
        torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(0)), dim=1
    )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_atoms, generator=gen).argsort(1)[:, :active]
    codes = torch.zeros(n, n_atoms).scatter_(1, idx, 0.5 + torch.rand(n, active, generator=gen))
    return 2.0 + codes @ atoms + 0.01 * torch.randn(n, d, generator=gen)


def trained(levels: tuple[int, ...] = (1, 2, 4), steps: int = 200, weighting: str = "uniform") -> MSAE:
    sae = MSAE(MSAEConfig(d_in=24, dict_size=48, k_levels=levels, weighting=weighting), seed=0)  # type: ignore[arg-type]
    sae.init_from_batch(planted(512, seed=1))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(steps):
        out = sae.matryoshka_loss(planted(256, seed=10 + step))
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
    return sae


def test_config_levels_weights_and_default_inference_level() -> None:
    cfg = MSAEConfig(d_in=8, dict_size=64, k_levels=(32, 4, 16, 4))
    assert cfg.k_levels == (4, 16, 32)
    assert cfg.k == 32
    assert cfg.group_sizes == (64,)
    assert cfg.level_weights == (1.0, 1.0, 1.0)
    assert MSAEConfig(d_in=8, dict_size=64, k_levels=(4, 8, 16), weighting="reverse").level_weights == (
        3,
        2,
        1,
    )
    assert MSAEConfig(d_in=8, dict_size=256, k=8).k == 8
    assert cfg.to_json()["kind"] == "msae"
    for bad in [dict(k_levels=(0, 4)), dict(k_levels=(4, 128)), dict(weighting="linear"),
                dict(k_levels=(4,), group_fractions=(0.5, 0.5)), dict(k_levels=(4,), k=65)]:  # fmt: skip
        with pytest.raises(ConfigError):
            MSAEConfig(d_in=8, dict_size=64, **bad)  # type: ignore[arg-type]


def test_encode_is_per_input_topk_and_batch_independent() -> None:
    sae = MSAE(MSAEConfig(d_in=24, dict_size=48, k_levels=(2, 6)), seed=3)
    with torch.no_grad():
        sae.b_enc_m.fill_(5.0)  # every pre-activation positive: exactly k latents per input
    x = planted(40)
    codes = sae.encode(x)
    assert ((codes > 0).sum(1) == 6).all()
    assert ((sae.encode(x, k=2) > 0).sum(1) == 2).all()
    pre = sae.pre_activations(x)
    assert torch.equal(codes, topk_codes(pre, 6))
    # one row encodes as it does in a batch, to float32 rounding (the kernels' blocking follows the batch
    # shape); a latent could only swap with a rival within CODE_ATOL of it in the row's TopK
    torch.testing.assert_close(sae.encode(x[:1]), codes[:1], rtol=0, atol=CODE_ATOL)
    assert torch.equal(sae.encode(x, use_threshold=False), codes)
    with pytest.raises(ConfigError):
        sae.encode(x, k=0)
    with pytest.raises(CheckpointError):  # no per-concept thresholds recorded yet
        sae.encode(x, threshold="concept")


@pytest.mark.parametrize("weighting", ["uniform", "reverse"])
def test_loss_is_the_weighted_normalised_mse_of_every_level(weighting: str) -> None:
    """The one-pass cumulative decode equals a dense reference per level (their nmse on centred,
    scaled inputs, weighted, divided by the sum of the weights)."""
    cfg = MSAEConfig(d_in=24, dict_size=48, k_levels=(1, 3, 9), weighting=weighting)  # type: ignore[arg-type]
    sae = MSAE(cfg, seed=0)
    x = planted(64)
    sae.init_from_batch(x)
    with torch.no_grad():
        sae.b_dec_d.normal_(0, 0.1)
    out = sae.matryoshka_loss(x)
    xn = (x - sae.input_mean_d) * sae.input_scale
    pre = torch.nn.functional.linear(xn - sae.b_dec_d, sae.W_enc_md, sae.b_enc_m).detach()
    ref = []
    for k in cfg.k_levels:
        recon = (topk_codes(pre, k) @ sae.W_dec_md + sae.b_dec_d).detach()
        ref.append(((recon - xn).pow(2).sum(1) / xn.pow(2).sum(1)).mean())
    w = torch.tensor(cfg.level_weights)
    assert float(out.loss.detach()) == pytest.approx(float((w * torch.stack(ref)).sum() / w.sum()), rel=1e-5)
    assert out.shell_mse_g.shape == (3,)
    assert len(out.selection.cols_k) <= 9 * 64
    out.loss.backward()
    assert sae.W_enc_md.grad is not None
    assert sae.W_dec_md.grad is not None


def test_training_learns_and_folding_keeps_the_function_in_raw_units(tmp_path: Path) -> None:
    sae = trained()
    x = planted(400, seed=99)
    with torch.no_grad():
        xn = (x - sae.input_mean_d) * sae.input_scale
        pre = torch.nn.functional.linear(xn - sae.b_dec_d, sae.W_enc_md, sae.b_enc_m).detach()
        before = (topk_codes(pre, 4) @ sae.W_dec_md + sae.b_dec_d) / sae.input_scale + sae.input_mean_d
    with pytest.raises(CheckpointError, match="finish_training"):
        sae.save(tmp_path / "early.safetensors")
    sae.finish_training()
    assert float(sae.input_scale) == 1.0
    assert not sae.input_mean_d.any()
    with torch.no_grad():
        after = sae.decode(sae.encode(x))
    assert torch.allclose(after, before, atol=1e-4)
    fve = 1 - (after - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fve > 0.9, fve
    assert torch.allclose(sae.W_dec_md.norm(dim=1), torch.ones(48), atol=1e-5)
    mse = [float((sae.decode(sae.encode(x, k=k)) - x).pow(2).sum().detach()) for k in (1, 2, 4)]
    assert mse[0] > mse[1] > mse[2]  # trained: every level adds detail


def test_save_load_roundtrip_and_kind_registry(tmp_path: Path) -> None:
    sae = trained(steps=20, weighting="reverse")
    sae.finish_training()
    path = sae.save(tmp_path / "sae.safetensors", config_path=tmp_path / "sae.json")
    assert kind_of(path) == "msae"
    loaded = load_sae(path)
    assert isinstance(loaded, MSAE)
    assert sae_kind(loaded) == "msae"
    assert loaded.cfg == sae.cfg
    x = planted(30)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    with pytest.raises(CheckpointError, match="load_sae"):
        MatryoshkaSAE.load(path)
    bt = MatryoshkaSAE(SAEConfig(d_in=24, dict_size=48, k=3, group_fractions=(1.0,)))
    bt_path = bt.save(tmp_path / "bt.safetensors")
    assert kind_of(bt_path) == "matryoshka"
    assert sae_kind(load_sae(bt_path)) == "matryoshka"
    assert isinstance(build_sae(sae.cfg), MSAE)
    assert not isinstance(build_sae(bt.cfg), MSAE)
    foreign = tmp_path / "foreign.safetensors"  # another tool's file: HF's usual {"format": "pt"} tag
    save_file(bt.dl_state_dict(), str(foreign), metadata={"format": "pt"})
    assert kind_of(foreign) == "matryoshka"
    assert not isinstance(load_sae(foreign), MSAE)
    odd = tmp_path / "odd.safetensors"
    save_file(bt.dl_state_dict(), str(odd), metadata={"kind": "jumprelu"})
    with pytest.raises(CheckpointError, match="unknown SAE kind"):
        load_sae(odd)


# ------------------------------------------------------------------------------------------ importer
def _their_reconstruction(doc: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """The public code's math: (x - mu) * s -> TopKReLU(enc(x - pre_bias) + latent_bias) -> decoder
    + pre_bias -> / s + mu."""
    sd = doc["model"]
    dec = sd["decoder"] if "decoder" in sd else sd["encoder"].t()
    xs = (x - doc["mean_center"]) * doc["scaling_factor"]
    pre = (xs - sd["pre_bias"]) @ sd["encoder"] + sd["latent_bias"]
    return (topk_codes(pre, k) @ dec + sd["pre_bias"]) / doc["scaling_factor"] + doc["mean_center"]


def _their_checkpoint(
    tmp_path: Path, name: str, d: int = 16, m: int = 64, tied: bool = False
) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(5)
    sd = {
        "pre_bias": 0.1 * torch.randn(d, generator=gen),
        "encoder": torch.randn(d, m, generator=gen) / d**0.5,
        "latent_bias": 0.05 * torch.randn(m, generator=gen),
        "latents_activation_frequency": torch.zeros(m, dtype=torch.int64),
    }
    if not tied:
        sd["decoder"] = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    doc = {
        "model": sd,
        "mean_center": torch.randn(d, generator=gen),
        "scaling_factor": 3.7,
        "target_norm": 4.0,
    }
    path = tmp_path / name
    torch.save(doc, path)
    return path, doc


def test_filename_and_nesting_follow_their_train_script() -> None:
    info = parse_msae_filename("6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train.pth")
    assert info["dict_size"] == 6144
    assert info["d_in"] == 768
    assert info["first_k"] == 64
    assert info["weighting"] == "reverse"
    assert not info["tied"]
    assert info["soft_cap"] == 0.0
    assert parse_msae_filename("weights.pth") == {}
    assert default_nesting(64, 6144) == (64, 128, 256, 512, 1024, 2048, 4096, 6144)
    assert default_nesting(16, 64) == (16, 32, 64)


@pytest.mark.parametrize("tied", [False, True])
def test_import_reproduces_their_model_in_raw_units(tmp_path: Path, tied: bool) -> None:
    path, doc = _their_checkpoint(tmp_path, f"64_16_TopKReLU_4_UW_{tied}_False_0.0_planted.pth", tied=tied)
    sae = import_msae_checkpoint(path)
    assert sae.cfg.k_levels == (4, 8, 16, 32, 64)
    assert sae.cfg.k == 32  # the last level is m (plain ReLU): inference at the largest sparse level
    assert sae.cfg.weighting == "uniform"
    x = torch.randn(50, 16)
    for k in (4, 32):
        ours = sae.decode(sae.encode(x, k=k))
        assert torch.allclose(ours, _their_reconstruction(doc, x, k), atol=1e-4)
    again = import_msae_checkpoint(path, k_levels=(4, 8), weighting="reverse", k=4)
    assert (again.cfg.k_levels, again.cfg.weighting, again.cfg.k) == ((4, 8), "reverse", 4)
    saved = again.save(tmp_path / "sae.safetensors")
    assert torch.allclose(
        load_sae(saved).decode(load_sae(saved).encode(x)), _their_reconstruction(doc, x, 4), atol=1e-4
    )


def test_import_refuses_what_it_cannot_represent(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        import_msae_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only"):
        import_msae_checkpoint(garbage)
    path, _ = _their_checkpoint(tmp_path, "64_16_TopKReLU_4_UW_False_True_0.0_x.pth")
    with pytest.raises(CheckpointError, match="normalize=True"):
        import_msae_checkpoint(path)
    path, _ = _their_checkpoint(tmp_path, "64_16_TopKReLU_4_UW_False_False_30.0_x.pth")
    with pytest.raises(CheckpointError, match="soft_cap"):
        import_msae_checkpoint(path)
    path, _ = _their_checkpoint(tmp_path, "renamed.pth")
    with pytest.raises(CheckpointError, match="k_levels"):
        import_msae_checkpoint(path)
    assert import_msae_checkpoint(path, k_levels=(2, 8)).cfg.k == 8
    path, _ = _their_checkpoint(tmp_path, "128_16_TopKReLU_4_UW_False_False_0.0_x.pth")
    with pytest.raises(CheckpointError, match="file name says"):
        import_msae_checkpoint(path)


@pytest.mark.gpu
def test_loss_gradients_and_encoding_on_cuda_match_cpu() -> None:
    """The level loop (embedding_bag with per-sample weights), its gradients and TopK inference on
    CUDA agree with the CPU (float32 tolerances: different GEMM kernels)."""
    cfg = MSAEConfig(d_in=512, dict_size=4096, k_levels=(16, 32, 64, 128))
    cpu = MSAE(cfg, seed=0)
    x = planted(2048, d=512, n_atoms=600, active=12)
    cpu.init_from_batch(x)
    gpu = MSAE(cfg, seed=0).cuda()
    gpu.load_state_dict(cpu.state_dict())
    out_c, out_g = cpu.matryoshka_loss(x), gpu.matryoshka_loss(x.cuda())
    out_c.loss.backward()
    out_g.loss.backward()
    assert float(out_g.loss.detach()) == pytest.approx(float(out_c.loss.detach()), rel=1e-4)
    for name, p in cpu.named_parameters():
        grad_g = dict(gpu.named_parameters())[name].grad
        assert grad_g is not None
        assert p.grad is not None
        torch.testing.assert_close(grad_g.cpu(), p.grad, rtol=1e-3, atol=1e-5)
    cpu.finish_training()
    gpu.finish_training()
    codes_c, codes_g = cpu.encode(x[:256]), gpu.encode(x[:256].cuda()).cpu()
    assert ((codes_c > 0) == (codes_g > 0)).float().mean() > 0.999  # near-ties may swap at the k-th place


def test_probe_pooling_reads_msae_codes() -> None:
    """Probes and classification pool an MSAE's codes like any SAE's (Eq. B.14 over its TopK codes)."""
    from insight_core.concepts.pooling import concept_codes, pool_images

    sae = trained(steps=30)
    sae.finish_training()
    feats_bpd = planted(6 * 10, seed=7).reshape(6, 10, 24)
    pooled = pool_images(sae, feats_bpd)
    codes = sae.encode(feats_bpd.reshape(60, 24)).reshape(6, 10, -1)
    assert pooled.m == 48
    assert torch.equal(concept_codes(sae, feats_bpd.reshape(60, 24)), codes.reshape(60, -1))
    dense_max = torch.zeros(6, 48)
    rows = torch.repeat_interleave(torch.arange(6), pooled.indptr.diff())
    dense_max[rows, pooled.cols_e] = pooled.max_e.float()
    torch.testing.assert_close(dense_max, codes.amax(1))


def test_sparse_backward_equals_dense_autograd() -> None:
    """The loss's gradients through the selected latents only equal dense autograd over all of them."""
    cfg = MSAEConfig(d_in=24, dict_size=96, k_levels=(2, 5, 11), weighting="reverse")
    sparse, dense = MSAE(cfg, seed=1), MSAE(cfg, seed=1)
    x = planted(300)
    sparse.init_from_batch(x)
    with torch.no_grad():
        sparse.b_dec_d.normal_(0, 0.1)
        sparse.b_enc_m.normal_(0, 0.1)
    dense.load_state_dict(sparse.state_dict())
    sparse.matryoshka_loss(x).loss.backward()
    xn = (x - dense.input_mean_d) * dense.input_scale
    pre = torch.nn.functional.linear(xn - dense.b_dec_d, dense.W_enc_md, dense.b_enc_m)  # autograd over all m
    losses = []
    for k in cfg.k_levels:
        recon = topk_codes(pre, k) @ dense.W_dec_md + dense.b_dec_d
        losses.append(((recon - xn).pow(2).sum(1) / xn.pow(2).sum(1)).mean())
    w = torch.tensor(cfg.level_weights)
    ((w * torch.stack(losses)).sum() / w.sum()).backward()
    for (name, p), (_, q) in zip(sparse.named_parameters(), dense.named_parameters(), strict=True):
        assert p.grad is not None
        assert q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
