"""Images sampled from a planted world: per-image layouts (which atoms are active on which patches),
the rendered features, and their feature shards on disk.

Invariants (tested): a child atom is only active on patches where its parent (hence every ancestor)
is active, and within each image its region is strictly smaller than its parent's, so the
co-occurrence confidence of DESIGN Eq. 5 is D[child, parent] = 1 while D[parent, child] < 0.75.
Everything is deterministic given the seeds (numpy ``Generator``), and computed in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from insight_core.atlas.layout import FeaturesLayout
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import write_npy, write_npz
from insight_core.planted.world import PlantedWorld, WorldConfig, _n_bands, _rect_shapes

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Samples


@dataclasses.dataclass
class PlantedLayout:
    """Ground truth of a sample, stored compactly as one entry per active (image, atom) pair.

    Entries are sorted by image, then atom; image ``i`` owns entries ``image_ptr[i]:image_ptr[i+1]``.
    ``entry_coef_ep[e, p]`` is the activation of entry ``e``'s atom on patch ``p`` (0 = inactive),
    i.e. ``entry_coef[e]`` times the per-patch jitter. About 15 entries per image.
    """

    grid: int
    n_atoms: int
    image_ptr: np.ndarray
    entry_atom: np.ndarray
    entry_coef: np.ndarray
    entry_coef_ep: np.ndarray

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.image_ptr) - 1

    def atoms_in(self, image_idx: int) -> np.ndarray:
        """Ids of the atoms active anywhere in one image (sorted)."""
        return self.entry_atom[self.image_ptr[image_idx] : self.image_ptr[image_idx + 1]]

    def mask_for(self, image_idx: int, atom: int) -> np.ndarray:
        """Bool (grid, grid) mask of the patches where ``atom`` is active in image ``image_idx``."""
        lo, hi = self.image_ptr[image_idx], self.image_ptr[image_idx + 1]
        j = lo + int(np.searchsorted(self.entry_atom[lo:hi], atom))
        if j < hi and self.entry_atom[j] == atom:
            return (self.entry_coef_ep[j] > 0).reshape(self.grid, self.grid)
        return np.zeros((self.grid, self.grid), dtype=bool)

    def dense_codes(self, image_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Exact codes, float32 (n, grid*grid, n_atoms), for a subset of images (default: all)."""
        idx = np.arange(self.n_images) if image_indices is None else np.asarray(image_indices, dtype=np.int64)
        out = np.zeros((len(idx), self.grid * self.grid, self.n_atoms), dtype=np.float32)
        for row, i in enumerate(idx):
            lo, hi = self.image_ptr[i], self.image_ptr[i + 1]
            out[row][:, self.entry_atom[lo:hi]] = self.entry_coef_ep[lo:hi].T
        return out

    def dense_masks(self, image_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Bool (n, grid*grid, n_atoms) masks for a subset of images (default: all; mind the memory)."""
        return self.dense_codes(image_indices) > 0


@dataclasses.dataclass
class PlantedSample:
    """Features of sampled images and their ground truth (``layout``)."""

    feats_npd: np.ndarray
    layout: PlantedLayout

    def mask_for(self, image_idx: int, atom: int) -> np.ndarray:
        """Bool (grid, grid) mask of ``atom`` in image ``image_idx``."""
        return self.layout.mask_for(image_idx, atom)

    def dense_masks(self, image_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Bool (n, grid*grid, n_atoms) masks for a subset of images."""
        return self.layout.dense_masks(image_indices)


def sample_images(world: PlantedWorld, n_images: int, *, seed: int) -> PlantedSample:
    """Sample ``n_images`` images (deterministic in ``seed`` and the world's seed).

    Layouts and noise come from separate streams drawn image by image, so the first k images of a
    larger sample with the same seed are the same images.
    """
    if n_images < 0:
        raise ConfigError(f"n_images must be >= 0, got {n_images}")
    cfg = world.config
    layout_ss, noise_ss = np.random.SeedSequence([int(seed), int(cfg.seed)]).spawn(2)
    layout = _sample_layout(world, n_images, np.random.default_rng(layout_ss))
    feats = _render(world, layout, np.random.default_rng(noise_ss))
    return PlantedSample(feats, layout)


def _sample_layout(world: PlantedWorld, n_images: int, rng: np.random.Generator) -> PlantedLayout:
    cfg = world.config
    shapes = _rect_shapes(cfg)
    ptr, atoms, coefs, coef_ep = [0], [], [], []
    for _ in range(n_images):
        entries = _layout_image(cfg, shapes, rng)  # {atom: mask (P,)}, sorted by atom below
        ids = sorted(entries)
        c = rng.uniform(cfg.coef_range[0], cfg.coef_range[1], size=len(ids))
        jitter = np.clip(rng.standard_normal((len(ids), cfg.n_patches)), -3.0, 3.0) * cfg.coef_jitter + 1.0
        masks = np.stack([entries[a] for a in ids]) if ids else np.zeros((0, cfg.n_patches), dtype=bool)
        atoms += ids
        coefs.append(c)
        coef_ep.append(c[:, None] * jitter * masks)
        ptr.append(ptr[-1] + len(ids))
    return PlantedLayout(
        grid=cfg.grid,
        n_atoms=world.n_atoms,
        image_ptr=np.asarray(ptr, dtype=np.int64),
        entry_atom=np.asarray(atoms, dtype=np.int64),
        entry_coef=np.concatenate(coefs).astype(np.float32) if coefs else np.zeros(0, np.float32),
        entry_coef_ep=np.concatenate(coef_ep).astype(np.float32)
        if coef_ep
        else np.zeros((0, cfg.n_patches), np.float32),
    )


def _object_masks(
    cfg: WorldConfig, shapes: list[tuple[int, int]], rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], list[list[np.ndarray]]]:
    """One object instance: its rectangle, its part bands, and each band's sub-part pieces (all G x G)."""
    g = cfg.grid
    h, w = shapes[int(rng.integers(len(shapes)))]
    y0, x0 = int(rng.integers(g - h + 1)), int(rng.integers(g - w + 1))
    rect = np.zeros((g, g), dtype=bool)
    rect[y0 : y0 + h, x0 : x0 + w] = True
    # Bands across the long side (random when square), pieces across the short side of each band.
    band_rows = h > w or (h == w and bool(rng.integers(2)))
    n_bands, n_pieces = _n_bands(cfg)
    long_idx = np.arange(y0, y0 + h) if band_rows else np.arange(x0, x0 + w)
    short_idx = np.arange(x0, x0 + w) if band_rows else np.arange(y0, y0 + h)
    bands, pieces = [], []
    for band in np.array_split(long_idx, n_bands)[: cfg.parts_per_object]:
        bands.append(_cross(g, band, short_idx, band_rows))
        pieces.append(
            [
                _cross(g, band, p, band_rows)
                for p in np.array_split(short_idx, n_pieces)[: cfg.subparts_per_part]
            ]
        )
    return rect, bands, pieces


def _cross(g: int, long_sel: np.ndarray, short_sel: np.ndarray, rows: bool) -> np.ndarray:
    m = np.zeros((g, g), dtype=bool)
    if rows:
        m[np.ix_(long_sel, short_sel)] = True
    else:
        m[np.ix_(short_sel, long_sel)] = True
    return m


def _layout_image(
    cfg: WorldConfig, shapes: list[tuple[int, int]], rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Active atoms of one image -> flat bool masks (P,); every patch gets an object or the background."""
    n_obj, n_p, n_s = cfg.n_objects, cfg.parts_per_object, cfg.subparts_per_part
    first_sub, first_attr = n_obj + n_obj * n_p, n_obj + n_obj * n_p * (1 + n_s)
    n_here = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    objects = rng.choice(n_obj, size=n_here, replace=False)
    top = np.full((cfg.grid, cfg.grid), -1)  # which instance is on top of each patch
    instances = []
    for k, o in enumerate(objects):
        rect, bands, pieces = _object_masks(cfg, shapes, rng)
        vis_parts = rng.random(n_p) < cfg.part_visible_prob
        if n_p and not vis_parts.any():
            vis_parts[rng.integers(n_p)] = True
        vis_subs = rng.random((n_p, n_s)) < cfg.subpart_visible_prob
        attr = int(rng.integers(cfg.n_attributes)) if cfg.n_attributes else -1
        instances.append((int(o), rect, bands, pieces, vis_parts, vis_subs, attr))
        top[rect] = k  # later objects occlude earlier ones
    out: dict[int, np.ndarray] = {}
    for k, (o, rect, bands, pieces, vis_parts, vis_subs, attr) in enumerate(instances):
        region = rect & (top == k)
        if not region.any():
            continue
        out[o] = region
        if attr >= 0:
            out[first_attr + attr] = out.get(first_attr + attr, np.zeros_like(region)) | region
        for j in np.flatnonzero(vis_parts):
            part = _strict_child(bands[j], region)
            if part is None:
                continue
            out[n_obj + o * n_p + j] = part
            for s in np.flatnonzero(vis_subs[j]):
                sub = _strict_child(pieces[j][s], part)
                if sub is not None:
                    out[first_sub + (o * n_p + j) * n_s + s] = sub
    bg = top < 0
    if bg.any():
        out[first_attr + cfg.n_attributes + int(rng.integers(cfg.n_backgrounds))] = bg
    return {a: m.reshape(-1) for a, m in out.items()}


def _strict_child(shape: np.ndarray, parent: np.ndarray) -> np.ndarray | None:
    """The visible part of a child: inside its parent and strictly smaller (else it is not shown).

    Occlusion can leave an object showing only one band; the band is then indistinguishable from
    the object and is dropped, which keeps every child's region a strict subset of its parent's.
    """
    m = shape & parent
    if not m.any() or m.sum() == parent.sum():
        return None
    return m


def _render(
    world: PlantedWorld, layout: PlantedLayout, rng: np.random.Generator, chunk: int = 64
) -> np.ndarray:
    """offset + codes @ atoms + noise, chunk by chunk.

    A patch has at most ~4 active atoms, so the sum is done as K gathers of (patch, rank) slots
    rather than with many tiny BLAS calls (those crawl on a busy multi-threaded CPU).
    """
    cfg, n_p = world.config, world.config.n_patches
    out = np.empty((layout.n_images, n_p, cfg.d), dtype=np.float32)
    for s in range(0, layout.n_images, chunk):
        e = min(s + chunk, layout.n_images)
        block = out[s:e].reshape(-1, cfg.d)
        rng.standard_normal(out=block, dtype=np.float32)  # noise first, the signal is added in place
        block *= np.float32(cfg.noise_std)
        block += world.offset_d
        atom_nk, coef_nk = _patch_slots(layout, s, e)
        for k in range(atom_nk.shape[1]):
            block += coef_nk[:, k, None] * world.atoms_ad[atom_nk[:, k]]
    return out


def _patch_slots(layout: PlantedLayout, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Active (atom, coef) pairs of each patch of images s..e-1, padded to K slots (coef 0 = empty)."""
    n_p = layout.grid * layout.grid
    lo, hi = layout.image_ptr[s], layout.image_ptr[e]
    coef_ep = layout.entry_coef_ep[lo:hi]
    img = np.repeat(np.arange(e - s), np.diff(layout.image_ptr[s : e + 1]))
    ent, patch = np.nonzero(coef_ep)
    gp = img[ent] * n_p + patch  # patch index within the chunk
    order = np.argsort(gp, kind="stable")
    ent, patch, gp = ent[order], patch[order], gp[order]
    first = np.searchsorted(gp, gp, side="left")
    rank = np.arange(len(gp)) - first
    k = int(rank.max()) + 1 if len(rank) else 1
    atom_nk = np.zeros(((e - s) * n_p, k), dtype=np.int64)
    coef_nk = np.zeros(((e - s) * n_p, k), dtype=np.float32)
    atom_nk[gp, rank] = layout.entry_atom[lo + ent]
    coef_nk[gp, rank] = coef_ep[ent, patch]
    return atom_nk, coef_nk


def object_labels(world: PlantedWorld, layout: PlantedLayout) -> np.ndarray:
    """Class label of each image for classification: its largest visible object (-1 when none).

    With ``objects_per_image=(1, 1)`` every image holds exactly one object, the unambiguous case;
    with several objects the "largest object" label is ambiguous for image-level pooled codes.
    Ties (equal visible areas) go to the lower object id.
    """
    n_obj = world.config.n_objects
    out = np.full(layout.n_images, -1, dtype=np.int64)
    for i in range(layout.n_images):
        lo, hi = layout.image_ptr[i], layout.image_ptr[i + 1]
        atoms = layout.entry_atom[lo:hi]
        is_obj = atoms < n_obj
        if is_obj.any():
            area = (layout.entry_coef_ep[lo:hi][is_obj] > 0).sum(axis=1)
            out[i] = int(atoms[is_obj][int(np.argmax(area))])  # atoms are sorted: ties -> lower id
    return out


# --------------------------------------------------------------------------------------------------
# Shards on disk


def write_feature_shards(
    sample: PlantedSample, out_dir: str | Path, shard_size: int = 500, dtype: type | np.dtype = np.float16
) -> list[Path]:
    """Write features as feature shards (n_in_shard, grid*grid, d) plus the images' planted layout.

    Shard k holds images ``k*shard_size`` onwards, in order. The layout file (non-pickle npz with
    ``grid``, ``n_atoms``, ``image_ptr``, ``entry_atom``, ``entry_coef``, ``entry_coef_ep``) is read
    back by :func:`load_layout`; its ``.npz`` suffix keeps it out of "all ``.npy`` files" readers.
    Stale ``shard_*.npy`` files from a larger earlier run in ``out_dir`` are removed.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ConfigError(f"dtype must be float16 or float32, got {dt}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    out = FeaturesLayout(Path(out_dir))
    out.root.mkdir(parents=True, exist_ok=True)
    n = sample.feats_npd.shape[0]
    paths = []
    for k, s in enumerate(range(0, n, shard_size)):
        arr = np.ascontiguousarray(sample.feats_npd[s : s + shard_size].astype(dt))
        paths.append(write_npy(out.shard(k), arr))
    for stale in out.shard_files():
        if stale.suffix == ".npy" and stale not in paths:
            logger.warning("removing stale feature shard %s from an earlier run", stale)
            stale.unlink()
    lay = sample.layout
    write_npz(
        out.planted_layout,
        grid=np.int64(lay.grid),
        n_atoms=np.int64(lay.n_atoms),
        image_ptr=lay.image_ptr,
        entry_atom=lay.entry_atom,
        entry_coef=lay.entry_coef,
        entry_coef_ep=lay.entry_coef_ep,
    )
    return paths


def load_layout(path: str | Path) -> PlantedLayout:
    """Read the planted layout written by :func:`write_feature_shards` (its file, or the shard folder)."""
    path = Path(path)
    if path.is_dir():
        path = FeaturesLayout(path).planted_layout
    try:
        with np.load(path, allow_pickle=False) as z:
            lay = PlantedLayout(
                grid=int(z["grid"]),
                n_atoms=int(z["n_atoms"]),
                image_ptr=z["image_ptr"].astype(np.int64),
                entry_atom=z["entry_atom"].astype(np.int64),
                entry_coef=z["entry_coef"].astype(np.float32),
                entry_coef_ep=z["entry_coef_ep"].astype(np.float32),
            )
    except (OSError, KeyError, ValueError) as e:
        raise FeatureFileError(f"cannot read planted layout {path}: {e}") from e
    n_entries = len(lay.entry_atom)
    if lay.image_ptr[-1] != n_entries or lay.entry_coef_ep.shape != (n_entries, lay.grid**2):
        raise FeatureFileError(f"{path}: inconsistent layout arrays ({n_entries} entries, grid {lay.grid})")
    return lay
