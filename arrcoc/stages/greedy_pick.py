"""Greedy max-min selection (DivPrune-like), the loop at the end of :func:`arrcoc.stages.balance.pick_patches`.

:func:`greedy_maxmin_reference` is the loop in torch: ``steps`` steps of argmax, gather and minimum over
``(B, N)``, about five small kernels each. On CUDA, :func:`greedy_maxmin` runs the same loop as one Triton
kernel (``_greedy_pick_triton``), registered as the custom op ``arrcoc::greedy_maxmin`` so that
``torch.compile`` keeps it as one opaque call and a CUDA graph captures one launch. Both give the same bits:
the kernel only compares, takes minima and counts, as the loop does.

``ARRCOC_PICK_KERNEL=0`` in the environment (read once, at import) or ``greedy_pick.USE_KERNEL = False``
before a pipeline first runs makes CUDA use the torch loop too, to measure against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import kernel_enabled

__all__ = ["greedy_maxmin", "greedy_maxmin_reference", "USE_KERNEL"]

#: Whether CUDA tensors go to the Triton kernel (else the torch loop everywhere).
USE_KERNEL: bool = kernel_enabled("ARRCOC_PICK_KERNEL")


def greedy_maxmin_reference(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
    """Greedy max-min in torch: at each live step keep the patch of highest score, then lower every score to
    that patch's row of ``weighted`` (the first pick replaces the scores with its row).

    Args:
        weighted: ``(B, N, N)`` ``[b, p, q]``: candidate ``q``'s score once ``p`` is kept; ``-inf`` where ``q``
            cannot be picked (padding, and ``q == p``: a kept patch is not picked again).
        score: ``(B, N)`` each candidate's score before the first pick; ``-inf`` where it cannot be picked.
        live: ``(B, steps)`` bool, whether each step may keep a patch (the steps inside the image's budget).

    Returns:
        ``(B, N)`` float32: 1 on each kept patch, 0 elsewhere. Ties go to the lower index (``argmax``); a step
        whose best score is ``-inf`` (or NaN) keeps nothing.
    """
    b, n = score.shape
    chosen = score.new_zeros(b, n, dtype=torch.float32)  # (B, N)
    for step in range(live.shape[1]):  # a Python int: the step count depends on the capacity only
        pick = score.argmax(-1, keepdim=True)  # (B, 1)
        take = live[:, step : step + 1] & (score.gather(1, pick) > -torch.inf)  # (B, 1) a real patch, not kept yet
        chosen.scatter_add_(1, pick, take.float())
        row = weighted.gather(1, pick[..., None].expand(-1, -1, n))[:, 0]  # (B, N)
        score = torch.where(take, row if step == 0 else torch.minimum(score, row), score)
    return chosen


def _kernel(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
    from . import _greedy_pick_triton  # Triton is imported on the first CUDA call only

    return _greedy_pick_triton.launch(weighted, score, live)


if hasattr(torch.library, "custom_op"):  # torch >= 2.4

    @torch.library.custom_op("arrcoc::greedy_maxmin", mutates_args=())
    def _greedy_maxmin_op(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
        return greedy_maxmin_reference(weighted, score, live)

    @_greedy_maxmin_op.register_fake
    def _(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
        return score.new_empty(score.shape, dtype=torch.float32)

    @_greedy_maxmin_op.register_kernel("cuda")
    def _(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
        return _kernel(weighted, score, live)

    _cuda_call = _greedy_maxmin_op
else:  # older torch: the kernel runs eagerly and graphs capture it; torch.compile breaks the graph around it
    _cuda_call = _kernel


def greedy_maxmin(weighted: Tensor, score: Tensor, live: Tensor) -> Tensor:
    """:func:`greedy_maxmin_reference`, as one Triton kernel on CUDA (when Triton is there and ``USE_KERNEL``).

    Same arguments, same result, bit for bit.
    """
    if USE_KERNEL and weighted.is_cuda:  # the picks are piecewise constant: no gradient, as from the loop's argmax
        return _cuda_call(weighted.detach(), score.detach(), live)
    return greedy_maxmin_reference(weighted, score, live)
