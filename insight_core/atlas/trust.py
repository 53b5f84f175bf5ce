"""Which weights an opened atlas may make this process load: one policy for every field that names them.

An atlas from elsewhere is someone else's files, its manifest included: with consistent hashes its
author still chooses every string in it. open_clip, timm and transformers load whatever name they are
given (a local file, an ``hf-hub:org/repo`` model, any Hub repo), so the fields that name weights
are checked here, before any file outside the atlas is looked at or any request is made:

- ``backbone.kind``: ``"open_clip"`` or ``"timm"``;
- ``backbone.arch``: a built-in open_clip model name (``open_clip.list_models()``) or timm model
  (``timm.list_models()``; with a tag, one of ``timm.list_pretrained()``), never a hub or path prefix;
- ``backbone.pretrained``: a built-in pretrained tag of open_clip for that arch, ``"hub"`` (timm's
  own pretrained weights of a pretrained timm name), ``"none"`` (random init), or a file inside the
  atlas listed in its manifest with its SHA-256 (a relative path, no links leaving the atlas);
- the captioner's ``config.lm``: ``"lm"`` (the LM bundled in ``captioner/lm/``, every file listed)
  or one of :data:`KNOWN_LMS`.

Anything else is refused with one :class:`AtlasError` naming the field, unless the operator trusts
the atlas (``--trust-atlas-weights``, or ``INSIGHT_TRUST_ATLAS_WEIGHTS=1``): then names go to the
loaders unchanged, as before this check existed. The precompute jobs read atlases their user built
and do not go through here; the app, ``pull`` and Hub atlases do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, Literal

from insight_core.atlas.layout import CaptionerLayout
from insight_core.atlas.manifest import Atlas, AtlasError
from insight_core.schema import LenientModel, read_file

ENV_TRUST = "INSIGHT_TRUST_ATLAS_WEIGHTS"
"""``1`` (or ``true``/``yes``/``on``) lets atlases name any weights, as ``--trust-atlas-weights``."""
TRUST_HINT = (
    "an atlas may name only built-in weights or its own listed files; if you trust this atlas, "
    f"start the app with --trust-atlas-weights (or set {ENV_TRUST}=1)"
)

BUNDLED_LM = CaptionerLayout.LM_DIR
"""``config.lm`` of a captioner whose LM is bundled in ``captioner/lm/`` (``captioner.BUNDLED_LM``)."""
KNOWN_LMS = frozenset(
    {
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
        "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
        "openai-community/gpt2-xl", "distilbert/distilgpt2",
    }
)  # fmt: skip
"""Hub LMs a captioner may name without trust: GPT-2 (the paper's LM) in its sizes."""
RANDOM_INIT = "none"
TIMM_HUB = "hub"

Kind = Literal["open_clip", "timm", "lm"]


def trust_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``$INSIGHT_TRUST_ATLAS_WEIGHTS`` asks to trust the weights atlases name."""
    value = (os.environ if env is None else env).get(ENV_TRUST, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def resolve_trust(trust: bool | None) -> bool:
    """An explicit setting, else the environment variable."""
    return trust_from_env() if trust is None else bool(trust)


@lru_cache(maxsize=1)
def _open_clip_models() -> frozenset[str]:
    import open_clip

    return frozenset(open_clip.list_models())


@lru_cache(maxsize=1)
def _timm_names() -> tuple[frozenset[str], frozenset[str]]:
    """timm's architectures and its pretrained ``name.tag`` weights."""
    import timm

    return frozenset(timm.list_models()), frozenset(timm.list_pretrained())


def _refuse(field: str, value: Any, expected: str) -> AtlasError:
    return AtlasError(f"{field}={value!r}: {expected}; refused ({TRUST_HINT})")


def _plain_name(value: str) -> bool:
    """A bare model name: no hub prefix (``hf-hub:``), path separator or drive."""
    return bool(value) and not any(c in value for c in ":/\\") and value == value.strip()


def check_arch(field: str, kind: str, arch: Any, *, trust: bool) -> str:
    """``arch`` when it is a built-in architecture of ``kind``; :class:`AtlasError` naming ``field``."""
    if not isinstance(arch, str) or not arch:
        raise AtlasError(f"{field}={arch!r}: expected a model name")
    if trust:
        return arch
    if kind == "open_clip":
        if _plain_name(arch) and arch in _open_clip_models():
            return arch
        raise _refuse(field, arch, "not a built-in open_clip model name (open_clip.list_models())")
    if kind == "timm":
        models, pretrained = _timm_names()
        base, _, tag = arch.partition(".")
        if _plain_name(arch) and base in models and (not tag or arch in pretrained):
            return arch
        raise _refuse(field, arch, "not a built-in timm model (timm.list_models() / timm.list_pretrained())")
    raise AtlasError(f"{field}: unknown model kind {kind!r} (expected 'open_clip' or 'timm')")


def _atlas_file(field: str, value: str, atlas: Atlas) -> str | None:
    """The absolute path of ``value`` when it names a file the atlas's manifest lists (hash-checked,
    inside the atlas); None when it is not a listed relative path."""
    pure = PurePosixPath(value)
    plain = not (pure.is_absolute() or ".." in pure.parts or "\\" in value or ":" in value)
    if not plain or value.startswith("~") or pure.as_posix() != value:
        return None  # not a path inside the atlas (refused below unless trusted)
    try:
        path = atlas.listed_file(value)
    except AtlasError as err:
        raise AtlasError(f"{field}={value!r}: {err}") from err
    return None if path is None else str(path)


def _builtin(kind: Kind, value: str, arch: str | None, atlas: Atlas) -> bool:
    """Whether ``value`` names built-in weights of ``kind`` (for ``arch``) or random init."""
    if kind == "lm":
        if value == BUNDLED_LM:
            return bool(atlas.manifest.get("file_sets", {}).get("captioner_lm"))
        return value in KNOWN_LMS
    if value.strip().lower() == RANDOM_INIT:
        return True
    if kind == "open_clip":
        import open_clip

        return arch is not None and value in open_clip.list_pretrained_tags_by_model(arch)
    pretrained = _timm_names()[1]
    if value != TIMM_HUB or arch is None:
        return False
    return arch in pretrained or ("." not in arch and any(p.partition(".")[0] == arch for p in pretrained))


_EXPECTED = {
    "open_clip": "not a built-in open_clip pretrained tag of {arch}, 'none', or a file the atlas lists",
    "timm": "not 'hub' (timm's weights of a pretrained model name; {arch} has none), 'none', "
    "or a file the atlas lists",
    "lm": f"not the bundled LM ({BUNDLED_LM!r}, with captioner/lm/ listed in the manifest) "
    f"or a known LM ({', '.join(sorted(KNOWN_LMS))})",
}


def check_weights_ref(
    field: str, value: Any, *, kind: Kind, arch: str | None, atlas: Atlas, trust: bool
) -> str:
    """The one policy for weights an atlas names: what to hand the loader, or one :class:`AtlasError`.

    Parameters
    ----------
    field
        How messages name the field (``"manifest.json backbone.pretrained"``).
    value
        The field's value as the atlas wrote it.
    kind
        ``"open_clip"`` / ``"timm"`` (backbone weights for ``arch``) or ``"lm"`` (the captioner's LM).
    trust
        The operator trusts the atlas: names go to the loader unchanged (files inside the atlas are
        still resolved against it).

    Returns
    -------
    str
        The value itself (a built-in name or tag, ``"none"``, the bundled LM) or, for a file the
        atlas lists, its absolute path.
    """
    if not isinstance(value, str) or not value.strip():
        raise AtlasError(f"{field}={value!r}: expected a weights name")
    if _builtin(kind, value, arch, atlas):
        return value
    if kind != "lm":  # a captioner's own LM is only ever the bundled folder
        path = _atlas_file(field, value, atlas)
        if path is not None:
            return path
    if trust:
        return value
    raise _refuse(field, value, _EXPECTED[kind].format(arch=arch))


def checked_backbone(atlas: Atlas, *, trust: bool) -> dict[str, Any]:
    """The manifest's ``backbone`` block with its kind, arch and weights checked (a listed weights
    file replaced by its absolute path), ready for ``manifest_backbone``."""
    block = dict(atlas.backbone)
    where = f"{atlas.layout.manifest} backbone"
    kind = str(block.get("kind") or "open_clip")
    if kind not in ("open_clip", "timm"):
        raise AtlasError(f"{where}.kind={kind!r}: expected 'open_clip' or 'timm'")
    if not block.get("arch"):
        return block  # the app reports a missing backbone block
    arch = check_arch(f"{where}.arch", kind, block["arch"], trust=trust)
    default = TIMM_HUB if kind == "timm" else _paper_tag()
    pretrained = block.get("pretrained") or default
    block["pretrained"] = check_weights_ref(
        f"{where}.pretrained", pretrained, kind=kind, arch=arch, atlas=atlas, trust=trust  # type: ignore[arg-type]
    )
    return block


def _paper_tag() -> str:
    from insight_core.models.backbone import PAPER_PRETRAINED  # what manifests without the field mean

    return PAPER_PRETRAINED


def lm_policy(atlas: Atlas, *, trust: bool) -> Any:
    """The check ``SteerableCaptioner.load`` applies to its config's ``lm`` for this atlas."""
    field = f"{atlas.layout.captioner.config} config.lm"
    return lambda value: check_weights_ref(field, value, kind="lm", arch=None, atlas=atlas, trust=trust)


def _captioner_lm(atlas: Atlas) -> Any:
    """The captioner's ``config.lm`` (None when there is no listed, readable captioner config: the
    captioner loader reports that itself)."""
    if not atlas.has("captioner"):
        return None
    try:
        config = read_file(_CaptionerLm, atlas.read_path("captioner"), AtlasError).config
    except AtlasError:
        return None
    return None if config is None else config.get("lm", "gpt2")


class _CaptionerLm(LenientModel):
    """The block of ``captioner/config.json`` (``insight_core.models.captioner.CaptionerFile``) that
    names the LM; read here without importing the model code."""

    config: dict[str, Any] | None = None


def check_atlas_refs(atlas: Atlas, *, trust: bool | None = None) -> dict[str, Any]:
    """Check every field of an opened atlas that names weights (backbone, captioner LM) before
    anything is loaded; returns the checked backbone block.

    Raises
    ------
    AtlasError
        Naming the first field that names weights the atlas may not choose.
    """
    trusted = resolve_trust(trust)
    block = checked_backbone(atlas, trust=trusted)
    lm = _captioner_lm(atlas)
    if lm is not None:
        lm_policy(atlas, trust=trusted)(lm)
    return block
