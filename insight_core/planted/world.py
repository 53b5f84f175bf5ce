"""Planted-concept world: synthetic patch features with a KNOWN concept hierarchy.

No pretrained weights are needed: every 14x14 "image" is a sparse sum of known unit atoms

    feat_p = offset + sum_{atoms a active on patch p} coef_{a,p} * atom_a + noise_p

where atoms form a hierarchy object -> part -> sub-part (plus flat attributes and backgrounds),
each atom has a name, and a synthetic "text encoder" embeds the names so that a part's word carries
its object's semantics (as "hubcap" carries "car" in CLIP). The world therefore exercises every
stage of the pipeline (SAE -> families -> naming) with a ground truth. This module builds the world
(atoms, hierarchy, names, vocabulary) and saves/loads it; :mod:`insight_core.planted.sampling` draws
images from it and :mod:`insight_core.planted.metrics` measures how well a pipeline recovers it.
Everything is deterministic given the seeds (numpy ``Generator``), and computed in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from insight_core.atlas.layout import WorldLayout
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import atomic_write, write_json, write_npz
from insight_core.schema import JsonModel, read_file, validate_config

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
    write_npz(files.vocab, words=words, embeddings=world.vocab_emb_wd)
    return files.root


class WorldFile(JsonModel):
    """``world/world.json`` (:func:`save_world`): the world's config and its non-tensor truth."""

    format: Literal["insight-planted-world"]
    version: Literal[1]
    config: dict[str, Any]
    """:class:`WorldConfig` fields (checked by ``validate_config``)."""
    names: list[str]
    kinds: list[str]
    parents: list[int]
    """Per atom its parent atom (-1: none)."""
    vocab_words: list[str]
    true_word_index: list[int]
    vocab_atom: list[int]


def load_world(in_dir: str | Path) -> PlantedWorld:
    """Read a world written by :func:`save_world`; raises ``FeatureFileError`` naming a bad file."""
    in_dir = Path(in_dir)
    json_path, st_path = WorldLayout(in_dir).config, WorldLayout(in_dir).tensors
    doc = read_file(WorldFile, json_path, FeatureFileError, "planted world file")
    cfg = validate_config(WorldConfig, doc.config, f"{json_path}: config", FeatureFileError)
    try:
        tensors = load_file(str(st_path))
    except (OSError, SafetensorError) as e:
        raise FeatureFileError(f"cannot read planted world tensors {st_path}: {e}") from e
    missing = {"atoms_ad", "offset_d", "vocab_emb_wd"} - set(tensors)
    if missing:
        raise FeatureFileError(f"{st_path}: missing tensors {sorted(missing)}")
    world = PlantedWorld(
        config=cfg,
        atoms_ad=tensors["atoms_ad"],
        names=doc.names,
        kinds=doc.kinds,
        parents=doc.parents,
        depth=[len(_chain(doc.parents, a)) for a in range(len(doc.parents))],
        offset_d=tensors["offset_d"],
        vocab_words=doc.vocab_words,
        vocab_emb_wd=tensors["vocab_emb_wd"],
        true_word_index=np.asarray(doc.true_word_index, dtype=np.int64),
        vocab_atom=np.asarray(doc.vocab_atom, dtype=np.int64),
    )
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
