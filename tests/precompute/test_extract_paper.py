"""Acceptance: ``extract`` computes the paper's released feature path (CLIP-DINOiser's MaskCLIP features
and its guided pooling with an imported ``last.pt``).

The reference below is written from the description of the released code, directly on the
open_clip module weights (no project code): random-init ViT-B/16 weights saved to a local file,
four 224x224 images, and a random checkpoint in CLIP-DINOiser's layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from precompute.__main__ import main

pytestmark = pytest.mark.slow  # a ViT-B/16 is built four times (~40 s on 2 CPU cores)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(123)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    weights = root / "vit_b16_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # smooth blobs + noise, lossless PNG so decoding is exact
        yy, xx = np.mgrid[0:224, 0:224] / 224.0
        base = np.stack([np.sin((c + 1 + i) * 3 * xx + c * yy) for c in range(3)], -1)
        arr = 127.5 + 90 * base + rng.normal(0, 20, (224, 224, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(images / f"img_{i}.png")
    g = torch.Generator().manual_seed(7)
    conv = torch.nn.Conv2d(768, 256, 3)  # a conv's default init scale, random values
    state = {
        "obj_proj.weight": torch.empty(256, 768, 3, 3).uniform_(-1, 1, generator=g) * conv.weight.abs().max(),
        "obj_proj.bias": torch.empty(256).uniform_(-0.01, 0.01, generator=g),
        "bkg_decoder.weight": torch.randn(1, 768, 1, 1, generator=g),
        "bkg_decoder.bias": torch.zeros(1),
    }
    checkpoint = root / "last.pt"
    torch.save({"epoch": 99, "model_state_dict": state}, checkpoint)
    return {"root": root, "weights": weights, "images": images, "checkpoint": checkpoint, "state": state}


def _reference(weights: Path, images: Path, state: dict) -> dict[str, torch.Tensor]:
    """MaskCLIP features, the intermediate tokens and the released pooling, from the description."""
    model = open_clip.create_model("ViT-B-16", pretrained=str(weights)).eval()
    visual = model.visual
    files = sorted(images.glob("*.png"))
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
            for f in files
        ]
    )
    pixels = (pixels - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
    blocks = visual.transformer.resblocks
    inter: list[torch.Tensor] = []
    handle = blocks[-3].ln_2.register_forward_hook(lambda _m, _i, out: inter.append(out))
    with torch.no_grad():
        b = pixels.shape[0]
        x = visual.conv1(pixels).reshape(b, 768, -1).permute(0, 2, 1)  # (B, 196, 768)
        cls = visual.class_embedding.expand(b, 1, 768)
        x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
        for blk in blocks[:-1]:
            x = blk(x)
        handle.remove()
        last = blocks[-1]
        # v = out_proj(value(ln_1(x))) + x; v = v + mlp(ln_2(v)); ln_post; proj; patch tokens only
        y = last.ln_1(x)
        qkv = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias)
        v = F.linear(qkv[..., 2 * 768 :], last.attn.out_proj.weight, last.attn.out_proj.bias)
        value_only = v
        v = v + x
        v = v + last.mlp(last.ln_2(v))
        maskclip = visual.ln_post(v)[:, 1:] @ visual.proj  # (B, 196, 512)
        value_only = visual.ln_post(value_only)[:, 1:] @ visual.proj
        # CLIP-DINOiser: conv (replicate padding) on block -3's ln_2 tokens, L2 norm, correlations,
        # corrs < 0.2 -> 0, weighted average / (sum + 1e-6)
        tokens = inter[0][:, 1:].permute(0, 2, 1).reshape(b, 768, 14, 14)
        proj = F.conv2d(F.pad(tokens, (1, 1, 1, 1), mode="replicate"), state["obj_proj.weight"],
                        state["obj_proj.bias"]).reshape(b, 256, 196)  # fmt: skip
        proj = proj / proj.norm(dim=1, keepdim=True)
        corrs = proj.transpose(1, 2) @ proj  # (B, 196, 196)
        uncut = corrs.clamp_min(0)
        corrs[corrs < 0.2] = 0.0
        pooled = torch.einsum("bnm,bmc->bnc", corrs, maskclip) / (corrs.sum(-1, keepdim=True) + 1e-6)
        pooled_uncut = torch.einsum("bnm,bmc->bnc", uncut, maskclip) / (uncut.sum(-1, keepdim=True) + 1e-6)
    return {"maskclip": maskclip, "value_only": value_only, "pooled": pooled, "pooled_uncut": pooled_uncut,
            "corrs": corrs}  # fmt: skip


@pytest.fixture(scope="module")
def reference(setup: dict) -> dict[str, torch.Tensor]:
    return _reference(setup["weights"], setup["images"], setup["state"])


def _extract(setup: dict, name: str, *extra: str) -> tuple[torch.Tensor, dict]:
    out = setup["root"] / name
    args = ["extract", "--images", str(setup["images"]), "--out", str(out),
            "--pretrained", str(setup["weights"]),
            "--batch-size", "4", "--precision", "fp32", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = json.loads((out / "shard_00000.ids.json").read_text())
    assert entry["ids"] == [f"img_{i}.png" for i in range(4)]
    return torch.from_numpy(np.load(out / entry["file"]).astype(np.float32)), manifest


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)


def test_extract_pool_none_is_the_released_maskclip_path(setup: dict, reference: dict) -> None:
    feats, manifest = _extract(setup, "none", "--pool", "none")
    assert feats.shape == (4, 196, 512)
    cos = _cos(feats, reference["maskclip"])
    print(f"pool none vs released MaskCLIP: per-patch cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.999
    # the test can fail: the value-only path (no residual, no MLP) is far from it
    assert _cos(reference["value_only"], reference["maskclip"]).mean() < 0.9
    bb = manifest["backbone"]
    assert (bb["dense"], bb["resize"], bb["pool"], bb["head"]) == ("released", "crop", "none", None)


def test_extract_pool_head_with_clip_dinoiser_checkpoint(setup: dict, reference: dict) -> None:
    feats, manifest = _extract(setup, "head", "--pool", "head", "--dinoiser", str(setup["checkpoint"]))
    cos = _cos(feats, reference["pooled"])
    print(
        f"pool head (last.pt) vs released pooling: per-patch cosine min {cos.min():.5f} mean {cos.mean():.5f}"
    )
    assert cos.min() >= 0.999
    # the test can fail: pooling changes the features, and so does a missing gamma cut
    corrs = reference["corrs"]
    assert ((corrs > 0) & (corrs < 1)).float().mean() > 0.05  # patches do pool with others
    assert _cos(reference["pooled"], reference["maskclip"]).mean() < 0.99
    assert _cos(reference["pooled_uncut"], reference["pooled"]).min() < 0.999
    bb = manifest["backbone"]
    assert (bb["dense"], bb["resize"], bb["pool"], bb["head"]) == ("released", "crop", "head", "released")
    assert bb["dinoiser"] == str(setup["checkpoint"])
    # 'auto' pooling picks the head when --dinoiser is given (same features, so the shards are reused)
    again, _ = _extract(setup, "head", "--dinoiser", str(setup["checkpoint"]))
    assert torch.equal(again, feats)


def test_extract_rejects_a_checkpoint_of_another_layout(
    setup: dict, caplog: pytest.LogCaptureFixture
) -> None:
    bad = setup["root"] / "other.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}}, bad)
    args = ["extract", "--images", str(setup["images"]), "--out", str(setup["root"] / "bad"), "--pretrained",
            "none", "--dinoiser", str(bad), "--no-progress"]  # fmt: skip
    assert main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "\n" not in errors[0]
    assert "other.pt: not a CLIP-DINOiser checkpoint: missing 'model_state_dict'" in errors[0]
