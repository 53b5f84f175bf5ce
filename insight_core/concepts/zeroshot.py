"""Zero-shot classification through concepts: any label, explained, no probe needed (issue #11).

As INSIGHT's open-vocabulary segmentation (paper Sec. 4.4), each patch's SAE reconstruction
``x_p = z_p W_dec + b_dec`` is compared with a label's text embedding ``t`` (unit norm) by cosine; an
image's score for the label is the mean over its patches. Because the reconstruction is linear in
the codes, the score splits exactly over concepts::

    score = 1/P sum_p cos(x_p, t) = sum_i a_i (W_dec[i] . t) + (1/P sum_p 1/|x_p|) (b_dec . t),
    a_i = 1/P sum_p z_pi / |x_p|

so concept ``i`` contributes its (norm-weighted) mean activation times ``W_dec[i] . t``, which for
the unit-norm decoder rows of a trained SAE is the cosine between the concept's direction and the
label; the decoder bias term is reported separately. Probabilities are softmax(100 x score), CLIP's
logit scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from insight_core.concepts.contributions import Decision, make_decision
from insight_core.errors import ConfigError
from insight_core.models.sae import MatryoshkaSAE

CLIP_LOGIT_SCALE = 100.0
"""Temperature of CLIP's zero-shot softmax (its learned logit scale, ~100)."""
LABEL_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""Prompt templates for typed labels (CLIP's basic zero-shot prompt)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroShot:
    """Zero-shot scores of one image for a list of labels, split over concepts."""

    labels: list[str]
    scores_l: np.ndarray
    """Mean patch cosine per label."""
    weights_m: np.ndarray
    """``a_i``: norm-weighted mean activation of every concept (see the module docstring)."""
    dots_ml: np.ndarray
    """``W_dec[i] . t_l`` for the active concepts' rows (zeros elsewhere are not stored: see ``active``)."""
    active: np.ndarray
    """Ids of the concepts active on the image (``weights_m[active] > 0``)."""
    bias_l: np.ndarray
    """Decoder-bias part of each label's score."""
    maps_lp: np.ndarray
    """Per-patch cosine of each label (heatmaps)."""
    max_m: np.ndarray
    """Max activation over patches of the active concepts (aligned with ``active``)."""

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.scores_l * CLIP_LOGIT_SCALE), 0).numpy()

    def decision(self, label_index: int) -> Decision:
        """The score of one label split over concepts."""
        if not 0 <= int(label_index) < len(self.labels):
            raise ConfigError(f"label index {label_index} out of range ({len(self.labels)} labels)")
        contrib = self.weights_m[self.active] * self.dots_ml[:, int(label_index)]
        return make_decision(label_index, self.labels[int(label_index)], self.active, contrib, self.max_m,
                             float(self.bias_l[int(label_index)]))  # fmt: skip


@torch.no_grad()
def zero_shot(
    sae: MatryoshkaSAE, codes_pm: torch.Tensor, text_ld: torch.Tensor, labels: list[str]
) -> ZeroShot:
    """Score one image's patches (their SAE codes, (P, m)) against label embeddings (L, d)."""
    if text_ld.ndim != 2 or text_ld.shape[1] != sae.cfg.d_in or len(labels) != text_ld.shape[0]:
        raise ConfigError(
            f"need {len(labels)} label embeddings of dimension {sae.cfg.d_in}, got {tuple(text_ld.shape)}"
        )
    if not labels:
        raise ConfigError("zero-shot needs at least one label")
    dev = sae.W_dec_md.device
    z_pm = codes_pm.to(dev, torch.float32)
    t_ld = torch.nn.functional.normalize(text_ld.to(dev, torch.float32), dim=1)
    active = (z_pm > 0).any(0).nonzero().squeeze(1)  # codes are sparse: decode the active rows only
    z_pa, w_ad = z_pm[:, active], sae.W_dec_md[active]
    recon_pd = z_pa @ w_ad + sae.b_dec_d
    inv_norm_p = 1.0 / recon_pd.norm(dim=1).clamp_min(1e-12)
    n_p = z_pm.shape[0]
    weights_m = torch.zeros(z_pm.shape[1], dtype=torch.float32, device=dev)
    weights_m[active] = (z_pa * inv_norm_p[:, None]).sum(0) / n_p
    dots_ml = w_ad @ t_ld.t()
    bias_l = inv_norm_p.mean() * (sae.b_dec_d @ t_ld.t())
    maps_lp = (recon_pd @ t_ld.t() * inv_norm_p[:, None]).t()
    scores_l = maps_lp.mean(1)
    return ZeroShot(
        labels=list(labels),
        scores_l=scores_l.double().cpu().numpy(),
        weights_m=weights_m.double().cpu().numpy(),
        dots_ml=dots_ml.double().cpu().numpy(),
        active=active.cpu().numpy(),
        bias_l=bias_l.double().cpu().numpy(),
        maps_lp=maps_lp.float().cpu().numpy(),
        max_m=z_pa.amax(0).double().cpu().numpy() if n_p else np.zeros(0),
    )
