"""Top-N exemplar sets of concepts and their merge: the streaming top-N of
:class:`~insight_core.concepts.stats.StatsAccumulator`.

An exemplar set holds, per concept, the N highest activations with their image id and patch index,
sorted by (activation desc, image id asc, patch index asc), and the sparse codes of the top
``top_w`` of them. The order is total, so the result does not depend on how patches were batched.
"""

from __future__ import annotations

import dataclasses

import torch


def lexsort_rows(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation (along the last dim) sorting by ``keys[0]``, then ``keys[1]``, ... (all ascending).

    Successive stable sorts from the least significant key; works row-wise on (T, L) or on 1-D keys.
    """
    perm = torch.arange(keys[0].shape[-1], device=keys[0].device).expand_as(keys[0]).contiguous()
    for key in reversed(keys):
        order = torch.sort(key.gather(-1, perm), dim=-1, stable=True).indices
        perm = perm.gather(-1, order)
    return perm


@dataclasses.dataclass
class Exemplars:
    """Top-N exemplars of ``T`` concepts, sorted by (act desc, image asc, patch asc); -inf/-1 padding."""

    act_tn: torch.Tensor
    image_tn: torch.Tensor
    patch_tn: torch.Tensor
    code_cols_twk: torch.Tensor
    """Active concepts of the top-``top_w`` exemplar patches (int32, -1 padding)."""
    code_vals_twk: torch.Tensor
    """Their activations (float32, 0 padding)."""


def pad_k(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    if t.shape[-1] >= k:
        return t
    pad = t.new_full((*t.shape[:-1], k - t.shape[-1]), fill)
    return torch.cat([t, pad], dim=-1)


def merge_exemplars(cur: Exemplars, new: Exemplars, top_n: int, top_w: int) -> Exemplars:
    """Merge two sorted exemplar sets of the same concepts into the sorted top ``top_n``.

    Because both inputs are sorted, an entry can only move *down* in rank; so an entry that ends in the
    merged top ``top_w`` was in the top ``top_w`` of its own input, where its code is available.
    """
    k = max(cur.code_cols_twk.shape[-1], new.code_cols_twk.shape[-1])
    act = torch.cat([cur.act_tn, new.act_tn], dim=1)
    img = torch.cat([cur.image_tn, new.image_tn], dim=1)
    patch = torch.cat([cur.patch_tn, new.patch_tn], dim=1)
    perm = lexsort_rows([-act, img, patch])[:, :top_n]
    n_cur = cur.act_tn.shape[1]
    src = perm[:, :top_w]
    code_src = torch.where(src < n_cur, src, src - n_cur + top_w)  # index into cat of the two code sets
    cols = torch.cat([pad_k(cur.code_cols_twk, k, -1), pad_k(new.code_cols_twk, k, -1)], dim=1)
    vals = torch.cat([pad_k(cur.code_vals_twk, k, 0.0), pad_k(new.code_vals_twk, k, 0.0)], dim=1)
    idx = code_src[:, :, None].expand(-1, -1, k)
    return Exemplars(
        act_tn=act.gather(1, perm),
        image_tn=img.gather(1, perm),
        patch_tn=patch.gather(1, perm),
        code_cols_twk=cols.gather(1, idx),
        code_vals_twk=vals.gather(1, idx),
    )
