"""Planted-concept world: synthetic patch features with a KNOWN concept hierarchy.

No pretrained weights are needed: every 14x14 "image" is a sparse sum of known unit atoms

    feat_p = offset + sum_{atoms a active on patch p} coef_{a,p} * atom_a + noise_p

where atoms form a hierarchy object -> part -> sub-part (plus flat attributes and backgrounds),
each atom has a name, and a synthetic "text encoder" embeds the names so that a part's word carries
its object's semantics (as "hubcap" carries "car" in CLIP). The world therefore exercises every
stage of the pipeline (SAE -> families -> naming) with a ground truth, and the metrics at the end of
this module measure how well a pipeline recovers it:

- :func:`atom_recovery`: decoder rows vs atoms (cosine);
- :func:`edge_recovery`: family DAG edges vs the true ancestor pairs;
- :func:`name_recovery`: chosen names vs true names (and how often a decoy won);
- :func:`map_iou`: concept activation maps vs the planted masks.

:func:`oracle_decoder` / :func:`oracle_codes` give a perfect "SAE" so later stages can be tested alone.

Invariants (tested): a child atom is only active on patches where its parent (hence every ancestor)
is active, and within each image its region is strictly smaller than its parent's, so the
co-occurrence confidence of DESIGN Eq. 5 is D[child, parent] = 1 while D[parent, child] < 0.75.
Everything is deterministic given the seeds (numpy ``Generator``), and computed in float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from insight_core.atlas.layout import FeaturesLayout, WorldLayout
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import atomic_write, write_json

logger = logging.getLogger(__name__)

KINDS = ("object", "part", "subpart", "attribute", "background")
_FORMAT = "insight-planted-world"
_FORMAT_VERSION = 1

# Small disjoint word lists; names past the end of a list get a numeric suffix ("wheel 2").
_OBJECT_WORDS = (
    "car", "dog", "house", "chair", "bicycle", "tree", "cat", "boat", "lamp", "guitar",
    "horse", "teapot", "bird", "clock", "truck", "table", "airplane", "bottle", "shoe", "umbrella",
    "piano", "camera", "bed", "kettle", "train", "fish", "laptop", "sofa", "bus", "cup",
    "owl", "tractor", "violin", "helmet", "rabbit", "bench", "windmill", "backpack", "giraffe", "bridge",
)  # fmt: skip
_PART_WORDS = (
    "wheel", "door", "window", "handle", "leg", "arm", "roof", "tail", "wing", "head",
    "lid", "spout", "seat", "pedal", "trunk", "branch", "screen", "keyboard", "neck", "sail",
    "mast", "beak", "fin", "sleeve", "strap", "blade", "frame", "chimney", "cushion", "engine",
)  # fmt: skip
_SUBPART_WORDS = (
    "hubcap", "knob", "hinge", "pane", "latch", "claw", "shingle", "feather", "nostril", "rivet",
    "spoke", "buckle", "lace", "petal", "button", "zipper", "bolt", "vent", "grille", "wick",
    "fret", "key", "tassel", "scale", "whisker", "hoof", "lens", "bristle", "socket", "rim",
)  # fmt: skip
_ATTRIBUTE_WORDS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "grey", "golden", "silver", "beige", "teal", "crimson", "striped", "spotted", "checkered", "furry",
    "shiny", "matte", "wooden", "metallic", "glossy", "rusty", "woolly", "scaly", "fuzzy", "smooth",
    "rough", "wrinkled", "transparent", "dotted", "plaid", "marbled", "velvety", "leathery", "feathery",
    "knitted", "woven", "cracked", "muddy", "frosty", "polished", "dusty", "speckled", "pastel",
)  # fmt: skip
_BACKGROUND_WORDS = (
    "beach", "forest", "street", "kitchen", "desert", "meadow", "office", "snowfield",
    "harbor", "mountain", "classroom", "garden", "parking lot", "lake", "stadium", "library",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, slots=True)
class WorldConfig:
    """Sizes and statistics of a planted-concept world (defaults: a CLIP-ViT-B/16-like 512-d space)."""

    d: int = 512
    """Feature dimension (CLIP ViT-B/16 joint space is 512)."""
    grid: int = 14
    """Patches per side; every image has grid*grid patches (14x14 = 196 for ViT-B/16 at 224 px)."""
    n_objects: int = 40
    """Root concepts (objects, e.g. "car")."""
    parts_per_object: int = 3
    """Parts per object (children of the object, e.g. "wheel"); each covers one band of the object."""
    subparts_per_part: int = 2
    """Sub-parts per part (grandchildren, e.g. "hubcap"); each covers a piece of its part's band."""
    n_attributes: int = 48
    """Colour/texture-like atoms outside the hierarchy; each object instance gets one over its whole
    region. 0, or >= 2 so that no attribute always co-occurs with an object (a spurious family edge)."""
    n_backgrounds: int = 16
    """Scene atoms; every patch not covered by an object gets the image's background atom."""
    objects_per_image: tuple[int, int] = (1, 3)
    """Inclusive range of the number of (distinct) objects per image."""
    object_area: tuple[float, float] = (0.15, 0.5)
    """Inclusive range of an object rectangle's area as a fraction of the grid."""
    part_visible_prob: float = 0.7
    """Probability that a part is visible on an object instance (at least one part always is)."""
    subpart_visible_prob: float = 0.6
    """Probability that a sub-part is visible on a visible part."""
    coef_range: tuple[float, float] = (0.5, 1.5)
    """Activation magnitude of an active (image, atom) pair, drawn uniformly from this range."""
    coef_jitter: float = 0.05
    """Std of the multiplicative per-patch jitter of an activation (clipped to +-3 std); 0 = none."""
    noise_std: float = 0.01
    """Per-dimension std of isotropic Gaussian noise. With d=512 the noise energy is 512 * 0.01**2 =
    0.05, i.e. about 1-2 % of an object patch's signal energy (3-4 atoms, E[coef^2] = 1.08 each) and
    about 5 % of a background patch's (one atom)."""
    offset_norm: float = 1.0
    """Norm of a constant mean vector added to every feature (real CLIP features have a non-zero mean)."""
    orthogonal: bool = True
    """Orthonormalise atoms and the offset direction (QR) when n_atoms + 1 <= d; otherwise (or when
    False) atoms are independent random unit vectors, nearly orthogonal (|cos| ~ 1/sqrt(d))."""
    name_context_beta: float = 0.6
    """Weight of the ancestors' atoms in a word embedding: emb("hubcap") ~ hubcap + beta*(wheel + car)."""
    word_noise: float = 0.1
    """Expected norm of the isotropic noise added to each word embedding before normalisation."""
    decoys_per_concept: tuple[int, int] = (1, 2)
    """Inclusive range of decoy words per part/sub-part: the same atom in a WRONG object's context."""
    n_distractors: int = 2000
    """Extra vocabulary words that are pure random unit vectors."""
    seed: int = 0
    """Seed of the world (atoms, offset, vocabulary); samples take their own seed as well."""

    def __post_init__(self) -> None:
        _check(self.d >= 2, "d", f"must be >= 2, got {self.d}")
        _check(self.grid >= 2, "grid", f"must be >= 2, got {self.grid}")
        _check(self.n_objects >= 1, "n_objects", f"must be >= 1, got {self.n_objects}")
        _check(self.parts_per_object >= 0, "parts_per_object", f"must be >= 0, got {self.parts_per_object}")
        _check(
            self.subparts_per_part >= 0, "subparts_per_part", f"must be >= 0, got {self.subparts_per_part}"
        )
        _check(
            self.n_attributes == 0 or self.n_attributes >= 2,
            "n_attributes",
            f"must be 0 or >= 2 (a lone attribute co-occurs with every object), got {self.n_attributes}",
        )
        _check(self.n_backgrounds >= 1, "n_backgrounds", f"must be >= 1, got {self.n_backgrounds}")
        lo, hi = _pair(self.objects_per_image, "objects_per_image")
        _check(
            0 <= lo <= hi <= self.n_objects,
            "objects_per_image",
            f"need 0 <= lo <= hi <= n_objects, got {(lo, hi)}",
        )
        lo, hi = _pair(self.object_area, "object_area")
        _check(0.0 < lo <= hi <= 1.0, "object_area", f"need 0 < lo <= hi <= 1, got {(lo, hi)}")
        _check(
            0.0 < self.part_visible_prob <= 1.0,
            "part_visible_prob",
            f"must be in (0, 1], got {self.part_visible_prob}",
        )
        _check(
            0.0 <= self.subpart_visible_prob <= 1.0,
            "subpart_visible_prob",
            f"must be in [0, 1], got {self.subpart_visible_prob}",
        )
        lo, hi = _pair(self.coef_range, "coef_range")
        _check(0.0 < lo <= hi, "coef_range", f"need 0 < lo <= hi, got {(lo, hi)}")
        _check(
            0.0 <= self.coef_jitter <= 0.2,
            "coef_jitter",
            f"must be in [0, 0.2] (keeps codes > 0), got {self.coef_jitter}",
        )
        _check(self.noise_std >= 0.0, "noise_std", f"must be >= 0, got {self.noise_std}")
        _check(self.offset_norm >= 0.0, "offset_norm", f"must be >= 0, got {self.offset_norm}")
        _check(
            self.name_context_beta >= 0.0, "name_context_beta", f"must be >= 0, got {self.name_context_beta}"
        )
        _check(self.word_noise >= 0.0, "word_noise", f"must be >= 0, got {self.word_noise}")
        lo, hi = _pair(self.decoys_per_concept, "decoys_per_concept")
        _check(
            0 <= lo <= hi <= self.n_objects - 1,
            "decoys_per_concept",
            f"need 0 <= lo <= hi <= n_objects - 1 (decoys use distinct other objects), got {(lo, hi)}",
        )
        _check(self.n_distractors >= 0, "n_distractors", f"must be >= 0, got {self.n_distractors}")
        _check(
            bool(_rect_shapes(self)),
            "object_area",
            f"no rectangle on a {self.grid}x{self.grid} grid has an area fraction in {self.object_area} and "
            f"room for {self.parts_per_object} part bands x {self.subparts_per_part} sub-part pieces",
        )

    @property
    def n_patches(self) -> int:
        """Patches per image (grid * grid)."""
        return self.grid * self.grid

    @property
    def n_atoms(self) -> int:
        """Total number of atoms (objects + parts + sub-parts + attributes + backgrounds)."""
        n_parts = self.n_objects * self.parts_per_object
        return (
            self.n_objects
            + n_parts
            + n_parts * self.subparts_per_part
            + self.n_attributes
            + self.n_backgrounds
        )


def _check(ok: bool, field: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"WorldConfig.{field} {what}")


def _pair(value: Any, field: str) -> tuple[Any, Any]:
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise ConfigError(f"WorldConfig.{field} must be a (lo, hi) pair, got {value!r}")
    return value[0], value[1]


def _n_bands(cfg: WorldConfig) -> tuple[int, int]:
    """Bands an object splits into, and pieces a band splits into (>= 2, so a child is always smaller)."""
    return max(cfg.parts_per_object, 2), max(cfg.subparts_per_part, 2)


def _rect_shapes(cfg: WorldConfig) -> list[tuple[int, int]]:
    """All (h, w) object rectangles with an allowed area and room for the part bands and pieces."""
    n_bands, n_pieces = _n_bands(cfg)
    lo, hi = cfg.object_area[0] * cfg.grid**2, cfg.object_area[1] * cfg.grid**2
    return [
        (h, w)
        for h in range(1, cfg.grid + 1)
        for w in range(1, cfg.grid + 1)
        if lo <= h * w <= hi and max(h, w) >= n_bands and min(h, w) >= n_pieces
    ]


# --------------------------------------------------------------------------------------------------
# World


@dataclasses.dataclass
class PlantedWorld:
    """Atoms, their hierarchy and names, and a vocabulary of word embeddings.

    Atom ids are laid out by kind: objects, then parts (object-major), sub-parts (part-major),
    attributes, backgrounds. ``vocab_atom[w]`` is the atom word ``w`` was built from (its true name or
    one of its decoys; -1 for distractors); a word is a decoy iff it is not ``true_word_index`` of
    that atom.
    """

    config: WorldConfig
    atoms_ad: np.ndarray
    names: list[str]
    kinds: list[str]
    parents: list[int]
    depth: list[int]
    offset_d: np.ndarray
    vocab_words: list[str]
    vocab_emb_wd: np.ndarray
    true_word_index: np.ndarray
    vocab_atom: np.ndarray

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.names)

    def ancestors(self, a: int) -> list[int]:
        """Ancestors of atom ``a``, nearest first (parent, grandparent, ...)."""
        return _chain(self.parents, a)

    def atoms_of_kind(self, kind: str) -> np.ndarray:
        """Ids of the atoms of one kind ("object", "part", "subpart", "attribute", "background")."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        return np.array([i for i, k in enumerate(self.kinds) if k == kind], dtype=np.int64)


def ancestor_pairs(world: PlantedWorld) -> set[tuple[int, int]]:
    """All (ancestor, descendant) atom pairs, transitive ones (grandparent, sub-part) included."""
    return {(anc, a) for a in range(world.n_atoms) for anc in world.ancestors(a)}


def make_world(cfg: WorldConfig | None = None) -> PlantedWorld:
    """Build the world for ``cfg`` (deterministic in ``cfg.seed``)."""
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(cfg.seed)
    names, kinds, parents = _hierarchy(cfg)
    atoms_ad, offset_d = _atoms_and_offset(cfg, rng)
    words, emb_wd, word_atom = _vocabulary(cfg, rng, atoms_ad, names, kinds, parents)
    order = rng.permutation(len(words))  # shuffle so a word's position carries no information
    words = [words[i] for i in order]
    emb_wd, word_atom = emb_wd[order], word_atom[order]
    true_idx = np.full(len(names), -1, dtype=np.int64)
    for w, name in enumerate(words):
        if word_atom[w] >= 0 and name == names[word_atom[w]]:
            true_idx[word_atom[w]] = w
    depth = [len(_chain(parents, a)) for a in range(len(names))]
    return PlantedWorld(
        cfg, atoms_ad, names, kinds, parents, depth, offset_d, words, emb_wd, true_idx, word_atom
    )


def _chain(parents: Sequence[int], a: int) -> list[int]:
    """Ancestors of ``a``, nearest first."""
    out = []
    while parents[a] >= 0:
        a = parents[a]
        out.append(a)
    return out


def _word(words: Sequence[str], i: int) -> str:
    base = words[i % len(words)]
    return base if i < len(words) else f"{base} {i // len(words) + 1}"


def _hierarchy(cfg: WorldConfig) -> tuple[list[str], list[str], list[int]]:
    """Names, kinds and parents in atom-id order (see :class:`PlantedWorld`)."""
    n_obj, n_p, n_s = cfg.n_objects, cfg.parts_per_object, cfg.subparts_per_part
    names = [_word(_OBJECT_WORDS, o) for o in range(n_obj)]
    kinds, parents = ["object"] * n_obj, [-1] * n_obj
    for g in range(n_obj * n_p):  # part g belongs to object g // n_p
        names.append(_word(_PART_WORDS, g))
        kinds.append("part")
        parents.append(g // n_p)
    for g in range(n_obj * n_p * n_s):  # sub-part g belongs to part g // n_s
        names.append(_word(_SUBPART_WORDS, g))
        kinds.append("subpart")
        parents.append(n_obj + g // n_s)
    for kind, words, n in (
        ("attribute", _ATTRIBUTE_WORDS, cfg.n_attributes),
        ("background", _BACKGROUND_WORDS, cfg.n_backgrounds),
    ):
        names += [_word(words, i) for i in range(n)]
        kinds += [kind] * n
        parents += [-1] * n
    assert len(set(names)) == len(names), "atom names must be unique"
    return names, kinds, parents


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _atoms_and_offset(cfg: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit atoms (orthonormal with the offset direction when they fit) and the offset vector."""
    n = cfg.n_atoms
    gauss = rng.standard_normal((n + 1, cfg.d))
    if cfg.orthogonal and n + 1 <= cfg.d:
        q, r = np.linalg.qr(gauss.T)
        rows = (q * np.sign(np.diag(r))).T  # sign fix: the basis is a function of the draw alone
    else:
        rows = _unit_rows(gauss)
    return rows[:n].astype(np.float32), (cfg.offset_norm * rows[n]).astype(np.float32)


def _vocabulary(
    cfg: WorldConfig,
    rng: np.random.Generator,
    atoms_ad: np.ndarray,
    names: list[str],
    kinds: list[str],
    parents: list[int],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """True names, decoys and distractors (unshuffled), with their embeddings and source atoms."""
    atoms = atoms_ad.astype(np.float64)
    beta = cfg.name_context_beta
    n_obj, n_p = cfg.n_objects, cfg.parts_per_object
    words: list[str] = []
    vecs: list[np.ndarray] = []
    src: list[int] = []
    for a, name in enumerate(names):  # true names: atom + beta * ancestors (the text carries context)
        words.append(name)
        vecs.append(atoms[a] + beta * atoms[_chain(parents, a)].sum(axis=0))
        src.append(a)
    for a, kind in enumerate(kinds):  # decoys: the same atom in another object's context
        if kind not in ("part", "subpart"):
            continue
        own = _chain(parents, a)[-1]
        n_decoys = int(rng.integers(cfg.decoys_per_concept[0], cfg.decoys_per_concept[1] + 1))
        others = rng.choice([o for o in range(n_obj) if o != own], size=n_decoys, replace=False)
        for other in others:
            context = [int(other)]
            if kind == "subpart":  # the wrong object's parts stand in for the missing part context
                context.append(n_obj + int(other) * n_p + int(rng.integers(n_p)))
            words.append(f"{names[a]} (decoy-of-{names[int(other)]})")
            vecs.append(atoms[a] + beta * atoms[context].sum(axis=0))
            src.append(a)
    for i in range(cfg.n_distractors):
        words.append(f"distractor {i:05d}")
        vecs.append(rng.standard_normal(cfg.d))
        src.append(-1)
    emb = np.stack(vecs)
    n_named = len(words) - cfg.n_distractors  # distractors are already pure noise
    emb[:n_named] += rng.standard_normal((n_named, cfg.d)) * (cfg.word_noise / np.sqrt(cfg.d))
    assert len(set(words)) == len(words), "vocabulary words must be unique"
    return words, _unit_rows(emb).astype(np.float32), np.asarray(src, dtype=np.int64)


def context_naming_accuracy(world: PlantedWorld) -> dict[str, dict[str, float]]:
    """How often argmax-cosine naming over the vocabulary finds the true name, per kind.

    ``"bare"`` queries with the atom alone; ``"with_ancestors"`` with atom + sum of ancestor atoms
    (the family-informed concept vector of DESIGN/Eq. B.9). Parts and sub-parts are ambiguous
    between their true name and decoys without context, by construction.
    """
    out: dict[str, dict[str, float]] = {"bare": {}, "with_ancestors": {}}
    for kind in KINDS:
        ids = world.atoms_of_kind(kind)
        if ids.size == 0:
            continue
        bare = world.atoms_ad[ids]
        ctx = bare + np.stack([world.atoms_ad[world.ancestors(int(a))].sum(axis=0) for a in ids])
        for key, q in (("bare", bare), ("with_ancestors", ctx)):
            best = np.argmax(_unit_rows(q) @ world.vocab_emb_wd.T, axis=1)
            out[key][kind] = float(np.mean(best == world.true_word_index[ids]))
    return out


# --------------------------------------------------------------------------------------------------
# Persistence of the world


def save_world(world: PlantedWorld, out_dir: str | Path) -> Path:
    """Write the world's config + names (JSON), tensors (safetensors) and vocabulary embeddings (``.npz``
    in the naming stage's ``--vocab-embeddings`` format), each atomically; see ``WorldLayout``."""
    files = WorldLayout(Path(out_dir))
    files.root.mkdir(parents=True, exist_ok=True)
    tensors = {"atoms_ad": world.atoms_ad, "offset_d": world.offset_d, "vocab_emb_wd": world.vocab_emb_wd}
    atomic_write(
        files.tensors,
        lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp)),
    )
    doc = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "config": dataclasses.asdict(world.config),
        "names": world.names,
        "kinds": world.kinds,
        "parents": world.parents,
        "vocab_words": world.vocab_words,
        "true_word_index": world.true_word_index.tolist(),
        "vocab_atom": world.vocab_atom.tolist(),
    }
    write_json(files.config, doc)
    words = np.array(world.vocab_words, dtype=str)
    _atomic_savez(files.vocab, words=words, embeddings=world.vocab_emb_wd)
    return files.root


def load_world(in_dir: str | Path) -> PlantedWorld:
    """Read a world written by :func:`save_world`; raises ``FeatureFileError`` naming a bad file."""
    in_dir = Path(in_dir)
    json_path, st_path = WorldLayout(in_dir).config, WorldLayout(in_dir).tensors
    try:
        doc = json.loads(json_path.read_text())
        tensors = load_file(str(st_path))
    except (OSError, ValueError, SafetensorError) as e:
        raise FeatureFileError(
            f"cannot read planted world from {in_dir} ({json_path.name} + {st_path.name}): {e}"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != _FORMAT_VERSION:
        raise FeatureFileError(
            f"{json_path} is not a planted world file (format {_FORMAT} v{_FORMAT_VERSION})"
        )
    try:
        cfg_doc = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()}
        cfg = WorldConfig(**cfg_doc)
        parents = [int(p) for p in doc["parents"]]
        world = PlantedWorld(
            config=cfg,
            atoms_ad=tensors["atoms_ad"],
            names=list(doc["names"]),
            kinds=list(doc["kinds"]),
            parents=parents,
            depth=[len(_chain(parents, a)) for a in range(len(parents))],
            offset_d=tensors["offset_d"],
            vocab_words=list(doc["vocab_words"]),
            vocab_emb_wd=tensors["vocab_emb_wd"],
            true_word_index=np.asarray(doc["true_word_index"], dtype=np.int64),
            vocab_atom=np.asarray(doc["vocab_atom"], dtype=np.int64),
        )
    except (KeyError, TypeError, ConfigError) as e:
        raise FeatureFileError(f"{json_path} / {st_path}: missing or invalid entry: {e}") from e
    n, n_words = cfg.n_atoms, len(world.vocab_words)
    shapes_ok = (
        world.atoms_ad.shape == (n, cfg.d)
        and world.offset_d.shape == (cfg.d,)
        and world.vocab_emb_wd.shape == (n_words, cfg.d)
        and len(world.names) == len(world.kinds) == len(world.parents) == len(world.true_word_index) == n
        and world.vocab_atom.shape == (n_words,)
    )
    if not shapes_ok:
        raise FeatureFileError(
            f"{in_dir}: array shapes do not match the config (n_atoms={n}, d={cfg.d}, {n_words} words)"
        )
    return world


def _atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, arr, allow_pickle=False)

    return atomic_write(path, write)


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
        paths.append(_atomic_save_npy(out.shard(k), arr))
    for stale in out.shard_files():
        if stale.suffix == ".npy" and stale not in paths:
            logger.warning("removing stale feature shard %s from an earlier run", stale)
            stale.unlink()
    lay = sample.layout
    _atomic_savez(
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


# --------------------------------------------------------------------------------------------------
# Oracle and recovery metrics


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
