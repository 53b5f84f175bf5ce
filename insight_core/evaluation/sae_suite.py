"""SAE quality suite (issue 23): SAEBench's core metrics in vision form, zero-shot recovery through
text, sparse probing, downstream preservation and Moran's-I feature localization, with baselines.

One streaming pass over a feature folder per *codec* (anything with ``encode``/``decode``: the atlas
SAE, a PCA with as many components as the SAE's L0, a random SAE of the same size) accumulates:

- ``fve`` = 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2; ``l0`` = mean active codes per patch;
  ``dead_fraction`` = share of codes never active; ``cosine`` = mean cos(x, x_hat) per patch;
- zero-shot: an image's score for class c is the mean over its patches of cos(x_p, t_c) (the
  Classify tab's rule, :mod:`insight_core.concepts.zeroshot`), the prediction its argmax; computed
  on the original features and on the reconstructions. ``zero_shot_recovered`` = reconstructed /
  original accuracy: the vision analogue of SAEBench's "loss recovered";
- downstream preservation (VISAEBench M3): a multinomial logistic probe (scikit-learn's objective,
  C = 1) trained on mean-pooled original features, evaluated on mean-pooled reconstructions of
  held-out images; the ratio of accuracies, clamped to [0, 2];
- sparse probing (SAEBench): per class, the k latents of the max-pooled codes with the largest
  mean difference (class minus rest, training split) feed a one-vs-rest logistic probe; top-1 accuracy
  is the argmax over the classes' probes on held-out images, per k;
- localization (VISAEBench M1): Moran's I of a latent's activation map over the patch grid
  (8-neighbour weights) on the images where it is active on at least ``min_active_patches`` and at
  most ``max_active_fraction`` of the patches; averaged per latent, then over the latents with at
  least ``min_images_per_latent`` such images (VISAEBench's aggregation, without its subsampling);
- ``fvu`` (VISAEBench M2): Var(x - x_hat) / Var(x) with variances over all scalars (one global mean),
  next to ``fve`` (per-dimension means, SAEBench's explained variance);
- monosemanticity (VISAEBench M5, Pach et al. 2025; :func:`monosemanticity`): per alive latent, the
  activation-weighted mean pairwise cosine of its top images in a *second* backbone's embedding space.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from insight_core.errors import ConfigError
from insight_core.models.sae import MatryoshkaSAE, ThresholdMode


class Codec(Protocol):
    """Something that encodes features into codes and decodes them back (an SAE, a PCA)."""

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes_bm: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True, slots=True)
class SuiteConfig:
    """Settings of the SAE quality suite."""

    probe_ks: tuple[int, ...] = (1, 2, 5, 20)
    """Latents per class of the k-sparse probes (SAEBench's sparse probing)."""
    test_fraction: float = 0.2
    """Share of each class's labelled images held out to score the probes."""
    seed: int = 0
    """Seed of the train/test split and of the random-SAE baseline."""
    probe_l2: float = 1e-3
    """L2 penalty (on the standardised features) of the sparse probes."""
    downstream_c: float = 1.0
    """Inverse L2 strength of the downstream-preservation probe (scikit-learn's C; VISAEBench's 1.0)."""
    probe_iters: int = 100
    """L-BFGS iterations of every logistic probe."""
    min_active_patches: int = 3
    """Moran's I: a (image, latent) pair counts only when the latent fires on this many patches."""
    max_active_fraction: float = 0.9
    """Moran's I: ... and on at most this share of the patches (background latents excluded)."""
    min_images_per_latent: int = 5
    """Moran's I: a latent is scored only with this many counted images (VISAEBench uses 50)."""
    mono_top_k: int = 16
    """Monosemanticity: top-activating images compared per latent (VISAEBench's 16)."""
    mono_max_features: int = 1000
    """Monosemanticity: alive latents scored at most (a seeded random subset beyond; VISAEBench's 1000)."""

    def __post_init__(self) -> None:
        if not self.probe_ks or any(int(k) < 1 for k in self.probe_ks):
            raise ConfigError(f"probe_ks: need positive latent counts, got {self.probe_ks}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.probe_l2 < 0 or self.probe_iters < 1 or self.downstream_c <= 0:
            raise ConfigError("probe_l2 must be >= 0, probe_iters >= 1 and downstream_c > 0")
        if self.min_active_patches < 1 or not 0.0 < self.max_active_fraction <= 1.0:
            raise ConfigError("min_active_patches must be >= 1 and max_active_fraction in (0, 1]")
        if self.min_images_per_latent < 1:
            raise ConfigError(f"min_images_per_latent: must be >= 1, got {self.min_images_per_latent}")
        if self.mono_top_k < 2 or self.mono_max_features < 1:
            raise ConfigError(
                f"mono_top_k must be >= 2 (pairs of images) and mono_max_features >= 1, got "
                f"{self.mono_top_k} and {self.mono_max_features}"
            )


# ------------------------------------------------------------------------------------------ codecs
@dataclasses.dataclass(eq=False)
class SaeCodec:
    """An SAE with thresholded (batch-independent) codes when it has a threshold, else BatchTopK."""

    sae: MatryoshkaSAE
    threshold: ThresholdMode = "global"

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        has = self.sae.has_concept_thresholds if self.threshold == "concept" else self.sae.has_threshold
        return self.sae.encode(x_bd, use_threshold=has, threshold=self.threshold)

    def decode(self, codes_bm: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(codes_bm)


@dataclasses.dataclass(eq=False)
class PcaCodec:
    """Projection on the top principal components: codes = (x - mean) V, x_hat = mean + codes V^T."""

    mean_d: torch.Tensor
    components_dk: torch.Tensor

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        return (x_bd - self.mean_d) @ self.components_dk

    def decode(self, codes_bm: torch.Tensor) -> torch.Tensor:
        return self.mean_d + codes_bm @ self.components_dk.T


def fit_pca(x_nd: torch.Tensor, n_components: int) -> PcaCodec:
    """PCA of the rows of ``x_nd`` (float64 SVD) keeping ``n_components`` (clipped to [1, d])."""
    x = x_nd.double()
    mean_d = x.mean(0)
    k = max(1, min(int(n_components), x.shape[1]))
    _, _, vh_dd = torch.linalg.svd(x - mean_d, full_matrices=False)
    return PcaCodec(mean_d.float(), vh_dd[:k].T.float().contiguous())


# ---------------------------------------------------------------------------------------- one pass
def queen_weights(grid: int) -> torch.Tensor:
    """(P, P) binary 8-neighbour adjacency of a ``grid`` x ``grid`` patch grid (row-major)."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    near = (np.abs(r[:, None] - r[None]) <= 1) & (np.abs(c[:, None] - c[None]) <= 1)
    np.fill_diagonal(near, False)
    return torch.from_numpy(near.astype(np.float32))


@dataclasses.dataclass
class PassResult:
    """What one pass over the features accumulated for one codec."""

    fve: float
    fvu: float
    """VISAEBench's FVU: residual over input variance, each over all scalars."""
    l0: float
    dead_fraction: float
    cosine: float
    n_rows: int
    zs_orig_ic: np.ndarray | None
    """(images, classes) zero-shot scores of the original features (None without text)."""
    zs_recon_ic: np.ndarray | None
    mean_orig_id: np.ndarray
    """(images, d) mean-pooled original features."""
    mean_recon_id: np.ndarray
    max_codes_im: np.ndarray | None
    """(images, m) max-pooled codes (only when asked for)."""
    morans_i: float | None
    """Mean over the scored latents of their mean Moran's I; None when none scored / no square grid."""
    morans_pairs: int
    """Counted (image, latent) pairs."""
    morans_latents: int
    """Scored latents (>= ``min_images_per_latent`` counted images)."""


@torch.no_grad()
def run_pass(
    codec: Codec,
    batches: Iterable[torch.Tensor],
    *,
    text_cd: torch.Tensor | None = None,
    keep_max_codes: bool = False,
    localization: bool = True,
    cfg: SuiteConfig = SuiteConfig(),
) -> PassResult:
    """Stream ``(images, patches, d)`` batches through ``codec`` and accumulate every suite figure."""
    t_cd = None if text_cd is None else torch.nn.functional.normalize(text_cd.float(), dim=1)
    n, sum_d, sum_sq, err, cos_sum, l0 = 0, None, 0.0, 0.0, 0.0, 0.0
    res_sum = 0.0
    fired: torch.Tensor | None = None
    zs_o, zs_r, mo, mr, mx = [], [], [], [], []
    mor_sum: torch.Tensor | None = None
    mor_cnt: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    for x_bpd in batches:
        b, p, d = x_bpd.shape
        x = x_bpd.reshape(b * p, d).float()
        z = codec.encode(x)
        xh = codec.decode(z)
        sum_d = x.double().sum(0) if sum_d is None else sum_d + x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        err += float((x - xh).double().pow(2).sum())
        res_sum += float((x - xh).double().sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(x, xh, dim=1, eps=1e-12).double().sum())
        active = z != 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
        n += b * p
        if t_cd is not None:
            zs_o.append(_patch_cos_mean(x, t_cd, b, p))
            zs_r.append(_patch_cos_mean(xh, t_cd, b, p))
        mo.append(x.reshape(b, p, d).mean(1).cpu())
        mr.append(xh.reshape(b, p, d).mean(1).cpu())
        z_bpm = z.reshape(b, p, -1)
        if keep_max_codes:
            mx.append(z_bpm.amax(1).cpu())
        if localization and math.isqrt(p) ** 2 == p and p > 1:
            if weights is None:
                weights = queen_weights(math.isqrt(p)).to(x.device)
                mor_sum = torch.zeros(z.shape[1], dtype=torch.float64)
                mor_cnt = torch.zeros(z.shape[1], dtype=torch.int64)
            s, c = _morans_batch(z_bpm, weights, cfg)
            mor_sum += s  # type: ignore[operator]
            mor_cnt += c  # type: ignore[operator]
    if n == 0 or sum_d is None or fired is None:
        raise ConfigError("the feature folder holds no patches")
    total_var = sum_sq - float(sum_d.pow(2).sum()) / n
    n_scalars = n * sum_d.numel()
    scalar_var_x = sum_sq / n_scalars - (float(sum_d.sum()) / n_scalars) ** 2
    scalar_var_res = err / n_scalars - (res_sum / n_scalars) ** 2
    counted = int(mor_cnt.sum()) if mor_cnt is not None else 0
    scored = (mor_cnt >= cfg.min_images_per_latent) if mor_cnt is not None else None
    n_scored = int(scored.sum()) if scored is not None else 0
    return PassResult(
        fve=1.0 - err / max(total_var, 1e-12),
        fvu=scalar_var_res / max(scalar_var_x, 1e-12),
        l0=l0 / n,
        dead_fraction=float((~fired).float().mean()),
        cosine=cos_sum / n,
        n_rows=n,
        zs_orig_ic=torch.cat(zs_o).numpy() if zs_o else None,
        zs_recon_ic=torch.cat(zs_r).numpy() if zs_r else None,
        mean_orig_id=torch.cat(mo).numpy(),
        mean_recon_id=torch.cat(mr).numpy(),
        max_codes_im=torch.cat(mx).numpy() if mx else None,
        morans_i=_per_latent_mean(mor_sum, mor_cnt, scored) if n_scored else None,
        morans_pairs=counted,
        morans_latents=n_scored,
    )


def _per_latent_mean(sum_m: Any, cnt_m: Any, scored_m: Any) -> float:
    return float((sum_m[scored_m] / cnt_m[scored_m]).mean())


def _patch_cos_mean(x_nd: torch.Tensor, t_cd: torch.Tensor, b: int, p: int) -> torch.Tensor:
    """Mean over each image's patches of cos(patch, class text): (b, classes)."""
    cos_nc = torch.nn.functional.normalize(x_nd, dim=1, eps=1e-12) @ t_cd.to(x_nd.device).T
    return cos_nc.reshape(b, p, -1).mean(1).double().cpu()


def _morans_batch(
    z_bpm: torch.Tensor, w_pp: torch.Tensor, cfg: SuiteConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of Moran's I and pair counts per latent over the valid (image, latent) pairs of a batch."""
    m = z_bpm.shape[2]
    sums, counts = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.int64)
    live = (z_bpm != 0).any(1).any(0).nonzero().squeeze(1)  # codes are sparse: only live latents
    if live.numel() == 0:
        return sums, counts
    z = z_bpm[:, :, live].double()
    b, p, a = z.shape
    g = math.isqrt(p)
    n_active = (z != 0).sum(1)
    zc = z - z.mean(1, keepdim=True)
    denom = zc.pow(2).sum(1)
    # W @ zc as the sum of the 8 shifted grids (W is the 8-neighbour adjacency): O(8P) instead of O(P^2)
    padded = torch.zeros(b, g + 2, g + 2, a, dtype=zc.dtype, device=zc.device)
    padded[:, 1:-1, 1:-1] = zc.reshape(b, g, g, a)
    neigh = sum(
        padded[:, 1 + dr : 1 + dr + g, 1 + dc : 1 + dc + g]
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if dr or dc
    )
    numer = (zc * torch.as_tensor(neigh).reshape(b, p, a)).sum(1)
    mi = (p / float(w_pp.sum())) * numer / denom.clamp_min(1e-12)
    ok = (n_active >= cfg.min_active_patches) & (n_active <= cfg.max_active_fraction * p) & (denom > 1e-12)
    sums[live.cpu()] = torch.where(ok, mi, 0.0).sum(0).cpu()
    counts[live.cpu()] = ok.sum(0).cpu()
    return sums, counts


# ------------------------------------------------------------------------------- label-based metrics
def split_indices(y_n: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split: per class, ``round(test_fraction * n_c)`` images (at least one
    when the class has two or more) are held out; classes with one image stay in training."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y_n):
        idx = rng.permutation(np.flatnonzero(y_n == c))
        n_test = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(test_fraction * idx.size)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def zero_shot_accuracy(scores_nc: np.ndarray, y_n: np.ndarray) -> float:
    """Share of images whose highest-scoring class is their label."""
    return float((scores_nc.argmax(1) == y_n).mean())


def fit_softmax_probe(
    x_nf: np.ndarray, y_n: np.ndarray, n_classes: int, cfg: SuiteConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the raw features (L-BFGS): (W_fc, b_c, mu, sd).

    The objective is scikit-learn's ``LogisticRegression(C=downstream_c)`` (VISAEBench's probe): mean
    cross-entropy + ||W||^2 / (2 C n), intercept unpenalised; ``mu``/``sd`` are the identity transform.
    """
    x = torch.from_numpy(np.asarray(x_nf, dtype=np.float64))
    y = torch.from_numpy(np.asarray(y_n, dtype=np.int64))
    mu, sd = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    penalty = 1.0 / (2.0 * cfg.downstream_c * max(1, len(y)))
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=cfg.probe_iters * 5,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + penalty * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def probe_predict(probe: tuple[torch.Tensor, ...], x_nf: np.ndarray) -> np.ndarray:
    w, b, mu, sd = probe
    x = torch.from_numpy(np.asarray(x_nf, dtype=np.float64))
    return (((x - mu) / sd) @ w + b).argmax(1).numpy()


def downstream_preservation(
    orig_nd: np.ndarray,
    recon_nd: np.ndarray,
    y_n: np.ndarray,
    n_classes: int,
    cfg: SuiteConfig,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """VISAEBench M3: probe trained on original pooled features, scored on held-out originals and on
    their reconstructions; ``preservation`` = reconstructed / original accuracy, clamped to [0, 2].
    ``split``: (train, test) indices, default :func:`split_indices`."""
    train, test = split if split is not None else split_indices(y_n, cfg.test_fraction, cfg.seed)
    if test.size == 0:
        return {"downstream_preservation": None, "reason": "no class has two labelled images"}
    probe = fit_softmax_probe(orig_nd[train], y_n[train], n_classes, cfg)
    acc_o = float((probe_predict(probe, orig_nd[test]) == y_n[test]).mean())
    acc_r = float((probe_predict(probe, recon_nd[test]) == y_n[test]).mean())
    ratio = None if acc_o == 0 else float(min(2.0, max(0.0, acc_r / acc_o)))
    return {"downstream_preservation": ratio, "downstream_accuracy_original": acc_o,
            "downstream_accuracy_reconstructed": acc_r, "downstream_test_images": int(test.size)}  # fmt: skip


def rank_latents(codes_nm: np.ndarray, y_n: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes, m) latents of each class by decreasing mean difference (class minus rest)."""
    codes = torch.from_numpy(np.asarray(codes_nm, dtype=np.float64))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y_n), n_classes).double()
    n_c = onehot.sum(0).clamp_min(1)
    mean_cm = (onehot.T @ codes) / n_c[:, None]
    rest_cm = (codes.sum(0)[None] - onehot.T @ codes) / (len(y_n) - onehot.sum(0)).clamp_min(1)[:, None]
    return torch.argsort(-(mean_cm - rest_cm), dim=1, stable=True).numpy()


def sparse_probing(codes_nm: np.ndarray, y_n: np.ndarray, n_classes: int, cfg: SuiteConfig) -> dict[str, Any]:
    """SAEBench sparse probing, per k: one-vs-rest k-sparse logistic probes (all classes fitted at once),
    ``top1_accuracy`` (argmax over the class probes) and ``binary_accuracy`` (mean over classes) on
    held-out images."""
    train, test = split_indices(y_n, cfg.test_fraction, cfg.seed)
    if test.size == 0:
        return {}
    order_cm = rank_latents(codes_nm[train], y_n[train], n_classes)
    out: dict[str, Any] = {}
    for k in sorted({min(int(k), codes_nm.shape[1]) for k in cfg.probe_ks}):
        logits_tc = _ovr_probes(codes_nm, y_n, n_classes, order_cm[:, :k], train, test, cfg)
        pos_tc = np.eye(n_classes, dtype=bool)[y_n[test]]
        out[str(k)] = {
            "top1_accuracy": float((logits_tc.argmax(1) == y_n[test]).mean()),
            "binary_accuracy": float(((logits_tc > 0) == pos_tc).mean(0).mean()),
        }
    return out


def _ovr_probes(
    codes_nm: np.ndarray, y_n: np.ndarray, n_classes: int, sel_ck: np.ndarray,
    train: np.ndarray, test: np.ndarray, cfg: SuiteConfig,
) -> np.ndarray:  # fmt: skip
    """Fit every class's binary probe on its own k latents; (test images, classes) logits."""
    x = torch.from_numpy(np.asarray(codes_nm, dtype=np.float64))
    sel = torch.from_numpy(sel_ck)
    xtr_ctk = x[train][:, sel].permute(1, 0, 2)  # (classes, train, k)
    mu_ck, sd_ck = xtr_ctk.mean(1), xtr_ctk.std(1, unbiased=False).clamp_min(1e-6)
    xs_ctk = (xtr_ctk - mu_ck[:, None]) / sd_ck[:, None]
    tgt_ct = torch.from_numpy(np.eye(n_classes)[y_n[train]].T.copy())
    w = torch.zeros(sel.shape, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=cfg.probe_iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("ctk,ck->ct", xs_ctk, w) + b[:, None]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, tgt_ct, reduction="none")
        loss = bce.mean(1).sum() + cfg.probe_l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    xte_ctk = (x[test][:, sel].permute(1, 0, 2) - mu_ck[:, None]) / sd_ck[:, None]
    return (torch.einsum("ctk,ck->ct", xte_ctk, w.detach()) + b.detach()[:, None]).T.numpy()


# --------------------------------------------------------------------------------- monosemanticity
EmbedFn = Callable[[np.ndarray], np.ndarray]
"""Sorted, unique image indices (u,) -> their evaluator embeddings (u, e); a row with a NaN marks an
image that could not be embedded (it then counts with weight 0)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Monosemanticity:
    """VISAEBench's M5 of one SAE (:func:`monosemanticity`)."""

    value: float | None
    """Mean score over the scored latents (None when none could be scored)."""
    latents_s: np.ndarray
    """Ids of the scored latents (ascending)."""
    scores_s: np.ndarray
    """Their scores: weighted mean pairwise cosine of their top images, in [-1, 1]."""
    n_alive: int
    """Latents active on at least one image."""
    n_images: int
    """Images the evaluator embedded (positive weight in some scored latent's top images)."""
    n_failed: int
    """Of those, images the evaluator could not embed (NaN rows)."""


def monosemanticity(
    codes_nm: np.ndarray,
    embed: EmbedFn | np.ndarray,
    *,
    top_k: int = 16,
    max_features: int = 1000,
    seed: int = 0,
) -> Monosemanticity:
    """Monosemanticity with a second backbone as evaluator (VISAEBench M5, Pach et al. 2025).

    For each alive latent j (max over images > 0; a seeded random ``max_features`` of them when there
    are more): its ``top_k`` images by activation (ties: lower image index first), weights
    ``w = (a - min_j) / (max_j - min_j)`` (min and max over all images), and
    ``MS_j = sum_{a<b} w_a w_b cos(e_a, e_b) / sum_{a<b} w_a w_b`` over the images' evaluator
    embeddings ``e``. Latents with fewer than two positively weighted top images are not scored.

    Parameters
    ----------
    codes_nm
        Per-image pooled codes (images, m): VISAEBench max-pools each image's patch codes.
    embed
        The evaluator: an (images, e) array, or a function of image indices (see :data:`EmbedFn`),
        called once with exactly the images that carry weight. Embeddings are L2-normalised here.
    """
    codes = np.asarray(codes_nm)  # (images, m) float32 stays float32: only the scored columns go float64
    if codes.ndim != 2 or codes.shape[0] == 0 or not np.issubdtype(codes.dtype, np.number):
        raise ConfigError(
            f"monosemanticity: codes must be (images, latents) with images > 0, got {codes.shape}"
        )
    if top_k < 2 or max_features < 1:
        raise ConfigError(
            f"monosemanticity: top_k must be >= 2 and max_features >= 1, got {top_k}, {max_features}"
        )
    hi_m, lo_m = codes.max(0).astype(np.float64), codes.min(0).astype(np.float64)
    alive = np.flatnonzero(hi_m > 0)
    latents = alive
    if alive.size > max_features:
        latents = np.sort(np.random.default_rng(seed).choice(alive, size=max_features, replace=False))
    cols_ns = codes[:, latents].astype(np.float64)
    k = min(top_k, codes.shape[0])
    top_sk = np.argsort(-cols_ns, axis=0, kind="stable")[:k].T
    span_s = hi_m[latents] - lo_m[latents]
    span_s[span_s == 0] = 1.0  # a constant latent: every weight 0, not scored
    w_sk = (np.take_along_axis(cols_ns.T, top_sk, axis=1) - lo_m[latents, None]) / span_s[:, None]
    needed = np.unique(top_sk[w_sk > 0])
    emb_ue, failed = _evaluator_embeddings(embed, needed, codes.shape[0])
    pos_sk = np.clip(np.searchsorted(needed, top_sk), 0, max(needed.size - 1, 0))
    if needed.size:
        w_sk = np.where(failed[pos_sk] | (w_sk <= 0), 0.0, w_sk)
    scores_s = np.full(latents.size, np.nan)
    for chunk in range(0, latents.size, 256):  # (latents, k, e) in slices: bounded memory
        sl = slice(chunk, chunk + 256)
        scores_s[sl] = _weighted_pair_cosine(emb_ue[pos_sk[sl]], w_sk[sl])
    ok = np.isfinite(scores_s)
    return Monosemanticity(
        value=float(scores_s[ok].mean()) if ok.any() else None,
        latents_s=latents[ok],
        scores_s=scores_s[ok],
        n_alive=int(alive.size),
        n_images=int(needed.size),
        n_failed=int(failed.sum()),
    )


def _evaluator_embeddings(
    embed: EmbedFn | np.ndarray, needed: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings (u, e) of the ``needed`` images (failed rows zero) and the failed mask (u,)."""
    if isinstance(embed, np.ndarray):
        if embed.ndim != 2 or embed.shape[0] != n:
            raise ConfigError(
                f"monosemanticity: embeddings must be ({n}, e) (one per image), got {embed.shape}"
            )
        raw = embed[needed]
    else:
        raw = np.asarray(embed(needed)) if needed.size else np.zeros((0, 1))
        if raw.ndim != 2 or raw.shape[0] != needed.size:
            raise ConfigError(
                f"monosemanticity: the evaluator returned {raw.shape} for {needed.size} images, "
                "expected (u, e)"
            )
    emb = np.asarray(raw, dtype=np.float64)
    failed = np.asarray(~np.isfinite(emb).all(axis=1), dtype=bool)
    emb = np.where(failed[:, None], 0.0, emb)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if emb.shape[0] == 0:
        emb = np.zeros((1, emb.shape[1]))  # gathers of weight-0 slots need one row
    return emb, failed


def _weighted_pair_cosine(e_ske: np.ndarray, w_sk: np.ndarray) -> np.ndarray:
    """Per latent, sum_{a<b} w_a w_b cos(e_a, e_b) / sum_{a<b} w_a w_b (NaN without a weighted pair)."""
    k = w_sk.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    cos_skk = np.einsum("ske,sle->skl", e_ske, e_ske)
    ww_skk = w_sk[:, :, None] * w_sk[:, None, :]
    numer = (cos_skk * ww_skk)[:, upper].sum(1)
    pairs = (w_sk > 0).sum(1) >= 2
    denom = ww_skk[:, upper].sum(1)
    return np.where(pairs, numer / np.where(pairs, denom, 1.0), np.nan)


# ------------------------------------------------------------------------------------ the whole suite
def core_figures(r: PassResult) -> dict[str, Any]:
    return {"fve": r.fve, "fvu": r.fvu, "l0": r.l0, "dead_fraction": r.dead_fraction, "cosine": r.cosine}


def zero_shot_figures(r: PassResult, rows: np.ndarray, y_n: np.ndarray) -> dict[str, Any]:
    """``zero_shot_accuracy`` (original), ``..._reconstructed`` and their ratio ``zero_shot_recovered``."""
    if r.zs_orig_ic is None or r.zs_recon_ic is None:
        return {}
    acc_o = zero_shot_accuracy(r.zs_orig_ic[rows], y_n)
    acc_r = zero_shot_accuracy(r.zs_recon_ic[rows], y_n)
    return {"zero_shot_accuracy": acc_o, "zero_shot_accuracy_reconstructed": acc_r,
            "zero_shot_recovered": None if acc_o == 0 else acc_r / acc_o}  # fmt: skip


def label_figures(
    r: PassResult, rows: np.ndarray, y_n: np.ndarray, n_classes: int, cfg: SuiteConfig, *, sparse: bool
) -> dict[str, Any]:
    """Zero-shot, downstream preservation and (``sparse``) sparse probing of the labelled images."""
    out = zero_shot_figures(r, rows, y_n)
    out.update(downstream_preservation(r.mean_orig_id[rows], r.mean_recon_id[rows], y_n, n_classes, cfg))
    if sparse and r.max_codes_im is not None:
        out["sparse_probing"] = sparse_probing(r.max_codes_im[rows], y_n, n_classes, cfg)
    return out


def localization_figures(r: PassResult) -> dict[str, Any]:
    return {"localization_morans_i": r.morans_i, "localization_pairs": r.morans_pairs,
            "localization_latents": r.morans_latents}  # fmt: skip


def class_count_check(classes: Sequence[str], text_cd: torch.Tensor | None, d: int) -> None:
    if text_cd is not None and (text_cd.ndim != 2 or text_cd.shape != (len(classes), d)):
        raise ConfigError(
            f"class embeddings: need ({len(classes)}, {d}) (one per class, the feature dimension), "
            f"got {tuple(text_cd.shape)}"
        )
