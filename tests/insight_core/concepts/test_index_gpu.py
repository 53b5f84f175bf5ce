"""GPU install check (``requirements-gpu.txt``): CUDA torch and the official faiss-gpu wheel in one process.

pip install -r requirements-gpu.txt && pip install --no-deps -e .
python -m pytest -q -rs -m gpu tests/insight_core/concepts/test_index_gpu.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.concepts.index import IndexConfig, build_index, describe_index, search

pytestmark = pytest.mark.gpu


def test_faiss_gpu_and_cuda_torch_work_together() -> None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-cpu is installed: pip install -r requirements-gpu.txt for the GPU build")
    assert faiss.get_num_gpus() >= 1, "faiss-gpu sees no GPU (CUDA 12 runtime or driver missing?)"
    x = torch.randn(4096, 64, device="cuda")  # CUDA torch (its own CUDA runtime) in the same process
    assert torch.isfinite(x @ x.T).all()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_000, 64)).astype(np.float32)
    index = build_index(vectors, IndexConfig(ivf_threshold=10_000, nlist=64, pq_m=16, use_gpu="always"))
    info = describe_index(index)
    assert info["type"] == "ivfpq"
    assert info["ntotal"] == 20_000
    _, ids = search(index, vectors[:200], 10, nprobe=64)
    assert (ids == np.arange(200)[:, None]).any(axis=1).mean() >= 0.5  # PQ codes are approximate
