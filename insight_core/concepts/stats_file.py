"""The statistics pass's configuration (:class:`StatsConfig`) and its result (:class:`ConceptStats`) with
its file format: ``stats.safetensors`` + ``stats.json``, written by ``save`` and checked by ``load``
(versions 1-4). :mod:`insight_core.concepts.stats` (the streaming pass) builds exactly these tensors
in ``StatsAccumulator.finalize`` and re-exports both classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from insight_core.concepts.cooccurrence import DEFAULT_FLOOR, Cooccurrence
from insight_core.concepts.exemplars import hist_edges, ragged_index, row_ptr, share_rows, shared_slots
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json, write_safetensors

_FORMAT = "insight-concept-stats"
_FORMAT_VERSION = 4
"""2 added the activation histograms and band samples; 3 stores D sparse (CSR: ``D_rowptr_m1``,
``D_cols_e``, ``D_vals_e``) instead of a dense ``D_mm``, and the exemplar codes unpadded (CSR over the
``m * top_w`` exemplar rows: ``ex_code_ptr_g1``, ``ex_code_cols_e``, ``ex_code_vals_e``); 4 stores
each distinct exemplar patch's code once (CSR rows ``g`` sorted by (image, patch) in the same three
tensors) plus ``ex_code_row_mw``, the row of each (concept, rank) slot (-1: empty). Versions 1-3
still load."""
_READABLE_VERSIONS = (1, 2, 3, 4)
_MAX_W_ENTRIES = 1 << 24  # code entries ConceptStats.w_pairs reads at once (~0.4 GiB of temporaries)


@dataclasses.dataclass(frozen=True, slots=True)
class StatsConfig:
    """What the statistics pass keeps besides counts and co-occurrence."""

    top_n: int = 64
    """Exemplar patches kept per concept (highest activations), for the app and thumbnails."""
    top_w: int = 30
    """Top exemplars per concept whose full sparse code is kept, for ``w(i, a)`` (paper App. B.4: 30)."""
    min_activation: float = 0.0
    """A concept counts as active on a patch when its code is strictly greater than this."""
    hist_bins: int = 64
    """Bins of each concept's activation histogram, log-spaced from ``hist_min`` to ``hist_max``."""
    hist_min: float = 1e-4
    """Lower edge of the histograms (smaller activations count in the first bin)."""
    hist_max: float = 1e4
    """Upper edge of the histograms (larger activations count in the last bin)."""
    band_bins: int = 4
    """Histogram bins per sampling band: exemplars across the activation range are sampled per band."""
    band_samples: int = 4
    """Patches sampled (uniformly, deterministically) per concept and band."""
    cooc_floor: float = DEFAULT_FLOOR
    """Co-occurrence entries ``D[j, j'] <`` this are not saved (0: keep every non-zero). It must not
    exceed the family threshold (0.75): see :mod:`insight_core.concepts.cooccurrence` for why no edge,
    name or shown co-occurrence changes, and for the size bound (``m * k_max / floor`` entries)."""

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ConfigError(f"StatsConfig.top_n must be >= 1, got {self.top_n}")
        if not 1 <= self.top_w <= self.top_n:
            raise ConfigError(f"StatsConfig.top_w must be in [1, top_n={self.top_n}], got {self.top_w}")
        if not (np.isfinite(self.min_activation) and self.min_activation >= 0):
            raise ConfigError(
                f"StatsConfig.min_activation must be finite and >= 0, got {self.min_activation}"
            )
        if self.band_bins < 1 or self.hist_bins < 1 or self.hist_bins % self.band_bins:
            raise ConfigError(
                f"StatsConfig.hist_bins ({self.hist_bins}) must be a positive multiple of band_bins "
                f"({self.band_bins})"
            )
        if not (0 < self.hist_min < self.hist_max < float("inf")):
            raise ConfigError(
                f"StatsConfig.hist_min/hist_max must satisfy 0 < hist_min < hist_max < inf, got "
                f"{self.hist_min}, {self.hist_max}"
            )
        if self.band_samples < 1:
            raise ConfigError(f"StatsConfig.band_samples must be >= 1, got {self.band_samples}")
        if not 0.0 <= self.cooc_floor < 1.0:
            raise ConfigError(f"StatsConfig.cooc_floor must be in [0, 1), got {self.cooc_floor}")

    @property
    def n_bands(self) -> int:
        """Sampling bands per concept (``hist_bins / band_bins``)."""
        return self.hist_bins // self.band_bins

    def edges(self) -> np.ndarray:
        """(hist_bins + 1,) histogram bin edges (see :func:`~insight_core.concepts.exemplars.hist_edges`)."""
        return hist_edges(self.hist_bins, self.hist_min, self.hist_max)


# --------------------------------------------------------------------------------------------------
# Result


@dataclasses.dataclass
class ConceptStats:
    """Finalised concept statistics (CPU tensors). ``m`` concepts, ``n = top_n``, ``w = top_w``."""

    freq_patches_m: torch.Tensor
    """(m,) int64: patches where the concept is active."""
    freq_images_m: torch.Tensor
    """(m,) int64: distinct images where the concept is active on at least one patch."""
    mean_act_m: torch.Tensor
    """(m,) float32: mean activation over the patches where it is active (0 if never active)."""
    max_act_m: torch.Tensor
    """(m,) float32: max activation (0 if never active)."""
    cooc: Cooccurrence
    """Eq. 5 co-occurrence confidence ``D[j, j']`` (fraction of j's activation mass on patches where
    j' is active), sparse: entries ``>= cooc.floor``; diagonal 1 for active concepts, empty rows for
    inactive ones. Statistics files with a dense ``D_mm`` (versions 1, 2) load with floor 0."""
    ex_act_mn: torch.Tensor
    """(m, n) float32: top activations per concept, sorted (act desc, image asc, patch asc); NaN pad."""
    ex_image_mn: torch.Tensor
    """(m, n) int64: image id of each exemplar; -1 pad."""
    ex_patch_mn: torch.Tensor
    """(m, n) int64: patch index of each exemplar within its image; -1 pad."""
    ex_code_ptr_g1: torch.Tensor
    """(m * w + 1,) int64: CSR row pointer of the sparse codes of the top-``w`` exemplar patches, one
    row per (concept, rank) at ``g = concept * w + rank`` (empty rows for empty slots). Kept ragged in
    memory as on disk: the busiest exemplar patches (hundreds of active concepts) would make a padded
    (m, w, k_max) table tens of GB at m = 65,536."""
    ex_code_cols_e: torch.Tensor
    """(e,) int32: active concepts of each row, in ascending order."""
    ex_code_vals_e: torch.Tensor
    """(e,) float32: their activations."""
    n_patches: int
    """Patches seen."""
    n_images: int
    """Images seen."""
    config: StatsConfig
    """The configuration of the pass."""
    hist_mb: torch.Tensor | None = None
    """(m, b) int64: activation histogram of each concept over ``b = hist_bins`` log-spaced bins
    (edges: ``config.edges()``). None for statistics files written before histograms (version 1)."""
    band_act_msr: torch.Tensor | None = None
    """(m, s, r) float32: activations of the patches sampled per concept and band (``s = n_bands``
    bands of ``band_bins`` histogram bins, ``r = band_samples``); NaN pad. None in version 1 files."""
    band_image_msr: torch.Tensor | None = None
    """(m, s, r) int64: image id of each band sample; -1 pad."""
    band_patch_msr: torch.Tensor | None = None
    """(m, s, r) int64: patch index of each band sample; -1 pad."""

    @property
    def m(self) -> int:
        """Number of concepts."""
        return int(self.freq_patches_m.shape[0])

    @property
    def D_mm(self) -> torch.Tensor:
        """Dense (m, m) float32 D (entries below ``cooc.floor`` read 0): 4 m^2 bytes, for small m only
        (tests, benchmarks); stages read :attr:`cooc`."""
        return self.cooc.to_dense()

    @property
    def k_max(self) -> int:
        """Most active concepts on a kept exemplar patch (at least 1)."""
        counts = self.ex_code_ptr_g1[1:] - self.ex_code_ptr_g1[:-1]
        return max(1, int(counts.max())) if counts.numel() else 1

    @property
    def ex_code_cols_mwk(self) -> torch.Tensor:
        """Dense (m, w, k_max) int32 exemplar codes (-1 pad): for small m only (tests, version-2 files)."""
        return self._dense_codes()[0]

    @property
    def ex_code_vals_mwk(self) -> torch.Tensor:
        """Dense (m, w, k_max) float32 activations of :attr:`ex_code_cols_mwk` (0 pad); small m only."""
        return self._dense_codes()[1]

    def _dense_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        ptr, m, w, k = self.ex_code_ptr_g1, self.m, self.config.top_w, self.k_max
        counts = ptr[1:] - ptr[:-1]
        rows = torch.repeat_interleave(torch.arange(m * w), counts)
        pos = torch.arange(self.ex_code_cols_e.numel()) - ptr[rows]
        cols = torch.full((m * w, k), -1, dtype=torch.int32)
        vals = torch.zeros((m * w, k), dtype=torch.float32)
        cols[rows, pos], vals[rows, pos] = self.ex_code_cols_e, self.ex_code_vals_e
        return cols.view(m, w, k), vals.view(m, w, k)

    @property
    def n_exemplars_m(self) -> torch.Tensor:
        """(m,) int64: exemplars stored per concept (min(top_n, freq_patches))."""
        return (self.ex_image_mn >= 0).sum(1)

    def w_pairs(
        self, i_idx: Any, a_idx: Any, *, chunk: int = 4096, max_entries: int = _MAX_W_ENTRIES
    ) -> torch.Tensor:
        """``w(i, a)`` for parallel index arrays: mean activation of concept ``a`` over the top-``top_w``
        exemplar patches of concept ``i`` (0 where ``a`` is inactive on a patch; 0 if ``i`` never fired).
        Returns float32 of the broadcast shape of the inputs. Reads the ragged codes in chunks of at
        most ``chunk`` pairs and ``max_entries`` code entries (a pair whose codes alone exceed it runs
        alone), so memory follows the codes actually read."""
        i_t = torch.as_tensor(i_idx, dtype=torch.int64)
        a_t = torch.as_tensor(a_idx, dtype=torch.int64)
        i_t, a_t = torch.broadcast_tensors(i_t, a_t)
        shape = i_t.shape
        i_t, a_t = i_t.reshape(-1), a_t.reshape(-1)
        m = self.m
        for name, t in (("i_idx", i_t), ("a_idx", a_t)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= m):
                raise ConfigError(
                    f"{name} must hold concept ids in [0, {m}), got range [{int(t.min())}, {int(t.max())}]"
                )
        w, ptr = self.config.top_w, self.ex_code_ptr_g1
        n_w = (self.ex_image_mn[:, :w] >= 0).sum(1)
        # concept i's exemplar codes are one contiguous run of entries: [ptr[i * w], ptr[(i + 1) * w])
        lo_p, len_p = ptr[i_t * w], ptr[(i_t + 1) * w] - ptr[i_t * w]
        out = torch.zeros(i_t.numel(), dtype=torch.float32)
        for s, e in _chunks(len_p, chunk, max_entries):
            idx = ragged_index(lo_p[s:e], len_p[s:e])  # the chunk's entries, pair after pair
            pair = torch.repeat_interleave(torch.arange(e - s), len_p[s:e], output_size=idx.numel())
            hit = self.ex_code_cols_e[idx].long() == a_t[s:e][pair]
            total = torch.zeros(e - s, dtype=torch.float64)
            total.index_add_(0, pair[hit], self.ex_code_vals_e[idx][hit].double())
            out[s:e] = total.float() / n_w[i_t[s:e]].clamp_min(1)
        return out.reshape(shape)

    def w(self, i: int, a: int) -> float:
        """``w(i, a)`` for one pair (see :meth:`w_pairs`)."""
        return float(self.w_pairs([i], [a])[0])

    # ---------------------------------------------------------------------------------------- I/O
    def _tensors(self) -> dict[str, torch.Tensor]:
        """What :meth:`save` writes: per-concept tensors, D in CSR, each exemplar patch's code once."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.endswith(("_m", "_mn", "_mb", "_msr")) and getattr(self, f.name) is not None
        }
        c = self.cooc
        out |= {"D_rowptr_m1": c.rowptr_m1, "D_cols_e": c.cols_e, "D_vals_e": c.vals_e}
        return out | self._shared_codes()

    def _shared_codes(self) -> dict[str, torch.Tensor]:
        """The exemplar codes with each distinct (image, patch)'s code stored once (version 4)."""
        w = self.config.top_w
        image_g, patch_g = (t[:, :w].reshape(-1) for t in (self.ex_image_mn, self.ex_patch_mn))
        row_g, ptr, cols, vals = share_rows(
            self.ex_code_ptr_g1, self.ex_code_cols_e, self.ex_code_vals_e, image_g, patch_g
        )
        return {
            "ex_code_row_mw": row_g.view(self.m, w),
            "ex_code_ptr_g1": ptr,
            "ex_code_cols_e": cols,
            "ex_code_vals_e": vals,
        }

    def save(self, tensors_path: str | Path, meta_path: str | Path) -> None:
        """Write the tensors (safetensors) and the counts and config (JSON), each atomically.

        An atlas keeps them at ``AtlasLayout.stats_tensors`` and ``AtlasLayout.stats_meta``.
        """
        tensors = self._tensors()
        write_safetensors(tensors_path, tensors, {"format": _FORMAT})
        doc = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "m": self.m,
            "n_patches": self.n_patches,
            "n_images": self.n_images,
            "k_max": self.k_max,
            "config": dataclasses.asdict(self.config),
            "cooccurrence": {"layout": "csr", "floor": self.cooc.floor, "nnz": self.cooc.nnz},
            "exemplar_codes": {
                "layout": "csr-shared",
                "rows": int(tensors["ex_code_ptr_g1"].numel()) - 1,
                "nnz": int(tensors["ex_code_cols_e"].numel()),
            },
        }
        write_json(meta_path, doc)

    @classmethod
    def load(cls, tensors_path: str | Path, meta_path: str | Path) -> ConceptStats:
        """Read :meth:`save`'s files; raises ``CheckpointError`` naming a missing or malformed file."""
        json_path, st_path = Path(meta_path), Path(tensors_path)
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read concept statistics metadata {json_path}: {e}") from e
        if (
            not isinstance(doc, dict)
            or doc.get("format") != _FORMAT
            or doc.get("version") not in _READABLE_VERSIONS
        ):
            raise CheckpointError(
                f"{json_path} is not a concept statistics file ({_FORMAT} v{_READABLE_VERSIONS})"
            )
        try:
            cfg = StatsConfig(**doc["config"])
            m, k = int(doc["m"]), int(doc["k_max"])
            n_patches, n_images = int(doc["n_patches"]), int(doc["n_images"])
            version = int(doc["version"])
            floor = float(doc["cooccurrence"]["floor"]) if version >= 3 else 0.0
            nnz = int(doc["cooccurrence"]["nnz"]) if version >= 3 else 0
            code_nnz = int(doc["exemplar_codes"]["nnz"]) if version >= 3 else 0
            code_rows = int(doc["exemplar_codes"]["rows"]) if version >= 4 else m * cfg.top_w
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{json_path}: missing or invalid entry: {e}") from e
        try:
            tensors = load_file(str(st_path))
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"cannot read concept statistics tensors {st_path}: {e}") from e
        n, w = cfg.top_n, cfg.top_w
        expected = {
            "freq_patches_m": ((m,), torch.int64),
            "freq_images_m": ((m,), torch.int64),
            "mean_act_m": ((m,), torch.float32),
            "max_act_m": ((m,), torch.float32),
            "ex_act_mn": ((m, n), torch.float32),
            "ex_image_mn": ((m, n), torch.int64),
            "ex_patch_mn": ((m, n), torch.int64),
        }
        if version >= 3:
            expected |= {
                "ex_code_ptr_g1": ((code_rows + 1,), torch.int64),
                "ex_code_cols_e": ((code_nnz,), torch.int32),
                "ex_code_vals_e": ((code_nnz,), torch.float32),
                "D_rowptr_m1": ((m + 1,), torch.int64),
                "D_cols_e": ((nnz,), torch.int32),
                "D_vals_e": ((nnz,), torch.float32),
            }
            if version >= 4:
                expected["ex_code_row_mw"] = ((m, w), torch.int64)
        else:
            expected["D_mm"] = ((m, m), torch.float32)
            expected["ex_code_cols_mwk"] = ((m, w, k), torch.int32)
            expected["ex_code_vals_mwk"] = ((m, w, k), torch.float32)
        if version >= 2:  # activation histograms and band samples
            s, r = cfg.n_bands, cfg.band_samples
            expected |= {
                "hist_mb": ((m, cfg.hist_bins), torch.int64),
                "band_act_msr": ((m, s, r), torch.float32),
                "band_image_msr": ((m, s, r), torch.int64),
                "band_patch_msr": ((m, s, r), torch.int64),
            }
        for name, (shape, dtype) in expected.items():
            t = tensors.get(name)
            if t is None:
                raise CheckpointError(f"{st_path}: missing tensor {name!r}; found {sorted(tensors)}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(
                    f"{st_path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                    f"(m={m}, top_n={n}, top_w={w}, k_max={k} from {json_path.name})"
                )
        if version >= 3:
            cooc = Cooccurrence(m, floor, *(tensors.pop(f"D_{x}") for x in ("rowptr_m1", "cols_e", "vals_e")))
            try:
                cooc.validate(str(st_path))
                check_codes(tensors["ex_code_ptr_g1"], tensors["ex_code_cols_e"], m, k)
                if version >= 4:
                    row_mw = tensors.pop("ex_code_row_mw")
                    check_slots(row_mw, tensors["ex_image_mn"][:, :w], code_rows)
                    tensors |= _expand_codes(row_mw, *(tensors.pop(f"ex_code_{x}") for x in _CODE))
            except ValueError as e:
                raise CheckpointError(f"{st_path}: {e}") from e
        else:  # dense D: keep every non-zero entry, so families, names and rows are unchanged
            cooc = Cooccurrence.from_dense(tensors.pop("D_mm"), floor=0.0)
            tensors |= _pack_codes(tensors.pop("ex_code_cols_mwk"), tensors.pop("ex_code_vals_mwk"))
        fields = {f.name: tensors[f.name] for f in dataclasses.fields(cls) if f.name in tensors}
        return cls(**fields, cooc=cooc, n_patches=n_patches, n_images=n_images, config=cfg)


_CODE = ("ptr_g1", "cols_e", "vals_e")


def _expand_codes(
    row_mw: torch.Tensor, ptr_r1: torch.Tensor, cols_e: torch.Tensor, vals_e: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Version 4's shared codes as the in-memory CSR over the ``m * w`` (concept, rank) slots."""
    start_g, count_g = shared_slots(row_mw.reshape(-1), ptr_r1)
    idx = ragged_index(start_g, count_g)
    return {"ex_code_ptr_g1": row_ptr(count_g), "ex_code_cols_e": cols_e[idx], "ex_code_vals_e": vals_e[idx]}


def check_slots(row_g: torch.Tensor, image_g: torch.Tensor, rows: int) -> None:
    """ValueError unless every filled exemplar slot (image id >= 0) names a stored code row in
    [0, ``rows``) and every empty one holds -1 (version 4's ``ex_code_row_mw``)."""
    filled = image_g >= 0
    if bool((row_g[filled] < 0).any() | (row_g[filled] >= rows).any() | (row_g[~filled] != -1).any()):
        raise ValueError(
            f"ex_code_row_mw must name a code row in [0, {rows}) for every filled top_w exemplar slot "
            "and -1 for every empty one"
        )


def _pack_codes(cols_mwk: torch.Tensor, vals_mwk: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exemplar codes without their padding (file size: ~k per patch, not k_max; 3x smaller at
    m = 65,536), CSR over the ``m * w`` exemplar rows."""
    valid = cols_mwk >= 0
    ptr = torch.zeros(valid.shape[0] * valid.shape[1] + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(valid.reshape(-1, valid.shape[-1]).sum(1), 0)
    return {"ex_code_ptr_g1": ptr, "ex_code_cols_e": cols_mwk[valid], "ex_code_vals_e": vals_mwk[valid]}


def check_codes(ptr: torch.Tensor, cols: torch.Tensor, m: int, k: int | None) -> None:
    """ValueError unless ``ptr`` is a CSR row pointer over ``cols`` (rows of at most ``k`` entries when
    given) and ``cols`` holds concept ids in [0, m)."""
    counts = ptr[1:] - ptr[:-1]
    most = "" if k is None else f" by at most k_max={k} per row"
    bad = bool((counts < 0).any()) or (k is not None and bool((counts > k).any()))
    if ptr.numel() == 0 or int(ptr[0]) != 0 or int(ptr[-1]) != cols.numel() or bad:
        raise ValueError(f"ex_code_ptr_g1 must rise from 0 to {cols.numel()}{most}")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= m):
        raise ValueError(f"ex_code_cols_e must hold concept ids in [0, {m})")


def _chunks(len_p: torch.Tensor, max_pairs: int, max_entries: int) -> list[tuple[int, int]]:
    """Consecutive ``[s, e)`` ranges of pairs with at most ``max_pairs`` pairs and ``max_entries``
    entries each (a single pair over ``max_entries`` gets its own range)."""
    out, s, n = [], 0, int(len_p.numel())
    cum = torch.cumsum(len_p, 0)
    while s < n:
        before = int(cum[s - 1]) if s else 0
        e = int(torch.searchsorted(cum, before + max_entries, right=True))
        e = min(max(e, s + 1), s + max(1, max_pairs), n)
        out.append((s, e))
        s = e
    return out
