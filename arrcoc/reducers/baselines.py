"""The public token-reduction methods arrcoc is compared with, behind the reducer interface.

Each baseline is written from its paper's description and registered by name, so the generation adapter,
the evaluation and the tests take it as ``method=<name>``:

=============  ==============================================================================================
``uniform``    spatial average pooling of the grid to exactly ``K`` cells (no single paper)
``random``     ``K`` patches drawn at random, deterministic per image and seed (no single paper)
``visionzip``  VisionZip: [CLS]-attention dominant tokens plus merged contextual tokens (needs ``cls_attention``)
``divprune``   DivPrune: max-min diversity selection of ``K`` patches
``tome``       ToMe: bipartite soft matching, size-weighted merging until ``K`` tokens remain
``fastv``      FastV: the ``K`` image tokens with the most text attention at an early LM layer (needs
               ``text_attention``)
=============  ==============================================================================================

Common contract (the same as arrcoc's reducer): ``reducer(visual, budget)`` returns exactly ``budget``
tokens per image with ``(row, col, height, width)`` boxes in patches and weights (patches pooled into each
token). The methods run on whatever features the caller hands over (the VLM's own vision tower in the
evaluation), so every method sees the same features. Every method returns its tokens in reading order (by
the first patch each token pools), so the methods differ only in what they keep, and at the full budget they
all return every patch in raster order. Patches of letterbox padding (``patch_valid == 0``) are ranked after
every image patch by the selection methods; the pooling methods pool them like any other patch.

All of them are pure tensor code with shapes fixed by ``(B, gh, gw, D)`` and ``budget``: sorting, gathering
and scattering, no host reads of tensor values, and an image's result never depends on its batch neighbours.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError
from ..stages.regions import patch_boxes
from .registry import ReducedTokens, VisualInput, check_budget, register_reducer

__all__ = [
    "UniformPooling",
    "RandomSelection",
    "VisionZip",
    "DivPrune",
    "ToMe",
    "FastV",
    "pool_assigned",
    "select_patches",
]

# Padding patches rank after every image patch; a finite offset (not -inf) keeps ties among them ordered.
_PADDING_PENALTY = 1e6


def _features(visual: VisualInput, budget: int) -> Tensor:
    """Validate the grid and the budget; return ``(B, N, D)`` float32 features in raster order."""
    if not isinstance(visual, VisualInput):
        raise InvalidInputError(f"visual must be a VisualInput; got {type(visual).__name__}")
    if visual.features.ndim != 4:
        raise InvalidInputError(f"visual.features must be (B, gh, gw, D); got shape {tuple(visual.features.shape)}")
    check_budget(visual, budget)
    return visual.features.float().flatten(1, 2)


def _grid_map(visual: VisualInput, name: str, method: str) -> Tensor:
    """The ``(B, N)`` float map ``visual.<name>`` a method cannot do without, checked against the grid."""
    value = getattr(visual, name)
    b, gh, gw = visual.features.shape[:3]
    if value is None:
        raise InvalidInputError(
            f"{method} needs visual.{name}, a (B, gh, gw) = ({b}, {gh}, {gw}) map; got None "
            f"(the caller must fill it, see the reducer's `needs`)"
        )
    if tuple(value.shape) != (b, gh, gw):
        raise InvalidInputError(
            f"visual.{name} must have shape (B, gh, gw) = ({b}, {gh}, {gw}); got {tuple(value.shape)}"
        )
    return value.float().flatten(1)


def _image_first(score: Tensor, visual: VisualInput) -> Tensor:
    """``score`` ``(B, N)`` with padding patches pushed below every image patch."""
    if visual.patch_valid is None:
        return score
    padding = (visual.patch_valid.flatten(1) <= 0).float()
    return score - padding * _PADDING_PENALTY


def select_patches(visual: VisualInput, index: Tensor) -> ReducedTokens:
    """Keep the patches ``index`` ``(B, K)`` (raster indices), returned in reading order.

    Returns:
        tokens ``(B, K, D)`` (the patches themselves), positions ``(B, K, 4)`` 1x1 boxes, weights ``(B, K)`` ones.
    """
    b, gh, gw, d = visual.features.shape
    index = torch.sort(index, dim=1).values  # reading order
    tokens = visual.features.flatten(1, 2).gather(1, index[..., None].expand(-1, -1, d))
    positions = patch_boxes(gh, gw, index.device)[index]  # (B, K, 4)
    weights = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    return ReducedTokens(tokens, positions, weights)


def _select_top(visual: VisualInput, score: Tensor, budget: int) -> ReducedTokens:
    """Keep the ``budget`` patches of highest ``score`` ``(B, N)`` (image patches first; ties: lower index)."""
    order = torch.sort(_image_first(score, visual), dim=1, descending=True, stable=True).indices
    return select_patches(visual, order[:, :budget])


def pool_assigned(
    features: Tensor, assign: Tensor, count: int, grid: tuple[int, int], out_dtype: torch.dtype | None = None
) -> ReducedTokens:
    """Merge patches into ``count`` tokens by an assignment: each token is the mean of the patches sent to it.

    Args:
        features: ``(B, N, D)`` float patch features, raster order.
        assign: ``(B, N)`` int64 token slot of each patch, in ``[0, count)``; every slot must receive a patch.
        count: ``K``, the number of tokens.
        grid: ``(gh, gw)``, with ``gh * gw == N``.
        out_dtype: dtype of the returned tokens (default: that of ``features``).

    Returns:
        tokens ``(B, K, D)`` (means, so the weight-averaged tokens equal the mean patch), positions ``(B, K, 4)``
        (the bounding box of each token's patches), weights ``(B, K)`` (patches pooled), in reading order.
    """
    b, n, d = features.shape
    gh, gw = grid
    patch = torch.arange(n, device=features.device).expand(b, n)  # (B, N) raster index
    rows, cols = patch // gw, patch % gw
    weights = features.new_zeros(b, count).scatter_add_(1, assign, features.new_ones(b, n))
    sums = features.new_zeros(b, count, d).scatter_add_(1, assign[..., None].expand(-1, -1, d), features)
    tokens = sums / weights.clamp_min(1)[..., None]

    def reduce(values: Tensor, how: str) -> Tensor:
        start = torch.full((b, count), n if how == "amin" else -1, dtype=torch.long, device=features.device)
        return start.scatter_reduce(1, assign, values, reduce=how, include_self=True)

    first = reduce(patch, "amin")  # (B, K) the token's first patch: its place in reading order
    row0, col0 = reduce(rows, "amin"), reduce(cols, "amin")
    positions = torch.stack((row0, col0, reduce(rows, "amax") - row0 + 1, reduce(cols, "amax") - col0 + 1), -1)
    order = torch.argsort(first, dim=1)  # (B, K)
    tokens = tokens.gather(1, order[..., None].expand(-1, -1, d)).to(out_dtype or features.dtype)
    return ReducedTokens(tokens, positions.gather(1, order[..., None].expand(-1, -1, 4)), weights.gather(1, order))


# ---------------------------------------------------------------------------------------------------- uniform


@functools.lru_cache(maxsize=64)
def _pooling_cells(gh: int, gw: int, budget: int) -> tuple[int, ...]:
    """Cell (token slot) of each patch when a ``gh x gw`` grid is cut into exactly ``budget`` rectangles.

    The grid is cut into ``bands`` horizontal bands (as near to square cells as the budget allows), and band
    ``i`` into ``n_i`` cells with ``sum(n_i) == budget``; band and cell edges are rounded even splits, so the
    cells tile the grid without overlap. Depends on shapes only (cached, computed on the host).
    """
    bands = round((budget * gh / gw) ** 0.5)
    bands = min(max(bands, -(-budget // gw)), gh, budget)  # every band gets between 1 and gw cells
    cells = []
    for i in range(bands):
        n_i = round((i + 1) * budget / bands) - round(i * budget / bands)
        cells.append(n_i)
    row_edges = [round(i * gh / bands) for i in range(bands + 1)]
    out = [0] * (gh * gw)
    first = 0
    for i, n_i in enumerate(cells):
        col_edges = [round(j * gw / n_i) for j in range(n_i + 1)]
        for r in range(row_edges[i], row_edges[i + 1]):
            for j in range(n_i):
                for c in range(col_edges[j], col_edges[j + 1]):
                    out[r * gw + c] = first + j
        first += n_i
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _pooling_cells_on(gh: int, gw: int, budget: int, device: torch.device) -> Tensor:
    """:func:`_pooling_cells` as a tensor on ``device``, made once: the first (eager) call copies it to the
    device, so a later CUDA-graph capture of the reducer finds it there and records no host copy."""
    return torch.tensor(_pooling_cells(gh, gw, budget), dtype=torch.long).to(device)


class UniformPooling(nn.Module):
    """Spatial average pooling of the patch grid to exactly ``K`` cells.

    No single paper: spatial average pooling of neighbouring visual tokens is the plain resolution-reduction
    baseline that token-reduction methods are measured against. Here it reaches any budget: the grid is cut
    into ``K`` near-square rectangles (rows of cells, see :func:`_pooling_cells`) and each becomes its mean.
    It ignores relevance entirely and spends the same detail everywhere.
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, config: Any = None) -> None:  # config: accepted for one factory signature, unused
        super().__init__()

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Pool ``visual.features`` ``(B, gh, gw, D)`` to ``(B, budget, D)``."""
        features = _features(visual, budget)
        b = features.shape[0]
        gh, gw = visual.grid
        cells = _pooling_cells_on(gh, gw, budget, features.device)
        return pool_assigned(features, cells.expand(b, -1), budget, (gh, gw), visual.features.dtype)


# ----------------------------------------------------------------------------------------------------- random

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 two's-complement value torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64 on every device)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


class RandomSelection(nn.Module):
    """Keep ``K`` patches chosen uniformly at random: the floor every relevance method must beat.

    No single paper: random token dropping is the control any selection rule has to beat. The draw is a hash of the seed, the patch index and the image's own features (their exact float bits),
    so it is reproducible call after call, differs between images, and does not depend on the batch
    neighbours or the batch position; the same features and seed give the same patches on any device.

    Args:
        seed: changes every draw.
    """

    needs: frozenset[str] = frozenset({"patch_valid"})

    def __init__(self, seed: int = 0, config: Any = None) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidInputError(f"seed must be an int; got {seed!r}")
        self.seed = seed

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Keep ``budget`` random patches of ``visual.features`` ``(B, gh, gw, D)``, in reading order."""
        features = _features(visual, budget)
        b, n, _ = features.shape
        bits = features.contiguous().view(torch.int32).long()  # exact, order-free fingerprint of the image
        image = _mix64(bits.sum((1, 2)) + _signed(self.seed * 0x2545F4914F6CDD1D))  # (B,)
        patch = torch.arange(1, n + 1, device=features.device) * _GOLDEN  # (N,)
        key = _mix64(image[:, None] ^ patch)  # (B, N) uniform 64-bit keys
        score = (_shift_right(key, 11).double() / float(1 << 53)).float()  # uniform in [0, 1)
        return _select_top(visual, score, budget)


# -------------------------------------------------------------------------------------------------- visionzip


class VisionZip(nn.Module):
    """VisionZip: the tokens the [CLS] token attends to most (dominant) plus merged contextual tokens.

    Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025,
    arXiv:2412.04467). Dominant tokens: the ``K_d`` patches with the highest [CLS] attention in the vision
    tower. Contextual tokens: the remaining patches are merged into ``K_c`` tokens; targets are taken at a
    uniform stride among them, every other remaining patch joins its most similar target (cosine of
    features; the paper uses the attention keys), and each contextual token is the mean of its group. The
    split follows the paper's settings (54 + 10 of 64 tokens): ``K_c = floor(10 K / 64)``.

    The [CLS] attention is required: the paper defines the dominant tokens by it (for towers without a
    [CLS] token it uses the average attention each token receives, which the caller can pass in the same
    field). It does not allow a substitute such as the feature norm, so a missing map is an error.
    """

    needs: frozenset[str] = frozenset({"cls_attention", "patch_valid"})

    def __init__(self, context_share: float = 10 / 64, config: Any = None) -> None:
        super().__init__()
        if not 0.0 <= context_share < 1.0:
            raise InvalidInputError(f"context_share must be in [0, 1); got {context_share}")
        self.context_share = context_share

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Reduce ``visual.features`` ``(B, gh, gw, D)`` to ``budget`` tokens using ``visual.cls_attention``."""
        features = _features(visual, budget)
        attention = _grid_map(visual, "cls_attention", "visionzip")
        b, n, d = features.shape
        contextual = min(int(budget * self.context_share), budget - 1)
        dominant = budget - contextual
        rest = n - dominant
        order = torch.sort(_image_first(attention, visual), dim=1, descending=True, stable=True).indices
        slot = torch.arange(n, device=features.device).expand(b, n)
        assign = torch.empty_like(slot).scatter_(1, order, slot)  # rank of each patch; dominant: < K_d
        if contextual == 0:
            return select_patches(visual, order[:, :dominant])
        # The remaining patches in raster order, targets at a uniform stride among them (as the paper).
        remaining = torch.sort(order[:, dominant:], dim=1).values  # (B, rest)
        step = max(1, rest // contextual)
        target_slots = torch.arange(0, rest, step, device=features.device)[:contextual]  # (K_c,)
        is_target = torch.zeros(rest, dtype=torch.long, device=features.device).index_fill_(0, target_slots, 1)
        target_of = torch.cumsum(is_target, 0) - 1  # target number of each target slot
        targets = remaining[:, target_slots]  # (B, K_c)
        unit = nn.functional.normalize(features, dim=-1)
        similarity = torch.einsum(
            "bnd,bkd->bnk",
            unit.gather(1, remaining[..., None].expand(-1, -1, d)),
            unit.gather(1, targets[..., None].expand(-1, -1, d)),
        )  # (B, rest, K_c)
        joins = torch.where(is_target.bool(), target_of, similarity.argmax(-1))  # (B, rest)
        assign = assign.scatter(1, remaining, dominant + joins)
        return pool_assigned(features, assign, budget, visual.grid, visual.features.dtype)


# --------------------------------------------------------------------------------------------------- divprune


class DivPrune(nn.Module):
    """DivPrune: keep the ``K`` patches that solve the max-min diversity problem greedily.

    Alvar et al., 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR
    2025). Distances are cosine distances ``1 - cos`` between patch features. The first
    token is the one whose nearest neighbour is farthest; each next token is the one whose distance to the
    tokens already kept is largest (max over candidates of the min over the kept set). ``K`` greedy steps,
    each a fixed-shape update of the running minimum distance.
    """

    needs: frozenset[str] = frozenset({"patch_valid"})

    def __init__(self, config: Any = None) -> None:
        super().__init__()

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Keep ``budget`` mutually distant patches of ``visual.features`` ``(B, gh, gw, D)``, in reading order."""
        features = _features(visual, budget)
        b, n, _ = features.shape
        unit = nn.functional.normalize(features, dim=-1)
        distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
        eye = torch.eye(n, dtype=torch.bool, device=features.device)
        # First pick: the largest distance to the nearest other patch.
        nearest = distance.masked_fill(eye, torch.inf).amin(-1) if n > 1 else distance.new_zeros(b, n)
        padding = _image_first(torch.zeros_like(nearest), visual)  # 0 on image patches, -penalty on padding
        score = nearest + padding  # (B, N)
        running = torch.full_like(nearest, torch.inf)  # min distance to the kept set
        chosen = torch.zeros(b, n, dtype=torch.bool, device=features.device)
        picks = []
        for _ in range(budget):  # a Python int: the step count depends on the budget only
            pick = torch.where(chosen, -torch.inf, score).argmax(-1, keepdim=True)  # (B, 1)
            picks.append(pick)
            chosen = chosen.scatter(1, pick, True)
            running = torch.minimum(running, distance.gather(1, pick[..., None].expand(-1, -1, n))[:, 0])
            score = running + padding
        return select_patches(visual, torch.cat(picks, 1))


# ------------------------------------------------------------------------------------------------------- tome


def _bipartite_merge(features: Tensor, assign: Tensor, tokens: int, remove: int) -> Tensor:
    """One round of ToMe's bipartite soft matching: ``tokens`` current tokens -> ``tokens - remove``.

    Args:
        features: ``(B, N, D)`` patch features.
        assign: ``(B, N)`` current token of each patch, in ``[0, tokens)``.
        tokens: current token count; remove: how many merge away, at most ``tokens // 2``.

    Returns:
        ``(B, N)`` the new token of each patch, in ``[0, tokens - remove)``.
    """
    b, n, d = features.shape
    sizes = features.new_zeros(b, tokens).scatter_add_(1, assign, features.new_ones(b, n))
    sums = features.new_zeros(b, tokens, d).scatter_add_(1, assign[..., None].expand(-1, -1, d), features)
    unit = nn.functional.normalize(sums / sizes.clamp_min(1)[..., None], dim=-1)  # (B, t, D) token means
    a, bb = unit[:, ::2], unit[:, 1::2]  # alternate tokens into the two sets
    n_a, n_b = a.shape[1], bb.shape[1]
    best, match = (a @ bb.transpose(1, 2)).max(-1)  # (B, n_a) each A token's most similar B token
    edges = torch.sort(best, dim=1, descending=True, stable=True).indices  # (B, n_a)
    kept, merged = edges[:, remove:], edges[:, :remove]  # A tokens left alone / merged into their match
    left = n_a - remove
    new_a = torch.empty(b, n_a, dtype=torch.long, device=features.device)
    new_a.scatter_(1, kept, torch.arange(left, device=features.device).expand(b, -1))
    new_a.scatter_(1, merged, left + match.gather(1, merged))
    new_b = (left + torch.arange(n_b, device=features.device)).expand(b, -1)
    mapping = torch.stack((new_a[:, :n_b], new_b), -1).flatten(1)  # (B, 2 n_b) interleaved A, B
    if n_a > n_b:
        mapping = torch.cat((mapping, new_a[:, n_b:]), 1)
    return mapping.gather(1, assign)


class ToMe(nn.Module):
    """ToMe: bipartite soft matching, merging the most similar tokens until ``K`` remain.

    Bolya et al., 2023, "Token Merging: Your ViT But Faster" (ICLR 2023, arXiv:2210.09461). Each round
    splits the current tokens alternately into sets A and B, matches every A token to its most similar B
    token (cosine of the token means; the paper uses attention keys), and merges the ``r`` best-matched A
    tokens into their partners. Merges are size-weighted means (the paper's proportional attention keeps
    the sizes), so the weight-averaged tokens always equal the mean patch. Applied to a finished grid, rounds
    run until exactly ``K`` tokens remain, each merging a quarter of the current tokens (the paper allows up
    to half per layer; at half, every A token would have to merge however unlike its match it is).
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, config: Any = None) -> None:
        super().__init__()

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Merge ``visual.features`` ``(B, gh, gw, D)`` down to ``budget`` tokens."""
        features = _features(visual, budget)
        b, n, _ = features.shape
        assign = torch.arange(n, device=features.device).expand(b, n)
        tokens = n
        while tokens > budget:  # Python ints: the round count depends on shapes only
            remove = min(tokens - budget, max(1, tokens // 4))
            assign = _bipartite_merge(features, assign, tokens, remove)
            tokens -= remove
        return pool_assigned(features, assign, budget, visual.grid, visual.features.dtype)


# ------------------------------------------------------------------------------------------------------ fastv


class FastV(nn.Module):
    """FastV: keep the ``K`` image tokens that receive the most attention at an early language-model layer.

    Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
    Large Vision-Language Models" (ECCV 2024, arXiv:2403.06764). FastV ranks image tokens by the attention
    they receive at layer ``K = 2`` and drops the rest for the later layers. Behind this interface the
    ranking map comes in ``visual.text_attention`` (the generation adapter measures it with a first pass
    over the full prompt), and the kept tokens form the whole visual input, in their original order.
    """

    needs: frozenset[str] = frozenset({"text_attention", "patch_valid"})

    def __init__(self, config: Any = None) -> None:
        super().__init__()

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Keep the ``budget`` patches of ``visual.features`` ``(B, gh, gw, D)`` with most text attention."""
        _features(visual, budget)
        return _select_top(visual, _grid_map(visual, "text_attention", "fastv"), budget)


register_reducer("uniform")(UniformPooling)
register_reducer("random")(RandomSelection)
register_reducer("visionzip")(VisionZip)
register_reducer("divprune")(DivPrune)
register_reducer("tome")(ToMe)
register_reducer("fastv")(FastV)
