"""Concept steering of the captioner: edit SAE concept activations of an image, then caption.

Given patch features ``x`` (14x14, joint space) the SAE codes are ``z = encode(x)``; each edit
scales (0 = remove, 1 = keep, > 1 = amplify) or adds to one concept's activation, on every patch or
within a region, giving ``z'``. The captioner then reads

    x' = decode(z')                     (keep_error=False, default: the paper's bottleneck -- the
                                         captioner was trained on SAE reconstructions)
    x' = decode(z') + (x - decode(z))   (keep_error=True: the SAE's error is preserved)

computed as ``base + (z' - z) W_dec`` so that no effective edit gives *bitwise* the unsteered input,
hence exactly the unsteered caption. Concepts are chosen by id or by name; a name selects every
concept carrying it (names come from the atlas ``concepts.parquet``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from insight_core.data.images import ImageSource, load_image
from insight_core.errors import CheckpointError, ConfigError, ImageLoadError
from insight_core.models.captioner import SteerableCaptioner
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.feature_path import pooled_features

log = logging.getLogger(__name__)

MAX_SCALE = 100.0
"""Largest accepted scale factor; larger values only push features far off-distribution."""

EditOp = Literal["scale", "add"]
Region = Sequence[int] | np.ndarray | torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class ConceptEdit:
    """One intervention on a concept's activations."""

    concept: int | str
    """Concept id (0 <= id < m) or name (every concept with that name, case-insensitive)."""
    op: EditOp = "scale"
    """``"scale"``: multiply the activation by ``value``; ``"add"``: add ``value`` to it."""
    value: float = 0.0
    """Scale factor in [0, MAX_SCALE] (0 removes, > 1 amplifies) or activation added (>= 0, finite)."""
    region: Region = None
    """Patches to edit: a boolean mask (gh, gw) or (gh*gw,), or row-major patch indices; None = all."""

    @classmethod
    def remove(cls, concept: int | str, region: Region = None) -> ConceptEdit:
        return cls(concept, "scale", 0.0, region)

    @classmethod
    def scale(cls, concept: int | str, factor: float, region: Region = None) -> ConceptEdit:
        return cls(concept, "scale", factor, region)

    @classmethod
    def add(cls, concept: int | str, value: float, region: Region = None) -> ConceptEdit:
        return cls(concept, "add", value, region)


@dataclasses.dataclass(frozen=True, slots=True)
class AppliedEdit:
    """An edit as applied: resolved concept ids and its effect on the activations."""

    concept: int | str
    """The concept as requested (id or name)."""
    concept_ids: tuple[int, ...]
    """Concept ids it resolved to."""
    names: tuple[str, ...]
    """Their names ('' when unknown)."""
    op: EditOp
    """``"scale"`` or ``"add"``."""
    value: float
    """Scale factor or added activation."""
    n_patches: int
    """Patches in the edited region."""
    activation_before: float
    """Sum of the concepts' activations in the region before the edit."""
    activation_after: float
    """The same sum after the edit."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class SteeringResult:
    """Output of :meth:`Steerer.steer`."""

    caption: str
    """Caption of the edited features."""
    unsteered_caption: str
    """Caption of the same path without edits."""
    edits: tuple[AppliedEdit, ...]
    """The edits as applied."""

    @property
    def changed(self) -> bool:
        return self.caption != self.unsteered_caption


class ConceptNames:
    """Case-insensitive lookup of concept ids by name (several concepts may share a name)."""

    def __init__(self, names: Mapping[int, str]) -> None:
        self.names = {int(i): str(n) for i, n in names.items() if n is not None}
        self._ids: dict[str, list[int]] = {}
        for i, n in sorted(self.names.items()):
            self._ids.setdefault(n.strip().lower(), []).append(i)

    @classmethod
    def from_parquet(cls, path: str | Path) -> ConceptNames:
        """Read ``id`` and ``name`` of an atlas ``concepts.parquet``."""
        import pyarrow.parquet as pq

        path = Path(path)
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:  # pyarrow errors derive from these
            raise CheckpointError(f"{path}: cannot read concepts table ({err})") from err
        if "name" not in table.column_names:
            log.info("%s has no 'name' column: concepts can only be chosen by id", path)
            return cls({})
        ids = table.column("id").to_pylist() if "id" in table.column_names else range(table.num_rows)
        return cls(dict(zip(ids, table.column("name").to_pylist(), strict=False)))

    def name_of(self, concept_id: int) -> str:
        return self.names.get(concept_id, "")

    def ids_of(self, name: str) -> list[int]:
        """Every concept id named ``name``; ``ConfigError`` with close matches when there is none."""
        ids = self._ids.get(name.strip().lower())
        if ids:
            return ids
        if not self._ids:
            raise ConfigError(
                f"concept {name!r}: no concept names are loaded (no concepts.parquet 'name' column)"
            )
        close = difflib.get_close_matches(name.strip().lower(), list(self._ids), n=5)
        hint = f"; close matches: {close}" if close else ""
        raise ConfigError(f"concept {name!r}: no concept has this name{hint}")


class Steerer:
    """Caption an image with concept edits.

    Parameters
    ----------
    captioner
        A trained :class:`SteerableCaptioner` with its SAE.
    names
        Concept names for lookup by name (``ConceptNames``, a mapping id -> name, or a
        ``concepts.parquet`` path).
    keep_error
        Add the SAE reconstruction error back after editing (default False: caption ``decode(z')``,
        the bottleneck the captioner was trained on; see the module docstring).
    backbone, pool
        For :meth:`steer_image`: a ``ClipBackbone`` and the pooling of the atlas features (a
        ``Dinoiser``, which may read intermediate tokens from the same backbone pass, or any
        callable mapping (B, gh, gw, d) -> same).
    cache_size
        Unsteered captions cached per (features, decoding settings), so repeated edits of one image
        pay for one decode only.
    """

    def __init__(
        self,
        captioner: SteerableCaptioner,
        *,
        names: ConceptNames | Mapping[int, str] | str | Path | None = None,
        keep_error: bool = False,
        backbone: Any = None,
        pool: Any = None,
        cache_size: int = 32,
    ) -> None:
        if captioner.sae is None:
            raise ConfigError("Steerer: the captioner has no SAE; steering edits SAE concepts")
        self.captioner = captioner
        self.sae = captioner.sae
        if isinstance(names, str | Path):
            names = ConceptNames.from_parquet(names)
        self.names = names if isinstance(names, ConceptNames) else ConceptNames(names or {})
        self.keep_error = keep_error
        self.backbone = backbone
        self.pool = pool
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._cache_size = cache_size

    # ----------------------------------------------------------------------------------- edits
    def resolve(self, concept: int | str) -> list[int]:
        """Concept ids for an id or a name; ``ConfigError`` naming the input when unknown."""
        m = self.sae.cfg.dict_size
        if isinstance(concept, bool) or not isinstance(concept, int | str | np.integer):
            raise ConfigError(
                f"concept {concept!r}: expected an int id or a str name, got {type(concept).__name__}"
            )
        if isinstance(concept, str):
            text = concept.strip()
            if text.lstrip("-").isdigit():  # "17" from a text box is an id
                return self.resolve(int(text))
            return self.names.ids_of(text)
        if not 0 <= int(concept) < m:
            raise ConfigError(f"concept {int(concept)}: unknown concept id, expected 0 <= id < {m}")
        return [int(concept)]

    def region_mask(self, region: Region, label: str = "region") -> torch.Tensor:
        """Boolean mask (gh*gw,) for a region (mask or patch indices); None = every patch."""
        gh, gw = self.captioner.cfg.grid
        n = gh * gw
        if region is None:
            return torch.ones(n, dtype=torch.bool)
        r = torch.as_tensor(np.asarray(region))
        if r.dtype == torch.bool:
            if tuple(r.shape) not in ((gh, gw), (n,)):
                raise ConfigError(
                    f"{label}: boolean mask must have shape ({gh}, {gw}) or ({n},), got {tuple(r.shape)}"
                )
            mask = r.reshape(-1)
        else:
            if r.is_floating_point() or r.ndim != 1:
                raise ConfigError(f"{label}: expected a boolean mask or a 1-D list of int patch indices")
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= n):
                raise ConfigError(f"{label}: patch indices must be in [0, {n}), got {r.tolist()}")
            mask = torch.zeros(n, dtype=torch.bool)
            mask[r.long()] = True
        if not bool(mask.any()):
            raise ConfigError(f"{label}: selects no patch")
        return mask

    def _check_edit(self, edit: ConceptEdit, label: str) -> None:
        if not isinstance(edit, ConceptEdit):
            raise ConfigError(f"{label}: expected a ConceptEdit, got {type(edit).__name__}")
        v = edit.value
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{label}.value: expected a finite number, got {v!r}")
        if edit.op == "scale" and not 0.0 <= v <= MAX_SCALE:
            raise ConfigError(
                f"{label}.value: scale {v} out of range, expected 0 <= scale <= {MAX_SCALE:g} "
                "(0 removes the concept, 1 keeps it, > 1 amplifies)"
            )
        if edit.op == "add" and v < 0:
            raise ConfigError(
                f"{label}.value: add {v} out of range, expected >= 0 (use op='scale' to weaken)"
            )
        if edit.op not in ("scale", "add"):
            raise ConfigError(f"{label}.op: expected 'scale' or 'add', got {edit.op!r}")

    def apply_edits(
        self, codes_nm: torch.Tensor, edits: Sequence[ConceptEdit]
    ) -> tuple[torch.Tensor, list[AppliedEdit]]:
        """Edited codes (gh*gw, m) and the applied edits (in order: later edits see earlier ones)."""
        out_nm = codes_nm.clone()
        applied = []
        for i, edit in enumerate(edits):
            label = f"edits[{i}]"
            self._check_edit(edit, label)
            ids = self.resolve(edit.concept)
            mask_n = self.region_mask(edit.region, f"{label}.region")
            cols = torch.tensor(ids)
            block = out_nm[mask_n][:, cols]
            before = float(block.sum())
            block = block * edit.value if edit.op == "scale" else block + edit.value
            rows = mask_n.nonzero().squeeze(1)
            out_nm[rows[:, None], cols[None, :]] = block
            applied.append(
                AppliedEdit(
                    concept=edit.concept,
                    concept_ids=tuple(ids),
                    names=tuple(self.names.name_of(j) for j in ids),
                    op=edit.op,
                    value=float(edit.value),
                    n_patches=int(mask_n.sum()),
                    activation_before=before,
                    activation_after=float(block.sum()),
                )
            )
        return out_nm, applied

    # ----------------------------------------------------------------------------------- inputs
    @torch.no_grad()
    def steered_inputs(
        self, patches: torch.Tensor, edits: Sequence[ConceptEdit]
    ) -> tuple[torch.Tensor, torch.Tensor, list[AppliedEdit]]:
        """Unsteered and steered adapter inputs (1, gh, gw, d) and the applied edits."""
        x_bhwd = self.captioner.check_patches(patches)
        if x_bhwd.shape[0] != 1:
            raise ConfigError(f"patches: steering takes one image, got a batch of {x_bhwd.shape[0]}")
        x_nd = x_bhwd.reshape(-1, x_bhwd.shape[-1])
        z_nm = self.sae.encode(x_nd)
        z2_nm, applied = self.apply_edits(z_nm, list(edits))
        base_nd = x_nd if self.keep_error else self.sae.decode(z_nm)
        diff_nm = z2_nm - z_nm
        touched = diff_nm.any(0).nonzero().squeeze(1)  # only edited concepts: cheap and exact (0 elsewhere)
        steered_nd = (
            base_nd + diff_nm[:, touched] @ self.sae.W_dec_md[touched] if touched.numel() else base_nd
        )
        return base_nd.reshape(x_bhwd.shape), steered_nd.reshape(x_bhwd.shape), applied

    def _unsteered(self, base_bhwd: torch.Tensor, gen_kwargs: dict[str, Any]) -> str:
        key = (
            hashlib.sha1(base_bhwd.contiguous().numpy().tobytes()).hexdigest(),
            tuple(sorted(gen_kwargs.items())),
        )
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        caption = self.captioner.generate(base_bhwd, **gen_kwargs)[0]
        self._cache[key] = caption
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caption

    # ----------------------------------------------------------------------------------- API
    def steer(
        self,
        patches: torch.Tensor,
        edits: Sequence[ConceptEdit],
        *,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> SteeringResult:
        """Caption patch features (gh, gw, d) with ``edits`` applied; also returns the unsteered caption."""
        gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "min_new_tokens": min_new_tokens}
        base_bhwd, steered_bhwd, applied = self.steered_inputs(patches, edits)
        unsteered = self._unsteered(base_bhwd, gen)
        same = torch.equal(steered_bhwd, base_bhwd)
        caption = unsteered if same else self.captioner.generate(steered_bhwd, **gen)[0]
        return SteeringResult(caption=caption, unsteered_caption=unsteered, edits=tuple(applied))

    @torch.no_grad()
    def image_patches(self, image: ImageSource) -> torch.Tensor:
        """Patch features (gh, gw, d) of an image (path, bytes, PIL image) with the configured backbone."""
        if self.backbone is None:
            raise ConfigError("steer_image: this Steerer has no backbone; pass backbone=ClipBackbone(...)")
        img = load_image(image)
        if min(img.size) < 1:
            raise ImageLoadError(f"image: empty image of size {img.size}")
        if isinstance(self.pool, Dinoiser):
            return pooled_features(self.backbone, self.pool, [img])[0]
        patches_bhwd = self.backbone.dense_features([img]).patches_bhwd
        if self.pool is not None:
            patches_bhwd = self.pool(patches_bhwd)
        return patches_bhwd[0]

    def steer_image(self, image: ImageSource, edits: Sequence[ConceptEdit], **kwargs: Any) -> SteeringResult:
        """:meth:`steer` on an image; ``ImageLoadError`` for empty, corrupt or missing images."""
        return self.steer(self.image_patches(image), edits, **kwargs)
