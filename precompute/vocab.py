"""Vocabulary embeddings: ``vocab-embed``, ``vocab-push``, ``vocab-pull``, and how ``name`` finds them.

Text embeddings of the naming vocabulary are the same for every atlas on one text encoder, so they
are an artefact computed once per backbone (``vocab-embed``: batched, autocast on a GPU, resumable,
progress with ETA, a manifest inside the ``.npz``) and shared through the Hub (``vocab-push`` /
``vocab-pull``). :func:`resolve_vocabulary` is what ``name`` (and ``build``) uses, in order:

1. an explicit ``--vocab-embeddings FILE`` (refused when its manifest names another backbone);
2. the per-user cache (``$INSIGHT_CACHE_DIR/vocab``), keyed by arch, tag, words and templates;
3. a published file for the exact arch + tag, from ``--vocab-repo`` (or the project's documented
   default, none yet), SHA-256 verified;
4. computing them: after timing one batch, when the whole vocabulary would exceed
   ``--naming-budget`` it says so in one loud line and, on CPU, embeds the largest subset that fits,
   the most concrete words first (``--max-words`` / ``--full-vocabulary`` override).

Random-init text encoders (``--pretrained none``) keep their embeddings in the atlas's own ``cache/``
and never in the per-user cache or on the Hub.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from insight_core.atlas.hub import DEFAULT_REPO_TYPE, HubError, RepoType
from insight_core.atlas.layout import VOCAB_DIR
from insight_core.concepts.vocab_budget import measure_rate, over_budget_line, plan_vocabulary
from insight_core.concepts.vocab_embeddings import TEMPLATES_BY_POS, VocabEmbeddings, load_vocab_embeddings
from insight_core.concepts.vocab_files import (
    VocabStore,
    VocabSubset,
    check_vocab_backbone,
    embed_resumable,
    file_sha256,
    parse_manifest,
    read_cached,
    user_vocab_cache,
    vocab_manifest,
    words_sha256,
)
from insight_core.concepts.vocab_hub import DEFAULT_VOCAB_REPO, fetch_vocab, push_vocab
from insight_core.concepts.vocabulary import (
    BRYSBAERT_FILE,
    build_vocabulary,
    concreteness_ratings,
    paper_vocab_sources,
    rank_by_concreteness,
)
from insight_core.device import resolve_device
from insight_core.errors import ConfigError
from insight_core.models.backbone import PAPER_ARCH, PAPER_PRETRAINED, BackboneConfig, ClipBackbone
from insight_core.models.image_batches import is_random_init
from precompute.options import Flat, NamingOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Words:
    """The words to embed, in embedding order, and where they came from."""

    words: tuple[str, ...]
    """Ranked (most concrete first), or the union's order under --max-words."""
    ranked_by: str
    """'concreteness' (Brysbaert ratings), 'list-order' (no ratings) or 'max-words' (union order)."""
    sources: tuple[dict[str, Any], ...]
    """The word lists used: name, file, sha256."""


def vocabulary_words(opts: NamingOptions) -> Words:
    """The vocabulary of ``--vocab-dir`` (default: the shipped lists), ordered for embedding."""
    vocab_dir = Path(opts.vocab_dir) if opts.vocab_dir is not None else VOCAB_DIR
    if not vocab_dir.is_dir():
        what = "--vocab-dir" if opts.vocab_dir is not None else "the shipped word lists"
        raise ConfigError(
            f"{what} {vocab_dir}: not a directory; "
            "give --vocab-dir WORD_LIST_DIR or --vocab-embeddings FILE.npz"
        )
    sources = paper_vocab_sources(vocab_dir)
    vocab = build_vocabulary(sources, max_words=opts.max_words)
    used = tuple({"name": s.name, "file": Path(s.path).name, "sha256": file_sha256(s.path)}
                 for s in sources if Path(s.path).is_file())  # fmt: skip
    if opts.max_words is not None:
        return Words(vocab.words, "max-words", used)
    table = vocab_dir / BRYSBAERT_FILE
    ratings = concreteness_ratings(table) if table.is_file() else None
    order = rank_by_concreteness(vocab.words, ratings)
    ranked = tuple(vocab.words[i] for i in order)
    return Words(ranked, "concreteness" if ratings is not None else "list-order", used)


def templates_for(opts: NamingOptions) -> dict[str, tuple[str, ...]]:
    """The paper's template sets, cut to --templates-per-pos."""
    n = opts.templates_per_pos
    return {pos: tuple(t[:n] if n else t) for pos, t in TEMPLATES_BY_POS.items()}


def _cache_tag(pretrained: str) -> tuple[str, str | None]:
    """The tag as the cache key sees it (a local weights file counts by its content hash) and that hash."""
    path = Path(pretrained)
    if not path.is_file():
        return pretrained, None
    sha = file_sha256(path)
    return f"{path.name}-{sha[:16]}", sha


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """Vocabulary embeddings and the record of where they came from."""

    vocab: VocabEmbeddings
    """The embeddings (with their manifest when ours)."""
    info: dict[str, Any]
    """``{"origin", "n_words", "policy", "reason", ...}`` (the ``name`` stage record, the atlas manifest)."""


def _info(vocab: VocabEmbeddings, origin: str, reason: str) -> dict[str, Any]:
    man = parse_manifest(vocab, "vocabulary embeddings")
    subset = man.subset if man is not None else VocabSubset()
    return {"origin": origin, "n_words": vocab.n_words, "n_total": subset.n_total or vocab.n_words,
            "policy": subset.policy or "file", "reason": subset.reason or reason}  # fmt: skip


def resolve_vocabulary(
    opts: NamingOptions,
    *,
    arch: str,
    pretrained: str,
    atlas_cache: Path,
    device: str = "auto",
    progress: bool = False,
    cache_dir: Path | None = None,
    encoder: Callable[[BackboneConfig], Any] | None = None,
) -> Resolved:
    """Vocabulary embeddings for ``name``: a given file, the cache, a published file, or computed.

    ``encoder`` builds the text encoder (default :class:`ClipBackbone`); it is only called when the
    embeddings have to be computed."""
    if opts.vocab_embeddings is not None:
        where = f"--vocab-embeddings {opts.vocab_embeddings}"
        vocab = load_vocab_embeddings(opts.vocab_embeddings)
        check_vocab_backbone(vocab, arch, pretrained, where)
        # the published reason names the file, not the builder's folders
        return Resolved(vocab, _info(vocab, "file", f"--vocab-embeddings {Path(opts.vocab_embeddings).name}"))
    words = vocabulary_words(opts)
    templates = templates_for(opts)
    tag, weights_sha = _cache_tag(pretrained)
    store = _store(pretrained, atlas_cache, cache_dir)
    hit = read_cached(store.path(arch, tag, words.words, templates), arch, pretrained, words.words)
    if hit is None and opts.max_words is None and not opts.full_vocabulary:
        earlier = store.find_budget_subset(arch, tag, words.words, templates, opts.naming_budget)
        if earlier is not None:
            hit = read_cached(earlier[0], arch, pretrained, words.words[: earlier[1]])
    if hit is not None:
        return Resolved(hit, _info(hit, "cache", "the per-user cache"))
    published = _published(opts, arch, pretrained, words.words, templates, cache_dir)
    if published is not None:
        return Resolved(
            published, _info(published, "hub", f"published in {opts.vocab_repo or DEFAULT_VOCAB_REPO}")
        )
    return _compute(opts, words, templates, arch=arch, pretrained=pretrained, tag=tag,
                    weights_sha=weights_sha, store=store, device=device, progress=progress,
                    encoder=encoder or ClipBackbone)  # fmt: skip


def _store(pretrained: str, atlas_cache: Path, cache_dir: Path | None) -> VocabStore:
    """The per-user cache; for a random-init encoder the atlas's own cache (never shared)."""
    if is_random_init(pretrained):
        return VocabStore(atlas_cache, prefix="vocab_emb_")
    return VocabStore(user_vocab_cache(cache_dir))


def _published(
    opts: NamingOptions,
    arch: str,
    pretrained: str,
    words: Sequence[str],
    templates: Mapping,
    cache_dir: Path | None,
) -> VocabEmbeddings | None:
    repo = opts.vocab_repo or DEFAULT_VOCAB_REPO
    if repo is None or is_random_init(pretrained):
        return None
    try:
        got = fetch_vocab(repo, arch, pretrained, words, templates, cache_dir=cache_dir)
    except HubError as err:  # offline or no access: computing still works
        log.warning("vocabulary embeddings not fetched from %s (%s); computing them", repo, err)
        return None
    return None if got is None else got[0]


def _compute(
    opts: NamingOptions,
    words: Words,
    templates: dict[str, tuple[str, ...]],
    *,
    arch: str,
    pretrained: str,
    tag: str,
    weights_sha: str | None,
    store: VocabStore,
    device: str,
    progress: bool,
    encoder: Callable[[BackboneConfig], Any],
) -> Resolved:
    dev = resolve_device(device, what="--device")
    backbone = encoder(BackboneConfig(arch=arch, pretrained=pretrained, device=str(dev)))
    if backbone.is_random:
        log.warning("RANDOM-INIT TEXT ENCODER: concept names will be meaningless")
    on_gpu = dev.type == "cuda"

    def encode(texts: Sequence[str], tmpl: Sequence[str]) -> Any:
        return (
            backbone.encode_text(texts, tmpl, batch_size=1024)
            if on_gpu
            else backbone.encode_text(texts, tmpl)
        )

    timed = None
    rate = None
    if opts.max_words is None and not opts.full_vocabulary:
        n0 = min(len(words.words), 64 if on_gpu else 4)  # 4 words x 30 templates: a few seconds on CPU
        rate, timed = measure_rate(words.words[:n0], encode, templates)
        log.info("text encoder: %.2f words/s (%d templates per word) on %s", rate,
                 sum(map(len, templates.values())), dev.type)  # fmt: skip
    plan = plan_vocabulary(len(words.words), rate=rate, budget_s=opts.naming_budget, on_cpu=not on_gpu,
                           ranked_by=words.ranked_by, max_words=opts.max_words, full=opts.full_vocabulary,
                           min_words=0 if timed is None else timed.shape[1])  # fmt: skip
    if plan.estimate_s is not None and plan.estimate_s > opts.naming_budget:
        log.warning("%s", over_budget_line(plan, opts.naming_budget, dev.type))
    log.info("vocabulary: %s", plan.reason)
    chosen = words.words[: plan.n_words]
    out = store.path(arch, tag, chosen, templates)
    hit = read_cached(out, arch, pretrained, chosen)
    if hit is not None:
        return Resolved(hit, _info(hit, "cache", plan.reason))
    key = f"{arch}|{tag}|{words_sha256(chosen)}|{words_sha256([str(templates)])}"
    done = None if timed is None else timed[:, : plan.n_words]
    emb_pwd = embed_resumable(chosen, encode, templates, out=out, key=key, done_pwd=done,
                              batch_words=256 if on_gpu else 32, progress=progress)  # fmt: skip
    manifest = vocab_manifest(arch=arch, pretrained=pretrained, words=chosen, templates_by_pos=templates,
                              subset=plan.record(), sources=words.sources,
                              weights_sha256=weights_sha)  # fmt: skip
    vocab = VocabEmbeddings(chosen, emb_pwd, tuple(templates), manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab.save_npz(out)
    log.info("vocabulary embeddings (%d words) saved to %s", vocab.n_words, out)
    return Resolved(vocab, _info(vocab, "computed", plan.reason))


# --------------------------------------------------------------------------------------------------
# Jobs


@dataclasses.dataclass(frozen=True, slots=True)
class VocabEmbedJob:
    """Compute the vocabulary's text embeddings once for a text encoder (with a manifest)."""

    out: Path
    """The .npz to write (words, embeddings (n_pos, W, d), pos_names, manifest)."""
    naming: Annotated[NamingOptions, Flat] = dataclasses.field(default_factory=NamingOptions)
    """The vocabulary (--vocab-dir, --max-words, --templates-per-pos); the whole of it (or the first
    --max-words words): --naming-budget does not apply to this explicit job."""
    arch: str = PAPER_ARCH
    """open_clip architecture of the text encoder (the atlas backbone's)."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag or local weights file (the atlas backbone's)."""
    device: str = "auto"
    """'auto' (CUDA when available: batched under autocast), 'cpu' or 'cuda:N'."""
    progress: bool = True
    """Show a progress bar with the ETA."""


def run_embed(job: VocabEmbedJob) -> Path:
    """Compute (or take from the cache) and write ``job.out``; rerunning an interrupted job resumes it."""
    opts = dataclasses.replace(
        job.naming, vocab_embeddings=None, vocab_repo=None, full_vocabulary=job.naming.max_words is None
    )
    got = resolve_vocabulary(opts, arch=job.arch, pretrained=job.pretrained, atlas_cache=job.out.parent,
                             device=job.device, progress=job.progress, encoder=ClipBackbone)  # fmt: skip
    got.vocab.save_npz(job.out)
    log.info("wrote %s: %d words x %d parts of speech (%s)", job.out, got.vocab.n_words, got.vocab.n_pos,
             got.info["reason"])  # fmt: skip
    return job.out


@dataclasses.dataclass(frozen=True, slots=True)
class VocabPushJob:
    """Publish a vocabulary-embedding file (from vocab-embed) on a Hugging Face Hub repo."""

    file: Path
    """The .npz written by vocab-embed (its manifest says which text encoder made it)."""
    repo_id: str
    """Target repo 'namespace/name' (created when missing)."""
    repo_type: RepoType = DEFAULT_REPO_TYPE
    """Hub repo type."""
    revision: str | None = None
    """Branch to push to; default: the main branch."""
    token: str | None = None
    """Hub token with write access; default: HF_TOKEN or `hf auth login`."""


def run_push(job: VocabPushJob) -> str:
    return push_vocab(job.file, job.repo_id, repo_type=job.repo_type, revision=job.revision, token=job.token)


@dataclasses.dataclass(frozen=True, slots=True)
class VocabPullJob:
    """Fetch the published embeddings of a vocabulary for a text encoder into the per-user cache."""

    repo_id: str
    """Source repo 'namespace/name'."""
    naming: Annotated[NamingOptions, Flat] = dataclasses.field(default_factory=NamingOptions)
    """The vocabulary whose embeddings to fetch (--vocab-dir, --max-words, --templates-per-pos)."""
    arch: str = PAPER_ARCH
    """open_clip architecture of the text encoder."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag of the text encoder."""
    out: Path | None = None
    """Also copy the verified file here (name finds it in the cache either way)."""
    repo_type: RepoType = DEFAULT_REPO_TYPE
    """Hub repo type."""
    revision: str | None = None
    """Branch, tag or commit; default: the main branch."""
    token: str | None = None
    """Hub token for private repos; default: HF_TOKEN or `hf auth login`."""


def run_pull(job: VocabPullJob) -> Path:
    words = vocabulary_words(job.naming)
    got = fetch_vocab(job.repo_id, job.arch, job.pretrained, words.words, templates_for(job.naming),
                      repo_type=job.repo_type, revision=job.revision, token=job.token)  # fmt: skip
    if got is None:
        raise ConfigError(
            f"{job.repo_type} repo {job.repo_id!r} has no embeddings of this vocabulary "
            f"({len(words.words):,} words) for {job.arch}/{job.pretrained}"
        )
    vocab, cached = got
    if job.out is not None:
        vocab.save_npz(job.out)
        return job.out
    return cached
