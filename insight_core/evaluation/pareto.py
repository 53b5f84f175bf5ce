"""Sparsity vs reconstruction: FVE, L0 and dead fraction of an SAE at several k (the Pareto frontier).

Every SAE kind is evaluated the same way, without retraining: each input keeps its own top-``k``
pre-activations (TopK + ReLU, batch-independent) for every ``k`` asked for, and the reconstruction
``codes W_dec + b_dec`` is compared with the input.

* For an **MSAE** these are exactly its trained levels (TopK at ``k_levels``), and any other k.
* For the **Matryoshka BatchTopK** kind, per-input TopK at k is the natural inference-time stand-in
  for "the same SAE at another sparsity": its encoder ranks the latents of each input, and TopK keeps
  the k best. It was trained with BatchTopK at one k (mean k per input, varying per input), so TopK at
  its own k is close to, not equal to, its trained rule; its trained rule (the learned global
  threshold; per-concept thresholds when recorded) is therefore reported as extra rows at its
  measured L0.

Figures per row: FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated rows;
L0 = mean active latents per row; dead fraction = latents that never fire on those rows; MSE per row.
A row is on the frontier when no other row has L0 <= and FVE >= with one of them strict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from insight_core.errors import ConfigError
from insight_core.models.msae import MSAE
from insight_core.models.sae import MatryoshkaSAE, ThresholdMode
from insight_core.models.sae_kinds import sae_kind


@dataclasses.dataclass(frozen=True, slots=True)
class ParetoRow:
    """One point of the sparsity / FVE trade-off."""

    rule: str
    """``topk`` (per-input TopK at ``k``), ``global-threshold`` or ``concept-threshold``."""
    k: int | None
    """Latents kept per input (TopK rows); None for threshold rules."""
    fve: float
    """Fraction of variance explained over the evaluated rows."""
    l0: float
    """Mean active latents per row."""
    dead_fraction: float
    """Fraction of latents never active on the evaluated rows."""
    mse: float
    """Mean squared error per row (sum over dims)."""
    trained: bool
    """The SAE was trained at this point (an MSAE level, or the BatchTopK kind's own rule)."""
    on_frontier: bool = False
    """No other row is at least as sparse and at least as accurate (one strictly)."""


def default_ks(sae: MatryoshkaSAE) -> tuple[int, ...]:
    """An MSAE's levels (and its inference k); for the BatchTopK kind, halvings and doublings of its k
    (k/4, k/2, k, 2k, 4k, 8k), all within [1, m]."""
    m = sae.cfg.dict_size
    if isinstance(sae, MSAE):
        ks = {*sae.cfg.k_levels, sae.cfg.k}
    else:
        k = sae.cfg.k
        ks = {max(1, k // 4), max(1, k // 2), k, 2 * k, 4 * k, 8 * k}
    return tuple(sorted(x for x in ks if 1 <= x <= m))


def _frontier(rows: list[ParetoRow]) -> list[ParetoRow]:
    out = []
    for r in rows:
        dominated = any(
            o is not r and o.l0 <= r.l0 and o.fve >= r.fve and (o.l0 < r.l0 or o.fve > r.fve) for o in rows
        )
        out.append(dataclasses.replace(r, on_frontier=not dominated))
    return out


@torch.no_grad()
def sparsity_fve(
    sae: MatryoshkaSAE, x_nd: torch.Tensor, ks: tuple[int, ...] | None = None, batch_size: int = 4096
) -> list[ParetoRow]:
    """FVE, L0 and dead fraction at every k of ``ks`` (default :func:`default_ks`), plus the trained
    threshold rules of the BatchTopK kind; rows sorted by L0."""
    m = sae.cfg.dict_size
    ks = tuple(sorted(set(ks or default_ks(sae))))
    bad = [k for k in ks if not 1 <= k <= m]
    if bad:
        raise ConfigError(f"--k values must be in [1, dict_size={m}], got {bad}")
    if x_nd.ndim != 2 or x_nd.shape[1] != sae.cfg.d_in or len(x_nd) == 0:
        raise ConfigError(f"need rows of dimension {sae.cfg.d_in}, got shape {tuple(x_nd.shape)}")
    device = sae.W_dec_md.device
    w_dec, b_dec = sae.W_dec_md.float(), sae.b_dec_d.float()
    rules: list[str] = []  # the BatchTopK kind's own (trained) inference rules
    if not isinstance(sae, MSAE):
        rules += ["global-threshold"] if sae.has_threshold else []
        rules += ["concept-threshold"] if sae.has_concept_thresholds else []
    n_terms = len(ks) + len(rules)
    sq_err = torch.zeros(n_terms, dtype=torch.float64)
    active = torch.zeros(n_terms, dtype=torch.float64)
    fired = torch.zeros(n_terms, m, dtype=torch.bool, device=device)
    mean_d = x_nd.double().mean(0)
    total_var = float((x_nd.double() - mean_d).pow(2).sum())
    for s in range(0, len(x_nd), batch_size):
        x_bd = x_nd[s : s + batch_size].to(device, torch.float32)
        pre_bm = sae.pre_activations(x_bd).float()
        vals_bk, idx_bk = pre_bm.topk(ks[-1], dim=1, sorted=True)
        vals_bk = vals_bk.clamp_min(0)
        recon_bd, start = b_dec.expand_as(x_bd), 0
        for i, k in enumerate(ks):  # TopK at a smaller k keeps a prefix of the sorted top latents
            recon_bd = recon_bd + F.embedding_bag(
                idx_bk[:, start:k], w_dec, per_sample_weights=vals_bk[:, start:k], mode="sum"
            )
            start = k
            sq_err[i] += float((x_bd - recon_bd).double().pow(2).sum())
            on = vals_bk[:, :k] > 0
            active[i] += float(on.sum())
            fired[i, idx_bk[:, :k][on]] = True
        for j, rule in enumerate(rules, start=len(ks)):
            mode: ThresholdMode = "concept" if rule == "concept-threshold" else "global"
            codes_bm = sae.encode(x_bd, threshold=mode)
            sq_err[j] += float((x_bd - sae.decode(codes_bm)).double().pow(2).sum())
            active[j] += float((codes_bm > 0).sum())
            fired[j] |= (codes_bm > 0).any(0)
    n = len(x_nd)
    trained_k = set(sae.cfg.k_levels) if isinstance(sae, MSAE) else set()
    labels: list[tuple[str, int | None]] = [("topk", k) for k in ks] + [(r, None) for r in rules]
    rows = [
        ParetoRow(
            rule=rule,
            k=k,
            fve=1.0 - float(sq_err[i]) / max(total_var, 1e-12),
            l0=float(active[i]) / n,
            dead_fraction=float((~fired[i]).float().mean()),
            mse=float(sq_err[i]) / n,
            trained=(k in trained_k) if rule == "topk" else True,
        )
        for i, (rule, k) in enumerate(labels)
    ]
    return sorted(_frontier(rows), key=lambda r: (r.l0, r.rule))


def describe(sae: MatryoshkaSAE) -> dict[str, Any]:
    """The SAE's kind and the settings a Pareto report should state."""
    doc: dict[str, Any] = {
        "kind": sae_kind(sae),
        "d_in": sae.cfg.d_in,
        "dict_size": sae.cfg.dict_size,
        "k": sae.cfg.k,
    }
    if isinstance(sae, MSAE):
        doc.update(k_levels=list(sae.cfg.k_levels), weighting=sae.cfg.weighting)
    else:
        doc.update(group_sizes=list(sae.cfg.group_sizes))
    return doc
