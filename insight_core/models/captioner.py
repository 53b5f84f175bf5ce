"""Steerable captioner (paper Sec. 4, App. B.6): ClipCap-style prefix captioning over SAE concepts.

The input is a 14x14 grid of joint-space patch features. The INSIGHT captioner reads the SAE
*reconstruction* of those features (``decode(encode(x))``, thresholded codes), the dense baseline
reads ``x`` itself. The grid is average-pooled to 8x8, projected to the adapter width, and a
transformer adapter (8 layers) with 10 learnable queries turns it into 10 prefix embeddings for a
causal language model (default ``gpt2``, any ``AutoModelForCausalLM`` + tokenizer by hub name or
local directory). Decoding is greedy or beam search with a KV cache; both are deterministic.

Steering (editing concept activations before decoding) lives in :mod:`insight_core.concepts.steering`.

On disk a captioner is a directory: ``config.json`` (:class:`CaptionerConfig` + metadata),
``adapter.safetensors`` and, when the LM was fine-tuned or built locally, ``lm/``
(``save_pretrained(safe_serialization=True)`` + tokenizer); otherwise the LM is referenced by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from insight_core.atlas.layout import CaptionerLayout
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json, write_safetensors
from insight_core.models.sae import MatryoshkaSAE

log = logging.getLogger(__name__)

CAPTIONER_FORMAT = "insight-captioner"
BUNDLED_LM = "lm"
"""``config.lm`` of a saved captioner whose LM is bundled in its folder (``CaptionerLayout.lm_dir``)."""
RANDOM_INIT_FLAG = "insight_random_init"
"""Key set in the HF config of LMs built by :func:`build_tiny_lm` (random init, never pretrained)."""

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
    def from_json(cls, doc: Mapping[str, Any]) -> CaptionerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in doc.items() if k in names})


def _require(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"CaptionerConfig.{field} must be {expected}")


# --------------------------------------------------------------------------------------------------
# Language model loading and the offline tiny LM
# --------------------------------------------------------------------------------------------------


def load_lm(name_or_dir: str) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer by hub name or local directory (float32, eval mode).

    Raises
    ------
    CheckpointError
        The name cannot be resolved (hub unreachable, unknown name, missing/corrupt files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, only when needed

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        lm = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"lm={name_or_dir!r}: could not load a causal LM + tokenizer ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass a Hugging Face hub name reachable "
            "from here or a local directory written by save_pretrained"
        ) from err
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"lm={name_or_dir!r}: its tokenizer has no end-of-text token (eos_token)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked anyway
    if getattr(lm.config, RANDOM_INIT_FLAG, False):
        log.warning(
            "LM %s was built with random weights (build_tiny_lm): it knows no language beyond what "
            "the captioner's training taught it; use only for tests",
            name_or_dir,
        )
    return lm.eval(), tokenizer


def build_tiny_lm(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 128,
    seed: int = 0,
) -> Path:
    """Build a small GPT-2 (random init) and a byte-level BPE tokenizer trained on ``texts``.

    Saved with ``save_pretrained`` into ``out_dir`` so that :func:`load_lm` loads it through the same
    code path as ``gpt2``. For offline tests and demos only: the weights are random.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError("build_tiny_lm: texts is empty; need captions to train the BPE tokenizer on")
    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, pad_token=eos)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{RANDOM_INIT_FLAG: True},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = GPT2LMHeadModel(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    lm.save_pretrained(out_dir, safe_serialization=True)
    log.warning(
        "built a tiny RANDOM-INIT GPT-2 (%d layers, width %d, vocab %d) in %s: for offline tests only",
        n_layer,
        n_embd,
        len(tokenizer),
        out_dir,
    )
    return out_dir


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
        lm: nn.Module,
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
        self.lm = lm
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
            "lm_source": self.cfg.lm,
            "d_lm": self.d_lm,
            **(extra or {}),
        }
        write_json(files.config, doc)
        return files.root

    @classmethod
    def load(cls, in_dir: str | Path, sae: MatryoshkaSAE | None = None) -> SteerableCaptioner:
        """Read a captioner directory written by :meth:`save`; ``lm`` "lm" means the bundled ``lm/``."""
        files = CaptionerLayout(Path(in_dir))
        doc = _read_config(files.config)
        try:
            cfg = CaptionerConfig.from_json(doc["config"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{files.config}: bad captioner config ({err})") from err
        lm_name = str(files.lm_dir) if cfg.lm == BUNDLED_LM else cfg.lm
        lm, tokenizer = load_lm(lm_name)
        cfg = dataclasses.replace(cfg, lm=lm_name)
        adapter = PrefixAdapter(cfg, int(lm.config.hidden_size))
        _load_adapter(adapter, files.adapter)
        return cls(cfg, lm, tokenizer, sae, adapter)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a captioner directory written by the captioner job")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from err
    if doc.get("format") != CAPTIONER_FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {CAPTIONER_FORMAT!r}")
    return doc


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


def _save_lm_dir(lm: nn.Module, tokenizer: Any, target: Path) -> None:
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


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionTrainConfig:
    """Optimisation of the adapter (and optionally the LM); ClipCap's defaults."""

    epochs: int = 10
    """Passes over the (image, caption) training pairs."""
    batch_size: int = 40
    """Caption pairs per step."""
    lr: float = 2e-5
    """AdamW learning rate."""
    warmup_steps: int = 5000
    """Linear learning-rate warmup (capped at 10 % of the run)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    finetune_lm: bool = False
    """Also train the LM (needed for a random-init LM); else it is frozen and only the adapter learns."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    seed: int = 0
    """Seed for batch order and dropout."""
    device: str = "cpu"
    """Torch device for training."""

    def __post_init__(self) -> None:
        for name, ok in (
            ("epochs", self.epochs >= 1),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0),
            ("warmup_steps", self.warmup_steps >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("grad_clip", self.grad_clip >= 0),
        ):
            if not ok:
                raise ConfigError(f"CaptionTrainConfig.{name} is out of range: {getattr(self, name)!r}")


@dataclasses.dataclass(slots=True)
class CaptionData:
    """Adapter inputs and their captions: one row per image, several captions per image."""

    tokens_bhwd: torch.Tensor
    """Adapter inputs (SAE reconstructions or dense features), (n_images, gh, gw, d)."""
    captions: list[list[str]]
    """Reference captions of each image."""

    def __post_init__(self) -> None:
        if self.tokens_bhwd.shape[0] != len(self.captions):
            raise ConfigError(
                f"CaptionData: {self.tokens_bhwd.shape[0]} images but {len(self.captions)} caption lists"
            )
        if any(not caps for caps in self.captions):
            raise ConfigError("CaptionData: every image needs at least one caption")

    def pairs(self) -> list[tuple[int, str]]:
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]


@dataclasses.dataclass(slots=True)
class TrainHistory:
    """Per-epoch losses of :func:`train_captioner` and the epoch whose weights were kept."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    """Mean training loss of each epoch."""
    val_loss: list[float] = dataclasses.field(default_factory=list)
    """Validation loss after each epoch (empty without validation data)."""
    first_batch_loss: float = float("nan")
    """Loss of the very first batch (before any update)."""
    best_epoch: int = -1
    """0-based epoch with the lowest validation (else training) loss; its weights are kept."""


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_captioner(
    model: SteerableCaptioner,
    train: CaptionData,
    val: CaptionData | None,
    cfg: CaptionTrainConfig,
    *,
    progress: bool = True,
) -> TrainHistory:
    """Train the adapter (+ LM if ``cfg.finetune_lm``); keeps the weights of the best validation epoch.

    Reproducible: batch order and dropout draw from ``cfg.seed`` (the global RNG state is restored).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _train(model, train, val, cfg, progress)


def _train(
    model: SteerableCaptioner,
    train: CaptionData,
    val: CaptionData | None,
    cfg: CaptionTrainConfig,
    progress: bool,
) -> TrainHistory:
    device = torch.device(cfg.device)
    model.to(device)
    model.lm.requires_grad_(cfg.finetune_lm)
    params = [p for p in model.adapter.parameters()] + (
        list(model.lm.parameters()) if cfg.finetune_lm else []
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = train.pairs()
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    warmup = min(cfg.warmup_steps, max(1, steps_per_epoch * cfg.epochs // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist, best, best_loss = TrainHistory(), None, math.inf
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="captioner", disable=not progress, unit="step")
    for epoch in range(cfg.epochs):
        model.adapter.train()
        model.lm.train(cfg.finetune_lm)
        total = 0.0
        for batch in torch.randperm(len(pairs), generator=gen).split(cfg.batch_size):
            idx = torch.tensor([pairs[j][0] for j in batch.tolist()])
            loss = model.loss(
                train.tokens_bhwd[idx].to(device).float(), [pairs[j][1] for j in batch.tolist()]
            )
            if math.isnan(hist.first_batch_loss):
                hist.first_batch_loss = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch)
        hist.train_loss.append(total / len(pairs))
        if val is not None:
            hist.val_loss.append(evaluate_loss(model, val, batch_size=cfg.batch_size))
        current = hist.val_loss[-1] if val is not None else hist.train_loss[-1]
        if current < best_loss:
            best_loss, hist.best_epoch = current, epoch
            best = _snapshot(model, cfg.finetune_lm)
        log.info(
            "epoch %d: train loss %.4f%s",
            epoch,
            hist.train_loss[-1],
            f" val loss {hist.val_loss[-1]:.4f}" if val else "",
        )
    bar.close()
    if best is not None:
        _restore(model, best)
    model.lm.requires_grad_(False)
    model.cpu().eval()
    return hist


def _snapshot(model: SteerableCaptioner, with_lm: bool) -> dict[str, dict[str, torch.Tensor]]:
    snap = {"adapter": copy.deepcopy(model.adapter.state_dict())}
    if with_lm:
        snap["lm"] = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    return snap


def _restore(model: SteerableCaptioner, snap: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    model.adapter.load_state_dict(snap["adapter"])
    if "lm" in snap:
        model.lm.load_state_dict(snap["lm"])


@torch.no_grad()
def evaluate_loss(model: SteerableCaptioner, data: CaptionData, *, batch_size: int = 64) -> float:
    """Mean caption loss over all (image, caption) pairs of ``data`` (eval mode)."""
    model.eval()
    device = next(model.adapter.parameters()).device
    pairs = data.pairs()
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        total += float(model.loss(data.tokens_bhwd[idx].to(device).float(), [c for _, c in chunk])) * len(
            chunk
        )
    return total / max(len(pairs), 1)


@torch.no_grad()
def caption_all(
    model: SteerableCaptioner, tokens_bhwd: torch.Tensor, *, batch_size: int = 32, **kwargs: Any
) -> list[str]:
    """Captions of many adapter inputs, ``batch_size`` at a time (see :meth:`SteerableCaptioner.generate`)."""
    out: list[str] = []
    for start in range(0, tokens_bhwd.shape[0], batch_size):
        out += model.generate(tokens_bhwd[start : start + batch_size], **kwargs)
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation: BLEU-4, METEOR, CIDEr (pycocoevalcap, the COCO caption evaluation code)
# --------------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_caption(text: str) -> str:
    """Lower-case, punctuation removed, single spaces (close to the PTB tokenizer of the COCO toolkit)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: Literal["auto", "off"] = "auto",
) -> dict[str, Any]:
    """Corpus BLEU-4, CIDEr (pure Python) and METEOR (needs Java; else reported as unavailable).

    Captions are normalised with :func:`normalize_caption` (Java's PTB tokenizer is not required).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise ConfigError(
            f"score_captions: need one prediction per reference list, got {len(predictions)} "
            f"and {len(references)}"
        )
    res = {i: [normalize_caption(p) or "empty"] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, Any] = {"bleu4": float(bleu[3]), "cider": float(cider), "n_images": len(predictions)}
    out["meteor"] = _meteor(gts, res) if meteor == "auto" else "off"
    return out


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | str:
    if not java_available():
        log.warning(
            "METEOR unavailable: it needs Java (apt-get install default-jre-headless); "
            "BLEU-4 and CIDEr are still computed"
        )
        return "unavailable (needs Java)"
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError, BrokenPipeError) as err:
        log.warning("METEOR unavailable: the Java scorer failed (%s)", err)
        return f"unavailable ({type(err).__name__})"
    return float(score)


def reproduction_rate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (after :func:`normalize_caption`) to one of their references."""
    hits = sum(
        normalize_caption(p) in {normalize_caption(r) for r in refs}
        for p, refs in zip(predictions, references, strict=False)
    )
    return hits / max(len(predictions), 1)
