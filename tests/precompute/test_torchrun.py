"""extract and train-sae under ``torchrun`` (2 CPU processes, gloo) give single-process results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from insight_core.atlas import AtlasLayout
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.sae import MatryoshkaSAE
from precompute.__main__ import main
from tests.insight_core.training.test_sae import planted_features

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "assets" / "examples"
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def _run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    """``python -m precompute ARGS``, or the same under ``torchrun --nproc_per_node PROCESSES``."""
    if processes == 1:
        cmd = [sys.executable, "-m", "precompute", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), "-m", "precompute", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """10 images (the 6 examples + flipped/rotated copies) and a local CLIP weights file."""
    root = tmp_path_factory.mktemp("torchrun")
    images = root / "imgs"
    images.mkdir()
    examples = sorted(EXAMPLES.glob("*.jpg"))
    for p in examples:
        shutil.copy(p, images / p.name)
    Image.open(examples[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "flip0.png")
    Image.open(examples[1]).rotate(90, expand=True).save(images / "rot1.png")
    Image.open(examples[2]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(images / "flip2.png")
    Image.open(examples[3]).rotate(180).save(images / "rot3.png")
    weights = root / "clip.safetensors"
    model = ClipBackbone(BackboneConfig(pretrained="none")).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return images, weights


def test_extract_on_two_processes_equals_one(photos: tuple[Path, Path], tmp_path: Path) -> None:
    images, weights = photos
    args = ["extract", "--images", str(images), "--pretrained", str(weights), "--shard-size", "2",
            "--batch-size", "2", "--no-progress"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    _run([*args, "--out", str(two)], processes=2)
    _run([*args, "--out", str(one)])
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len(list(one.glob("shard_*.npy"))) == 5
    for npy in one.glob("shard_*.npy"):
        assert np.array_equal(np.load(npy), np.load(two / npy.name)), npy.name
    for ids in one.glob("shard_*.ids.json"):
        assert json.loads(ids.read_text()) == json.loads((two / ids.name).read_text())
    manifest_one = json.loads((one / "manifest.json").read_text())
    manifest_two = json.loads((two / "manifest.json").read_text())
    assert manifest_two == manifest_one
    assert (manifest_two["n_planned"], manifest_two["n_images"], manifest_two["n_skipped"]) == (10, 10, 0)


def test_train_sae_on_two_processes_matches_one(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    world = "--world.d 64 --world.n-objects 4 --world.n-attributes 4 --world.n-backgrounds 2"
    world += " --world.n-distractors 50"
    assert main(["synth", "--out", str(planted), "--n-images", "300", *world.split()]) == 0
    sae = "--dict-size 128 --k 3 --group-fractions 0.25 0.75 --batch-size 1024 --steps 300 --lr 3e-3"
    sae += " --warmup-steps 20 --threshold-start-step 100 --checkpoint-every 100 --no-progress"
    args = ["train-sae", "--features", str(planted / "features"), *sae.split()]
    two, one = tmp_path / "atlas2", tmp_path / "atlas1"
    _run([*args, "--out", str(two)], processes=2)
    _run([*args, "--out", str(one)])
    for atlas in (one, two):  # one set of atlas files, no checkpoint or temp file left behind
        assert sorted(p.name for p in atlas.iterdir()) == ["sae.json", "sae.safetensors", "sae_metrics.json",
                                                            "stages"]  # fmt: skip
        assert sorted(AtlasLayout(atlas).stage_records()) == ["train-sae"]
    m1 = json.loads((one / "sae_metrics.json").read_text())
    m2 = json.loads((two / "sae_metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["steps"] == m1["steps"] == 300
    assert m2["samples_seen"] == m1["samples_seen"] == 300 * 1024  # same global batch
    assert m1["fve"] > 0.8, m1["fve"]
    assert m2["fve"] > 0.8, m2["fve"]
    assert abs(m1["fve"] - m2["fve"]) < 0.02, (m1["fve"], m2["fve"])
    assert m2["thresholded"]
    assert abs(m2["l0"] - m1["l0"]) < 1.0, (m1["l0"], m2["l0"])
    assert MatryoshkaSAE.load(two / "sae.safetensors").cfg == MatryoshkaSAE.load(one / "sae.safetensors").cfg

    mtime = (two / "sae.safetensors").stat().st_mtime_ns  # every rank agrees: up to date
    done = _run([*args, "--out", str(two)], processes=2)
    assert "up to date" in done.stderr
    assert (two / "sae.safetensors").stat().st_mtime_ns == mtime


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from insight_core import distributed
    from insight_core.data.features import scan_features
    from insight_core.models.sae import SAEConfig
    from insight_core.training.sae import SAETrainer, TrainConfig

    features, out = Path(sys.argv[1]), Path(sys.argv[2])
    info = distributed.init_from_env("cpu")
    train, _ = scan_features(features).split(0.1, seed=0)
    sae_cfg = SAEConfig(d_in=32, dict_size=48, k=2, group_fractions=(0.25, 0.75))
    cfg = TrainConfig(lr=1e-3, batch_size=128, steps=45, warmup_steps=5, threshold_start_step=10,
                      checkpoint_every=10, dead_after_samples=500, seed=0, device="cpu")
    reference = SAETrainer(sae_cfg, cfg, train.n_rows)
    reference.fit(train, progress=False)

    class Crash(Exception):
        pass

    def crash_at_27(step, _):
        if step == 27:
            raise Crash

    ckpt = out / "state.safetensors"
    try:
        crashing = SAETrainer(sae_cfg, cfg, train.n_rows)
        crashing.fit(train, checkpoint=ckpt, progress=False, on_step=crash_at_27)
    except Crash:
        pass
    distributed.barrier()
    resumed = SAETrainer(sae_cfg, cfg, train.n_rows)
    resumed.fit(train, checkpoint=ckpt, progress=False)
    agree = resumed._replicas_agree()
    if info.is_main:
        diff = max(float((a - b).abs().max()) for a, b in
                   zip(reference.sae.state_dict().values(), resumed.sae.state_dict().values()))
        doc = {"world": info.world_size, "step": resumed.state.step, "max_diff": diff, "agree": agree,
               "samples_seen": resumed.state.samples_seen}
        (out / "result.json").write_text(json.dumps(doc))
    distributed.cleanup()
    """
)


def test_interrupted_two_process_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    features = planted_features(tmp_path, n=3000)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(features), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    assert result["step"] == 45
    assert result["samples_seen"] == 45 * 128
    assert result["agree"], result  # the replicas stayed bitwise identical
    assert result["max_diff"] < 1e-6, result


def test_timm_layers_on_two_processes_equal_one(photos: tuple[Path, Path], tmp_path: Path) -> None:
    """Several timm layers in one pass: each layer folder is the same under torchrun."""
    from insight_core.models.timm_backbone import TimmBackbone, TimmConfig

    images, _ = photos
    weights = tmp_path / "vit.safetensors"
    model = TimmBackbone(TimmConfig(name="vit_tiny_patch16_224", pretrained="none", device="cpu")).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    args = ["extract", "--images", str(images), "--backbone", "timm:vit_tiny_patch16_224",
            "--pretrained", str(weights), "--layer", "-1", "-3", "--shard-size", "3", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    _run([*args, "--out", str(two)], processes=2)
    _run([*args, "--out", str(one)])
    for layer in ("layer_-1", "layer_-3"):
        shards = sorted((one / layer).glob("shard_*.npy"))
        assert len(shards) == 4
        for npy in shards:
            assert np.array_equal(np.load(npy), np.load(two / layer / npy.name)), npy
        manifest = json.loads((one / layer / "manifest.json").read_text())
        assert manifest == json.loads((two / layer / "manifest.json").read_text())
        assert manifest["n_images"] == 10


def test_streamed_train_sae_on_two_processes_matches_one(photos: tuple[Path, Path], tmp_path: Path) -> None:
    """train-sae --stream under torchrun: rank 0 plans, each rank computes the features of its own
    chunks only; the global batch, steps and quality are a single process's; no array is stored."""
    images, _ = photos
    sae = "--dict-size 32 --k 4 --group-fractions 0.25 0.75 --batch-size 128 --steps 30 --lr 1e-2"
    sae += " --warmup-steps 3 --threshold-start-step 10 --held-out-fraction 0.2 --seed 1 --no-progress"
    args = ["train-sae", "--stream", "--images", str(images), "--backbone", "timm:vit_tiny_patch16_224",
            "--pretrained", "none", "--shard-size", "4", *sae.split()]  # fmt: skip
    runs = {}
    for processes in (2, 1):
        out = tmp_path / f"p{processes}"
        _run([*args, "--features", str(out / "features"), "--out", str(out / "atlas")], processes=processes)
        runs[processes] = json.loads((out / "atlas" / "sae_metrics.json").read_text())
        plan = json.loads((out / "features" / "manifest.json").read_text())
        assert plan["storage"] == "stream"
        assert plan["n_images"] == 10
    assert not list(tmp_path.rglob("*.npy"))  # streamed: no feature array anywhere
    one, two = runs[1], runs[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["steps"] == one["steps"] == 30
    assert two["samples_seen"] == one["samples_seen"] == 30 * 128  # same global batch
    assert two["features_storage"] == one["features_storage"] == "stream"
    assert min(one["fve"], two["fve"]) > 0.5, (one["fve"], two["fve"])
    assert abs(one["fve"] - two["fve"]) < 0.05, (one["fve"], two["fve"])
