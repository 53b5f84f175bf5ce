"""Held-out metrics of a Matryoshka BatchTopK SAE: fraction of variance explained (overall and per
shell), L0, never-active fraction, MSE."""

from __future__ import annotations

from typing import Any

import torch

from insight_core.models.sae import MatryoshkaSAE, ThresholdMode


@torch.no_grad()
def evaluate(
    sae: MatryoshkaSAE, x_nd: torch.Tensor, batch_size: int = 8192, threshold: ThresholdMode = "global"
) -> dict[str, Any]:
    """Held-out metrics: FVE (full and per shell), L0, never-active fraction, relative MSE.

    Uses thresholded (batch-independent) codes -- the global threshold, or per-concept ones with
    ``threshold="concept"`` -- when the SAE has them, otherwise BatchTopK codes.
    """
    thresholded = sae.has_concept_thresholds if threshold == "concept" else sae.has_threshold
    device = next(sae.parameters()).device
    n_groups = len(sae.cfg.group_sizes)
    sq_err_g = torch.zeros(n_groups, dtype=torch.float64)
    l0_total, fired_m = 0.0, torch.zeros(sae.cfg.dict_size, dtype=torch.bool, device=device)
    mean_d = x_nd.double().mean(0)
    total_var = float((x_nd.double() - mean_d).pow(2).sum())
    for s in range(0, len(x_nd), batch_size):
        x_bd = x_nd[s : s + batch_size].to(device, torch.float32)
        codes_bm = sae.encode(x_bd, use_threshold=thresholded, threshold=threshold)
        shells_gbd = sae.shell_reconstructions(codes_bm)
        sq_err_g += (x_bd[None] - shells_gbd).pow(2).sum((1, 2)).double().cpu()
        active = codes_bm > 0
        l0_total += float(active.sum())
        fired_m |= active.any(0)
    n = max(1, len(x_nd))
    fve_g = (1 - sq_err_g / max(total_var, 1e-12)).tolist()
    return {
        "n_eval_rows": len(x_nd),
        "fve": fve_g[-1],
        "fve_per_shell": fve_g,
        "l0": l0_total / n,
        "never_active_fraction": float((~fired_m).float().mean()),
        "mse": float(sq_err_g[-1]) / n,
        "thresholded": thresholded,
        "threshold_mode": threshold,
        "threshold": float(sae.threshold),
    }
