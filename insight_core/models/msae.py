"""MSAE: Matryoshka SAE over several TopK sparsity levels (Zaigrajew et al., arXiv 2502.20578).

One dictionary; each input keeps its own top-``k`` pre-activations (per-sample TopK + ReLU, not
BatchTopK), and the loss sums the reconstruction error at every level ``k_1 < ... < k_L`` of
``k_levels``. Because TopK at a smaller ``k`` keeps a prefix of the sorted top ``k_L`` latents, every
level comes from one encoder pass: the top ``k_L`` latents are sorted once and each level's
reconstruction is the previous one plus the next slice of latents (``embedding_bag`` over the decoder
rows, so no dense (B, m) decode per level). The dense encoder product only selects (no autograd); the
gradient reaches the encoder through the selected entries (:class:`SelectedPreActivations`).

What follows the public code (github.com/WolodjaZ/MSAE, ``sae.py`` ``MatryoshkaAutoencoder``,
``train.py``, ``config.py``):

* levels ``nesting_list`` sorted ascending; weights ``relative_importance``: ``"uniform"`` (UW) all 1,
  ``"reverse"`` (RW) ``[L, L-1, ..., 1]`` -- the *sparsest* level weighs most, as their code computes
  (``reversed(range(1, L + 1))``); the loss is the weighted sum divided by the sum of the weights;
* per-level loss: normalised MSE ``mean_b ||x_hat - x||^2 / ||x||^2`` on mean-centred inputs
  (their ``nmse`` with ``mean_center=True``);
* input normalisation: inputs are mean-centred and scaled by a dataset constant. Their code scales by
  ``target_norm / E||x - mu||^2`` with ``target_norm = sqrt(d)``; here the scale makes the mean
  squared norm exactly ``d`` (``sqrt(d / E||x - mu||^2)``), the evident intent. The normalised-MSE loss
  does not depend on the scale, only the optimiser's step sizes do. Mean and scale come from the
  first training batch (their code uses the whole training file);
* decoder rows are kept at unit norm with the parallel gradient removed (their ``scale_to_unit_norm``
  + ``project_grads_decode``). They renormalise before the optimiser step and rescale the encoder to
  compensate; here rows are renormalised after each step (dictionary_learning's order, the shared
  trainer's), so saved rows are exactly unit norm, which the naming and heatmaps assume;
* no soft cap (their MSAE configs leave ``latent_soft_cap`` at 0) and no per-sample ``normalize``.

Saved weights are in *raw feature units*: when training ends the normalisation is folded into the
biases (``b_enc / s``, ``b_dec / s + mean``; codes scale by ``1 / s``, which changes no TopK choice),
exactly as dictionary_learning folds its ``norm_factor``. Everything downstream (``decode``,
``W_dec_md``, ``b_dec_d``) therefore reads an MSAE like a Matryoshka BatchTopK SAE.

Inference: ``encode(x)`` keeps each input's top ``cfg.k`` latents, by default the largest level
(``encode(x, k=16)`` picks another level, or any k); ``threshold="concept"`` uses per-concept
thresholds recorded during training, as for the BatchTopK kind. An MSAE has one Matryoshka *group*
(its nesting is over k, not over dictionary prefixes), so group views show a single group.

Differences from the public training script, all documented in ``docs/msae.md``: Adam with the shared
trainer's schedule (warmup, linear decay from 80 %, automatic batch and lr when not given) instead of
AdamW with an epoch-wise decay; the shared trainer's dead-latent aux loss is on unless
``--aux-alpha 0`` (their code has none); the encoder is initialised tied to the unit-norm decoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json, write_safetensors
from insight_core.models.sae import (
    MatryoshkaSAE,
    SAEConfig,
    ShellLosses,
    ThresholdMode,
    TopKSelection,
    finish_loading,
    read_sae_file,
)

log = logging.getLogger(__name__)

MSAE_FORMAT = "insight-msae-topk"
"""``format`` metadata of an MSAE ``sae.safetensors`` (the BatchTopK kind writes ``SAE_FORMAT``)."""
Weighting = Literal["uniform", "reverse"]
"""Level weights of the MSAE loss: ``uniform`` (UW) or ``reverse`` (RW: L, L-1, ..., 1)."""
DEFAULT_K_LEVELS: tuple[int, ...] = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True, slots=True)
class MSAEConfig(SAEConfig):
    """Architecture of an MSAE (one dictionary, TopK at several k levels)."""

    k: int = 0
    """Inference level: latents kept per input by ``encode``; 0 = the largest of ``k_levels``."""
    group_fractions: tuple[float, ...] = (1.0,)
    """One group: MSAE nests sparsity levels, not dictionary prefixes (must stay ``(1.0,)``)."""
    k_levels: tuple[int, ...] = DEFAULT_K_LEVELS
    """TopK levels whose reconstructions the loss sums (sorted ascending; each <= dict_size)."""
    weighting: Weighting = "uniform"
    """Level weights: ``uniform`` (MSAE UW) or ``reverse`` (MSAE RW, the sparsest level weighs L)."""
    normalize_input: bool = True
    """Train on mean-centred inputs scaled to mean squared norm d (folded into the saved biases)."""

    def __post_init__(self) -> None:
        levels = tuple(sorted({int(k) for k in self.k_levels}))
        object.__setattr__(self, "k_levels", levels)
        if not levels or levels[0] < 1 or levels[-1] > self.dict_size:
            raise ConfigError(
                f"k_levels must be between 1 and dict_size={self.dict_size}, got {list(self.k_levels)}"
            )
        if self.weighting not in get_args(Weighting):
            raise ConfigError(f"weighting must be one of {get_args(Weighting)}, got {self.weighting!r}")
        if tuple(float(f) for f in self.group_fractions) != (1.0,):
            raise ConfigError(
                f"an MSAE has one group: group_fractions must be (1.0,), got {self.group_fractions}"
            )
        if self.k == 0:
            object.__setattr__(self, "k", levels[-1])
        SAEConfig.__post_init__(self)

    @property
    def level_weights(self) -> tuple[float, ...]:
        """Loss weight of each level (their ``relative_importance``)."""
        n = len(self.k_levels)
        return tuple(float(n - i) for i in range(n)) if self.weighting == "reverse" else (1.0,) * n

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "group_fractions": [1.0],
            "k_levels": list(self.k_levels),
            "kind": "msae",
        }


def topk_codes(pre_bm: torch.Tensor, k: int) -> torch.Tensor:
    """Per-input TopK then ReLU (MSAE's ``TopKReLU``): dense (B, m) codes with <= k non-zeros per row."""
    k = min(int(k), pre_bm.shape[1])
    vals, idx = pre_bm.topk(k, dim=1)
    return torch.zeros_like(pre_bm).scatter_(1, idx, vals.clamp_min(0))


class SelectedPreActivations(torch.autograd.Function):
    """``pre[b, idx_bk[b, j]]`` of ``pre = xc W_enc^T + b_enc`` with a sparse backward.

    The forward takes the values already computed by the (no-grad) dense selection pass; the backward
    reaches the encoder through the B*k selected entries only (``embedding_bag`` for the input,
    a sparse (m, B) x (B, d) product for ``W_enc``), O(B k d) instead of two dense O(B m d) products.
    """

    @staticmethod
    def forward(
        ctx: Any, xc_bd: torch.Tensor, w_md: torch.Tensor, b_m: torch.Tensor, idx_bk: torch.Tensor,
        pre_bk: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(xc_bd, w_md, idx_bk)
        return pre_bk.clone()

    @staticmethod
    def backward(ctx: Any, g_bk: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc_bd, w_md, idx_bk = ctx.saved_tensors
        b, k = idx_bk.shape
        m = w_md.shape[0]
        cols, g = idx_bk.reshape(-1), g_bk.reshape(-1).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_bk, w_md, per_sample_weights=g_bk.contiguous(), mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(b, device=idx_bk.device).repeat_interleave(k)
            with warnings.catch_warnings():  # indices valid by construction (as in sparse_shells.py)
                warnings.filterwarnings("ignore", message="Sparse", category=UserWarning)
                sel = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (m, b), check_invariants=False)
                grad_w = torch.sparse.mm(sel, xc_bd)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_x, grad_w, grad_b, None, None


class MSAE(MatryoshkaSAE):
    """Matryoshka SAE over TopK levels; same parameters and interface as :class:`MatryoshkaSAE`.

    Extra buffers ``input_mean_d`` / ``input_scale`` hold the training normalisation; they are the
    identity (0 and 1) once :meth:`finish_training` folded them into the biases, as in every saved file.
    """

    cfg: MSAEConfig
    input_mean_d: torch.Tensor
    input_scale: torch.Tensor
    level_weights_l: torch.Tensor

    def __init__(self, cfg: MSAEConfig, *, seed: int | None = 0) -> None:
        if not isinstance(cfg, MSAEConfig):
            raise ConfigError(f"MSAE needs an MSAEConfig, got {type(cfg).__name__}")
        super().__init__(cfg, seed=seed)
        self.register_buffer("input_mean_d", torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("level_weights_l", torch.tensor(cfg.level_weights), persistent=False)

    # ----------------------------------------------------------------------------------- inference
    @property
    def has_threshold(self) -> bool:
        """An MSAE needs no learned threshold: per-input TopK is batch-independent."""
        return True

    def encode(
        self,
        x_bd: torch.Tensor,
        *,
        use_threshold: bool = True,
        threshold: ThresholdMode = "global",
        k: int | None = None,
    ) -> torch.Tensor:
        """Dense codes (B, m): each input's top ``k`` latents (default ``cfg.k``, the largest level).

        ``threshold="concept"`` keeps each latent above its own recorded threshold instead
        (``use_threshold=False`` has no other meaning for TopK and is accepted for compatibility).
        """
        pre_bm = self.pre_activations(x_bd)
        if use_threshold and threshold == "concept":
            return pre_bm * (pre_bm > self._threshold_for("concept"))
        if threshold not in get_args(ThresholdMode):
            raise ConfigError(f"threshold must be one of {get_args(ThresholdMode)}, got {threshold!r}")
        k = self.cfg.k if k is None else int(k)
        if not 1 <= k <= self.cfg.dict_size:
            raise ConfigError(f"k must be in [1, {self.cfg.dict_size}], got {k}")
        return topk_codes(pre_bm, k)

    @property
    def loss_terms(self) -> tuple[int, ...]:
        """The k levels (one loss term each)."""
        return self.cfg.k_levels

    # ----------------------------------------------------------------------------------- training
    def _normalise(self, x_bd: torch.Tensor) -> torch.Tensor:
        return (x_bd.to(self.W_enc_md.dtype) - self.input_mean_d) * self.input_scale

    @torch.no_grad()
    def init_from_batch(self, x_bd: torch.Tensor) -> list[torch.Tensor]:
        """Input mean and scale from the first training batch (b_dec starts at 0 in normalised
        units, as their ``bias_init_median=False``); returns the tensors to broadcast to other ranks."""
        if self.cfg.normalize_input:
            x = x_bd.double()
            mean = x.mean(0)
            msq = float((x - mean).pow(2).sum(1).mean())
            self.input_mean_d.copy_(mean.float())
            self.input_scale.fill_(math.sqrt(self.cfg.d_in / msq) if msq > 0 else 1.0)
        self.b_dec_d.zero_()
        return [self.input_mean_d, self.input_scale, self.b_dec_d.data]

    def matryoshka_loss(self, x_bd: torch.Tensor, group_weights_g: torch.Tensor | None = None) -> ShellLosses:
        """The MSAE loss: weighted mean over levels of the normalised MSE (see the module docstring).

        ``group_weights_g`` (one weight per level) replaces the config's weighting when given.
        ``shell_mse_g`` holds each level's MSE in raw units (sum over dims, mean over the batch);
        ``selection`` is the largest level's active latents (values in normalised units until
        :meth:`finish_training`); ``residual_bd`` is in normalised units (the aux loss reads it so).
        """
        xn_bd = self._normalise(x_bd)
        levels = self.cfg.k_levels
        xc_bd = xn_bd - self.b_dec_d
        with torch.no_grad():  # dense pass only selects; gradients flow through the selected entries
            top_bk, idx_bk = F.linear(xc_bd, self.W_enc_md, self.b_enc_m).topk(levels[-1], dim=1, sorted=True)
        vals_bk = SelectedPreActivations.apply(xc_bd, self.W_enc_md, self.b_enc_m, idx_bk, top_bk).clamp_min(
            0
        )
        recon_bd = self.b_dec_d.expand_as(xn_bd)
        denom_b = xn_bd.pow(2).sum(1).clamp_min(1e-12)
        scale2 = self.input_scale.pow(2)
        losses, mse = [], []
        start = 0
        for k in levels:
            recon_bd = recon_bd + F.embedding_bag(
                idx_bk[:, start:k], self.W_dec_md, per_sample_weights=vals_bk[:, start:k], mode="sum"
            )
            start = k
            err_b = (recon_bd - xn_bd).pow(2).sum(1)
            losses.append((err_b / denom_b).mean())
            mse.append(err_b.detach().mean() / scale2)
        weights = group_weights_g if group_weights_g is not None else self.level_weights_l
        if weights.numel() != len(levels):
            raise ConfigError(f"{weights.numel()} loss weights for {len(levels)} k levels {list(levels)}")
        loss = (weights.to(vals_bk) * torch.stack(losses)).sum() / weights.sum()
        vals_det = vals_bk.detach()
        active = vals_det > 0
        rows = torch.arange(len(x_bd), device=x_bd.device)[:, None].expand_as(idx_bk)
        sel = TopKSelection(rows_k=rows[active], cols_k=idx_bk[active], vals_k=vals_det[active])
        return ShellLosses(
            loss=loss, shell_mse_g=torch.stack(mse), residual_bd=(xn_bd - recon_bd).detach(), selection=sel
        )

    def aux_loss(
        self, x_bd: torch.Tensor, residual_bd: torch.Tensor, dead_m: torch.Tensor, k_aux: int
    ) -> torch.Tensor:
        """The shared dead-latent aux loss, in the normalised units of the training pass."""
        return super().aux_loss(self._normalise(x_bd), residual_bd, dead_m, k_aux)

    @torch.no_grad()
    def finish_training(self) -> None:
        """Fold the input normalisation into the biases and thresholds (raw feature units)."""
        s = float(self.input_scale)
        if s != 1.0 or bool(self.input_mean_d.any()):
            self.b_enc_m.div_(s)
            self.b_dec_d.div_(s).add_(self.input_mean_d)
            if self.has_learned_global_threshold:
                self.threshold.div_(s)
            ct = self.concept_threshold_m
            ok = (ct >= 0) & torch.isfinite(ct)
            ct[ok] = ct[ok] / s
            self.input_mean_d.zero_()
            self.input_scale.fill_(1.0)

    @property
    def has_learned_global_threshold(self) -> bool:
        return bool(self.threshold >= 0)

    # ----------------------------------------------------------------------------------- I/O
    def dl_state_dict(self) -> dict[str, torch.Tensor]:
        """The BatchTopK kind's tensors (raw units; see :meth:`finish_training`) plus ``k_levels``."""
        if float(self.input_scale) != 1.0 or bool(self.input_mean_d.any()):
            raise CheckpointError("MSAE still holds its training normalisation: call finish_training() first")
        return {**super().dl_state_dict(), "k_levels": torch.tensor(self.cfg.k_levels, dtype=torch.int64)}

    def save(
        self,
        path: str | Path,
        *,
        config_path: str | Path | None = None,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write ``path`` (safetensors; its ``format``/``kind`` metadata say MSAE) and optionally the
        JSON config."""
        path = Path(path)
        meta = {
            "format": MSAE_FORMAT,
            "kind": "msae",
            "config": json.dumps(self.cfg.to_json()),
            **(extra_metadata or {}),
        }
        write_safetensors(path, self.dl_state_dict(), meta)
        if config_path is not None:
            doc = {"format": MSAE_FORMAT, **self.cfg.to_json(), "group_sizes": [self.cfg.dict_size]}
            write_json(config_path, doc)
        return path

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], cfg: MSAEConfig, *, source: str) -> MSAE:
        """Build from tensors with the BatchTopK kind's names (raw units); validates shapes and values."""
        m, d = cfg.dict_size, cfg.d_in
        expected = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
        for name, shape in expected.items():
            if name not in state:
                raise CheckpointError(f"{source}: missing tensor {name!r}; found {sorted(state)}")
            if tuple(state[name].shape) != shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(state[name].shape)}, expected {shape} (d={d}, m={m})"
                )
        sae = cls(cfg, seed=None)
        with torch.no_grad():
            sae.W_enc_md.copy_(state["W_enc"].t().float())
            sae.b_enc_m.copy_(state["b_enc"].float())
            sae.W_dec_md.copy_(state["W_dec"].float())
            sae.b_dec_d.copy_(state["b_dec"].float())
            if "threshold" in state and state["threshold"].numel() == 1:
                sae.threshold.copy_(state["threshold"].float().reshape(()))
        finish_loading(sae, state, source)
        return sae

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> MSAE:
        """Load an MSAE saved by :meth:`save`."""
        path = Path(path)
        state, meta = read_sae_file(path)
        try:
            doc = json.loads(meta["config"])
            cfg = MSAEConfig(
                d_in=int(doc["d_in"]),
                dict_size=int(doc["dict_size"]),
                k=int(doc["k"]),
                k_levels=tuple(int(k) for k in doc["k_levels"]),
                weighting=doc.get("weighting", "uniform"),
                normalize_input=bool(doc.get("normalize_input", True)),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: malformed MSAE 'config' metadata: {err!r}") from err
        except ConfigError as err:
            raise CheckpointError(f"{path}: inconsistent MSAE configuration: {err}") from err
        return cls.from_state(state, cfg, source=str(path)).to(device)


# --------------------------------------------------------------------------------------- importer
_NAME_RE = re.compile(
    r"^(?P<m>\d+)_(?P<d>\d+)_(?P<act>[A-Za-z]+)_(?P<k>\d+)(?:_(?P<w>RW|UW))?_(?P<tied>True|False)_"
    r"(?P<norm>True|False)_(?P<cap>[0-9.]+)"
)


def parse_msae_filename(name: str) -> dict[str, Any]:
    """Settings encoded in a public MSAE checkpoint's file name (``train.py`` writes
    ``{m}_{d}_{activation}_{k}[_RW|_UW]_{tied}_{normalize}_{soft_cap}_{dataset}.pth``); {} if it does
    not match."""
    match = _NAME_RE.match(Path(name).name)
    if not match:
        return {}
    g = match.groupdict()
    return {
        "dict_size": int(g["m"]),
        "d_in": int(g["d"]),
        "activation": g["act"],
        "first_k": int(g["k"]),
        "weighting": {"RW": "reverse", "UW": "uniform"}.get(g["w"] or ""),
        "tied": g["tied"] == "True",
        "normalize": g["norm"] == "True",
        "soft_cap": float(g["cap"]),
    }


def default_nesting(first_k: int, dict_size: int) -> tuple[int, ...]:
    """Their ``train.py`` levels from one k: doubling from ``first_k`` up to ``dict_size`` (included)."""
    levels = [first_k]
    while levels[-1] * 2 <= dict_size:
        levels.append(levels[-1] * 2)
    if levels[-1] != dict_size:
        levels.append(dict_size)
    return tuple(levels)


def import_msae_checkpoint(
    path: str | Path,
    *,
    k_levels: tuple[int, ...] | None = None,
    weighting: Weighting | None = None,
    k: int | None = None,
) -> MSAE:
    """Import a public MSAE checkpoint (``torch.save`` of ``{"model": state_dict, "mean_center": mu,
    "scaling_factor": s, "target_norm": t}``; ``torch.load(weights_only=True)``).

    The state dict holds ``pre_bias`` (d), ``encoder`` (d, m), ``latent_bias`` (m), ``decoder`` (m, d;
    absent when tied: ``encoder.T``) and ``latents_activation_frequency``. Their model reads
    ``(x - mu) * s``; the import folds that in (``b_dec = mu + pre_bias / s``, ``b_enc = latent_bias / s``,
    codes in raw units), so it reads raw embeddings. The levels are not stored: ``k_levels`` default to
    their ``train.py`` rule from the file name's first k (doubling up to m, so the largest level is m,
    i.e. plain ReLU codes); ``k`` (inference level) defaults to the largest level below m when the last
    level is m, since dense ReLU codes make no sparse atlas. A checkpoint with ``normalize=True``
    (per-input standardisation) or a soft cap cannot be folded into a linear SAE and is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"MSAE checkpoint not found: {path}")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    if not isinstance(doc, Mapping) or not isinstance(doc.get("model"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (the MSAE train.py format)")
    sd: Mapping[str, Any] = doc["model"]
    missing = [n for n in ("pre_bias", "encoder", "latent_bias") if n not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing}; found {sorted(sd)}")
    enc = sd["encoder"].float()
    if enc.ndim != 2:
        raise CheckpointError(f"{path}: encoder must be 2-D (d, m), got {tuple(enc.shape)}")
    d, m = enc.shape
    dec = sd["decoder"].float() if sd.get("decoder") is not None else enc.t().contiguous()
    info = parse_msae_filename(path.name)
    if info:
        if (info["d_in"], info["dict_size"]) != (d, m):
            raise CheckpointError(
                f"{path}: file name says d={info['d_in']} m={info['dict_size']}, weights d={d} m={m}"
            )
        if info["normalize"]:
            raise CheckpointError(
                f"{path}: trained with normalize=True (per-input standardisation), not importable"
            )
        if info["soft_cap"] > 0:
            raise CheckpointError(f"{path}: trained with latent_soft_cap={info['soft_cap']}, not importable")
    mean = doc.get("mean_center", 0.0)
    mean_d = mean.float().reshape(-1) if torch.is_tensor(mean) else torch.full((d,), float(mean))
    if mean_d.numel() == 1:
        mean_d = mean_d.expand(d).clone()
    if mean_d.shape != (d,):
        raise CheckpointError(f"{path}: mean_center has shape {tuple(mean_d.shape)}, expected ({d},)")
    s = float(doc.get("scaling_factor", 1.0))
    if not math.isfinite(s) or s <= 0:
        raise CheckpointError(f"{path}: scaling_factor must be a positive number, got {s}")
    if k_levels is None:
        if not info:
            raise CheckpointError(
                f"{path}: the file name does not follow train.py's pattern, so the k levels are unknown; "
                "pass k_levels"
            )
        k_levels = default_nesting(info["first_k"], m)
    levels = tuple(sorted(set(k_levels)))
    if k is None:
        k = levels[-2] if levels[-1] == m and len(levels) > 1 else levels[-1]
    weighting = weighting or (info.get("weighting") if info else None) or "uniform"
    try:
        cfg = MSAEConfig(d_in=d, dict_size=m, k=k, k_levels=levels, weighting=weighting)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    state = {
        "W_enc": enc,
        "b_enc": sd["latent_bias"].float() / s,
        "W_dec": dec,
        "b_dec": mean_d + sd["pre_bias"].float() / s,
    }
    sae = MSAE.from_state(state, cfg, source=str(path))
    norms = dec.norm(dim=1)
    log.info(
        "imported MSAE %s: d=%d m=%d levels %s (%s), inference k=%d; decoder row norms %.3f-%.3f",
        path, d, m, list(levels), weighting, k, float(norms.min()), float(norms.max()),
    )  # fmt: skip
    return sae
