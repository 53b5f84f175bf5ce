"""Steerable captioner (paper Sec. 4, App. B.6): ClipCap-style prefix captioning over SAE concepts.

The input is a 14x14 grid of joint-space patch features. The INSIGHT captioner reads the SAE
*reconstruction* of those features (``decode(encode(x))``, thresholded codes), the dense baseline
reads ``x`` itself. The grid is average-pooled to 8x8, projected to the adapter width, and a
transformer adapter (8 layers) with 10 learnable queries turns it into 10 prefix embeddings for a
causal language model (default ``gpt2``, any ``AutoModelForCausalLM`` + tokenizer by hub name or
local directory). Decoding is greedy or beam search with a KV cache; both are deterministic.

Steering (editing concept activations before decoding) lives in :mod:`insight_core.concepts.steering`,
training in :mod:`insight_core.training.captioner`, caption metrics in
:mod:`insight_core.evaluation.captions`, LM loading in :mod:`insight_core.models.lm`.

On disk a captioner is a directory: ``config.json`` (:class:`CaptionerConfig` + metadata),
``adapter.safetensors`` and, when the LM was fine-tuned or built locally, ``lm/``
(``save_pretrained(safe_serialization=True)`` + tokenizer); otherwise the LM is referenced by name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from insight_core.atlas.layout import CaptionerLayout
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json, write_safetensors
from insight_core.models.lm import load_lm
from insight_core.models.sae import MatryoshkaSAE
from insight_core.schema import JsonModel, read_file, validate_config

log = logging.getLogger(__name__)

CAPTIONER_FORMAT = "insight-captioner"
BUNDLED_LM = "lm"
"""``config.lm`` of a saved captioner whose LM is bundled in its folder (``CaptionerLayout.lm_dir``)."""

Source = Literal["insight", "dense"]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionerConfig:
    """Architecture of the prefix captioner (paper defaults, App. B.6)."""

    d_in: int = 512
    """Dimension of the input patch features (CLIP ViT-B/16 joint space: 512)."""
    grid: tuple[int, int] = (14, 14)
    """Patch grid of the input features."""
    pooled_grid: tuple[int, int] = (8, 8)
    """Grid after adaptive average pooling; these 64 tokens are the adapter's memory."""
    n_queries: int = 10
    """Learnable queries = length of the LM prefix."""
    n_layers: int = 8
    """Transformer layers of the adapter."""
    n_heads: int = 8
    """Attention heads of the adapter."""
    d_model: int | None = None
    """Adapter width; ``None`` = the LM's hidden size (as ClipCap's transformer mapper)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / d_model in the adapter layers."""
    dropout: float = 0.0
    """Dropout in the adapter during training (none at inference)."""
    lm: str = "gpt2"
    """Causal LM: a Hugging Face hub name or a local ``save_pretrained`` directory."""
    source: Source = "insight"
    """Adapter input: ``"insight"`` = SAE-reconstructed patches, ``"dense"`` = raw patch features."""
    max_caption_tokens: int = 40
    """Training captions are truncated to this many LM tokens (including the end token)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "pooled_grid", tuple(int(g) for g in self.pooled_grid))
        _require(self.d_in >= 1, "d_in", f">= 1, got {self.d_in}")
        _require(len(self.grid) == 2 and min(self.grid) >= 1, "grid", f"two positive ints, got {self.grid}")
        _require(
            len(self.pooled_grid) == 2 and min(self.pooled_grid) >= 1,
            "pooled_grid",
            f"two positive ints, got {self.pooled_grid}",
        )
        _require(self.n_queries >= 1, "n_queries", f">= 1, got {self.n_queries}")
        _require(self.n_layers >= 1, "n_layers", f">= 1, got {self.n_layers}")
        _require(self.n_heads >= 1, "n_heads", f">= 1, got {self.n_heads}")
        if self.d_model is not None:
            _require(
                self.d_model >= 1 and self.d_model % self.n_heads == 0,
                "d_model",
                f"a positive multiple of n_heads={self.n_heads}, got {self.d_model}",
            )
        _require(self.mlp_ratio > 0, "mlp_ratio", f"> 0, got {self.mlp_ratio}")
        _require(0 <= self.dropout < 1, "dropout", f"in [0, 1), got {self.dropout}")
        _require(bool(self.lm), "lm", "a hub name or a local directory, got ''")
        _require(self.source in ("insight", "dense"), "source", f"'insight' or 'dense', got {self.source!r}")
        _require(self.max_caption_tokens >= 2, "max_caption_tokens", f">= 2, got {self.max_caption_tokens}")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "grid": list(self.grid), "pooled_grid": list(self.pooled_grid)}

    @classmethod
    def from_json(cls, doc: Any, source: str | Path = "captioner config") -> CaptionerConfig:
        """The config in a ``config.json``'s ``config`` block (:class:`CheckpointError` naming
        ``source`` and the field when it does not fit)."""
        return validate_config(cls, doc, source, CheckpointError)


class CaptionerFile(JsonModel):
    """``captioner/config.json``, written by :meth:`SteerableCaptioner.save`."""

    format: Literal["insight-captioner"]
    config: dict[str, Any]
    """:class:`CaptionerConfig` fields; ``lm`` is :data:`BUNDLED_LM` when the LM is in ``lm/``."""
    lm_source: str | None = None
    """Where the LM came from (:func:`public_lm_source`)."""
    d_lm: int | None = None
    """Hidden size of the LM (the adapter's output width)."""


def _require(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"CaptionerConfig.{field} must be {expected}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class PrefixAdapter(nn.Module):
    """Pooled patch tokens + learnable queries -> transformer -> ``n_queries`` LM prefix embeddings."""

    def __init__(self, cfg: CaptionerConfig, d_lm: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model or d_lm
        if d % cfg.n_heads:
            raise ConfigError(f"CaptionerConfig.n_heads={cfg.n_heads} must divide the adapter width {d}")
        n_mem = cfg.pooled_grid[0] * cfg.pooled_grid[1]
        self.in_norm = nn.LayerNorm(cfg.d_in)  # features' scale depends on the backbone; normalise it
        self.in_proj = nn.Linear(cfg.d_in, d)
        self.pos_pd = nn.Parameter(torch.randn(n_mem, d) * 0.02)
        self.queries_qd = nn.Parameter(torch.randn(cfg.n_queries, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            int(d * cfg.mlp_ratio),
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_lm)

    def forward(self, tokens_bhwd: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings ``prefix_bqe`` (B, n_queries, d_lm) for patch tokens (B, gh, gw, d_in)."""
        pooled_bpd = F.adaptive_avg_pool2d(tokens_bhwd.permute(0, 3, 1, 2), self.cfg.pooled_grid)
        mem_bpd = self.in_proj(self.in_norm(pooled_bpd.flatten(2).transpose(1, 2))) + self.pos_pd
        queries_bqd = self.queries_qd.expand(tokens_bhwd.shape[0], -1, -1)
        out_bnd = self.layers(torch.cat([queries_bqd, mem_bpd], dim=1))
        return self.out_proj(self.out_norm(out_bnd[:, : self.cfg.n_queries]))


class SteerableCaptioner(nn.Module):
    """Prefix captioner over (SAE-reconstructed) patch features.

    Parameters
    ----------
    cfg
        Architecture and input source.
    lm, tokenizer
        A causal LM and its tokenizer (see :func:`load_lm`).
    sae
        The frozen SAE; required for ``source="insight"`` and for steering.
    adapter
        Existing adapter weights; a fresh (random) one when ``None``.
    """

    def __init__(
        self,
        cfg: CaptionerConfig,
        lm: Any,
        tokenizer: Any,
        sae: MatryoshkaSAE | None = None,
        adapter: PrefixAdapter | None = None,
    ) -> None:
        super().__init__()
        if cfg.source == "insight" and sae is None:
            raise ConfigError("SteerableCaptioner: source='insight' needs the SAE (sae=None given)")
        if sae is not None and sae.cfg.d_in != cfg.d_in:
            raise ConfigError(f"SteerableCaptioner: SAE d_in={sae.cfg.d_in} differs from cfg.d_in={cfg.d_in}")
        self.cfg = cfg
        self.lm: Any = lm  # a transformers causal LM (config, get_input_embeddings, save_pretrained, ...)
        self.tokenizer = tokenizer
        self.sae = sae.requires_grad_(False).eval() if sae is not None else None
        self.adapter = adapter if adapter is not None else PrefixAdapter(cfg, self.d_lm)
        self.eval()

    @classmethod
    def build(
        cls, cfg: CaptionerConfig, sae: MatryoshkaSAE | None = None, *, seed: int = 0
    ) -> SteerableCaptioner:
        """A new captioner: LM loaded by ``cfg.lm``, adapter randomly initialised from ``seed``."""
        lm, tokenizer = load_lm(cfg.lm)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            adapter = PrefixAdapter(cfg, int(lm.config.hidden_size))
        return cls(cfg, lm, tokenizer, sae, adapter)

    # ------------------------------------------------------------------------------------ inputs
    @property
    def d_lm(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def check_patches(self, patches: torch.Tensor, name: str = "patches") -> torch.Tensor:
        """Return ``patches`` as float32 (B, gh, gw, d); accepts (gh, gw, d), (B, gh*gw, d), (gh*gw, d)."""
        gh, gw = self.cfg.grid
        d = self.cfg.d_in
        if not isinstance(patches, torch.Tensor):
            raise ConfigError(f"{name}: expected a torch.Tensor, got {type(patches).__name__}")
        if patches.numel() == 0:
            raise ConfigError(f"{name}: empty tensor {tuple(patches.shape)}; expected patch features")
        x = patches
        if x.ndim == 2 or (x.ndim == 3 and x.shape[:2] == (gh, gw)):
            x = x.unsqueeze(0)
        if x.ndim == 3 and x.shape[1] == gh * gw:
            x = x.reshape(x.shape[0], gh, gw, x.shape[-1])
        if x.ndim != 4 or tuple(x.shape[1:]) != (gh, gw, d) or not x.is_floating_point():
            raise ConfigError(
                f"{name}: expected float patch features shaped (B, {gh}, {gw}, {d}) or ({gh}, {gw}, {d}), "
                f"got {x.dtype} {tuple(patches.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"{name}: contains NaN or inf")
        return x.float()

    @torch.no_grad()
    def reconstruct(self, patches_bhwd: torch.Tensor) -> torch.Tensor:
        """SAE reconstruction ``decode(encode(x))`` of every patch (thresholded codes)."""
        if self.sae is None:
            raise ConfigError("reconstruct: this captioner has no SAE")
        x_nd = patches_bhwd.reshape(-1, self.cfg.d_in)
        return self.sae.decode(self.sae.encode(x_nd)).reshape(patches_bhwd.shape)

    def input_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """What the adapter reads for raw patch features: the SAE reconstruction or the features."""
        x = self.check_patches(patches)
        return self.reconstruct(x) if self.cfg.source == "insight" else x

    # ------------------------------------------------------------------------------------ training
    def caption_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) of ``captions`` + end token, right-padded, and their mask (B, T)."""
        ids = self.tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
        ids = [[*row[: self.cfg.max_caption_tokens - 1], self.eos_id] for row in ids]
        t = max(len(row) for row in ids)
        ids_bt = torch.full((len(ids), t), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask_bt = torch.zeros(len(ids), t, dtype=torch.long)
        for i, row in enumerate(ids):
            ids_bt[i, : len(row)] = torch.tensor(row)
            mask_bt[i, : len(row)] = 1
        return ids_bt, mask_bt

    def loss(self, tokens_bhwd: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Next-token cross-entropy of ``captions`` after the prefix of adapter inputs ``tokens_bhwd``."""
        device = tokens_bhwd.device
        ids_bt, mask_bt = (t.to(device) for t in self.caption_ids(captions))
        prefix_bqe = self.adapter(tokens_bhwd)
        embeds_bte = self.lm.get_input_embeddings()(ids_bt)
        q = self.cfg.n_queries
        attn = torch.cat([mask_bt.new_ones(len(captions), q), mask_bt], dim=1)
        logits_btv = self.lm(inputs_embeds=torch.cat([prefix_bqe, embeds_bte], 1), attention_mask=attn).logits
        pred_btv = logits_btv[:, q - 1 : -1]  # position q-1+t predicts caption token t
        labels_bt = ids_bt.masked_fill(mask_bt == 0, -100)
        return F.cross_entropy(pred_btv.reshape(-1, pred_btv.shape[-1]).float(), labels_bt.reshape(-1))

    # ------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(
        self,
        tokens_bhwd: torch.Tensor,
        *,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> list[str]:
        """Captions for adapter inputs (B, gh, gw, d): greedy (``num_beams=1``) or beam search."""
        if not 1 <= max_new_tokens <= 1000:
            raise ConfigError(f"max_new_tokens must be in [1, 1000], got {max_new_tokens}")
        if not 1 <= num_beams <= 64:
            raise ConfigError(f"num_beams must be in [1, 64], got {num_beams}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
        self.eval()
        prefix_bqe = self.adapter(tokens_bhwd.float())
        decode = _greedy if num_beams == 1 else _beam
        ids = decode(self, prefix_bqe, max_new_tokens, min_new_tokens, num_beams)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def caption(self, patches: torch.Tensor, **kwargs: Any) -> list[str]:
        """Captions of raw patch features (B, gh, gw, d) or (gh, gw, d); see :meth:`generate`."""
        return self.generate(self.input_tokens(patches), **kwargs)

    # ------------------------------------------------------------------------------------ I/O
    def save(self, out_dir: str | Path, *, save_lm: bool, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``adapter.safetensors`` (+ ``lm/`` when ``save_lm``), each atomically."""
        files = CaptionerLayout(Path(out_dir))
        files.root.mkdir(parents=True, exist_ok=True)
        lm_ref = self.cfg.lm
        if save_lm:
            _save_lm_dir(self.lm, self.tokenizer, files.lm_dir)
            lm_ref = BUNDLED_LM
        elif files.lm_dir.is_dir():
            shutil.rmtree(files.lm_dir)  # a stale fine-tuned LM must not shadow the named one
        meta = {"format": CAPTIONER_FORMAT}
        write_safetensors(files.adapter, self.adapter.state_dict(), meta)
        doc = {
            "format": CAPTIONER_FORMAT,
            "config": {**self.cfg.to_json(), "lm": lm_ref},
            "lm_source": public_lm_source(self.cfg.lm, files.root),
            "d_lm": self.d_lm,
            **(extra or {}),
        }
        write_json(files.config, doc)
        return files.root

    @classmethod
    def load(
        cls,
        in_dir: str | Path,
        sae: MatryoshkaSAE | None = None,
        *,
        lm_policy: Callable[[str], str] | None = None,
    ) -> SteerableCaptioner:
        """Read a captioner directory written by :meth:`save`; ``lm`` "lm" means the bundled ``lm/``.

        ``lm_policy`` maps the config's ``lm`` to the name to load or raises (an atlas from elsewhere
        must not choose what is downloaded: ``insight_core.atlas.trust.lm_policy``); None: any name.
        """
        files = CaptionerLayout(Path(in_dir))
        if not files.config.is_file():
            raise CheckpointError(
                f"{files.config}: missing; expected a captioner directory written by the captioner job"
            )
        doc = read_file(CaptionerFile, files.config, CheckpointError, "captioner config")
        cfg = CaptionerConfig.from_json(doc.config, f"{files.config}: config")
        lm_ref = lm_policy(cfg.lm) if lm_policy is not None else cfg.lm
        bundled = lm_ref == BUNDLED_LM
        lm_name = str(files.lm_dir) if bundled else lm_ref
        lm, tokenizer = load_lm(lm_name, local_only=bundled)  # a bundled LM never reaches the Hub
        cfg = dataclasses.replace(cfg, lm=lm_name)
        adapter = PrefixAdapter(cfg, int(lm.config.hidden_size))
        _load_adapter(adapter, files.adapter)
        return cls(cfg, lm, tokenizer, sae, adapter)


def public_lm_source(lm: str, root: Path) -> str | None:
    """Where the LM came from, fit for a published atlas: a Hub name as is, a local folder inside the
    captioner folder relative to it, any other local path dropped (None): it is the builder's machine."""
    local = Path(lm).expanduser()
    if not (local.is_absolute() or lm.startswith((".", "~")) or local.exists()):  # a Hub name
        return lm
    try:
        return local.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def _load_adapter(adapter: PrefixAdapter, path: Path) -> None:
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read adapter weights ({err})") from err
    expected = adapter.state_dict()
    bad = sorted(set(expected) ^ set(state)) + [
        k for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if bad:
        raise CheckpointError(
            f"{path}: adapter tensors do not match the config (first mismatches: {bad[:5]})"
        )
    adapter.load_state_dict(state)


def _save_lm_dir(lm: Any, tokenizer: Any, target: Path) -> None:
    """``save_pretrained`` into a temp folder beside ``target``, then swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------------------------------
# Decoding (KV cache; deterministic)
# --------------------------------------------------------------------------------------------------


def _step(model: SteerableCaptioner, ids_b: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    out = model.lm(
        inputs_embeds=model.lm.get_input_embeddings()(ids_b[:, None]), past_key_values=past, use_cache=True
    )
    return out.logits[:, -1].float(), out.past_key_values


def _no_eos_before(logits_bv: torch.Tensor, step: int, min_new: int, eos: int) -> torch.Tensor:
    if step < min_new:
        logits_bv = logits_bv.clone()
        logits_bv[:, eos] = -math.inf
    return logits_bv


def _greedy(
    model: SteerableCaptioner, prefix_bqe: torch.Tensor, max_new: int, min_new: int, _: int
) -> list[list[int]]:
    eos = model.eos_id
    out = model.lm(inputs_embeds=prefix_bqe, use_cache=True)
    logits_bv, past = out.logits[:, -1].float(), out.past_key_values
    b = prefix_bqe.shape[0]
    ids_bt = torch.empty(b, 0, dtype=torch.long)
    done_b = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new):
        next_b = _no_eos_before(logits_bv, step, min_new, eos).argmax(-1).cpu()
        next_b[done_b] = eos
        ids_bt = torch.cat([ids_bt, next_b[:, None]], 1)
        done_b |= next_b == eos
        if bool(done_b.all()) or step == max_new - 1:
            break
        logits_bv, past = _step(model, next_b.to(prefix_bqe.device), past)
    return [_until_eos(row.tolist(), eos) for row in ids_bt]


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row


def _beam(
    model: SteerableCaptioner, prefix_bqe: torch.Tensor, max_new: int, min_new: int, k: int
) -> list[list[int]]:
    """Beam search per image; final score = sum log-prob / length (length penalty 1, as HF)."""
    eos, b = model.eos_id, prefix_bqe.shape[0]
    out = model.lm(inputs_embeds=prefix_bqe.repeat_interleave(k, 0), use_cache=True)
    logits_nv, past = out.logits[:, -1].float(), out.past_key_values
    v = logits_nv.shape[-1]
    scores_bk = torch.full((b, k), -math.inf)
    scores_bk[:, 0] = 0.0  # all beams start identical: keep one so the first step yields k distinct ones
    seqs_nt = torch.empty(b * k, 0, dtype=torch.long)
    done_n = torch.zeros(b * k, dtype=torch.bool)
    for step in range(max_new):
        logp_nv = F.log_softmax(_no_eos_before(logits_nv, step, min_new, eos), -1).cpu()
        logp_nv[done_n] = -math.inf
        logp_nv[done_n, eos] = 0.0  # a finished beam carries its score forward unchanged
        cand_bkv = scores_bk[:, :, None] + logp_nv.view(b, k, v)
        scores_bk, flat_bk = cand_bkv.view(b, k * v).topk(k, dim=1)
        src_n = ((flat_bk // v) + torch.arange(b)[:, None] * k).reshape(-1)
        tok_n = (flat_bk % v).reshape(-1)
        seqs_nt = torch.cat([seqs_nt[src_n], tok_n[:, None]], 1)
        done_n = done_n[src_n] | (tok_n == eos)
        if bool(done_n.all()) or step == max_new - 1:
            break
        past.reorder_cache(src_n.to(prefix_bqe.device))
        logits_nv, past = _step(model, tok_n.to(prefix_bqe.device), past)
    seqs = [_until_eos(row.tolist(), eos) for row in seqs_nt]
    lengths_bk = torch.tensor(
        [len(s) + (1 if eos in row else 0) for s, row in zip(seqs, seqs_nt.tolist(), strict=False)]
    )
    norm_bk = scores_bk / lengths_bk.view(b, k).clamp_min(1)
    best_b = norm_bk.argmax(1)
    return [seqs[i * k + int(best_b[i])] for i in range(b)]
