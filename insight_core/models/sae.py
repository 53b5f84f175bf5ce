"""Matryoshka BatchTopK sparse autoencoder (paper Sec. 3.2, App. B.2).

``z_pre = W_enc^T (x - b_dec) + b_enc``; training keeps the top ``B*k`` pre-activations of the whole
batch (BatchTopK), inference keeps those above a learned global ``threshold`` so an image's codes do
not depend on its batch. The dictionary is split into nested groups; the loss sums the
reconstruction error of every prefix ("shell") of groups (Eq. 4).

Inference modes of :meth:`MatryoshkaSAE.encode`:

* ``threshold="global"`` (default): ``z = z_pre * (z_pre > threshold)`` with the learned global
  threshold (dictionary_learning's rule);
* ``threshold="concept"``: the paper's "thresholded variant" (App. B.5): each concept ``i`` has its
  own threshold ``concept_threshold[i]``, the k-th largest (k = 12) activation of that concept
  observed during training, and ``z_i = z_pre_i * (z_pre_i > concept_threshold[i])``;
* ``use_threshold=False``: BatchTopK over the given batch (training behaviour; batch-dependent).

Speed: the dense encoder matmul runs without autograd and only *selects* latents; the selected
activations are recomputed with autograd from gathered encoder rows, and only active latents are
decoded. All shells come from one scatter of the active contributions into per-group partial sums
followed by a cumulative sum over groups, so training costs ~one dense matmul per step instead of
three, plus O(B*k*d) sparse work (:mod:`insight_core.models.sparse_shells`).

Weights live internally as ``(m, d)`` row-major matrices (fast row gathers, and GEMM rows that are
bitwise identical for any batch of >= 8 rows); on disk they use dictionary_learning's
``MatryoshkaBatchTopKSAE`` names and layouts (``W_enc`` d x m, ``W_dec`` m x d, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json, write_safetensors
from insight_core.models.sparse_shells import SparsePlan, SparseShellLoss, TopKSelection

log = logging.getLogger(__name__)

PAPER_GROUP_FRACTIONS: tuple[float, ...] = (0.008, 0.03, 0.06, 0.12, 0.24, 0.542)
"""Nested group size ratios of the paper (App. B.2); the last group takes the remainder."""

SAE_FORMAT = "insight-matryoshka-batchtopk-sae"
ThresholdMode = Literal["global", "concept"]
"""Inference threshold of :meth:`MatryoshkaSAE.encode`: the learned global one or per concept."""
_MIN_GEMM_ROWS = 8  # CPU GEMM picks another kernel below 8 rows; pad so results never depend on batch


@dataclasses.dataclass(frozen=True, slots=True)
class SAEConfig:
    """Architecture of a Matryoshka BatchTopK SAE (paper defaults)."""

    d_in: int = 512
    """Input dimension (CLIP ViT-B/16 joint space: 512)."""
    dict_size: int = 8192
    """Number of latents (concepts) m; expansion factor 16 at d=512."""
    k: int = 12
    """Mean number of active latents per input during training (BatchTopK keeps B*k per batch)."""
    group_fractions: tuple[float, ...] = PAPER_GROUP_FRACTIONS
    """Relative sizes of the nested groups, coarse to fine; must sum to 1."""

    def __post_init__(self) -> None:
        if self.d_in < 1:
            raise ConfigError(f"d_in must be >= 1, got {self.d_in}")
        if self.dict_size < 1:
            raise ConfigError(f"dict_size must be >= 1, got {self.dict_size}")
        if not 1 <= self.k <= self.dict_size:
            raise ConfigError(f"k must be in [1, dict_size={self.dict_size}], got {self.k}")
        fr = tuple(float(f) for f in self.group_fractions)
        object.__setattr__(self, "group_fractions", fr)
        if not fr or any(f <= 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise ConfigError(f"group_fractions must be positive and sum to 1, got {list(fr)}")
        if any(s < 1 for s in self.group_sizes):
            raise ConfigError(
                f"group_fractions {list(fr)} give an empty group for dict_size={self.dict_size}: "
                f"sizes {list(self.group_sizes)}"
            )

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Sizes of the groups; as dictionary_learning: floor each, the last takes the remainder."""
        sizes = [int(f * self.dict_size) for f in self.group_fractions[:-1]]
        return (*sizes, self.dict_size - sum(sizes))

    @property
    def group_ends(self) -> tuple[int, ...]:
        """Exclusive end index of each nested shell (cumulative group sizes)."""
        return tuple(int(e) for e in torch.tensor(self.group_sizes).cumsum(0).tolist())

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "group_fractions": list(self.group_fractions)}


@dataclasses.dataclass(frozen=True, slots=True)
class ShellLosses:
    """Output of :meth:`MatryoshkaSAE.matryoshka_loss` (one training pass)."""

    loss: torch.Tensor
    """Sum over shells of the mean squared reconstruction error (Eq. 4), with autograd."""
    shell_mse_g: torch.Tensor
    """Per-shell mean squared error (sum over dims, mean over batch), detached."""
    residual_bd: torch.Tensor
    """Residual of the full reconstruction, ``x - x_hat``, detached."""
    selection: TopKSelection
    """The latents that were active."""


def batch_topk(pre_bm: torch.Tensor, k: int) -> TopKSelection:
    """Exact BatchTopK: the ``B*k`` largest positive entries of ``pre_bm`` over the whole batch.

    A flat ``topk`` over B*m values is slower than the encoder matmul on CPU. Instead take each row's
    top ``4k`` candidates and select globally among them. A row whose candidates were *all* selected
    may own more (BatchTopK lets busy inputs take many latents), so only those rows get a wider
    candidate set and the selection reruns; once no row is saturated the result is exact.
    """
    b, m = pre_bm.shape
    width = min(m, 4 * k)
    vals, cols = (t.reshape(-1) for t in pre_bm.topk(width, dim=1, sorted=False))
    rows = torch.arange(b, device=pre_bm.device).repeat_interleave(width)
    width_b = torch.full((b,), width, device=pre_bm.device)
    while True:
        top_vals, pos = vals.topk(min(b * k, vals.numel()), sorted=False)
        pos = pos[top_vals > 0]
        saturated_b = (torch.bincount(rows[pos], minlength=b) >= width_b) & (width_b < m)
        if not bool(saturated_b.any()):
            return TopKSelection(rows_k=rows[pos], cols_k=cols[pos], vals_k=vals[pos])
        sat = saturated_b.nonzero().squeeze(1)
        wider = min(m, 4 * int(width_b[sat].max()))
        sub_vals, sub_cols = pre_bm[sat].topk(wider, dim=1, sorted=False)
        keep = ~saturated_b[rows]
        vals = torch.cat([vals[keep], sub_vals.reshape(-1)])
        cols = torch.cat([cols[keep], sub_cols.reshape(-1)])
        rows = torch.cat([rows[keep], sat.repeat_interleave(wider)])
        width_b[sat] = wider


def read_sae_file(path: Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none with ``tensors=False``) and metadata of an SAE safetensors file of any kind;
    one error naming the file."""
    if not path.is_file():
        raise CheckpointError(f"SAE checkpoint not found: {path}")
    try:
        state = load_file(str(path)) if tensors else {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read SAE checkpoint {path}: {err}") from err
    return state, meta


def finish_loading(sae: MatryoshkaSAE, state: Mapping[str, torch.Tensor], source: str) -> MatryoshkaSAE:
    """The end of every SAE kind's loading: per-concept thresholds when the file has them (absent from
    older files and foreign checkpoints), then a check that no parameter is NaN or inf."""
    m = sae.cfg.dict_size
    if "concept_threshold" in state:
        ct = state["concept_threshold"]
        if tuple(ct.shape) != (m,):
            raise CheckpointError(f"{source}: concept_threshold has shape {tuple(ct.shape)}, expected ({m},)")
        with torch.no_grad():
            sae.concept_threshold_m.copy_(ct.float())
    for name, tensor in sae.named_parameters():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: parameter {name} contains NaN or inf values")
    return sae


class MatryoshkaSAE(nn.Module):
    """Matryoshka BatchTopK SAE with a learned inference threshold.

    Parameters are ``W_enc_md`` (encoder rows), ``b_enc_m``, ``W_dec_md`` (unit-norm decoder rows,
    one concept direction each), ``b_dec_d``; buffers ``threshold`` (-1 until learned) and
    ``concept_threshold_m`` (per-concept thresholds of the paper's thresholded variant; -1 until
    recorded by training, +inf for a concept that never fired).
    """

    threshold: torch.Tensor
    concept_threshold_m: torch.Tensor
    group_id_m: torch.Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(cfg.dict_size, cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec_md = nn.Parameter(w_dec)
        self.W_enc_md = nn.Parameter(w_dec.clone())  # tied init, as dictionary_learning
        self.b_enc_m = nn.Parameter(torch.zeros(cfg.dict_size))
        self.b_dec_d = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("concept_threshold_m", torch.full((cfg.dict_size,), -1.0))
        self.register_buffer("group_id_m", self._group_ids(cfg), persistent=False)

    @staticmethod
    def _group_ids(cfg: SAEConfig) -> torch.Tensor:
        sizes = torch.tensor(cfg.group_sizes)
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    # ----------------------------------------------------------------------------------- encoding
    def _check_input(self, x_bd: torch.Tensor) -> None:
        if x_bd.ndim != 2 or x_bd.shape[1] != self.cfg.d_in:
            raise ConfigError(f"SAE input must have shape (batch, {self.cfg.d_in}), got {tuple(x_bd.shape)}")
        if not x_bd.is_floating_point():
            raise ConfigError(f"SAE input must be a floating-point tensor, got {x_bd.dtype}")

    def pre_activations(self, x_bd: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc`` for a batch, shape (B, m)."""
        self._check_input(x_bd)
        x_bd = x_bd.to(self.W_enc_md.dtype)
        n = x_bd.shape[0]
        if n < _MIN_GEMM_ROWS:  # keep one GEMM kernel for every batch size -> batch-independent codes
            pad = x_bd.new_zeros(_MIN_GEMM_ROWS - n, x_bd.shape[1])
            return F.linear(torch.cat([x_bd, pad]) - self.b_dec_d, self.W_enc_md, self.b_enc_m)[:n]
        return F.linear(x_bd - self.b_dec_d, self.W_enc_md, self.b_enc_m)

    @property
    def has_threshold(self) -> bool:
        return bool(self.threshold >= 0)

    @property
    def has_concept_thresholds(self) -> bool:
        """Whether per-concept thresholds were recorded (by training; older files have none)."""
        return bool((self.concept_threshold_m >= 0).all())

    def encode(
        self, x_bd: torch.Tensor, *, use_threshold: bool = True, threshold: ThresholdMode = "global"
    ) -> torch.Tensor:
        """Dense codes (B, m), batch-independent by default.

        Parameters
        ----------
        x_bd
            Inputs (B, d).
        use_threshold
            False: BatchTopK over this batch (training behaviour) instead of a threshold.
        threshold
            ``"global"``: keep pre-activations above the learned global threshold; ``"concept"``:
            above each concept's own threshold (the paper's thresholded variant, App. B.5).
        """
        pre_bm = self.pre_activations(x_bd)
        if use_threshold:
            return pre_bm * (pre_bm > self._threshold_for(threshold))
        sel = batch_topk(pre_bm, self.cfg.k)
        codes = torch.zeros_like(pre_bm)
        codes[sel.rows_k, sel.cols_k] = sel.vals_k
        return codes

    def _threshold_for(self, mode: str) -> torch.Tensor:
        """The threshold (scalar or (m,), >= 0) of an inference mode; clear errors when missing."""
        if mode not in get_args(ThresholdMode):
            raise ConfigError(f"threshold must be one of {get_args(ThresholdMode)}, got {mode!r}")
        if mode == "concept":
            if not self.has_concept_thresholds:
                raise CheckpointError(
                    "this SAE has no per-concept thresholds (saved before they were recorded, or "
                    "imported); retrain it with train-sae, or use threshold='global'"
                )
            return self.concept_threshold_m.clamp_min(0)
        if not self.has_threshold:
            raise CheckpointError(
                "this SAE has no learned inference threshold (threshold < 0); train it past "
                "threshold_start_step or call encode(..., use_threshold=False) for BatchTopK codes"
            )
        return self.threshold.clamp_min(0)

    @property
    def loss_terms(self) -> tuple[int, ...]:
        """One label per term of the training loss: the end of each nested shell (for an MSAE: its
        k levels). ``TrainConfig.group_weights`` gives one weight per term."""
        return self.cfg.group_ends

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, codes_bm: torch.Tensor) -> torch.Tensor:
        """``codes W_dec + b_dec``."""
        return codes_bm.to(self.W_dec_md.dtype) @ self.W_dec_md + self.b_dec_d

    def shell_reconstructions(self, codes_bm: torch.Tensor) -> torch.Tensor:
        """Reconstruction from each nested prefix of groups, shape (G, B, d); the last is the full one."""
        parts, start = [], 0
        for end in self.cfg.group_ends:
            parts.append(codes_bm[:, start:end] @ self.W_dec_md[start:end])
            start = end
        return torch.stack(parts).cumsum(0) + self.b_dec_d

    def forward(self, x_bd: torch.Tensor) -> torch.Tensor:
        """Thresholded reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x_bd))

    # ----------------------------------------------------------------------------------- training
    def matryoshka_loss(self, x_bd: torch.Tensor, group_weights_g: torch.Tensor | None = None) -> ShellLosses:
        """Nested-group loss (Eq. 4) from a single pass; see the module docstring for the method."""
        x_bd = x_bd.to(self.W_enc_md.dtype)
        with torch.no_grad():
            sel = batch_topk(self.pre_activations(x_bd), self.cfg.k)
        plan = SparsePlan.build(sel, x_bd.shape[0], self.cfg.dict_size, self.group_id_m)
        shell_mse_g, residual_bd = SparseShellLoss.apply(
            x_bd, self.W_enc_md, self.b_enc_m, self.W_dec_md, self.b_dec_d, plan
        )
        weights = group_weights_g if group_weights_g is not None else torch.ones_like(shell_mse_g)
        return ShellLosses(
            loss=(weights * shell_mse_g).sum(),
            shell_mse_g=shell_mse_g.detach(),
            residual_bd=residual_bd,
            selection=sel,
        )

    def aux_loss(
        self, x_bd: torch.Tensor, residual_bd: torch.Tensor, dead_m: torch.Tensor, k_aux: int
    ) -> torch.Tensor:
        """Aux loss for dead latents (Eq. B.6): the top ``k_aux`` dead latents per input model the
        residual of the main reconstruction; normalised by the residual's variance (as OpenAI's
        and dictionary_learning's implementations). Cost scales with the number of dead latents."""
        dead_idx = dead_m.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return x_bd.new_zeros(())
        k_aux = min(k_aux, dead_idx.numel())
        pre_bn = F.relu(F.linear(x_bd - self.b_dec_d, self.W_enc_md[dead_idx], self.b_enc_m[dead_idx]))
        top_vals, top_pos = pre_bn.topk(k_aux, dim=1, sorted=False)
        acts_bn = torch.zeros_like(pre_bn).scatter(1, top_pos, top_vals)
        recon_bd = acts_bn @ self.W_dec_md[dead_idx]  # no bias: it models the residual
        err = (residual_bd - recon_bd).pow(2).sum(-1).mean()
        denom = (residual_bd - residual_bd.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        return torch.nan_to_num(err / denom.clamp_min(1e-12))

    @torch.no_grad()
    def init_from_batch(self, x_bd: torch.Tensor) -> list[torch.Tensor]:
        """First training step: b_dec starts at the geometric median of the batch (dictionary_learning).
        Returns the tensors a data-parallel run broadcasts from rank 0."""
        self.b_dec_d.copy_(geometric_median(x_bd.to(self.b_dec_d.dtype)))
        return [self.b_dec_d.data]

    def finish_training(self) -> None:
        """Called once when training ends (an SAE kind that trains in other units converts back here)."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (each latent's direction is W_dec[i])."""
        self.W_dec_md.div_(self.W_dec_md.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row (keeps rows on the sphere)."""
        g = self.W_dec_md.grad
        if g is not None:
            g -= (g * self.W_dec_md).sum(1, keepdim=True) * self.W_dec_md

    # ----------------------------------------------------------------------------------- I/O
    def dl_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with dictionary_learning's ``MatryoshkaBatchTopKSAE`` names and layouts, plus
        ``concept_threshold`` (m,) (this project's per-concept thresholds; -1 = not recorded)."""
        return {
            "W_enc": self.W_enc_md.detach().t().contiguous(),
            "b_enc": self.b_enc_m.detach().clone(),
            "W_dec": self.W_dec_md.detach().clone(),
            "b_dec": self.b_dec_d.detach().clone(),
            "threshold": self.threshold.detach().clone().float(),
            "k": torch.tensor(self.cfg.k, dtype=torch.int32),
            "group_sizes": torch.tensor(self.cfg.group_sizes, dtype=torch.int64),
            "concept_threshold": self.concept_threshold_m.detach().clone().float(),
        }

    @classmethod
    def from_dl_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        *,
        source: str = "<state dict>",
        group_fractions: tuple[float, ...] | None = None,
    ) -> MatryoshkaSAE:
        """Build from a dictionary_learning-style state dict; validates names, shapes and consistency."""
        missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in state]
        if missing:
            raise CheckpointError(f"{source}: missing tensors {missing}; found {sorted(state)}")
        w_enc = state["W_enc"]
        if w_enc.ndim != 2:
            raise CheckpointError(f"{source}: W_enc must be 2-D (d, m), got shape {tuple(w_enc.shape)}")
        d, m = w_enc.shape
        expected = {"b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(state[name].shape)}, expected {shape} "
                    f"(from W_enc {d}x{m})"
                )
        k = int(state["k"].item()) if "k" in state else None
        if k is None:
            raise CheckpointError(f"{source}: no 'k' tensor; pass a checkpoint saved with its top-k value")
        if "group_sizes" in state:
            sizes = [int(s) for s in state["group_sizes"].tolist()]
            if sum(sizes) != m or any(s < 1 for s in sizes):
                raise CheckpointError(f"{source}: group_sizes {sizes} do not partition dict_size={m}")
            fractions = group_fractions or _fractions_for_sizes(sizes, m)
        else:
            fractions = group_fractions or (1.0,)
        try:
            cfg = SAEConfig(d_in=d, dict_size=m, k=k, group_fractions=fractions)
        except ConfigError as err:
            raise CheckpointError(f"{source}: inconsistent configuration: {err}") from err
        if "group_sizes" in state and list(cfg.group_sizes) != sizes:
            raise CheckpointError(f"{source}: group_sizes {sizes} cannot be expressed as fractions of {m}")
        sae = cls(cfg, seed=None)
        with torch.no_grad():
            sae.W_enc_md.copy_(w_enc.t().float())
            sae.b_enc_m.copy_(state["b_enc"].float())
            sae.W_dec_md.copy_(state["W_dec"].float())
            sae.b_dec_d.copy_(state["b_dec"].float())
            if "threshold" in state:
                sae.threshold.copy_(_scalar_threshold(state["threshold"], source))
        return finish_loading(sae, state, source)

    def save(
        self,
        path: str | Path,
        *,
        config_path: str | Path | None = None,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write ``path`` (safetensors, dictionary_learning names; the config in its metadata) and,
        when given, ``config_path``: the config as readable JSON (an atlas's ``sae.json``)."""
        path = Path(path)
        meta = {"format": SAE_FORMAT, "config": json.dumps(self.cfg.to_json()), **(extra_metadata or {})}
        write_safetensors(path, self.dl_state_dict(), meta)
        if config_path is None:
            return path
        config_doc = {
            "format": SAE_FORMAT,
            **self.cfg.to_json(),
            "group_sizes": list(self.cfg.group_sizes),
            "threshold": float(self.threshold),
        }
        write_json(config_path, config_doc)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> MatryoshkaSAE:
        """Load an SAE saved by :meth:`save` (or any safetensors file with dictionary_learning names)."""
        path = Path(path)
        state, meta = read_sae_file(path)  # metadata has the exact group fractions
        if meta.get("kind", "matryoshka") != "matryoshka" or meta.get("format") == "insight-msae-topk":
            raise CheckpointError(
                f"{path} is an SAE of kind {meta.get('kind') or meta.get('format')!r}, not a Matryoshka "
                "BatchTopK SAE: load it with insight_core.models.sae_kinds.load_sae"
            )
        fractions = None
        if "config" in meta:
            try:
                fractions = tuple(json.loads(meta["config"])["group_fractions"])
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{path}: malformed 'config' metadata: {err}") from err
        return cls.from_dl_state_dict(state, source=str(path), group_fractions=fractions).to(device)


def geometric_median(points_nd: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations; a robust centre for b_dec's initial value."""
    guess = points_nd.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points_nd - guess).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points_nd).sum(0) / weights.sum()
        if (new - guess).norm() < tol:
            return new
        guess = new
    return guess


def import_dictionary_learning(path: str | Path, *, norm_factor: float | None = None) -> MatryoshkaSAE:
    """Import a dictionary_learning ``ae.pt`` checkpoint (``torch.load(weights_only=True)``).

    What such checkpoints carry, and how it is handled:

    * the final ``ae.pt`` is the SAE's state dict: ``W_enc`` (d, m), ``b_enc``, ``W_dec`` (m, d),
      ``b_dec``, ``k``, ``threshold`` (the global inference threshold; -1 if never learned) and
      ``group_sizes``. When the run normalised its activations (``normalize_activations=True``:
      inputs divided by a scalar ``norm_factor`` so that their mean squared norm is 1),
      dictionary_learning has already folded the factor into ``b_enc``, ``b_dec`` and
      ``threshold`` before saving, so the SAE reads *raw* features and nothing is rescaled;
    * a mid-training backup ``ae.pt`` is a dict ``{"ae": state_dict, "norm_factor": f, "config":
      ..., "step": ..., "optimizer": ...}`` whose weights are still in normalised units: its biases
      and threshold are multiplied by ``norm_factor`` here, exactly as dictionary_learning does at
      the end of training;
    * ``k`` and the group sizes, when missing from the weights, come from the sibling
      ``config.json`` (``trainer.k``, ``trainer.group_fractions``), which also gives the exact group
      fractions; half-precision weights are read as float32.

    ``norm_factor`` overrides the factor (only needed for a normalised-unit state dict that does not
    record it). The checkpoint's SAE expects the features it was trained on: for the paper's
    released SAE, DINOised CLIP patch features (open_clip ViT-B-16 ``laion2b_s34b_b88k``, bicubic
    resize of the short side to 224 + centre crop, CLIP mean/std, the released MaskCLIP dense path
    pooled by the CLIP-DINOiser head): ``extract``'s defaults with ``--dinoiser last.pt``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"dictionary_learning checkpoint not found: {path}")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    if not isinstance(doc, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(doc).__name__}")
    trainer = _dl_trainer_config(path.parent / "config.json")
    state: dict[str, Any] = dict(doc)
    factor = norm_factor
    if "ae" in doc and isinstance(doc["ae"], Mapping):  # a backup: weights in normalised units
        state = dict(doc["ae"])
        if factor is None and doc.get("norm_factor") is not None:
            factor = float(doc["norm_factor"])
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    if "k" not in state and trainer.get("k") is not None:
        state["k"] = torch.tensor(int(trainer["k"]))
    fractions = trainer.get("group_fractions")
    fractions = tuple(float(f) for f in fractions) if fractions else None
    if factor is not None:
        if not math.isfinite(factor) or factor <= 0:
            raise CheckpointError(f"{path}: norm_factor must be a positive number, got {factor}")
        for name in ("b_enc", "b_dec"):  # dictionary_learning's scale_biases(norm_factor)
            if name in state:
                state[name] = state[name] * factor
        if "threshold" in state and bool((state["threshold"] >= 0).all()):
            state["threshold"] = state["threshold"] * factor
        log.info("%s: normalised-unit weights; biases and threshold scaled by norm_factor %.6g", path, factor)
    sae = MatryoshkaSAE.from_dl_state_dict(state, source=str(path), group_fractions=fractions)
    if not sae.has_threshold:
        log.warning("%s: no learned inference threshold (-1): use encode(..., use_threshold=False)", path)
    log.info(
        "imported %s: d=%d m=%d k=%d groups %s, threshold %.4g",
        path, sae.cfg.d_in, sae.cfg.dict_size, sae.cfg.k, list(sae.cfg.group_sizes), float(sae.threshold),
    )  # fmt: skip
    return sae


def _dl_trainer_config(config_path: Path) -> dict[str, Any]:
    """The ``trainer`` block of a dictionary_learning ``config.json`` ({} when there is none)."""
    if not config_path.is_file():
        return {}
    try:
        trainer = json.loads(config_path.read_text()).get("trainer", {})
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"malformed dictionary_learning config {config_path}: {err}") from err
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{config_path}: malformed dictionary_learning config ('trainer' is no object)")
    return trainer


def _scalar_threshold(t: torch.Tensor, source: str) -> torch.Tensor:
    if t.numel() != 1:
        raise CheckpointError(
            f"{source}: threshold has shape {tuple(t.shape)}; a BatchTopK SAE has one global threshold"
        )
    return t.float().reshape(())


def _fractions_for_sizes(sizes: list[int], m: int) -> tuple[float, ...]:
    """Fractions that reproduce ``sizes`` under the floor-then-remainder rule."""
    fr = [(s + 0.5) / m for s in sizes[:-1]]
    return (*fr, 1.0 - sum(fr))
