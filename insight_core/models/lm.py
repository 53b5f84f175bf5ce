"""Causal language models for the captioner: load one by Hugging Face hub name or local directory,
or build the tiny random-init GPT-2 that offline tests and demos use."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from insight_core.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RANDOM_INIT_FLAG = "insight_random_init"
"""Key set in the HF config of LMs built by :func:`build_tiny_lm` (random init, never pretrained)."""


def load_lm(name_or_dir: str, *, local_only: bool = False) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer by hub name or local directory (float32, eval mode).

    ``local_only``: read only files on this machine (a bundled directory): no Hub request at all.

    Raises
    ------
    CheckpointError
        The name cannot be resolved (hub unreachable, unknown name, missing/corrupt files).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, only when needed

    try:
        # never run code a model folder ships (trust_remote_code stays off, said explicitly)
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_dir, local_files_only=local_only, trust_remote_code=False
        )
        lm = AutoModelForCausalLM.from_pretrained(
            name_or_dir, dtype=torch.float32, local_files_only=local_only, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # SafetensorError: corrupt weights
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
    random_flag: dict[str, Any] = {RANDOM_INIT_FLAG: True}  # saved in config.json: the weights are random
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **random_flag,
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
