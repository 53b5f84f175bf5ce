"""Shared app fixtures: one small demo atlas with a tiny captioner, one loaded state, one launched app.

Everything is session-scoped so the app tests pay for one atlas build (~30-60 s on 2 CPU cores)
and one server launch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
log = logging.getLogger(__name__)


def _train_captioner(atlas: Path, work: Path) -> None:
    """A tiny offline captioner (random-init GPT-2 + BPE on the example captions) that memorises the
    six example photos, saved as ATLAS/captioner (the layout ``precompute captioner`` writes)."""
    from insight_core.atlas.layout import AtlasLayout, FeaturesLayout
    from insight_core.models.captioner import CaptionerConfig, SteerableCaptioner
    from insight_core.models.lm import build_tiny_lm
    from insight_core.models.sae import MatryoshkaSAE
    from insight_core.training.captioner import CaptionData, CaptionTrainConfig, train_captioner

    doc = json.loads((EXAMPLES / "captions.json").read_text())
    by_id = {im["id"]: im["file_name"] for im in doc["images"]}
    caps: dict[str, list[str]] = {}
    for a in doc["annotations"]:
        caps.setdefault(by_id[a["image_id"]], []).append(a["caption"])
    layout = AtlasLayout(atlas)
    shard = FeaturesLayout(work / "features").shard(0)
    ids = json.loads(FeaturesLayout.ids_of(shard).read_text())
    ids = ids["ids"] if isinstance(ids, dict) else ids
    names = [Path(str(i)).name for i in ids]
    feats = torch.from_numpy(np.load(shard).astype(np.float32)).reshape(len(names), 14, 14, -1)
    sae = MatryoshkaSAE.load(layout.sae)
    lm_dir = build_tiny_lm([c for cs in caps.values() for c in cs] * 3, work / "tiny_lm", vocab_size=400,
                           n_embd=64, n_head=2, n_layer=2)  # fmt: skip
    cfg = CaptionerConfig(d_in=int(feats.shape[-1]), n_layers=1, n_heads=2, d_model=32, lm=str(lm_dir))
    model = SteerableCaptioner.build(cfg, sae)
    data = CaptionData(model.input_tokens(feats), [caps.get(n, ["a photo"])[:2] for n in names])
    train_cfg = CaptionTrainConfig(epochs=60, batch_size=12, lr=5e-3, finetune_lm=True)
    train_captioner(model, data, None, train_cfg, progress=False)
    model.save(layout.captioner.root, save_lm=True, extra={"note": "tiny offline test captioner"})


@pytest.fixture(scope="session")
def app_atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete demo atlas (random-init backbone, 6 example photos) plus a tiny captioner."""
    from insight_core.atlas import write_manifest
    from insight_core.atlas.layout import AtlasLayout
    from precompute import demo

    prebuilt = os.environ.get("INSIGHT_TEST_APP_ATLAS")  # reuse one between local runs
    reuse = AtlasLayout(prebuilt) if prebuilt else None
    if reuse and reuse.manifest.is_file() and reuse.captioner.config.is_file():
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("app") / "atlas"
    n = torch.get_num_threads()
    try:
        # the demo's own captioner (8-layer adapter) is slower to train than the tiny one below
        skip_cap = (
            {"captioner": False} if "captioner" in {f.name for f in dataclasses.fields(demo.DemoJob)} else {}
        )
        demo.run(
            demo.DemoJob(out=root, pretrained="none", steps=40, max_words=24, progress=False, **skip_cap)
        )
        torch.set_num_threads(1)  # tiny models train faster on one thread
        _train_captioner(root, root.parent / "atlas-work")
        write_manifest(root)  # list the captioner (and its LM files): the app reads only listed files
    finally:
        torch.set_num_threads(n)
    return root


@pytest.fixture(scope="session")
def app_state(app_atlas: Path):
    from app.state import load_state

    return load_state(app_atlas)


@pytest.fixture(scope="session")
def launched_app(app_atlas: Path, app_state) -> Iterator[str]:
    """The explorer launched on a free local port; yields its URL."""
    from app.server import LAUNCH_OPTIONS, QUEUE_SIZE, example_images
    from app.ui import build_ui
    from app.views import Views

    demo = build_ui(Views(app_state), example_images())
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=4)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **LAUNCH_OPTIONS
    )  # the served app's options (no exception text shown)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="session")
def client(launched_app: str):
    from gradio_client import Client

    return Client(launched_app, verbose=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium per browser-test module (skips without playwright or chromium)."""
    from tests.app.browser import chromium

    with chromium() as b:
        yield b
