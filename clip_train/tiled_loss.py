"""InfoNCE computed in tiles: the loss and its gradients without ever holding the B x B logits.

The full loss materialises the logits, their softmax and their gradient: ~16 bytes x B^2, which
bounds the contrastive batch long before the towers do (docs/benchmarks.md). As in Inf-CL (Cheng
et al., 2024, "Breaking the Memory Barrier"), the forward pass walks the similarity matrix tile
by tile and keeps only a running log-sum-exp per row (and per column); the backward pass
recomputes each tile's logits from the saved features and lse vectors and accumulates the feature
and temperature gradients. Memory is O(B x D + tile^2); the result equals the full loss to
rounding. Written here because the libraries that do this (inf-cl and similar) are Triton/CUDA
kernels with their own ring communication: they neither run on the CPU nor compose with our
feature gathering and GradCache.

Logits are computed in fp32 whatever the input dtype (autocast is turned off inside): the tiles
are small, and the lse accumulation needs the precision.
"""

from __future__ import annotations

import torch


def _tiles(n: int, tile: int):
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


class _TiledCrossEntropy(torch.autograd.Function):
    """Cross-entropy over the rows of `scale * x @ y.T` with labels `offset + i`, and with
    `symmetric` also over its columns (labels `j`; x and y then pair up one to one).

    Returns (mean row loss, mean column loss); the column loss is 0 when not symmetric.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        offset: int,
        tile: int,
        symmetric: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(x):
            xf, yf, s = x.float(), y.float(), scale.float()
            n, m = xf.shape[0], yf.shape[0]
            row_lse = xf.new_full((n,), float("-inf"))
            col_lse = xf.new_full((m,), float("-inf")) if symmetric else None
            for r0, r1 in _tiles(n, tile):
                for c0, c1 in _tiles(m, tile):
                    logits = s * (xf[r0:r1] @ yf[c0:c1].T)
                    row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], logits.logsumexp(dim=1))
                    if symmetric:
                        col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], logits.logsumexp(dim=0))
            positive = s * (xf * yf[offset : offset + n]).sum(dim=1)
            row_loss = (row_lse - positive).mean()
            col_loss = (col_lse - positive).mean() if symmetric else row_loss.new_zeros(())
        ctx.save_for_backward(x, y, scale, row_lse, col_lse if symmetric else row_lse)
        ctx.offset, ctx.tile, ctx.symmetric = offset, tile, symmetric
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor, grad_col: torch.Tensor):
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        offset, tile, symmetric = ctx.offset, ctx.tile, ctx.symmetric
        with _no_autocast(x):
            xf, yf, s = x.float(), y.float(), scale.float()
            n, m = xf.shape[0], yf.shape[0]
            # d loss / d logits = softmax / n per direction, minus the one-hot labels (done below)
            w_row = grad_row.float() / n
            w_col = grad_col.float() / m if symmetric else None
            dx, dy = torch.zeros_like(xf), torch.zeros_like(yf)
            d_scale = torch.zeros((), dtype=torch.float32, device=xf.device)
            for r0, r1 in _tiles(n, tile):
                for c0, c1 in _tiles(m, tile):
                    raw = xf[r0:r1] @ yf[c0:c1].T
                    logits = s * raw
                    g = (logits - row_lse[r0:r1, None]).exp_().mul_(w_row)
                    if symmetric:
                        g.add_((logits - col_lse[None, c0:c1]).exp_().mul_(w_col))
                    dx[r0:r1].addmm_(g, yf[c0:c1])
                    dy[c0:c1].addmm_(g.T, xf[r0:r1])
                    d_scale += (g * raw).sum()
            # the labels: -w at (i, offset + i) in each direction
            w_pos = w_row + (w_col if symmetric else 0.0)
            y_pos = yf[offset : offset + n]
            dx.sub_(w_pos * y_pos)
            dy[offset : offset + n].sub_(w_pos * xf)
            d_scale -= w_pos * (xf * y_pos).sum()
            dx.mul_(s)
            dy.mul_(s)
        return dx.to(x.dtype), dy.to(y.dtype), d_scale.to(scale.dtype), None, None, None


def tiled_cross_entropy(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: int = 0,
    tile: int = 1024,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of the rows of `scale * x @ y.T` (labels `offset + i`) and, with
    `symmetric`, of its columns; the second value is None when not symmetric."""
    if tile < 1:
        raise ValueError(f"tile must be positive, not {tile}")
    if offset < 0 or offset + x.shape[0] > y.shape[0]:
        raise ValueError(
            f"rows {offset}..{offset + x.shape[0]} have no positive among {y.shape[0]} columns"
        )
    if symmetric and (offset or x.shape[0] != y.shape[0]):
        raise ValueError("the symmetric loss needs as many rows as columns and offset 0")
    row, col = _TiledCrossEntropy.apply(x, y, scale, offset, tile, symmetric)
    return row, (col if symmetric else None)
