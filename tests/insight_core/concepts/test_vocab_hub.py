"""Published vocabulary embeddings: push to and fetch from an in-memory fake Hub (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub.errors import RemoteEntryNotFoundError

from insight_core.concepts.vocab_embeddings import VocabEmbeddings
from insight_core.concepts.vocab_files import cache_key
from insight_core.concepts.vocab_hub import fetch_vocab, hub_paths, push_vocab
from insight_core.errors import ConfigError, VocabularyMismatchError
from tests.insight_core.concepts.test_vocab_files import TEMPLATES, WORDS, make_vocab


class FakeRepo:
    """``HfApi.create_repo`` / ``upload_file`` and ``hf_hub_download`` over a folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_file(self, *, path_or_fileobj: Any, path_in_repo: str, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("upload_file", path_in_repo, kwargs))
        dest = self.root / repo_id / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = path_or_fileobj if isinstance(path_or_fileobj, bytes) else Path(path_or_fileobj).read_bytes()
        dest.write_bytes(data)

    def download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        path = self.root / repo_id / filename
        if not path.is_file():
            response = httpx.Response(404, request=httpx.Request("GET", f"https://hub/{filename}"))
            raise RemoteEntryNotFoundError(f"{filename} not found", response=response)
        return str(path)


@pytest.fixture
def hub(tmp_path: Path) -> FakeRepo:
    return FakeRepo(tmp_path / "hub")


def _push(hub: FakeRepo, vocab: VocabEmbeddings, tmp_path: Path) -> str:
    return push_vocab(vocab.save_npz(tmp_path / "vocab.npz"), "me/vocab", api=hub)  # type: ignore[arg-type]


def test_push_then_fetch_into_the_cache(hub: FakeRepo, tmp_path: Path) -> None:
    name = _push(hub, make_vocab(), tmp_path)
    key = cache_key("ViT-B-16", "openai", WORDS, TEMPLATES)
    assert name == hub_paths(key)[0]
    sidecar = json.loads((hub.root / "me/vocab" / hub_paths(key)[1]).read_text())
    assert sidecar["manifest"]["backbone"]["pretrained"] == "openai"
    assert len(sidecar["sha256"]) == 64
    got = fetch_vocab("me/vocab", "ViT-B-16", "openai", WORDS, TEMPLATES, cache_dir=tmp_path / "cache",
                      download=hub.download)  # fmt: skip
    assert got is not None
    vocab, cached = got
    assert vocab.words == WORDS
    assert cached == tmp_path / "cache" / f"{key}.npz"
    assert cached.is_file()


def test_nothing_published_for_these_words_or_this_backbone_is_none(hub: FakeRepo, tmp_path: Path) -> None:
    _push(hub, make_vocab(), tmp_path)
    kwargs = {"cache_dir": tmp_path / "cache", "download": hub.download}
    assert fetch_vocab("me/vocab", "ViT-B-16", "openai", WORDS[:3], TEMPLATES, **kwargs) is None
    assert fetch_vocab("me/vocab", "ViT-B-16", "laion2b_s34b_b88k", WORDS, TEMPLATES, **kwargs) is None
    assert fetch_vocab("me/vocab", "ViT-B-16", "none", WORDS, TEMPLATES, **kwargs) is None


def test_an_altered_file_is_refused(hub: FakeRepo, tmp_path: Path) -> None:
    _push(hub, make_vocab(), tmp_path)
    npz = hub.root / "me/vocab" / hub_paths(cache_key("ViT-B-16", "openai", WORDS, TEMPLATES))[0]
    other = make_vocab(words=("dog", "cat", "red", "tree", "bus"))  # same size class, other content
    other.save_npz(npz)
    with pytest.raises(VocabularyMismatchError, match="SHA-256"):
        fetch_vocab("me/vocab", "ViT-B-16", "openai", WORDS, TEMPLATES, cache_dir=tmp_path / "c",
                    download=hub.download)  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_a_sidecar_for_another_backbone_is_refused_naming_both(hub: FakeRepo, tmp_path: Path) -> None:
    _push(hub, make_vocab(), tmp_path)
    key = cache_key("ViT-B-16", "openai", WORDS, TEMPLATES)
    other = cache_key("ViT-B-16", "laion", WORDS, TEMPLATES)
    folder = hub.root / "me/vocab"
    (folder / hub_paths(other)[1]).write_bytes((folder / hub_paths(key)[1]).read_bytes())
    with pytest.raises(VocabularyMismatchError, match=r"ViT-B-16/openai.*ViT-B-16/laion"):
        fetch_vocab("me/vocab", "ViT-B-16", "laion", WORDS, TEMPLATES, cache_dir=tmp_path / "c",
                    download=hub.download)  # fmt: skip


def test_random_init_and_manifest_less_files_are_not_published(hub: FakeRepo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="random-init"):
        _push(hub, make_vocab(tag="none"), tmp_path)
    bare = make_vocab()
    with pytest.raises(ConfigError, match="no manifest"):
        _push(hub, VocabEmbeddings(bare.words, bare.emb_pwd, bare.pos_names), tmp_path)
    assert not [c for c in hub.calls if c[0] == "upload_file"]
