"""Hierarchy-aware concept naming (paper Sec. 3.4, App. B.4, Eq. B.9-B.13).

Three steps, each usable on its own:

1. **Vocabulary** -- :func:`insight_core.concepts.vocabulary.build_vocabulary` unions the paper's
   word lists, normalised and deduplicated in a deterministic order.
2. **Text embeddings** -- :func:`insight_core.concepts.vocab_embeddings.embed_vocabulary` embeds
   every word with noun, verb and adjective templates (cached on disk, or read from a
   bring-your-own ``.npz``).
3. **Concept vectors and names** (this module) -- :func:`concept_vectors` builds the
   family-informed vector of Eq. B.9,

   ``v_i = b_dec + alpha * w_ii * W_dec[i] + sum_{a in parents(i)} D[i, a] * w_ia * W_dec[a]``

   (``w_ia`` = mean activation of concept ``a`` on the top-30 patches of concept ``i``; ``D`` the
   co-occurrence confidence of the family stage), and :func:`name_concepts` scores every word by the
   maximum over parts of speech of its cosine with the normalised concept vector (Eq. B.10-B.13) and
   names each concept by the argmax, keeping the top-k alternatives.

The co-occurrence matrix, the ``w`` values and the parent lists come from the stats/family stages;
this module takes them as plain arrays, mappings or callables and imports neither.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from insight_core.concepts._util import as_numpy, chunks, sq_norms
from insight_core.concepts.vocab_embeddings import VocabEmbeddings
from insight_core.errors import ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Concept vectors (Eq. B.9)


def parents_from_edges(parent_idx: Any, child_idx: Any, m: int) -> list[list[int]]:
    """Parent lists (length ``m``) from ``(parent, child)`` edge arrays (e.g. ``edges.parquet``).

    Each list is sorted and deduplicated.
    """
    p, c = as_numpy(parent_idx).astype(np.int64).ravel(), as_numpy(child_idx).astype(np.int64).ravel()
    if p.shape != c.shape:
        raise ConfigError(f"parent_idx {p.shape} and child_idx {c.shape} must have the same length")
    if p.size and (min(p.min(), c.min()) < 0 or max(p.max(), c.max()) >= m):
        raise ConfigError(f"edge indices must lie in [0, m={m})")
    pairs = np.unique(np.stack([c, p], axis=1), axis=0) if p.size else np.zeros((0, 2), np.int64)
    out: list[list[int]] = [[] for _ in range(m)]
    starts = np.searchsorted(pairs[:, 0], np.arange(m + 1))
    for i in np.flatnonzero(np.diff(starts)).tolist():
        out[i] = pairs[starts[i] : starts[i + 1], 1].tolist()
    return out


def _flatten_parents(
    parents: Sequence[Sequence[int]] | Mapping[int, Sequence[int]], m: int
) -> tuple[np.ndarray, np.ndarray]:
    """(child, parent) index arrays, grouped by child in ascending order."""
    if isinstance(parents, Mapping):
        bad = [k for k in parents if not 0 <= int(k) < m]
        if bad:
            raise ConfigError(f"parents has keys outside [0, m={m}): {bad[:5]}")
        lists: list[Sequence[int]] = [()] * m
        for k, v in parents.items():
            lists[int(k)] = v
    else:
        lists = list(parents)
        if len(lists) != m:
            raise ConfigError(f"parents must hold one parent list per concept (m={m}), got {len(lists)}")
    lens = np.fromiter((len(p) for p in lists), dtype=np.int64, count=m)
    par = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
    child = np.repeat(np.arange(m, dtype=np.int64), lens)
    if par.size and (par.min() < 0 or par.max() >= m):
        raise ConfigError(f"parents holds indices outside [0, m={m})")
    if (par == child).any():
        i = int(child[np.argmax(par == child)])
        raise ConfigError(f"parents[{i}] lists concept {i} as its own parent")
    return child, par


def _lookup(src: Any, i_idx: np.ndarray, a_idx: np.ndarray, m: int, name: str) -> np.ndarray:
    if callable(src):
        out = as_numpy(src(i_idx, a_idx))
    else:
        arr = as_numpy(src)
        if arr.shape != (m, m):
            raise ConfigError(f"{name} must be an (m, m) = ({m}, {m}) array or a callable, got {arr.shape}")
        out = arr[i_idx, a_idx]
    out = np.asarray(out, dtype=np.float64)
    if out.shape != i_idx.shape:
        raise ConfigError(f"{name} returned shape {out.shape} for {i_idx.shape} index pairs")
    if not np.isfinite(out).all():
        raise ConfigError(f"{name} returned NaN/inf values")
    return out


def concept_vectors(
    W_dec_md: Any,
    b_dec_d: Any,
    parents: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    D_mm_or_lookup: Any,
    w_lookup: Any,
    alpha: float = 1.33,
    *,
    use_parents: bool = True,
    pair_chunk: int = 1 << 16,
) -> np.ndarray:
    """Family-informed concept vectors (Eq. B.9), float32 (m, d).

    ``v_i = b_dec + alpha * w_ii * W_dec[i] + sum_{a in parents(i)} D[i, a] * w_ia * W_dec[a]``

    The decoder bias ``b_dec`` is included, as in the paper: ``v_i`` is then the reconstruction of a
    typical patch where ``i`` and its ancestors fire, i.e. a point of the image-embedding manifold
    (it shifts every vector by the data mean; naming normalises ``v_i`` afterwards).

    Parameters
    ----------
    W_dec_md, b_dec_d
        SAE decoder rows (m, d) and bias (d,) (numpy or torch).
    parents
        ``parents[i]``: parent concept indices of ``i`` (all ancestors kept by the family DAG,
        transitive edges included), as a length-m sequence or a mapping ``{i: [a, ...]}``.
    D_mm_or_lookup
        Co-occurrence confidence ``D[i, a]``: an (m, m) array or a callable ``(i_idx, a_idx) -> values``.
    w_lookup
        ``w_ia`` = mean activation of concept ``a`` on the top-30 patches of concept ``i``: an (m, m)
        array or a callable ``(i_idx, a_idx) -> values``; called once with ``i_idx = a_idx = arange(m)``
        for ``w_ii`` and with the flattened (child, parent) pairs.
    alpha
        Weight of the concept's own direction (paper: 1.33).
    use_parents
        False: the no-context variant ``b_dec + alpha * w_ii * W_dec[i]`` (parents, D unused).
    pair_chunk
        Approximate number of (child, parent) pairs handled at once (bounds memory).
    """
    W = as_numpy(W_dec_md).astype(np.float64)
    if W.ndim != 2:
        raise ConfigError(f"W_dec_md must be (m, d), got shape {W.shape}")
    m, d = W.shape
    b = as_numpy(b_dec_d).astype(np.float64)
    if b.shape != (d,):
        raise ConfigError(f"b_dec_d must have shape ({d},), got {b.shape}")
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ConfigError("W_dec_md / b_dec_d hold NaN/inf values")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be finite, got {alpha}")
    diag = np.arange(m, dtype=np.int64)
    w_self = _lookup(w_lookup, diag, diag, m, "w_lookup")
    n_dead = int(np.count_nonzero(w_self == 0))
    if n_dead:
        logger.warning(
            "%d of %d concepts have w_ii = 0 (never active on their top patches): their vector is "
            "b_dec (+ parents) and their name carries no information about them",
            n_dead,
            m,
        )
    V = b[None, :] + (alpha * w_self)[:, None] * W
    if use_parents:
        child, par = _flatten_parents(parents, m)
        if child.size:
            coef = _lookup(D_mm_or_lookup, child, par, m, "D_mm_or_lookup") * _lookup(
                w_lookup, child, par, m, "w_lookup"
            )
            starts = np.flatnonzero(np.r_[True, child[1:] != child[:-1]])  # child is sorted
            _accumulate(V, W, child, par, coef, starts, pair_chunk)
    return V.astype(np.float32)


def _accumulate(
    V: np.ndarray,
    W: np.ndarray,
    child: np.ndarray,
    par: np.ndarray,
    coef: np.ndarray,
    starts: np.ndarray,
    pair_chunk: int,
) -> None:
    """``V[child] += coef * W[par]`` summed per child, in blocks of whole children (~pair_chunk pairs)."""
    n = child.size
    g = 0
    while g < len(starts):
        lo = int(starts[g])
        # last group whose start is <= lo + pair_chunk (always at least one group)
        g_end = max(g + 1, int(np.searchsorted(starts, lo + pair_chunk, side="right")))
        hi = int(starts[g_end]) if g_end < len(starts) else n
        contrib = coef[lo:hi, None] * W[par[lo:hi]]
        V[child[starts[g:g_end]]] += np.add.reduceat(contrib, starts[g:g_end] - lo, axis=0)
        g = g_end


# --------------------------------------------------------------------------------------------------
# Naming (Eq. B.10-B.13)


@dataclasses.dataclass(frozen=True)
class NamingResult:
    """Names of m concepts: the top-k words per concept, best first (column 0 is the name)."""

    words: tuple[str, ...]
    """Vocabulary words (indices in ``top_index`` refer to these)."""
    pos_names: tuple[str, ...]
    """Part-of-speech names (``top_pos`` indexes these)."""
    top_index: np.ndarray
    """int64 (m, k) word indices by decreasing score (ties: lower word index first)."""
    top_score: np.ndarray
    """float32 (m, k) scores: max over parts of speech of cos(v_i, word)."""
    top_pos: np.ndarray
    """int64 (m, k) part of speech reaching the max (ties: the first in ``pos_names``)."""

    @property
    def n_concepts(self) -> int:
        """Number of named concepts m."""
        return int(self.top_index.shape[0])

    @property
    def best_index(self) -> np.ndarray:
        """(m,) word index of each concept's name."""
        return self.top_index[:, 0]

    @property
    def best_score(self) -> np.ndarray:
        """(m,) score of each concept's name."""
        return self.top_score[:, 0]

    @property
    def best_word(self) -> list[str]:
        """Each concept's name."""
        return [self.words[i] for i in self.best_index.tolist()]

    @property
    def best_pos(self) -> list[str]:
        """Part of speech under which each name scored best."""
        return [self.pos_names[p] for p in self.top_pos[:, 0].tolist()]

    @property
    def top_words(self) -> list[list[str]]:
        """Top-k words per concept, best first."""
        return [[self.words[i] for i in row] for row in self.top_index.tolist()]

    @property
    def top_pos_names(self) -> list[list[str]]:
        """Top-k parts of speech per concept."""
        return [[self.pos_names[p] for p in row] for row in self.top_pos.tolist()]

    def names(self) -> dict[int, str]:
        """``{concept id: name}`` (the form :func:`insight_core.planted.metrics.name_recovery` takes)."""
        return dict(enumerate(self.best_word))

    def to_records(self, concept_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One plain dict per concept (for ``concepts.parquet``).

        Keys: ``id``, ``name``, ``name_score``, ``name_pos``, ``top_names``, ``top_scores``,
        ``top_pos`` (lists of length k, best first, so ``top_names[0] == name``).
        """
        ids = list(range(self.n_concepts)) if concept_ids is None else [int(i) for i in concept_ids]
        if len(ids) != self.n_concepts:
            raise ConfigError(f"concept_ids has {len(ids)} entries for {self.n_concepts} concepts")
        words, pos, scores = self.top_words, self.top_pos_names, self.top_score.tolist()
        return [
            {
                "id": cid,
                "name": words[r][0],
                "name_score": float(scores[r][0]),
                "name_pos": pos[r][0],
                "top_names": words[r],
                "top_scores": [float(s) for s in scores[r]],
                "top_pos": pos[r],
            }
            for r, cid in enumerate(ids)
        ]


def name_concepts(
    V_md: Any, vocab: VocabEmbeddings, top_k: int = 5, batch: int = 1024, *, word_batch: int = 8192
) -> NamingResult:
    """Name concepts by the best-scoring vocabulary word (Eq. B.10-B.13).

    ``score(i, w) = max_pos cos(v_i / |v_i|, e_pos(w))``; the name is the argmax over words, and the
    top ``top_k`` words are kept as alternatives. Computed in blocks of ``batch`` concepts x
    ``word_batch`` words (peak memory ~ 22 bytes * batch * word_batch, ~190 MB by default), so the
    full m x W x n_pos score tensor never exists. A zero concept vector scores 0 with every word.
    """
    V = as_numpy(V_md).astype(np.float32)
    if V.ndim != 2 or V.shape[1] != vocab.dim:
        raise ConfigError(f"V_md must be (m, d={vocab.dim}), got shape {V.shape}")
    if not np.isfinite(V).all():
        raise ConfigError("V_md holds NaN/inf values")
    for name, val in (("top_k", top_k), ("batch", batch), ("word_batch", word_batch)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{name} must be a positive int, got {val!r}")
    m, W = V.shape[0], vocab.n_words
    k = min(top_k, W)
    norms = np.sqrt(sq_norms(V)).astype(np.float32)
    Vn = V / np.maximum(norms, 1e-12)[:, None]
    E = vocab.emb_pwd
    top_index = np.zeros((m, k), dtype=np.int64)
    top_score = np.zeros((m, k), dtype=np.float32)
    top_pos = np.zeros((m, k), dtype=np.int64)
    for cs in chunks(m, batch):
        q = Vn[cs]
        cand_i, cand_s, cand_p = [], [], []
        for ws in chunks(W, word_batch):
            s = q @ E[0, ws].T
            pos = np.zeros(s.shape, dtype=np.int8)
            for p in range(1, vocab.n_pos):
                sp = q @ E[p, ws].T
                better = sp > s
                np.copyto(s, sp, where=better)
                pos[better] = p
            kk = min(k, s.shape[1])
            if kk < s.shape[1]:
                part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(kk), s.shape)
            cand_i.append(part + ws.start)
            cand_s.append(np.take_along_axis(s, part, axis=1))
            cand_p.append(np.take_along_axis(pos, part, axis=1))
        ci, cs_, cp = np.concatenate(cand_i, 1), np.concatenate(cand_s, 1), np.concatenate(cand_p, 1)
        order = np.lexsort((ci, -cs_), axis=1)[:, :k]  # by score desc, then word index asc
        top_index[cs] = np.take_along_axis(ci, order, axis=1)
        top_score[cs] = np.take_along_axis(cs_, order, axis=1)
        top_pos[cs] = np.take_along_axis(cp, order, axis=1)
    logger.info("named %d concepts against %d words x %d part(s) of speech", m, W, vocab.n_pos)
    return NamingResult(vocab.words, vocab.pos_names, top_index, top_score, top_pos)


# --------------------------------------------------------------------------------------------------
# Config of the naming stage


@dataclasses.dataclass(frozen=True, slots=True)
class NamingConfig:
    """Parameters of the naming stage (paper defaults)."""

    alpha: float = 1.33
    """Weight of a concept's own decoder direction in its concept vector (Eq. B.9)."""
    use_parents: bool = True
    """Add the parents' directions (family context); False = the no-context variant."""
    top_k: int = 5
    """Alternative names kept per concept (the name included)."""
    min_concreteness: float = 2.5
    """Brysbaert entries are kept when their mean concreteness rating exceeds this."""
    max_words: int | None = None
    """Cap on the vocabulary size (None = the whole union)."""
    text_batch_size: int = 1024
    """Words per text-encoder call."""
    concept_batch: int = 1024
    """Concepts scored at once."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"NamingConfig.alpha must be a positive number, got {self.alpha!r}")
        for name in ("top_k", "text_batch_size", "concept_batch"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"NamingConfig.{name} must be a positive int, got {val!r}")
        if self.max_words is not None and (not isinstance(self.max_words, int) or self.max_words < 1):
            raise ConfigError(
                f"NamingConfig.max_words must be None or a positive int, got {self.max_words!r}"
            )
        if not math.isfinite(self.min_concreteness):
            raise ConfigError(f"NamingConfig.min_concreteness must be finite, got {self.min_concreteness!r}")
