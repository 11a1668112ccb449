"""Budgeted token allocation: relevance -> integer tokens per region, exactly the budget per image.

The continuous allocation is water-filling: ``x_r = clamp(lam * w_r, lo_r, hi_r)`` with ``lam`` chosen per image
so that ``sum(x) = budget``. ``S(lam) = sum_r x_r`` is piecewise linear and increasing, so ``lam`` is solved
exactly from its breakpoints (no iteration, no host sync). The integer allocation is ``floor(x)`` plus one
token for the regions with the largest fractional parts (ties: larger relevance, then lower index) until the
budget is met.

Both steps need an order over the regions. For small problems it is counted pairwise (``O(R^2)`` elementwise
work, a few kernels); for large ones it is sorted (float64 radix sorts dominated the stage's GPU time on small
problems: docs/decisions.md). The choice depends on shapes only, so it is fixed at capture; both give the same
allocation.

Guarantees: exact sum; bounds; monotone (more relevance never means fewer tokens, bounds permitting);
deterministic; static shapes.

On CUDA, outside ``torch.compile``, :class:`Allocator` is one Triton kernel (``_allocation_triton``; ``USE_KERNEL``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import BudgetError, InvalidInputError, InvalidTypeError
from .kernels import kernel_enabled, runs_kernel

__all__ = ["allocate", "Allocator", "USE_KERNEL"]

_FLOOR = 1e-6  # added weight (relative to the largest) so every region has positive weight
#: Pairwise orders up to this many compared pairs per call (``B * R * R``, or ``B * 2R * R`` for the level); sorts
#: beyond, where pairwise measured slower (docs/decisions.md).
PAIRWISE_PAIRS = 1 << 22
#: Whether :class:`Allocator` runs as one Triton kernel on CUDA (``ARRCOC_ALLOCATION_KERNEL=0``: the torch form).
USE_KERNEL: bool = kernel_enabled("ARRCOC_ALLOCATION_KERNEL")
#: Regions per image up to which the kernel runs (each region's place is counted against every other, per image).
KERNEL_REGIONS = 1024


def _solve_level(weight: Tensor, low: Tensor, high: Tensor, budget: Tensor) -> Tensor:
    """The continuous allocation ``clamp(lam * weight, low, high)`` summing to ``budget`` per row.

    Args:
        weight: ``(B, R)`` float64, positive.
        low, high: ``(B, R)`` float64 bounds, ``low <= high``.
        budget: ``(B,)`` float64 within ``[sum(low), sum(high)]``.

    Returns:
        ``(B, R)`` float64.
    """
    # Region r is at `low` until lam = low/w, grows with slope w, and saturates at lam = high/w.
    starts, stops = low / weight, high / weight
    events = torch.cat((starts, stops), 1)  # (B, 2R)
    if events.numel() * weight.shape[1] <= PAIRWISE_PAIRS:
        lam0, s0, k0 = _last_event_pairwise(events, weight, low, high, starts, stops, budget)
    else:
        lam0, s0, k0 = _last_event_sorted(events, weight, low, high, budget)
    lam = lam0 + (budget[:, None] - s0).clamp_min(0) / k0.clamp_min(1e-300)
    return torch.minimum(torch.maximum(lam * weight, low), high)


def _last_event_sorted(
    events: Tensor, weight: Tensor, low: Tensor, high: Tensor, budget: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The last event where ``S`` does not exceed the budget, with ``S`` and its slope just after it: ``(B, 1)``
    each. ``S`` at every event from a sort and two cumulative sums."""
    slope_delta = torch.cat((weight, -weight), 1)
    const_delta = torch.cat((-low, high), 1)
    events, order = torch.sort(events, dim=1, stable=True)
    slope = torch.cumsum(slope_delta.gather(1, order), 1)  # slope right after each event
    const = torch.cumsum(const_delta.gather(1, order), 1)
    total = low.sum(1, keepdim=True) + const + slope * events  # S at each event
    # Before the first event S = sum(low) <= budget.
    last = ((total <= budget[:, None]).sum(1, keepdim=True) - 1).clamp_min(0)  # (B, 1)
    return events.gather(1, last), total.gather(1, last), slope.gather(1, last)


def _last_event_pairwise(
    events: Tensor, weight: Tensor, low: Tensor, high: Tensor, starts: Tensor, stops: Tensor, budget: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`_last_event_sorted`, with ``S`` evaluated at every event directly (``(B, 2R, R)`` work)."""
    total = (events[:, :, None] * weight[:, None, :]).clamp(low[:, None, :], high[:, None, :]).sum(2)  # (B, 2R)
    lam0 = torch.where(total <= budget[:, None], events, -torch.inf).amax(1, keepdim=True)
    # S is increasing, so the first event qualifies unless rounding lifts it a hair above sum(low) = budget
    lam0 = torch.where(lam0 > -torch.inf, lam0, events.amin(1, keepdim=True))
    s0 = (lam0 * weight).clamp(low, high).sum(1, keepdim=True)
    k0 = torch.where((starts <= lam0) & (lam0 < stops), weight, 0.0).sum(1, keepdim=True)  # regions still growing
    return lam0, s0, k0


def _round(level: Tensor, relevance: Tensor, low: Tensor, high: Tensor, budget: Tensor) -> Tensor:
    """Integer allocation from the continuous one, summing exactly to ``budget``.

    Ties of the fractional part are broken by the *original* relevance (the floored weights can tie where
    relevance does not, e.g. 0 and 1e-33), then by index, which keeps the allocation monotone.
    """
    base = torch.minimum(torch.maximum(torch.floor(level), low), high)  # (B, R)
    missing = budget - base.sum(1)  # (B,) >= 0
    fraction = torch.where(base < high, level - base, -1.0)  # no room: never picked
    extra = (_priority_rank(fraction, relevance) < missing[:, None]) & (base < high)
    return (base + extra).long()


def _priority_rank(fraction: Tensor, relevance: Tensor) -> Tensor:
    """Each region's place (0 first) in the order: larger fraction, then larger relevance, then lower index."""
    b, n = fraction.shape
    index = torch.arange(n, device=fraction.device)
    if b * n * n <= PAIRWISE_PAIRS:  # count the regions ahead of each
        f_mine, f_other = fraction[:, :, None], fraction[:, None, :]
        r_mine, r_other = relevance[:, :, None], relevance[:, None, :]
        earlier = index[None, :] < index[:, None]  # [mine, other]: the other comes first
        ahead = (f_other > f_mine) | ((f_other == f_mine) & ((r_other > r_mine) | ((r_other == r_mine) & earlier)))
        return ahead.sum(2)
    # stable sorts, last key first
    order = torch.sort(relevance, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(fraction.gather(1, order), dim=1, descending=True, stable=True).indices)
    return torch.empty_like(order).scatter_(1, order, index.expand_as(order))


def _allocate(relevance: Tensor, budget: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Unchecked allocation: ``(B, R)`` float, ``(B,)`` int, ``(B, R)`` int bounds -> ``(B, R)`` int64."""
    relevance = relevance.double().clamp_min(0)
    weight = relevance + _FLOOR * (relevance.amax(1, keepdim=True) + 1)  # zero-weight regions are served last
    low, high, total = low.double(), high.double(), budget.double()
    level = _solve_level(weight, low, high, total)
    return _round(level, relevance, low, high, total)


def _uses_kernel(relevance: Tensor) -> bool:
    """Whether :class:`Allocator` launches its Triton kernel (float32 on CUDA, at most ``KERNEL_REGIONS`` regions an
    image)."""
    return runs_kernel(relevance, USE_KERNEL) and relevance[0].numel() <= KERNEL_REGIONS


_INT64 = 2**62  # Python ints beyond this cannot be summed in int64 without overflow


def _as_bounds(value: int | Tensor, like: Tensor, name: str, check: bool) -> Tensor:
    if isinstance(value, Tensor):
        if check and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise InvalidTypeError(f"{name} must be an integer tensor; got {value.dtype}")
        if check:
            try:
                fits = torch.broadcast_shapes(value.shape, like.shape) == like.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise InvalidInputError(
                    f"{name} must broadcast to relevance's shape {tuple(like.shape)}; got shape {tuple(value.shape)}"
                )
        return value.to(like.device, torch.long).broadcast_to(like.shape)
    if check and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidTypeError(f"{name} must be an int or an integer tensor; got {value!r} ({type(value).__name__})")
    if check and not -_INT64 < value < _INT64:
        raise InvalidInputError(f"{name} must be within +-2**62; got {value}")
    return torch.full(like.shape, int(value), dtype=torch.long, device=like.device)


def _check_budget(budget: int | Tensor, batch: int) -> None:
    if isinstance(budget, Tensor):
        if budget.dtype == torch.bool or budget.is_floating_point() or budget.is_complex():
            raise BudgetError(f"budget must be an int or an integer (B,) tensor; got a {budget.dtype} tensor")
        if budget.shape not in ((batch,), ()):
            raise BudgetError(f"budget tensor must have shape ({batch},); got {tuple(budget.shape)}")
    elif isinstance(budget, bool) or not isinstance(budget, int):
        raise BudgetError(f"budget must be a whole number of tokens; got {budget!r} ({type(budget).__name__})")
    elif not -_INT64 < budget < _INT64:
        raise BudgetError(f"budget must be a whole number of tokens within +-2**62; got {budget}")


def allocate(
    relevance: Tensor,
    budget: int | Tensor,
    min_tokens: int | Tensor = 1,
    max_tokens: int | Tensor = 16,
    *,
    check: bool = True,
) -> Tensor:
    """Integer tokens per region, proportional to relevance within bounds, exactly ``budget`` per image.

    Args:
        relevance: ``(B, ...)`` non-negative float weights per region (e.g. ``(B, rh, rw)``).
        budget: tokens per image: an int, or a ``(B,)`` integer tensor.
        min_tokens: least tokens per region: an int or an integer tensor broadcastable to ``relevance``
            (0 lets a region be dropped).
        max_tokens: most tokens per region, likewise.
        check: validate the inputs (may read tensor values, so it syncs with the device). Pass ``False`` in
            code that must not sync, such as a captured CUDA graph; the result is then undefined for
            invalid inputs.

    Returns:
        ``relevance``-shaped int64: sums to ``budget`` per image; each region within its bounds; a region
        never gets fewer tokens than a less relevant one with the same bounds; ties go to the lower index.

    Raises:
        InvalidTypeError: a non-float relevance, or non-integer bounds.
        InvalidInputError: NaN, infinite or negative relevance, or ``min_tokens > max_tokens`` somewhere.
        BudgetError: a budget that is not a whole number, or outside ``[sum(min), sum(max)]`` for an image.
    """
    if check:
        if not isinstance(relevance, Tensor) or not relevance.is_floating_point():
            raise InvalidTypeError(
                f"relevance must be a floating-point tensor; got "
                f"{relevance.dtype if isinstance(relevance, Tensor) else type(relevance).__name__}"
            )
        if relevance.ndim < 2 or relevance.numel() == 0:
            raise InvalidInputError(
                f"relevance must have shape (B, ...regions) with at least one image and one region; "
                f"got {tuple(relevance.shape)}"
            )
        bad = (~torch.isfinite(relevance)).sum().item()  # ok-sync: validation (check=True)
        if bad:
            raise InvalidInputError(f"relevance holds {bad} NaN or infinite values")
        if (relevance < 0).any().item():  # ok-sync: validation (check=True)
            raise InvalidInputError(
                f"relevance must be non-negative; its minimum is {relevance.min().item():.4g}"  # ok-sync: the message
            )
        _check_budget(budget, relevance.shape[0])
    shape = relevance.shape
    flat = relevance.reshape(shape[0], -1)
    low = _as_bounds(min_tokens, relevance, "min_tokens", check).reshape(flat.shape)
    high = _as_bounds(max_tokens, relevance, "max_tokens", check).reshape(flat.shape)
    if isinstance(budget, Tensor):
        budget = budget.to(relevance.device, torch.long).broadcast_to((shape[0],))
    else:
        budget = torch.full((shape[0],), int(budget), dtype=torch.long, device=relevance.device)
    if check:
        if (low > high).any().item() or (low < 0).any().item():  # ok-sync: validation (check=True)
            raise InvalidInputError("min_tokens must be >= 0 and <= max_tokens for every region")
        lows, highs, budgets = low.sum(1).tolist(), high.sum(1).tolist(), budget.tolist()  # ok-sync: validation
        for i, (b, lo, hi) in enumerate(zip(budgets, lows, highs)):
            if not lo <= b <= hi:
                raise BudgetError(
                    f"budget {b} for image {i} cannot be met: it must be between {lo} (sum of "
                    f"min_tokens) and {hi} (sum of max_tokens)"
                )
    return _allocate(flat, budget, low, high).reshape(shape)


class Allocator(nn.Module):
    """Stage: balanced relevance -> integer tokens per region (unchecked, graph-safe).

    For an image whose budget is below the sum of its regions' minimum, the minimum becomes 0 (regions
    may then get no token), decided per image with tensor ops.
    """

    def forward(self, relevance: Tensor, budget: Tensor, min_tokens: Tensor, max_tokens: Tensor) -> Tensor:
        """Allocate.

        Args:
            relevance: ``(B, rh, rw)`` non-negative float.
            budget: ``(B,)`` int64, within ``[1, max_tokens.sum()]`` per image.
            min_tokens, max_tokens: ``(B, rh, rw)`` int64 bounds per region.

        Returns:
            ``(B, rh, rw)`` int64 summing to ``budget`` per image.
        """
        b = relevance.shape[0]
        low, high = min_tokens.reshape(b, -1), max_tokens.reshape(b, -1)
        if _uses_kernel(relevance):  # one launch; the same tokens but where a float64 rounding crosses a whole one
            from . import _allocation_triton  # Triton is imported on the first CUDA call only

            flat = relevance.reshape(b, -1)
            return _allocation_triton.launch(flat, budget, low, high, _FLOOR, drop_low=True).view_as(relevance)
        low = torch.where((budget < low.sum(1))[:, None], 0, low)
        return _allocate(relevance.reshape(b, -1), budget, low, high).view_as(relevance)
