"""Opponent processing: three relevance maps -> one, with the tensions explicit and reported per image.

- exploit <-> explore: a softmax temperature. The more the scorers agree on an image, the more it exploits
  (lower temperature); where they disagree it explores. Given the budget, it also exploits more the scarcer the
  tokens are (``scarcity``).
- focus <-> diversify: a region similar to a more relevant region is discounted (maximal marginal
  relevance), so tokens are not spent twice on the same content.
- compress <-> particularize: a mix of the uniform share and the relevance-driven share; 0 is uniform
  pooling, 1 follows relevance fully.
- cover: without a question, a share ``cover`` of the relevance follows *novelty*, how many distinct things a
  region holds (:func:`novelty`), so that a later question finds its evidence wherever it is; with one, a share
  ``query_cover`` does, a hedge against a question whose words miss its evidence. With a budget and
  ``BalanceConfig.pick`` set, the cover counts instead how many of the image's ``budget`` picked patches
  (:func:`pick_patches`) each region holds, and compression shows exactly those patches.

On CUDA, outside ``torch.compile``, :meth:`Balance.forward` after its inputs and :func:`frame_patches` are one Triton
kernel each (``_balance_triton``, ``_frame_triton``; ``BALANCE_KERNEL``, ``FRAME_KERNEL``), and so are the regions' unit
mean features of :meth:`Balance.similarity` (``_region_stats_triton``; ``SIMILARITY_KERNEL``) and the set-up of
:func:`pick_patches`'s greedy loop (``_pick_setup_triton``; ``PICK_SETUP_KERNEL``).
"""

from __future__ import annotations

import math
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BalanceConfig
from .greedy_pick import greedy_maxmin
from .kernels import kernel_enabled, runs_kernel
from .regions import masked_mean, normalize_per_image, to_regions
from .scorers import unit_patches

__all__ = [
    "Balance",
    "BALANCE_KERNEL",
    "BALANCE_KEYS",
    "FRAME_CELL_LIMIT",
    "FRAME_KERNEL",
    "PICK_SETUP_KERNEL",
    "SIMILARITY_KERNEL",
    "frame_patches",
    "novelty",
    "objectness_peaks",
    "pick_patches",
    "region_units",
]

#: Whether CUDA grids go to the Triton kernel of :func:`frame_patches` (``ARRCOC_FRAME_KERNEL=0``: the torch form).
FRAME_KERNEL: bool = kernel_enabled("ARRCOC_FRAME_KERNEL")
#: Whether CUDA maps go to the Triton kernel of :meth:`Balance.forward` (``ARRCOC_BALANCE_KERNEL=0``: the torch form).
BALANCE_KERNEL: bool = kernel_enabled("ARRCOC_BALANCE_KERNEL")
#: Whether CUDA features go to the Triton kernel of :meth:`Balance.similarity`'s region means
#: (``ARRCOC_SIMILARITY_KERNEL=0``: the torch form).
SIMILARITY_KERNEL: bool = kernel_enabled("ARRCOC_SIMILARITY_KERNEL")
#: Whether CUDA cosines go to the Triton kernel that sets up :func:`pick_patches`'s greedy loop
#: (``ARRCOC_PICK_SETUP_KERNEL=0``: the torch form).
PICK_SETUP_KERNEL: bool = kernel_enabled("ARRCOC_PICK_SETUP_KERNEL")
#: Grids up to this many patches take the pick set-up's kernels (a program walks a block of an image's rows across
#: all ``N`` columns); on larger ones the torch form's launches spread over the whole GPU.
PICK_SETUP_CELL_LIMIT = 1024
#: Grids up to this many patches take :func:`frame_patches`'s kernel (its grid in registers, one block of the next
#: power of two); larger ones the torch form.
FRAME_CELL_LIMIT = 16384

#: What ``Balance.forward`` reports per image, in order.
BALANCE_KEYS: tuple[str, ...] = (
    "weights",
    "has_query",
    "agreement",
    "exploit",
    "temperature",
    "diversify",
    "redundancy",
    "particularize",
    "coverage",
    "evenness",
)


def _correlation(maps: Tensor, valid: Tensor) -> Tensor:
    """Pearson correlation between every pair of maps over valid regions: ``(B, K, R), (B, R) -> (B, K, K)``."""
    w = valid[:, None].float()
    centred = maps - masked_mean(maps, w, -1)[..., None]
    centred = centred * w
    cov = centred @ centred.transpose(1, 2)  # (B, K, K)
    std = cov.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()
    return cov / (std[:, :, None] * std[:, None, :])


def novelty(features: Tensor, patch_valid: Tensor) -> Tensor:
    """How new each patch is: 1 minus its best cosine with any image patch that stands out more than it does.

    Patches are ranked by rarity (1 - cosine with the image's mean feature; ties: lower index first); the rarest
    patch of each group of look-alikes scores near 1, the rest of the group and a uniform background near 0. Summed
    over a region it counts the distinct things the region holds first: the score of a greedy max-min (DivPrune-like)
    cover, without a loop.

    Args:
        features: ``(B, gh, gw, D)`` patch features.
        patch_valid: ``(B, gh, gw)`` share of each patch that is image.

    Returns:
        ``(B, gh, gw)`` in [0, 1], 0 on padding; at least one patch of an image with content scores 1.
    """
    valid = (patch_valid > 0).flatten(1)  # (B, N)
    unit = F.normalize(features.float().flatten(1, 2), dim=-1)  # (B, N, D)
    mean = F.normalize((unit * valid[..., None]).sum(1, keepdim=True), dim=-1)  # (B, 1, D)
    rarity = torch.where(valid, 1 - (unit * mean).sum(-1), -torch.inf)  # (B, N) padding ranks last
    index = torch.arange(unit.shape[1], device=unit.device)
    above = (rarity[:, None, :] > rarity[:, :, None]) | (
        (rarity[:, None, :] == rarity[:, :, None]) & (index[None, :] < index[:, None])
    )  # [b, p, q]: q ranks above p
    # (B, N, N) floats: 64 MiB per image at 64x64 patches; masked in place rather than copied.
    nearest = (unit @ unit.transpose(1, 2)).masked_fill_(~(above & valid[:, None, :]), -1.0).amax(-1)  # (B, N)
    return torch.where(valid, (1 - nearest).clamp(0, 1), 0.0).view(patch_valid.shape)


def objectness_peaks(objectness: Tensor, patch_valid: Tensor, threshold: float) -> Tensor:
    """The 3x3 local maxima of an objectness map above ``threshold``, on image patches only.

    Args:
        objectness: ``(B, gh, gw)`` in [0, 1] (``arrcoc.stages.objectness.Objectness``).
        patch_valid: ``(B, gh, gw)`` share of each patch that is image.
        threshold: a peak's objectness must exceed it.

    Returns:
        ``(B, gh, gw)`` bool; equal neighbours are both peaks; padding never is one, nor hides one.
    """
    valid = patch_valid > 0
    level = torch.where(valid, objectness.float(), -torch.inf)  # (B, gh, gw) padding below every image patch
    top = F.max_pool2d(level[:, None], 3, 1, 1)[:, 0]  # (B, gh, gw) the 3x3 neighbourhood's maximum
    return (level >= top) & (level > threshold) & valid


def _balance_kernel(maps: Tensor, patch_valid: Tensor) -> bool:
    """Whether :meth:`Balance.forward` launches its Triton kernel for these ``(B, 3, R)`` maps."""
    return runs_kernel(maps, BALANCE_KERNEL) and maps.shape[1] == 3 and patch_valid.dtype == torch.float32


def _pick_setup_kernel(gram: Tensor) -> bool:
    """Whether :func:`pick_patches` sets its greedy loop up with its Triton kernel for these cosines."""
    return runs_kernel(gram, PICK_SETUP_KERNEL) and gram.shape[-1] <= PICK_SETUP_CELL_LIMIT


def _similarity_kernel(features: Tensor, patch_valid: Tensor) -> bool:
    """Whether :func:`region_units` launches its Triton kernel for these features."""
    return (
        runs_kernel(features, SIMILARITY_KERNEL)
        and patch_valid.dtype == torch.float32
        and patch_valid.shape == features.shape[:3]
    )


def _frame_kernel(flat: Tensor) -> bool:
    """Whether :func:`frame_patches` launches its Triton kernel for this grid."""
    return runs_kernel(flat, FRAME_KERNEL) and flat[0].numel() <= FRAME_CELL_LIMIT


def frame_patches(
    flat: Tensor,
    patch_valid: Tensor,
    colour: Tensor | None = None,
    solid: float = 0.9,
    touched: float = 0.05,
    chroma: float = 0.06,
) -> Tensor:
    """The patches of an artificial border: a constant fill reaching in from the image's edge, and its rim.

    A fundus photo's black mask, a scan's blank margin, a pasted-on frame, a clipped black backdrop: patches almost
    wholly flat (``flat >= solid``) and without colour (black, grey or white; a clear blue sky is no border) on the
    image's edge, and those joined to them through such patches or along the edge through partly flat ones
    (``flat >= touched``: the fill thinner than a patch there), plus every image patch next to them (where the fill
    meets the picture, or a glint inside it). Their edge against the fill makes the rim's patches the most distinct of the
    image to a max-min cover, and the least worth a token. A border frames a picture: when most image patches beyond
    it are solid too (a silhouette or a diagram on a flat ground, whose outline is the content), the image has none.
    In a framed picture every other solid patch counts too: the flat inside of a button would otherwise go before
    its outline, which is in the border's tier.

    A photographed surface is not flat (``arrcoc.stages.texture.FLAT_RANGE``); the generated world's shapes are, but
    keep a gap to the image's edge, so none of its images has a border. The fill is followed ``max(gh, gw) // 2``
    patches from where it starts (a fixed number of steps, so the shapes stay static).

    Args:
        flat: ``(B, gh, gw)`` share of each patch's image pixels that are flat (texture's ``"flat"`` channel).
        patch_valid: ``(B, gh, gw)`` share of each patch that is image; padding is never a border patch.
        colour: ``(B, gh, gw, 3)`` each patch's mean L*a*b* (texture's first channels, scaled by 1/100), or
            ``None`` (any colour may be a fill).
        solid: the flat share of a patch inside the fill.
        touched: the flat share of an edge patch that a thin fill crosses.
        chroma: the largest chroma (``sqrt(a² + b²)``, scaled by 1/100) of a patch inside the fill.

    Returns:
        ``(B, gh, gw)`` bool.
    """
    if _frame_kernel(flat):  # the same border in one launch
        from . import _frame_triton  # Triton is imported on the first CUDA call only

        return _frame_triton.launch(flat, patch_valid, colour, solid, touched, chroma)
    colourless = None if colour is None else torch.linalg.vector_norm(colour[..., 1:3].float(), dim=-1) < chroma
    valid = (patch_valid > 0)[:, None].float()  # (B, 1, gh, gw)
    flat = flat[:, None]

    def grown(x: Tensor) -> Tensor:  # 8-neighbour dilation
        return F.max_pool2d(x, 3, stride=1, padding=1)

    # the image's edge: image patches with a neighbour that is padding or off the grid
    edge = valid * (1 + F.max_pool2d(-F.pad(valid, (1, 1, 1, 1)), 3, stride=1))  # off the grid counts as padding
    inside = (flat >= solid).float() * valid
    if colourless is not None:
        inside = inside * colourless[:, None].float()
    passable = torch.maximum(inside, edge * (flat >= touched).float())
    fill = inside * edge  # where a fill starts: a solid patch on the edge
    for _ in range(max(1, max(flat.shape[-2:]) // 2)):
        fill = grown(fill) * passable
    border = grown(fill) * valid  # the fill and its rim
    # A border frames a picture: the image patches beyond it are mostly not flat. Around a flat drawing (a
    # silhouette, a diagram) the flat backdrop is the drawing's ground and its outline the content: no border.
    rest = valid - border
    framed = (fill.amax((-2, -1), keepdim=True) > 0) & (  # (B, 1, 1, 1)
        (inside * rest).sum((-2, -1), keepdim=True) < 0.5 * rest.sum((-2, -1), keepdim=True)
    )
    # in a framed picture every solid patch is a fill too: the flat inside of a shape off the edge (a button) would
    # otherwise go before its outline, which joined the border's tier
    return (torch.maximum(border, inside) * framed > 0)[:, 0]


def _lab_distance(lab: Tensor) -> Tensor:
    """``(B, N, 3) -> (B, N, N)``: the Euclidean distance between every two patches' Lab colours, the channels' squared
    differences summed in channel order. Not ``torch.cdist``, whose matrix-product form loses near-equal colours to
    cancellation (and rounds otherwise than the pick's kernel). The root is taken in float64 and rounded once: torch's
    float32 root on the CPU is not always the nearest float, the kernel's is."""
    light, green_red, blue_yellow = (c[:, :, None] - c[:, None, :] for c in lab.unbind(-1))
    return (light * light + green_red * green_red + blue_yellow * blue_yellow).double().sqrt().to(lab.dtype)


def _maxmin_inputs(
    gram: Tensor,
    valid: Tensor,
    lab: Tensor | None,
    colour_share: float,
    place: Tensor | None,
    weight: Tensor | None,
    priority: Tensor | None,
    frame: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The greedy max-min's inputs (:func:`greedy_maxmin`): ``weighted`` ``(B, N, N)``, ``[b, p, q]`` candidate
    ``q``'s score once ``p`` is kept, and ``score`` ``(B, N)`` before the first pick. On CUDA ``_pick_setup_triton``
    computes the same bits in one launch (two with tiers).

    Args:
        gram: ``(B, N, N)`` cosines of the patches' unit features; valid: ``(B, N)`` bool image patches.
        lab: ``(B, N, 3)`` Lab colours, or ``None``; colour_share: the weight of their distance.
        place: ``(1, N, N)`` the grid distance already weighted, or ``None``.
        weight: ``(B, N)`` each candidate's weight, or ``None`` (1).
        priority: ``(B, N)`` whole non-negative tiers, or ``None``; frame: ``(B, N)`` bool, a tier below, or ``None``.
    """
    n = valid.shape[1]
    distance = 1 - gram
    if lab is not None:
        distance = distance + colour_share * _lab_distance(lab)
    if place is not None:
        distance = distance + place
    others = valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=gram.device)  # [b, p, q]: q not p
    nearest = distance.masked_fill(~others, torch.inf).amin(-1)  # (B, N) distance to the nearest other patch
    nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)  # an image of one patch
    # A candidate's score is its distance from the nearest kept patch times its weight; min and a non-negative
    # weight commute exactly, so the weight is folded into the distances once. -inf marks what cannot be picked:
    # padding, and (the diagonal) a patch once it is kept.
    weighted = distance if weight is None else distance * weight[:, None, :]
    weighted = weighted.masked_fill(~others, -torch.inf)  # [b, p, q]
    score = torch.where(valid, nearest if weight is None else nearest * weight, -torch.inf)  # before the first pick
    if frame is not None:  # tier -1; an image without a border adds 0 to every score: the same picks, bit for bit
        priority = (0.0 if priority is None else priority) - frame.float()
    if priority is not None:
        # A bonus on candidate q's column adds to its score whatever is kept (min over kept p of d[p, q] + bonus[q]),
        # so it orders the tiers and leaves the max-min order within each alone. A tier's step exceeds the image's
        # largest distance (scores are never above it; -inf padding and diagonal stay -inf); tier 0 gets nothing,
        # so once the higher tiers are kept the fill is the plain max-min, bit for bit.
        span = weighted.amax((1, 2)).clamp_min(0) + 1  # (B,) per image: no dependence on the batch
        bonus = priority * span[:, None]  # (B, N)
        weighted = weighted + bonus[:, None, :]
        score = score + bonus
    return weighted, score


def pick_patches(
    method: str,
    features: Tensor,
    patch_valid: Tensor,
    budget: Tensor,
    steps: int,
    salience: Tensor | None = None,
    salience_share: float = 0.0,
    colour: Tensor | None = None,
    colour_share: float = 0.0,
    patch_novelty: Tensor | None = None,
    spatial_share: float = 0.0,
    objectness: Tensor | None = None,
    peak_threshold: float = 0.3,
    priority: Tensor | None = None,
    frame: Tensor | None = None,
    unit: Tensor | None = None,
) -> Tensor:
    """The ``budget`` image patches a query-free cover keeps: 1 on each, 0 elsewhere.

    - ``"novelty"``: the ``budget`` patches of highest :func:`novelty` (times the salience weight; ties: lower
      index), a one-shot max-min cover.
    - ``"maxmin"``: greedy max-min (DivPrune) over cosine distance, plus ``colour_share`` times the Lab colour
      distance, with each candidate's score multiplied by its salience weight: the first pick is the patch whose
      nearest neighbour is farthest, each next one the patch farthest from those kept. ``steps`` (the token
      capacity, a Python int) greedy steps of fixed shape; a step past an image's budget keeps nothing.
    - ``"peaks"``: ``"maxmin"`` that first keeps the :func:`objectness_peaks` (in max-min order among themselves,
      as many as the budget allows), then fills the budget by max-min from them: ``priority`` 1 on the peaks.

    ``priority`` (``"maxmin"``, ``"peaks"``) orders candidates in tiers: every candidate of a higher tier is kept
    before any of a lower one, in max-min order within a tier. Each tier's score gets a bonus of that many times
    more than any distance of its image, so the same greedy loop (kernel) runs unchanged. ``frame`` (``"maxmin"``,
    ``"peaks"``) puts an artificial border's patches (:func:`frame_patches`) a tier below the rest: kept only once
    every other patch is.

    The salience weight is ``1 - salience_share + salience_share * salience``: 1 for ``salience_share = 0``.

    Args:
        method: one of ``arrcoc.config.PICK_METHODS`` other than ``"off"``.
        features: ``(B, gh, gw, D)`` patch features.
        patch_valid: ``(B, gh, gw)`` share of each patch that is image.
        budget: ``(B,)`` int64 patches to keep, at most the image's patch count and ``steps``.
        steps: the greedy steps (``"maxmin"``), at least the largest budget.
        salience: ``(B, gh, gw)`` in [0, 1], or ``None`` (weight 1).
        salience_share: in [0, 1].
        colour: ``(B, gh, gw, 3)`` Lab colour of each patch (texture's first channels), or ``None``.
        colour_share: weight of the colour distance (``"maxmin"``).
        spatial_share: weight of the patches' distance on the grid, in units of its longer side, added to theirs
            (``"maxmin"``).
        patch_novelty: :func:`novelty` of ``features`` and ``patch_valid`` when already computed (``"novelty"``).
        objectness: ``(B, gh, gw)`` in [0, 1], the probe's map (``"peaks"``, required there).
        peak_threshold: the objectness a peak must exceed (``"peaks"``).
        priority: ``(B, gh, gw)`` whole non-negative tiers (``"maxmin"``), or ``None`` (one tier); ``"peaks"`` makes it.
        frame: ``(B, gh, gw)`` bool, the border patches to keep last, or ``None`` (none).
        unit: :func:`arrcoc.stages.scorers.unit_patches` of ``features`` when already computed (``"maxmin"``,
            ``"peaks"``).

    Returns:
        ``(B, gh, gw)`` float, 1 on exactly ``budget`` image patches per image (fewer only if it has fewer).
    """
    b, gh, gw, _ = features.shape
    valid = (patch_valid > 0).flatten(1)  # (B, N)
    n = valid.shape[1]
    weight = None  # (B, N) each candidate's weight, or 1
    if salience is not None and salience_share > 0:
        weight = 1 - salience_share + salience_share * salience.flatten(1).float()
    if method == "novelty":
        if patch_novelty is None:
            patch_novelty = novelty(features, patch_valid)
        key = patch_novelty.flatten(1) if weight is None else patch_novelty.flatten(1) * weight
        key = torch.where(valid, key, -1.0)  # padding after every image patch
        rank = torch.argsort(torch.sort(key, dim=-1, descending=True, stable=True).indices, dim=-1)  # (B, N)
        return ((rank < budget[:, None]) & valid).to(features.dtype).view(b, gh, gw)
    if method not in ("maxmin", "peaks"):
        raise ValueError(f"unknown pick method {method!r}")
    if method == "peaks" and objectness is None:
        raise ValueError("pick 'peaks' needs an objectness map")
    unit = unit_patches(features) if unit is None else unit  # (B, N, D)
    gram = unit @ unit.transpose(1, 2)  # (B, N, N) cosines
    lab = colour.float().flatten(1, 2) if colour is not None and colour_share > 0 else None  # (B, N, 3)
    if method == "peaks":
        assert objectness is not None  # checked above
        priority = objectness_peaks(objectness, patch_valid, peak_threshold)  # (B, gh, gw)
    if priority is not None:
        priority = priority.flatten(1).float()  # (B, N)
    frame = frame.flatten(1) if frame is not None else None  # (B, N)
    if spatial_share == 0 and _pick_setup_kernel(gram):  # one launch (two with tiers), the same bits
        from . import _pick_setup_triton  # Triton is imported on the first CUDA call only

        weighted, score = _pick_setup_triton.launch(gram, valid, lab, colour_share, weight, priority, frame)
    else:
        place = None
        if spatial_share > 0:  # alike patches far apart count as apart (alike objects in two places)
            cell = torch.arange(n, device=features.device)
            place = torch.stack((cell // gw, cell % gw), -1).float() / max(gh, gw)  # (N, 2) row, column
            place = spatial_share * torch.cdist(place, place)[None]
        weighted, score = _maxmin_inputs(gram, valid, lab, colour_share, place, weight, priority, frame)
    live = budget[:, None] > torch.arange(steps, device=budget.device)  # (B, steps): steps inside the budget
    chosen = greedy_maxmin(weighted, score, live)  # (B, N) one Triton kernel on CUDA
    return chosen.to(features.dtype).view(b, gh, gw)


def region_units(features: Tensor, patch_valid: Tensor, side: int) -> Tensor:
    """Each region's mean feature (weighted by patch validity) at unit length: ``(B, gh, gw, D), (B, gh, gw) ->
    (B, R, D)``, 0 for a region with no image content. One Triton launch on CUDA (``_region_stats_triton``)."""
    if _similarity_kernel(features, patch_valid):
        from . import _region_stats_triton  # Triton is imported on the first CUDA call only

        return _region_stats_triton.region_units(features, patch_valid, side)
    region_w = to_regions(patch_valid[..., None], side)[..., 0]  # (B, rh, rw, P)
    region_feat = masked_mean(to_regions(features, side), region_w[..., None], -2)  # (B, rh, rw, D)
    return F.normalize(region_feat.flatten(1, 2), dim=-1)


class Balance(nn.Module):
    """Stage: scores ``(B, 3, rh, rw)`` -> balanced relevance ``(B, rh, rw)`` plus the tensions used.

    The knobs are buffers (tensors), so changing them does not change any shape.
    """

    region_size: Final[int]
    covers: Final[bool]

    def __init__(self, config: BalanceConfig | None = None, region_size: int = 4) -> None:
        super().__init__()
        config = config or BalanceConfig()
        self.region_size = region_size
        self.covers = config.cover > 0 or config.query_cover > 0  # novelty costs (N, N) per image: only when used
        self.query_covers = config.query_cover > 0
        self.register_buffer("base_weights", torch.tensor(config.weights), persistent=False)
        self.register_buffer("exploit", torch.tensor(config.exploit), persistent=False)
        self.register_buffer("scarcity", torch.tensor(config.scarcity), persistent=False)
        self.register_buffer("diversify", torch.tensor(config.diversify), persistent=False)
        self.register_buffer("particularize", torch.tensor(config.particularize), persistent=False)
        self.register_buffer("cover", torch.tensor(config.cover), persistent=False)
        self.register_buffer("query_cover", torch.tensor(config.query_cover), persistent=False)
        low, high = config.temperature_range
        self.log_t_low, self.log_t_high = math.log(low), math.log(high)

    def similarity(self, features: Tensor, patch_valid: Tensor) -> Tensor:
        """Cosine similarity between the regions' mean features, ``(B, R, R)``: what redundancy is measured
        with. It needs no scores, so a pipeline can compute it beside the scorers and pass it to ``forward``."""
        unit = region_units(features, patch_valid, self.region_size)  # (B, R, D)
        return unit @ unit.transpose(1, 2)

    def forward(
        self,
        scores: Tensor,
        features: Tensor,
        patch_valid: Tensor,
        query_mask: Tensor,
        budget: Tensor | None = None,
        similarity: Tensor | None = None,
        patch_novelty: Tensor | None = None,
        patch_pick: Tensor | None = None,
        asked: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Combine the maps.

        Args:
            scores: ``(B, 3, rh, rw)`` in ``SCORER_NAMES`` order, each in [0, 1] per image.
            features: ``(B, gh, gw, D)`` patch features (for redundancy between regions).
            patch_valid: ``(B, gh, gw)`` share of each patch that is image.
            query_mask: ``(B, L)`` bool, True on real query tokens.
            budget: ``(B,)`` tokens per image, when known: ``exploit`` moves by ``scarcity`` per halving of the
                budget relative to an eighth of the image's patches. ``None`` (relevance alone): no move.
            similarity: :meth:`similarity` of ``features`` and ``patch_valid``, when already computed.
            patch_novelty: :func:`novelty` of ``features`` and ``patch_valid``, when already computed.
            patch_pick: :func:`pick_patches` for this budget, or ``None``: the cover then counts picked patches
                per region instead of summing novelty.
            asked: the caller knows on the host that every image has a question: the cover then follows
                ``query_cover`` alone, and at 0 no novelty is computed (an (N, N) product per image, read by nothing).

        Returns:
            relevance ``(B, rh, rw)``: non-negative, summing to 1 over the regions with image content (0
            elsewhere); and the per-image tensions, keyed by ``BALANCE_KEYS``.
        """
        b, k, rh, rw = scores.shape
        maps = scores.flatten(2)  # (B, 3, R)
        if similarity is None:
            similarity = self.similarity(features, patch_valid)  # (B, R, R)
        covered = None  # (B, gh, gw) the patch map whose sum per region a share of the relevance follows
        if self.query_covers if asked else self.covers:
            if patch_pick is not None:
                covered = patch_pick  # 1 on the picked patches
            else:
                covered = novelty(features, patch_valid) if patch_novelty is None else patch_novelty
        has_query = query_mask.any(-1)  # (B,)
        if _balance_kernel(maps, patch_valid):  # one launch for the rest, to float32 rounding
            return self._forward_kernel(scores, query_mask, patch_valid, budget, similarity, covered, has_query)
        region_w = to_regions(patch_valid[..., None], self.region_size)[..., 0]  # (B, rh, rw, P)
        valid = (region_w.sum(-1) > 0).flatten(1)  # (B, R)
        cover = None  # (B, R) each region's novelty, or picked patches
        if covered is not None:
            cover = to_regions(covered[..., None], self.region_size).sum((-1, -2)).flatten(1)
        weights = self.base_weights.expand(b, k).clone()
        weights[:, 2] = weights[:, 2] * has_query  # no query: participatory contributes nothing
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, 3)
        combined = normalize_per_image((weights[..., None] * maps).sum(1), valid)  # (B, R)

        # Agreement: mean correlation of the active maps; a single active map agrees with itself.
        active = (weights > 0).float()
        pair = active[:, :, None] * active[:, None, :] * (1 - torch.eye(k, device=scores.device))
        corr = _correlation(maps, valid)
        agreement = ((corr * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1e-12) + 1) / 2
        agreement = torch.where(pair.sum((1, 2)) > 0, agreement, 1.0)  # (B,)
        exploit = self.exploit + 0.5 * (agreement - 0.5)  # (B,)
        if budget is not None:
            patches = (patch_valid > 0).flatten(1).sum(1).clamp_min(1)
            exploit = exploit + self.scarcity * torch.log2(patches / (8 * budget.clamp_min(1)))
        exploit = exploit.clamp(0, 1)
        temperature = torch.exp(self.log_t_high + (self.log_t_low - self.log_t_high) * exploit)  # (B,)

        # Redundancy: best cosine with any region that ranks higher (ties: lower index ranks higher).
        index = torch.arange(rh * rw, device=scores.device)
        higher = (combined[:, None, :] > combined[:, :, None]) | (
            (combined[:, None, :] == combined[:, :, None]) & (index[None, :] < index[:, None])
        )  # [b, r, j]: j ranks above r
        redundancy = torch.where(higher & valid[:, None, :], similarity, 0.0).amax(-1).clamp(0, 1)  # (B, R)
        focused = combined * (1 - self.diversify * redundancy)

        logits = torch.where(valid, focused / temperature[:, None], -torch.inf)
        peaked = torch.softmax(logits, -1)  # (B, R)
        uniform = valid / valid.sum(-1, keepdim=True).clamp_min(1)
        relevance = (1 - self.particularize) * uniform + self.particularize * peaked
        # A share follows the regions' novelty, linearly: coverage, not peaks.
        coverage = torch.where(has_query, self.query_cover, self.cover)  # (B,) with a question, a hedge
        if cover is not None:
            novel = cover / cover.sum(-1, keepdim=True).clamp_min(1e-12)
            relevance = (1 - coverage[:, None]) * relevance + coverage[:, None] * novel  # (B, R)
        relevance = torch.where(valid, relevance, 0.0)
        entropy = -(relevance * relevance.clamp_min(1e-30).log()).sum(-1)
        evenness = entropy / valid.sum(-1).clamp_min(2).log()

        report = {
            "weights": weights,
            "has_query": has_query,
            "agreement": agreement,
            "exploit": exploit,
            "temperature": temperature,
            "diversify": self.diversify.expand(b),
            "redundancy": redundancy.view(b, rh, rw),
            "particularize": self.particularize.expand(b),
            "coverage": coverage,
            "evenness": evenness,
        }
        return relevance.view(b, rh, rw), report

    def _forward_kernel(
        self,
        scores: Tensor,
        query_mask: Tensor,
        patch_valid: Tensor,
        budget: Tensor | None,
        similarity: Tensor,
        covered: Tensor | None,
        has_query: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward` after its inputs, as one Triton launch (``_balance_triton``): ``covered`` is the cover's
        patch map (or ``None``), which the kernel sums per region."""
        from . import _balance_triton  # Triton is imported on the first CUDA call only

        b, _, rh, rw = scores.shape
        knobs = torch.cat(  # read at each call: a knob changed in place takes effect, as in the torch form
            (self.base_weights, self.exploit[None], self.scarcity[None], self.diversify[None],
             self.particularize[None], self.cover[None], self.query_cover[None])
        ).float()  # fmt: skip
        relevance, weights, values, redundancy = _balance_triton.launch(
            scores.flatten(2),
            query_mask,
            patch_valid,
            self.region_size,
            budget,
            similarity,
            covered,
            knobs,
            (self.log_t_low, self.log_t_high),
        )
        report = {
            "weights": weights,
            "has_query": has_query,
            "agreement": values[:, 0],
            "exploit": values[:, 1],
            "temperature": values[:, 2],
            "diversify": self.diversify.expand(b),
            "redundancy": redundancy.view(b, rh, rw),
            "particularize": self.particularize.expand(b),
            "coverage": values[:, 3],
            "evenness": values[:, 4],
        }
        return relevance.view(b, rh, rw), report
