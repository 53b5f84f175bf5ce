"""Comparisons of results computed in differently composed batches (batch size, batch members, thread
count, process count).

CPU kernels (oneDNN, BLAS) choose their blocking, and so the order of float32 additions, by the shape
of the whole batch: the same input row can come out a few float32 ulps apart in two batchings, and
PyTorch promises nothing else. Such results are compared with the tolerances below, never bitwise.
Reruns with identical batches (resuming the same run) may still be compared exactly.
"""

from __future__ import annotations

import numpy as np
import torch

FP16_RTOL = 2.0**-9
"""Two fp16 ulps, relative: fp16 keeps 10 mantissa bits, so one ulp is at most ``|x| * 2**-10``. Two
float32 results a few ulps apart round to the same fp16 value or to neighbours (one ulp); two leaves
room for a value that also crosses a power of two."""

FP16_ATOL = 2.0**-14
"""Absolute floor (~6e-5) for values near zero: their float32 error comes from dot products over
hundreds of O(1) terms (~1e-6 .. 1e-5 absolute), which can exceed a tiny value's own fp16 ulps."""

FLIPPED_FRACTION = 0.05
"""At most this share of values may differ at all: batching noise flips the fp16 rounding of ~0.1 %
of them; a real change (other preprocessing, other weights) moves nearly all of them."""


def assert_fp16_features_close(got: np.ndarray, want: np.ndarray, what: str = "features") -> None:
    """fp16 features of the same images extracted in different batches agree to fp16 rounding."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    a, b = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(a, b, rtol=FP16_RTOL, atol=FP16_ATOL, err_msg=what)
    flipped = float((a != b).mean())
    assert flipped <= FLIPPED_FRACTION, f"{what}: {flipped:.1%} of the values differ, not just rounding"


CODE_ATOL = 1e-5
"""float32 SAE pre-activations of one input in two batchings: d-term dot products of O(1) values
differ by at most a few 1e-6; 1e-5 leaves a margin."""


def assert_codes_match(
    got: torch.Tensor, want: torch.Tensor, threshold: torch.Tensor | float, what: str = "codes"
) -> None:
    """Thresholded SAE codes (``pre * (pre > threshold)``) of the same inputs in different batches.

    Active values agree within :data:`CODE_ATOL`; a latent may be active on one side only when its
    pre-activation lies within that of its threshold (the rounding decided the comparison).
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    thr = torch.as_tensor(threshold, dtype=got.dtype).expand_as(got)
    both = (got > 0) & (want > 0)
    torch.testing.assert_close(got[both], want[both], rtol=0, atol=CODE_ATOL, msg=lambda m: f"{what}: {m}")
    one_side = (got > 0) != (want > 0)
    active = torch.maximum(got, want)[one_side]
    off = (active - thr[one_side]).abs()
    assert bool((off <= CODE_ATOL).all()), (
        f"{what}: {int(one_side.sum())} latents active in one batching only, up to {float(off.max()):.3g} "
        "from the threshold (only values at the threshold may flip)"
    )
