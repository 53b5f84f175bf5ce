"""Oracle and recovery metrics of a planted world: how well a pipeline recovers its ground truth.

- :func:`atom_recovery`: decoder rows vs atoms (cosine);
- :func:`edge_recovery`: family DAG edges vs the true ancestor pairs;
- :func:`name_recovery`: chosen names vs true names (and how often a decoy won);
- :func:`map_iou`: concept activation maps vs the planted masks.

:func:`oracle_decoder` / :func:`oracle_codes` / :func:`oracle_sae` give a perfect "SAE" so later stages
can be tested alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from insight_core.errors import ConfigError
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.planted.sampling import PlantedSample
from insight_core.planted.world import PlantedWorld, _unit_rows, ancestor_pairs


def oracle_decoder(world: PlantedWorld) -> np.ndarray:
    """The atoms as an (n_atoms, d) decoder: a perfect SAE's ``W_dec`` (latent i = atom i)."""
    return world.atoms_ad.copy()


def oracle_codes(
    world: PlantedWorld, sample: PlantedSample, image_indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Exact codes (n, grid*grid, n_atoms) of the oracle SAE: feats = offset + codes @ atoms + noise."""
    if sample.layout.n_atoms != world.n_atoms:
        raise ConfigError(f"sample has {sample.layout.n_atoms} atoms but the world has {world.n_atoms}")
    return sample.layout.dense_codes(image_indices)


def oracle_sae(world: PlantedWorld, threshold: float = 0.25) -> MatryoshkaSAE:
    """The planted atoms as a one-group SAE: decoder = encoder = atoms, b_dec = the world's offset.

    Atoms (and the offset) are orthonormal, so ``(x - offset) . atom`` is the planted coefficient
    (0.5-1.5) plus noise of std ~0.01: a 0.25 threshold recovers the planted codes.
    """
    n_atoms, d = world.atoms_ad.shape
    sae = MatryoshkaSAE(SAEConfig(d_in=d, dict_size=n_atoms, k=3, group_fractions=(1.0,)), seed=None)
    with torch.no_grad():
        sae.W_dec_md.copy_(torch.from_numpy(world.atoms_ad))
        sae.W_enc_md.copy_(torch.from_numpy(world.atoms_ad))
        sae.b_enc_m.zero_()
        sae.b_dec_d.copy_(torch.from_numpy(world.offset_d))
        sae.threshold.fill_(threshold)
    return sae


def _np(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class AtomRecovery:
    """Decoder-vs-atom matching (cosines are signed: a flipped direction is not a recovery)."""

    recovered_fraction: float
    """Fraction of atoms whose best decoder row has cosine >= threshold."""
    mean_max_cos: float
    """Mean over atoms of the best cosine."""
    max_cos_a: np.ndarray
    """Best cosine per atom."""
    atom_to_latent: np.ndarray
    """Best latent per atom (always set, even when below threshold)."""
    latent_to_atom: np.ndarray
    """Best atom per latent if its cosine >= threshold, else -1."""


def atom_recovery(atoms_ad: Any, decoder_md: Any, threshold: float = 0.9) -> AtomRecovery:
    """Match atoms to decoder rows by cosine similarity."""
    atoms, dec = _np(atoms_ad).astype(np.float64), _np(decoder_md).astype(np.float64)
    if atoms.ndim != 2 or dec.ndim != 2 or atoms.shape[1] != dec.shape[1]:
        raise ConfigError(
            f"atoms_ad {atoms.shape} and decoder_md {dec.shape} must be 2-D with the same width"
        )
    cos_am = _unit_rows(atoms) @ _unit_rows(dec).T
    max_cos = cos_am.max(axis=1)
    best_atom = cos_am.argmax(axis=0)
    latent_to_atom = np.where(cos_am.max(axis=0) >= threshold, best_atom, -1)
    return AtomRecovery(
        recovered_fraction=float(np.mean(max_cos >= threshold)),
        mean_max_cos=float(max_cos.mean()),
        max_cos_a=max_cos,
        atom_to_latent=cos_am.argmax(axis=1),
        latent_to_atom=latent_to_atom,
    )


@dataclasses.dataclass(frozen=True)
class EdgeRecovery:
    """Predicted family edges vs true (ancestor, descendant) pairs among recovered atoms."""

    precision: float
    """n_correct / n_pred (0 when nothing was predicted)."""
    recall: float
    """n_correct / n_true (0 when there is nothing to find)."""
    n_pred: int
    """Distinct predicted atom pairs (after mapping latents to atoms)."""
    n_true: int
    """True ancestor pairs whose two atoms are both recovered."""
    n_correct: int
    """Predicted pairs that are true pairs."""
    missing: frozenset[tuple[int, int]]
    """True pairs not predicted (atom ids)."""
    spurious: frozenset[tuple[int, int]]
    """Predicted pairs that are not true pairs (atom ids)."""


def edge_recovery(
    pred_edges: Iterable[tuple[int, int]], latent_to_atom: Any, world: PlantedWorld
) -> EdgeRecovery:
    """Score (parent_latent, child_latent) edges against :func:`ancestor_pairs` (transitive pairs count).

    Edges with an unmatched latent, or whose two latents map to the same atom, are dropped; the
    truth is restricted to pairs whose atoms are both matched by some latent.
    """
    l2a = _np(latent_to_atom).astype(np.int64)
    pred = set()
    for p, c in pred_edges:
        ap, ac = int(l2a[int(p)]), int(l2a[int(c)])
        if ap >= 0 and ac >= 0 and ap != ac:
            pred.add((ap, ac))
    found = set(l2a[l2a >= 0].tolist())
    truth = {(a, b) for a, b in ancestor_pairs(world) if a in found and b in found}
    correct = pred & truth
    return EdgeRecovery(
        precision=len(correct) / len(pred) if pred else 0.0,
        recall=len(correct) / len(truth) if truth else 0.0,
        n_pred=len(pred),
        n_true=len(truth),
        n_correct=len(correct),
        missing=frozenset(truth - pred),
        spurious=frozenset(pred - truth),
    )


@dataclasses.dataclass(frozen=True)
class NameRecovery:
    """Predicted names of matched latents vs the true atom names."""

    accuracy: float
    """Fraction of matched latents named exactly with their atom's name (unnamed count as wrong)."""
    per_kind: dict[str, float]
    """The same per atom kind (kinds with at least one matched latent)."""
    decoy_fraction: float
    """Fraction of matched latents named with a decoy of their own atom (right word, wrong context)."""
    n_matched: int
    """Latents matched to an atom."""
    n_unnamed: int
    """Matched latents missing from ``pred_names``."""


def name_recovery(pred_names: Mapping[int, str], latent_to_atom: Any, world: PlantedWorld) -> NameRecovery:
    """Score latent names against the names of the atoms the latents match."""
    l2a = _np(latent_to_atom).astype(np.int64)
    decoys: dict[int, set[str]] = {}
    for w, a in enumerate(world.vocab_atom.tolist()):
        if a >= 0 and w != world.true_word_index[a]:
            decoys.setdefault(a, set()).add(world.vocab_words[w])
    hits: dict[str, list[bool]] = {}
    n_decoy = n_unnamed = 0
    for lat in np.flatnonzero(l2a >= 0).tolist():
        atom = int(l2a[lat])
        name = pred_names.get(lat)
        n_unnamed += name is None
        n_decoy += name in decoys.get(atom, ())
        hits.setdefault(world.kinds[atom], []).append(name == world.names[atom])
    n = sum(len(v) for v in hits.values())
    return NameRecovery(
        accuracy=sum(sum(v) for v in hits.values()) / n if n else 0.0,
        per_kind={k: float(np.mean(v)) for k, v in hits.items()},
        decoy_fraction=n_decoy / n if n else 0.0,
        n_matched=n,
        n_unnamed=n_unnamed,
    )


@dataclasses.dataclass(frozen=True)
class MapIoU:
    """IoU of each atom's planted mask with its latent's activation map."""

    per_atom: np.ndarray
    """IoU per atom; NaN when the atom is absent and its latent never fires (nothing to compare)."""
    mean: float
    """Mean of the defined per-atom IoUs (NaN if none is defined)."""
    per_kind: dict[str, float]
    """Mean per atom kind (only when ``kinds`` was given)."""


def map_iou(
    codes_npm: Any,
    masks_npa: Any,
    atom_to_latent: Any,
    threshold: float = 0.0,
    *,
    kinds: Sequence[str] | None = None,
) -> MapIoU:
    """Per-atom IoU between {patches where its latent's code > threshold} and the atom's mask.

    ``codes_npm`` (..., m) and ``masks_npa`` (..., a) share their leading dims (e.g. images x
    patches) and are pooled over all of them. ``atom_to_latent[a] = -1`` means "no latent"
    (IoU 0 where the atom occurs). Pass a subset of images: the codes are dense.
    """
    codes, masks = _np(codes_npm), _np(masks_npa).astype(bool)
    a2l = _np(atom_to_latent).astype(np.int64)
    if codes.shape[:-1] != masks.shape[:-1] or masks.shape[-1] != len(a2l):
        raise ConfigError(
            f"codes_npm {codes.shape} and masks_npa {masks.shape} must share leading dims, and masks "
            f"need one column per atom_to_latent entry ({len(a2l)})"
        )
    codes, masks = codes.reshape(-1, codes.shape[-1]), masks.reshape(-1, masks.shape[-1])
    pred = codes[:, np.maximum(a2l, 0)] > threshold
    pred[:, a2l < 0] = False
    inter = (pred & masks).sum(axis=0)
    union = (pred | masks).sum(axis=0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)  # NaN: nothing to compare
    per_kind: dict[str, float] = {}
    if kinds is not None:
        kinds_arr = np.asarray(kinds)
        for k in dict.fromkeys(kinds):
            vals = iou[kinds_arr == k]
            if np.isfinite(vals).any():
                per_kind[k] = float(np.nanmean(vals))
    mean = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return MapIoU(per_atom=iou, mean=mean, per_kind=per_kind)
