"""``name``: hierarchy-aware concept names -> ``ATLAS/concepts.parquet`` (paper Sec. 3.4, App. B.4).

Family-informed concept vectors (Eq. B.9: the concept's decoder row plus its parents', weighted by
co-occurrence confidence and activations on the concept's top-30 patches) are matched against a
vocabulary embedded with noun / verb / adjective templates; the best word names the concept and
the top-5 are kept as alternatives. The vocabulary embeddings come from ``--vocab-embeddings
FILE.npz`` (``vocab-embed``'s file, or ``words`` + ``embeddings``; refused when made for another
backbone), the per-user cache, a published file (``--vocab-repo``), or are computed from the word
lists of ``--vocab-dir`` (default: the shipped ``assets/vocab``, see its PROVENANCE.md) within
``--naming-budget`` (precompute/vocab.py). Which, and why, is kept in the stage record and the atlas
manifest (``configs.naming.vocabulary``). Runs ``stats``/``families`` first when given ``--features``.

Atlases whose features are not text-aligned (a timm backbone such as DINOv2: the manifest's
``backbone.text_aligned`` is false) have no text encoder to name against: the stage then writes the
concept vectors and a table of neutral names (``concept 123``, no alternatives) so every later stage
and the app work, and says so once.
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
from insight_core.concepts.vocabulary import paper_vocab_sources
from insight_core.errors import ConfigError
from insight_core.io import atomic_write, write_safetensors
from insight_core.models.backbone import PAPER_ARCH, PAPER_PRETRAINED, ClipBackbone
from insight_core.models.feature_path import backbone_label, is_text_aligned
from insight_core.models.timm_backbone import not_text_aligned_message
from precompute import families as families_stage
from precompute.common import atlas_manifest, features_manifest, load_atlas_sae, load_atlas_stats
from precompute.options import Flat, NamingOptions
from precompute.vocab import Resolved, resolve_vocabulary

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
    """open_clip architecture of the text encoder, used when neither the feature nor the atlas
    manifest records one (they win: the text encoder must be the atlas backbone's)."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag or local weights file of the text encoder (default: the paper's
    laion2b_s34b_b88k), used when no manifest records one, as --arch."""
    text_aligned: bool | None = None
    """Whether the features share a space with a text encoder; None: read ``backbone.text_aligned``
    from the feature manifest (--features) or the atlas manifest (true when neither says). False
    writes neutral names ('concept 123')."""
    force: bool = False
    """Rename even if the inputs (SAE, edges, stats, vocabulary) and settings are unchanged."""
    device: str = "auto"
    """Device of the text encoder when vocabulary embeddings are computed ('auto': CUDA when available)."""
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


def _vocabulary(job: NameJob) -> Resolved:
    """The vocabulary embeddings (a given file, the cache, a published file, or computed within the
    naming budget: precompute/vocab.py) and the record of which and why."""
    arch, pretrained = text_encoder(job)
    return resolve_vocabulary(job.naming, arch=arch, pretrained=pretrained,
                              atlas_cache=AtlasLayout(job.atlas).vocab_cache_dir, device=job.device,
                              progress=job.progress, encoder=ClipBackbone)  # fmt: skip


def text_encoder(job: NameJob) -> tuple[str, str]:
    """The atlas's text encoder: the arch and tag its feature (or atlas) manifest records, else
    --arch / --pretrained. Vocabulary embeddings must come from exactly this encoder."""
    block = _recorded_backbone(job)
    arch, pretrained = block.get("arch"), block.get("pretrained")
    recorded = block.get("kind", "open_clip") == "open_clip" and isinstance(arch, str)
    if not recorded or not isinstance(arch, str) or not isinstance(pretrained, str):
        return job.arch, job.pretrained
    if (arch, pretrained) != (job.arch, job.pretrained):
        log.info("text encoder: %s/%s, as the atlas's manifest records (not --arch %s --pretrained %s)",
                 arch, pretrained, job.arch, job.pretrained)  # fmt: skip
    return arch, pretrained


def _vocab_files(job: NameJob) -> list[Path]:
    if job.naming.vocab_embeddings is not None:
        return [Path(job.naming.vocab_embeddings)]
    return [Path(src.path) for src in paper_vocab_sources(_vocab_dir(job)) if Path(src.path).is_file()]


def _input_key(job: NameJob) -> str:
    layout = AtlasLayout(job.atlas)
    files = [layout.sae, layout.edges, layout.stats_tensors, layout.stats_meta, *_vocab_files(job)]
    not_settings = ("force", "progress", "features", "device")
    settings = {k: v for k, v in dataclasses.asdict(job).items() if k not in not_settings}
    settings["text_aligned"] = _text_aligned(job)  # resolved from the manifests when not given
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
    text_aligned = _text_aligned(job)
    resolved = _vocabulary(job) if text_aligned else None
    vocab = resolved.vocab if resolved is not None else None
    if vocab is not None and vocab.dim != sae.cfg.d_in:
        raise ConfigError(f"vocabulary embeddings have d={vocab.dim} but the SAE has d_in={sae.cfg.d_in}")
    parents = parents_from_edges(fam.parent_e, fam.child_e, sae.cfg.dict_size)
    vectors = concept_vectors(
        sae.W_dec_md.detach(),
        sae.b_dec_d.detach(),
        parents,
        stats.cooc.lookup,  # D[i, a] for edges only: >= the floor, so always stored
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
    if vocab is None:
        log.warning("%s", not_text_aligned_message(_backbone_label(job), "naming concepts"))
        log.warning("writing neutral concept names ('concept 123') to %s", layout.concepts)
        records = neutral_records(sae.cfg.dict_size)
    else:
        records = name_concepts(vectors, vocab, top_k=job.naming.top_k).to_records()
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
    table = pa.Table.from_pylist(records, schema=_schema(records))
    atomic_write(layout.concepts, lambda tmp: pq.write_table(table, str(tmp)))
    n_words = vocab.n_words if vocab is not None else 0
    record.write(key, [layout.concepts, layout.concept_vectors], n_concepts=len(records), n_words=n_words,
                 text_aligned=text_aligned, vocabulary=resolved.info if resolved else None)  # fmt: skip
    if resolved is not None:
        log.info("named %d concepts against %d words (%s: %s) -> %s", len(records), n_words,
                 resolved.info["origin"], resolved.info["reason"], layout.concepts)  # fmt: skip
    return records


def neutral_name(cid: int) -> str:
    """The name of a concept of an atlas without a text encoder."""
    return f"concept {int(cid)}"


def neutral_records(m: int) -> list[dict]:
    """``concepts.parquet`` name columns for ``m`` concepts that cannot be named (no alternatives)."""
    return [
        {"id": i, "name": neutral_name(i), "name_score": 0.0, "name_pos": "", "top_names": [],
         "top_scores": [], "top_pos": []}
        for i in range(m)
    ]  # fmt: skip


def _schema(records: list[dict]) -> pa.Schema | None:
    """Explicit list types, so an all-empty ``top_names`` column is still a list of strings."""
    if not records:
        return None
    lists = {"top_names": pa.list_(pa.string()), "top_scores": pa.list_(pa.float64()),
             "top_pos": pa.list_(pa.string())}  # fmt: skip
    inferred = pa.Table.from_pylist(records[:1]).schema
    return pa.schema([pa.field(f.name, lists.get(f.name, f.type)) for f in inferred])


def _recorded_backbone(job: NameJob) -> dict:
    """The ``backbone`` block of the feature manifest (--features) or else of the atlas manifest."""
    if job.features is not None and (block := features_manifest(job.features).get("backbone")) is not None:
        return block
    return atlas_manifest(AtlasLayout(job.atlas)).get("backbone") or {}


def _text_aligned(job: NameJob) -> bool:
    if job.text_aligned is not None:
        return job.text_aligned
    return is_text_aligned(_recorded_backbone(job))


def _backbone_label(job: NameJob) -> str:
    block = _recorded_backbone(job)
    return backbone_label(block) if block else "this atlas's backbone"
