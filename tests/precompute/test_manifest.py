"""``insight manifest``: the backbone block an atlas publishes names no file of the builder's machine."""

from __future__ import annotations

from pathlib import Path

from insight_core.atlas import AtlasLayout
from precompute.manifest import public_backbone


def test_the_published_backbone_block_names_the_head_inside_the_atlas(tmp_path: Path) -> None:
    root = tmp_path / "atlas"
    root.mkdir()
    block = {"arch": "ViT-B-16", "pool": "head", "dinoiser": "/home/builder/last.pt"}
    assert public_backbone(block, root)["dinoiser"] is None  # not installed: no builder path either
    AtlasLayout(root).dinoiser.write_bytes(b"head")
    assert public_backbone(block, root)["dinoiser"] == "dinoiser.safetensors"
    assert public_backbone({"arch": "ViT-B-16"}, root) == {"arch": "ViT-B-16"}
    assert public_backbone(None, root) is None
