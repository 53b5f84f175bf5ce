"""The weights policy: an atlas names only built-in tags, GPT-2, or files it lists; else one AtlasError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insight_core.atlas import ATLAS_FILES, REQUIRED_ROLES, Atlas, AtlasError, write_manifest
from insight_core.atlas.manifest import CHECKSUM_KEY, manifest_checksum
from insight_core.atlas.trust import (
    ENV_TRUST,
    KNOWN_LMS,
    check_arch,
    check_atlas_refs,
    check_weights_ref,
    checked_backbone,
    trust_from_env,
)
from insight_core.models.backbone import PAPER_PRETRAINED


@pytest.fixture
def atlas_dir(tmp_path: Path) -> Path:
    root = tmp_path / "atlas"
    for role in REQUIRED_ROLES:
        path = root / ATLAS_FILES[role]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content of {role}".encode())
    write_manifest(root, backbone={"arch": "ViT-B-16", "pretrained": PAPER_PRETRAINED})
    return root


def _set_backbone(root: Path, **fields) -> Atlas:
    """Rewrite the backbone block with a consistent checksum (as an author controlling the atlas can)."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["backbone"] = {**manifest["backbone"], **fields}
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    return Atlas.open(root)


def _ref(atlas: Atlas, value, kind="open_clip", arch="ViT-B-16", trust=False) -> str:
    return check_weights_ref("backbone.pretrained", value, kind=kind, arch=arch, atlas=atlas, trust=trust)


def test_built_in_tags_random_init_and_known_lms_pass_unchanged(atlas_dir: Path) -> None:
    atlas = Atlas.open(atlas_dir)
    for tag in (PAPER_PRETRAINED, "openai", "none", "None"):
        assert _ref(atlas, tag) == tag
    assert _ref(atlas, "hub", kind="timm", arch="vit_small_patch14_dinov2.lvd142m") == "hub"
    assert _ref(atlas, "hub", kind="timm", arch="vit_base_patch16_224") == "hub"  # timm's default tag
    assert _ref(atlas, "none", kind="timm", arch="vit_tiny_patch16_224") == "none"
    for lm in ("gpt2", "openai-community/gpt2-medium"):
        assert lm in KNOWN_LMS
        assert _ref(atlas, lm, kind="lm", arch=None) == lm
    assert checked_backbone(atlas, trust=False)["pretrained"] == PAPER_PRETRAINED


@pytest.mark.parametrize(
    ("kind", "arch", "value"),
    [
        ("open_clip", "ViT-B-16", "/etc/passwd"),  # a file outside the atlas
        ("open_clip", "ViT-B-16", "../outside.pt"),
        ("open_clip", "ViT-B-16", "~/weights.pt"),
        ("open_clip", "ViT-B-16", "laion2b_s32b_b82k"),  # a tag of another arch (ViT-L-14)
        ("open_clip", "ViT-B-16", "hf-hub:evil/clip"),
        ("open_clip", "ViT-B-16", "https://evil.example/w.pt"),
        ("open_clip", "ViT-B-16", "unlisted.pt"),  # inside the atlas, but not in the manifest
        ("timm", "vit_small_patch14_dinov2.lvd142m", "/tmp/w.safetensors"),
        ("timm", "vit_small_patch14_dinov2.lvd142m", "evil/repo"),
        ("timm", "vit_small_patch16_224.untrained_tag_x", "hub"),  # no such pretrained weights
        ("lm", None, "evil-org/evil-lm"),
        ("lm", None, "/home/builder/lm"),
        ("lm", None, "lm"),  # the bundled marker, but the manifest lists no captioner/lm/
        ("lm", None, "sae.safetensors"),  # a captioner LM is only ever the bundled folder
        ("open_clip", "ViT-B-16", 7),
    ],
)
def test_anything_else_is_one_atlas_error_naming_the_field(atlas_dir: Path, kind, arch, value) -> None:
    (atlas_dir / "unlisted.pt").write_bytes(b"x")
    atlas = Atlas.open(atlas_dir)
    with pytest.raises(AtlasError, match=r"backbone\.pretrained=") as err:
        _ref(atlas, value, kind=kind, arch=arch)
    if isinstance(value, str):  # says how an operator who trusts the atlas gets today's behaviour
        assert "--trust-atlas-weights" in str(err.value)


def test_trust_passes_names_through_unchanged(atlas_dir: Path) -> None:
    atlas = Atlas.open(atlas_dir)
    for kind, arch, value in (("open_clip", "ViT-B-16", "/etc/passwd"), ("lm", None, "evil-org/evil-lm"),
                              ("timm", "vit_small_patch16_224", "/tmp/w.pt")):  # fmt: skip
        assert _ref(atlas, value, kind=kind, arch=arch, trust=True) == value
    assert check_arch("backbone.arch", "open_clip", "hf-hub:evil/clip", trust=True) == "hf-hub:evil/clip"


def test_a_file_the_atlas_lists_is_handed_over_as_its_absolute_path(atlas_dir: Path) -> None:
    atlas = _set_backbone(atlas_dir, pretrained="sae.safetensors")
    assert _ref(atlas, "sae.safetensors") == str(atlas_dir / "sae.safetensors")
    assert checked_backbone(atlas, trust=False)["pretrained"] == str(atlas_dir / "sae.safetensors")
    (atlas_dir / "sae.safetensors").write_bytes(b"content of SAE")  # same size, other bytes
    fresh = Atlas.open(atlas_dir, verify="sizes")  # not hashed at open: the policy hashes it
    with pytest.raises(AtlasError, match=r"backbone\.pretrained='sae\.safetensors'"):
        _ref(fresh, "sae.safetensors")


def test_a_listed_file_that_links_outside_the_atlas_is_refused(atlas_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"content of sae")  # same size and hash as the listed file
    (atlas_dir / "sae.safetensors").unlink()
    (atlas_dir / "sae.safetensors").symlink_to(outside)
    with pytest.raises(AtlasError, match="outside the atlas"):
        Atlas.open(atlas_dir)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"arch": "hf-hub:evil/clip"}, r"backbone\.arch='hf-hub:evil/clip'"),
        ({"arch": "local-dir:/tmp/model"}, r"backbone\.arch="),
        ({"arch": "NotAModel-B-16"}, r"backbone\.arch='NotAModel-B-16'"),
        ({"kind": "timm", "arch": "hf-hub:timm/evil", "pretrained": "hub"}, r"backbone\.arch="),
        ({"kind": "transformers"}, r"backbone\.kind='transformers'"),
        ({"pretrained": "/etc/passwd"}, r"backbone\.pretrained='/etc/passwd'"),
    ],
)
def test_check_atlas_refs_refuses_hostile_backbone_blocks(atlas_dir: Path, fields: dict, match: str) -> None:
    atlas = _set_backbone(atlas_dir, **fields)
    with pytest.raises(AtlasError, match=match):
        check_atlas_refs(atlas, trust=False)


def test_check_atlas_refs_reads_the_captioner_lm(atlas_dir: Path) -> None:
    config = atlas_dir / "captioner" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"format": "insight-captioner", "config": {"lm": "evil-org/evil-lm"}}))
    write_manifest(atlas_dir)
    with pytest.raises(AtlasError, match=r"captioner/config\.json config\.lm='evil-org/evil-lm'"):
        check_atlas_refs(Atlas.open(atlas_dir), trust=False)
    assert check_atlas_refs(Atlas.open(atlas_dir), trust=True)["arch"] == "ViT-B-16"
    config.write_text(json.dumps({"format": "insight-captioner", "config": {"lm": "gpt2"}}))
    write_manifest(atlas_dir)
    check_atlas_refs(Atlas.open(atlas_dir), trust=False)


def test_trust_from_env() -> None:
    assert trust_from_env({ENV_TRUST: "1"})
    assert trust_from_env({ENV_TRUST: "true"})
    assert not trust_from_env({})
    assert not trust_from_env({ENV_TRUST: "0"})


def test_published_files_name_inputs_relative_to_the_atlas_or_not_at_all(tmp_path: Path) -> None:
    from insight_core.atlas import AtlasLayout
    from insight_core.atlas.layout import public_inputs
    from insight_core.models.captioner import public_lm_source

    root = tmp_path / "atlas"
    (root / "captioner" / ".cache" / "tiny_lm").mkdir(parents=True)
    layout = AtlasLayout(root)
    assert layout.public(root / "features") == "features"
    assert layout.public(tmp_path / "work" / "features") is None  # the builder's machine
    assert layout.public(None) is None
    assert public_inputs(root, features=tmp_path / "f", masks=root / "masks") == {"features": None,
                                                                                  "masks": "masks"}
    assert public_lm_source("gpt2", root / "captioner") == "gpt2"
    assert public_lm_source("openai-community/gpt2", root / "captioner") == "openai-community/gpt2"
    assert public_lm_source(str(tmp_path / "my_lm"), root / "captioner") is None
    inside = root / "captioner" / ".cache" / "tiny_lm"
    assert public_lm_source(str(inside), root / "captioner") == ".cache/tiny_lm"
