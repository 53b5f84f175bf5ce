"""Sparse forward and backward of the Matryoshka shell loss (:meth:`MatryoshkaSAE.matryoshka_loss
<insight_core.models.sae.MatryoshkaSAE.matryoshka_loss>`): CSR views of one batch's BatchTopK
selection, and an autograd Function that decodes every shell with one sparse product and reaches the
encoder through sparse products instead of dense (B, m) matmuls.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class TopKSelection:
    """The latents kept by BatchTopK for a batch: parallel 1-D tensors of length K (<= B*k)."""

    rows_k: torch.Tensor
    """Batch row of each kept activation (int64)."""
    cols_k: torch.Tensor
    """Latent index of each kept activation (int64)."""
    vals_k: torch.Tensor
    """Pre-activation value (positive) of each kept activation, without autograd."""


@dataclasses.dataclass(frozen=True, slots=True)
class SparsePlan:
    """CSR views of one batch's BatchTopK selection, built once and reused by forward and backward.

    ``codes`` is (B, m); ``shells`` is the same non-zeros with row ``b*G + group(col)`` (B*G, m), so
    one spmm gives every group's partial decode. ``perm`` reorders the (row-major) non-zeros into
    column-major order for the transposed products.
    """

    codes: torch.Tensor
    shells: torch.Tensor
    shells_t_crow: torch.Tensor
    shells_t_col: torch.Tensor
    codes_t_col: torch.Tensor
    perm: torch.Tensor
    cols: torch.Tensor
    n_groups: int

    @staticmethod
    def build(sel: TopKSelection, b: int, m: int, group_id_m: torch.Tensor) -> SparsePlan:
        # torch calls CSR "beta" and warns about skipped invariant checks; the indices built here
        # are valid by construction and the ops used are covered by tests.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse", category=UserWarning)
            return SparsePlan._build(sel, b, m, group_id_m)

    @staticmethod
    def _build(sel: TopKSelection, b: int, m: int, group_id_m: torch.Tensor) -> SparsePlan:
        n_groups = int(group_id_m[-1]) + 1
        order = stable_argsort(sel.rows_k * m + sel.cols_k)
        rows, cols, vals = sel.rows_k[order], sel.cols_k[order], sel.vals_k[order]
        slots = rows * n_groups + group_id_m[cols]
        codes = torch.sparse_csr_tensor(_crow(rows, b), cols, vals, (b, m), check_invariants=False)
        shells = torch.sparse_csr_tensor(
            _crow(slots, b * n_groups), cols, vals, (b * n_groups, m), check_invariants=False
        )
        perm = stable_argsort(cols)  # stable: keeps rows ascending within each column
        return SparsePlan(
            codes=codes,
            shells=shells,
            shells_t_crow=_crow(cols, m),
            shells_t_col=slots[perm],
            codes_t_col=rows[perm],
            perm=perm,
            cols=cols,
            n_groups=n_groups,
        )

    def transposed(self, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.shells_t_crow, col, values[self.perm], (len(self.shells_t_crow) - 1, n_cols)
        )


def stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """Stable argsort. On CPU numpy's is used: torch's parallel CPU sort was ~200x slower here."""
    if keys.is_cuda:
        return torch.sort(keys, stable=True).indices
    return torch.from_numpy(keys.numpy().argsort(kind="stable"))


def _crow(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=sorted_rows.device)
    crow[1:] = torch.bincount(sorted_rows, minlength=n_rows).cumsum(0)
    return crow


class SparseShellLoss(torch.autograd.Function):
    """Per-shell MSE (G,) of the selected codes' nested reconstructions, with a sparse backward.

    Forward: one spmm gives every group's partial decode; an in-place cumsum over groups turns them
    into the shell reconstructions and then into residuals ``x - x_hat_g`` (one (B, G, d) buffer).
    Backward: dL/dx_hat_g is proportional to the residual; its reverse cumsum over groups is the
    gradient of each group's partial decode. The kept code values are ``(x - b_dec) . W_enc[c] +
    b_enc[c]`` (positive by selection), so their gradients reach the encoder through sparse
    products instead of dense (B, m) matmuls.
    """

    @staticmethod
    def forward(ctx, x_bd, w_enc_md, b_enc_m, w_dec_md, b_dec_d, plan: SparsePlan):
        b, d = x_bd.shape
        err_bgd = (plan.shells @ w_dec_md).view(b, plan.n_groups, d)
        err_bgd.cumsum_(1)
        err_bgd.sub_((x_bd - b_dec_d)[:, None, :]).neg_()  # x - (b_dec + partial sums)
        shell_mse_g = torch.linalg.vector_norm(err_bgd, dim=(0, 2)).square() / b
        ctx.save_for_backward(x_bd, w_enc_md, w_dec_md, b_dec_d, err_bgd)
        ctx.plan = plan
        residual_bd = err_bgd[:, -1].clone()
        ctx.mark_non_differentiable(residual_bd)
        return shell_mse_g, residual_bd

    @staticmethod
    def backward(ctx, grad_mse_g, _grad_residual):
        x_bd, w_enc_md, w_dec_md, b_dec_d, err_bgd = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        b, n_groups, d = err_bgd.shape
        m = w_dec_md.shape[0]
        grad_part = err_bgd * (grad_mse_g * (-2.0 / b))[None, :, None]  # dL/dx_hat_g
        for g in range(n_groups - 2, -1, -1):  # reverse cumsum: group g feeds shells g..G-1
            grad_part[:, g] += grad_part[:, g + 1]
        grad_b_dec = grad_part[:, 0].sum(0)
        grad_part = grad_part.view(b * n_groups, d)
        # decoder rows: S_shells^T @ dL/dpartial; code values: <dL/dpartial[slot], W_dec[c]> (SDDMM)
        grad_w_dec = plan.transposed(plan.shells_t_col, plan.shells.values(), b * n_groups) @ grad_part
        grad_vals = torch.sparse.sampled_addmm(plan.shells, grad_part, w_dec_md.t(), beta=0.0).values()
        # encoder: G^T @ (x - b_dec) and G @ W_enc, G = code gradients on the selection's pattern
        codes_grad = torch.sparse_csr_tensor(
            plan.codes.crow_indices(), plan.cols, grad_vals, (b, m), check_invariants=False
        )
        grad_w_enc = plan.transposed(plan.codes_t_col, grad_vals, b) @ (x_bd - b_dec_d)
        grad_b_enc = torch.zeros(m, dtype=grad_vals.dtype, device=grad_vals.device)
        grad_b_enc.index_add_(0, plan.cols, grad_vals)
        grad_b_dec = grad_b_dec - (codes_grad @ w_enc_md).sum(0)
        return None, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None
