"""On CUDA the evaluations give the CPU's results (run with ``-m gpu`` on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from insight_core.evaluation.concept_metrics import ConceptMetricsConfig, run_concept_metrics
from insight_core.evaluation.ovs import OvsClasses, OvsConfig, class_prompts, run_ovs
from tests.insight_core.evaluation.test_concept_metrics import _world

pytestmark = pytest.mark.gpu


def test_concept_metrics_on_cuda_match_cpu(tmp_path: Path) -> None:
    ms, sae, _, _ = _world(tmp_path)
    cfg = ConceptMetricsConfig(min_images=2)
    cpu, _ = run_concept_metrics(ms, sae, cfg, partial=tmp_path / "a", key="k", progress=False)
    gpu, _ = run_concept_metrics(ms, sae.to("cuda"), cfg, partial=tmp_path / "b", key="k", progress=False)
    assert gpu.ent_sum_m.is_cuda
    for key in ("locality", "consistency", "impurity"):
        assert getattr(gpu.result(cfg), key) == pytest.approx(getattr(cpu.result(cfg), key), abs=1e-6)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_ovs_on_cuda_matches_cpu(tmp_path: Path, upsample: str) -> None:
    ms, sae, _, _ = _world(tmp_path)
    cfg = OvsConfig(upsample=upsample, background_prompt=True)
    names, prompts, values = zip(*class_prompts(ms.labels, cfg), strict=True)
    emb = torch.nn.functional.normalize(torch.randn(len(names), sae.cfg.d_in), dim=-1).numpy()
    classes = OvsClasses(names, prompts, values, emb)
    cpu, _ = run_ovs(ms, sae, classes, cfg, partial=tmp_path / "a", key="k", progress=False)
    gpu, _ = run_ovs(ms, sae.to("cuda"), classes, cfg, partial=tmp_path / "b", key="k", progress=False)
    a, b = cpu.result(), gpu.result()
    assert gpu.conf_insight_kk.is_cuda
    # ties between classes can fall either way on another device: allow a handful of pixels
    diff = (cpu.conf_insight_kk - gpu.conf_insight_kk.cpu()).abs().sum()
    assert int(diff) <= 0.001 * int(cpu.conf_insight_kk.sum())
    assert b["insight"]["miou"] == pytest.approx(a["insight"]["miou"], abs=1e-3)
    assert b["dense"]["miou"] == pytest.approx(a["dense"]["miou"], abs=1e-3)
