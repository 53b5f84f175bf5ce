"""``name``: hierarchy-aware concept names -> ``ATLAS/concepts.parquet`` (paper Sec. 3.4, App. B.4).

Family-informed concept vectors (Eq. B.9: the concept's decoder row plus its parents', weighted by
co-occurrence confidence and activations on the concept's top-30 patches) are matched against a
vocabulary embedded with noun / verb / adjective templates; the best word names the concept and
the top-5 are kept as alternatives. ``--vocab-embeddings FILE.npz`` (``words``, ``embeddings``)
bypasses the text encoder; without it, the word lists of ``--vocab-dir`` (default: the shipped
``assets/vocab``, see its PROVENANCE.md) are embedded. Runs ``stats``/``families`` first when given
``--features``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.atlas.layout import VOCAB_DIR
from insight_core.concepts.families import Families
from insight_core.concepts.naming import concept_vectors, name_concepts, parents_from_edges
from insight_core.concepts.vocab_embeddings import (
    TEMPLATES_BY_POS,
    VocabEmbeddings,
    cached_vocab_embeddings,
    load_vocab_embeddings,
)
from insight_core.concepts.vocabulary import build_vocabulary, paper_vocab_sources
from insight_core.errors import ConfigError
from insight_core.io import atomic_write, write_safetensors
from insight_core.models.backbone import PAPER_ARCH, PAPER_PRETRAINED, BackboneConfig, ClipBackbone
from precompute import families as families_stage
from precompute.common import load_atlas_sae, load_atlas_stats
from precompute.options import Flat, NamingOptions

log = logging.getLogger(__name__)

STAGE = "name"


@dataclasses.dataclass(frozen=True, slots=True)
class NameJob:
    """Name every concept of the atlas against a vocabulary, using its family context."""

    atlas: Path
    """Atlas directory (sae.safetensors; stats/ and edges.parquet are built when missing)."""
    features: Path | None = None
    """Feature directory, needed when stats/ is missing or stale."""
    naming: Annotated[NamingOptions, Flat] = dataclasses.field(default_factory=NamingOptions)
    """The vocabulary and how concepts are matched against it."""
    arch: str = PAPER_ARCH
    """open_clip architecture of the text encoder (must match the atlas backbone)."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag or local weights file of the text encoder (must match the atlas
    backbone; default: the paper's laion2b_s34b_b88k)."""
    force: bool = False
    """Rename even if the inputs (SAE, edges, stats, vocabulary) and settings are unchanged."""
    progress: bool = True
    """Show progress bars."""


def _families(job: NameJob, m: int) -> Families:
    edges = AtlasLayout(job.atlas).edges
    if job.features is not None or not edges.is_file():
        return families_stage.run(
            families_stage.FamiliesJob(atlas=job.atlas, features=job.features, progress=job.progress)
        )
    return families_stage.read_edges(edges, m)


def _vocab_dir(job: NameJob) -> Path:
    return Path(job.naming.vocab_dir) if job.naming.vocab_dir is not None else VOCAB_DIR


def _vocabulary(job: NameJob) -> VocabEmbeddings:
    opts = job.naming
    if opts.vocab_embeddings is not None:
        return load_vocab_embeddings(opts.vocab_embeddings)
    vocab_dir = _vocab_dir(job)
    if not vocab_dir.is_dir():
        what = "--vocab-dir" if opts.vocab_dir is not None else "the shipped word lists"
        raise ConfigError(
            f"{what} {vocab_dir}: not a directory; "
            "give --vocab-dir WORD_LIST_DIR or --vocab-embeddings FILE.npz"
        )
    vocab = build_vocabulary(paper_vocab_sources(vocab_dir), max_words=opts.max_words)
    n = opts.templates_per_pos
    templates = {pos: tuple(t[:n] if n else t) for pos, t in TEMPLATES_BY_POS.items()}
    backbone = ClipBackbone(BackboneConfig(arch=job.arch, pretrained=job.pretrained))
    if backbone.is_random:
        log.warning("RANDOM-INIT TEXT ENCODER: concept names will be meaningless")
    return cached_vocab_embeddings(
        AtlasLayout(job.atlas).vocab_cache_dir,
        vocab.words,
        f"{job.arch}/{job.pretrained}",
        backbone.encode_text,
        templates,
        progress=job.progress,
    )


def _vocab_files(job: NameJob) -> list[Path]:
    if job.naming.vocab_embeddings is not None:
        return [Path(job.naming.vocab_embeddings)]
    return [Path(src.path) for src in paper_vocab_sources(_vocab_dir(job)) if Path(src.path).is_file()]


def _input_key(job: NameJob) -> str:
    layout = AtlasLayout(job.atlas)
    files = [layout.sae, layout.edges, layout.stats_tensors, layout.stats_meta, *_vocab_files(job)]
    settings = {
        k: v for k, v in dataclasses.asdict(job).items() if k not in ("force", "progress", "features")
    }
    return fingerprint([f for f in files if f.is_file()], {"name": settings})


def run(job: NameJob) -> list[dict]:
    layout = AtlasLayout(job.atlas)
    sae = load_atlas_sae(layout)
    fam = _families(job, sae.cfg.dict_size)
    stats = load_atlas_stats(layout)
    key, record = _input_key(job), layout.stage_record(STAGE)
    if not job.force and record.is_current(key):
        log.info("%s is up to date; skipping (use --force to rename)", layout.concepts)
        return pq.read_table(layout.concepts).to_pylist()
    vocab = _vocabulary(job)
    if vocab.dim != sae.cfg.d_in:
        raise ConfigError(f"vocabulary embeddings have d={vocab.dim} but the SAE has d_in={sae.cfg.d_in}")
    parents = parents_from_edges(fam.parent_e, fam.child_e, sae.cfg.dict_size)
    vectors = concept_vectors(
        sae.W_dec_md.detach(),
        sae.b_dec_d.detach(),
        parents,
        stats.D_mm.numpy(),
        stats.w_pairs,
        alpha=job.naming.alpha,
        use_parents=job.naming.use_parents,
    )
    vectors_md = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    write_safetensors(  # the index stage and the app search these
        layout.concept_vectors,
        {"vectors_md": vectors_md},
        {"alpha": str(job.naming.alpha), "use_parents": str(job.naming.use_parents)},
    )
    result = name_concepts(vectors, vocab, top_k=job.naming.top_k)
    records = result.to_records()
    group_m = np.repeat(np.arange(len(sae.cfg.group_sizes)), sae.cfg.group_sizes)
    n_patches = max(1, stats.n_patches)
    for rec in records:
        i = rec["id"]
        rec.update(
            group=int(group_m[i]),
            freq_patches=int(stats.freq_patches_m[i]),
            frequency=float(stats.freq_patches_m[i]) / n_patches,
            freq_images=int(stats.freq_images_m[i]),
            mean_activation=float(stats.mean_act_m[i]),
            n_parents=len(parents[i]),
            n_children=len(fam.children(i)),
        )
    table = pa.Table.from_pylist(records)
    atomic_write(layout.concepts, lambda tmp: pq.write_table(table, str(tmp)))
    record.write(
        key, [layout.concepts, layout.concept_vectors], n_concepts=len(records), n_words=vocab.n_words
    )
    log.info("named %d concepts against %d words -> %s", len(records), vocab.n_words, layout.concepts)
    return records
