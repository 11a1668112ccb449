"""Where each visual token lies, as a vector the language model adds to it: :class:`TokenPositions`.

A LLaVA-style model numbers its image tokens in one dimension, in raster order. When every patch is read, that
order tells where each token lies, if only implicitly (token ``r * W + c`` is row ``r``, column ``c``). For
compressed tokens it tells nothing: the ``k``-th of 63 tokens can lie anywhere, and a merged token (uniform
pooling, ToMe) covers an area. The reducers return each token's box (row, column, height, width in patches)
next to the token; this module turns the box, relative to the image's patch grid, into a vector added to the
projected token, so "which side is the cross on" has an answer in the token the question attends to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError
from ..stages.regions import patch_boxes

__all__ = ["TokenPositions", "add_token_positions"]


class TokenPositions(nn.Module):
    """Boxes ``(B, K, 4)`` in patches -> ``(B, K, hidden_size)`` vectors to add to the projected tokens.

    The box's centre and size, as shares of the grid (so 224 and 384 px images agree), go through sines and
    cosines at ``frequencies`` octaves, one linear layer and a learned gain. The layer starts at zero: a model
    trained without positions gets this module added and starts exactly where it was. The gain starts at
    ``gain``: projected visual tokens are large (norm ~70 in the shipped model, against ~1.5 for a word
    embedding), and a unit-scale layer stepping at the model's learning rate stayed ~40x below them, too small
    for the language model's RMS norms to let through (a first run with gain 1 still answered "right" to
    every side question).
    """

    def __init__(self, hidden_size: int, frequencies: int = 6, gain: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        self.proj = nn.Linear(4 * 2 * frequencies, hidden_size)
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.initial_gain = float(gain)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Back to the start: zero output, the initial gain."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        with torch.no_grad():
            self.gain.fill_(self.initial_gain)

    def forward(self, boxes: Tensor, grid: tuple[int, int]) -> Tensor:
        """``boxes`` ``(B, K, 4)`` (row, col, height, width) on a ``grid`` of ``(gh, gw)`` patches."""
        gh, gw = grid
        row, col, height, width = boxes.to(self.scales.dtype).unbind(-1)  # (B, K) each
        shares = torch.stack(((row + height / 2) / gh, (col + width / 2) / gw, height / gh, width / gw), -1)
        angles = shares[..., None] * self.scales  # (B, K, 4, F)
        return self.gain * self.proj(torch.cat((angles.sin(), angles.cos()), -1).flatten(-2))


def add_token_positions(
    model: nn.Module, projected: Tensor, boxes: Tensor | None, grid: tuple[int, int] | None
) -> Tensor:
    """``projected`` ``(B, K, H)`` visual tokens plus their position vectors from ``model.token_positions`` (a
    :class:`TokenPositions`); unchanged for a model without that submodule.

    ``boxes`` ``(B, K, 4)`` and ``grid`` ``(gh, gw)`` place the tokens. Without boxes the ``K`` tokens must be
    every patch of ``grid`` (or, without a grid too, of a square grid) in raster order: full tokens.
    """
    positions = getattr(model, "token_positions", None)
    if positions is None:
        return projected
    count = projected.shape[1]
    if boxes is None:
        side = math.isqrt(count)
        grid = grid or (side, side)
        if grid[0] * grid[1] != count:
            raise InvalidInputError(
                f"this model adds each visual token's position: pass the boxes of the {count} "
                f"tokens (only every patch of the grid, {grid[0]} x {grid[1]}, may leave them out)"
            )
        boxes = patch_boxes(*grid, positions.scales.device)[None]
    elif grid is None:
        raise InvalidInputError("boxes given without the patch grid they lie on: pass grid=(rows, cols)")
    return projected + positions(boxes, grid).to(projected.dtype)
