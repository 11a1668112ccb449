"""What the pipeline returns: relevance maps alone, or packed tokens with their maps."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["ScoreOutput", "CompressionOutput"]


@dataclass
class ScoreOutput:
    """Relevance of each region, per image.

    Images of a call may fall in different buckets and so have different region grids; per-region tensors
    are padded with zeros to the largest grid of the call, and ``region_grid`` gives each image's own.

    Attributes:
        scores: ``{"propositional", "perspectival", "participatory"} -> (B, rh, rw)`` in [0, 1] per image.
        relevance: ``(B, rh, rw)`` balanced relevance, summing to 1 over an image's regions.
        balance: the opponent-processing weights and tensions used: one dict for the batch, keyed by
            ``arrcoc.stages.balance.BALANCE_KEYS``, each value a tensor whose first dimension is the image
            (``(B,)``, ``(B, 3)`` weights, ``(B, rh, rw)`` redundancy); ``image(i)["balance"]`` gives image ``i``'s values.
        region_grid: ``(B, 2)`` int64, each image's ``(rh, rw)``.
        patch_grid: ``(B, 2)`` int64, each image's encoder grid ``(gh, gw)``.
        bucket: ``(B,)`` int64 bucket size ``S`` of each image.
        scale: ``(B,)`` bucket pixels per source pixel; bucket pixel ``(x, y)`` is source ``(x, y) / scale``.
        source_size: ``(B, 2)`` int64 ``(height, width)`` of each source image.
        names: a display name per image (file path, or a description of the object passed).
        region_size: region side in patches.
        timings: milliseconds per stage, when the call was made with ``profile=True``.
    """

    scores: dict[str, Tensor]
    relevance: Tensor
    balance: dict[str, Tensor]
    region_grid: Tensor
    patch_grid: Tensor
    bucket: Tensor
    scale: Tensor
    source_size: Tensor
    names: list[str]
    region_size: int
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def patch_pixels(self, index: int) -> float:
        """Side of one patch of image ``index``, in source pixels."""
        return float(self.bucket[index]) / float(self.patch_grid[index, 0]) / float(self.scale[index])

    def image(self, index: int) -> dict[str, Any]:
        """Image ``index``'s results as plain Python values, cropped to its own region grid (for JSON)."""
        rh, rw = (int(v) for v in self.region_grid[index])
        out: dict[str, Any] = {
            "name": self.names[index],
            "bucket": int(self.bucket[index]),
            "source_size": [int(v) for v in self.source_size[index]],
            "patch_grid": [int(v) for v in self.patch_grid[index]],
            "region_grid": [rh, rw],
            "region_size": self.region_size,
        }
        out["relevance"] = self.relevance[index, :rh, :rw].tolist()  # ok-sync: JSON export
        out["scores"] = {k: v[index, :rh, :rw].tolist() for k, v in self.scores.items()}  # ok-sync
        out["balance"] = {
            k: (v[index, :rh, :rw] if v.ndim == 3 else v[index]).tolist()  # ok-sync: JSON export
            for k, v in self.balance.items()
        }
        if self.timings:
            out["timings_ms"] = dict(self.timings)
        return out

    def to(self, device: torch.device | str) -> ScoreOutput:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device)
            elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), Tensor):
                value = {k: v.to(device) for k, v in value.items()}
            moved[f.name] = value
        # the dataclass itself, not a lazily built or zero-copy subclass (arrcoc.runtime.graphs.lazy_output): a plain copy
        cls = next(c for c in type(self).__mro__ if "__dataclass_fields__" in vars(c))
        return cls(**moved)


@dataclass
class CompressionOutput(ScoreOutput):
    """Packed tokens for a VLM, with the maps and allocation that produced them.

    Attributes:
        tokens: ``(B, T, D)`` float: ``T`` is the token capacity (>= every budget), ``D`` the encoder width;
            zeros past an image's budget.
        positions: ``(B, T, 4)`` int64 ``(row, col, height, width)`` of each token's area, in patches: every
            token is one patch, so height and width are 1 (0 past the budget).
        mask: ``(B, T)`` bool, exactly ``budget`` True per image (the first ``budget`` tokens).
        weights: ``(B, T)`` float, the number of patches each token stands for: 1, and 0 past the budget (the
            field a pooling reducer such as ``"uniform"`` fills with larger counts).
        allocation: ``(B, rh, rw)`` int64 tokens per region; sums to the budget per image.
        prefix: ``(B, P, D)`` the encoder's class/register tokens (``P`` may be 0).
        budget: ``(B,)`` int64.
    """

    tokens: Tensor = None  # type: ignore[assignment]
    positions: Tensor = None  # type: ignore[assignment]
    mask: Tensor = None  # type: ignore[assignment]
    weights: Tensor = None  # type: ignore[assignment]
    allocation: Tensor = None  # type: ignore[assignment]
    prefix: Tensor = None  # type: ignore[assignment]
    budget: Tensor = None  # type: ignore[assignment]

    def image(self, index: int) -> dict[str, Any]:
        out = super().image(index)
        rh, rw = out["region_grid"]
        out["budget"] = int(self.budget[index])
        out["allocation"] = self.allocation[index, :rh, :rw].tolist()  # ok-sync: JSON export
        return out
