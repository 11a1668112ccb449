"""The perspectival scorer: the Triton kernels (``_perspectival_triton``) against the torch form.

On CPU the kernels run in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported). They agree with the torch form to float32 rounding (2e-6 on maps in [0, 1]), with the same exact zeros
and the same NaNs. The ``cuda`` tests run the compiled kernels at the pipeline's shapes, and in a CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch

from arrcoc.stages import scorers
from arrcoc.stages.scorers import PerspectivalScorer

#: How far the kernels' maps may be from the torch form's (both in [0, 1]).
TOLERANCE = 2e-6

#: name -> (images, rows, cols, width, side, surround, kind, blocks): each case's inputs come from :func:`_inputs`;
#: blocks: ``(patch_block, width_block, region_block)`` passed to ``launch``, or None for its defaults.
CASES: dict[str, tuple[int, int, int, int, int, int, str, tuple[int, int, int] | None]] = {
    "random": (2, 8, 8, 16, 4, 5, "random", None),
    "letterbox-half-valid-odd-sides": (2, 9, 7, 40, 4, 5, "letterbox", None),
    "padding-constant-random": (3, 6, 7, 8, 2, 3, "special", None),
    "one-patch": (2, 1, 1, 5, 4, 5, "random", None),
    "one-row": (2, 1, 9, 7, 2, 5, "letterbox", None),
    "one-column-side-one": (1, 6, 1, 3, 1, 3, "random", None),
    "width-one-surround-one": (2, 5, 6, 1, 2, 1, "letterbox", None),
    "term-weights": (2, 7, 7, 12, 3, 5, "weights", None),
    "blocked": (2, 9, 7, 36, 3, 3, "letterbox", (16, 16, 4)),
    "blocked-special": (3, 5, 5, 12, 2, 3, "special", (16, 8, 4)),
    "nan": (2, 5, 6, 6, 2, 3, "nan", None),
}

#: term_weights per kind (the scorer's default elsewhere).
WEIGHTS = {"weights": (0.25, 2.0, 0.0)}


def _inputs(
    images: int, rows: int, cols: int, width: int, kind: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(texture (B, gh, gw, 6), features (B, gh, gw, D), patch_valid (B, gh, gw))``: noise around a salient
    object (regions' scores far apart, as an image's are, so that rounding is not magnified by the normalisations).

    ``letterbox``: the image covers the top-left part of the grid, its last row and column half (0.5), padding past
    them. ``special``: image 0 all padding, image 1 letterboxed with all its valid patches alike (Lab and features;
    padding patches hold other values), image 2 random. ``nan``: a NaN feature on a valid patch of image 0 (every
    valid region NaN), a NaN in a texture channel past Lab in image 1 (never read).
    """
    g = torch.Generator().manual_seed(images * 10000 + rows * 100 + cols + width)
    texture = torch.randn(images, rows, cols, 6, generator=g) * 20
    texture[..., 0] = torch.rand(images, rows, cols, generator=g) * 100
    features = torch.randn(images, rows, cols, width, generator=g) + 0.5
    for image in range(images):  # a salient object: a block of patches unlike the rest in colour and features
        y, x = (int(torch.randint(0, size, (), generator=g)) for size in (rows, cols))
        texture[image, y : y + 1 + rows // 3, x : x + 1 + cols // 3, :3] += torch.tensor([40.0, -30.0, 30.0])
        features[image, y : y + 1 + rows // 3, x : x + 1 + cols // 3] += 2 * torch.randn(width, generator=g)
    patch_valid = (torch.rand(images, rows, cols, generator=g) > 0.15).float()
    patch_valid[:, 0, 0] = 1.0
    if kind in ("letterbox", "special"):
        h, w = max(1, rows - rows // 3), max(1, cols - cols // 4)
        patch_valid.zero_()
        patch_valid[:, :h, :w] = 1.0
        patch_valid[:, h - 1, :w] = 0.5
        patch_valid[:, :h, w - 1] = 0.5
        patch_valid[:, 0, 0] = 1.0
    if kind == "special":
        patch_valid[0] = 0.0
        alike = patch_valid[1] > 0
        texture[1, alike, :3] = torch.tensor([4.0, -2.0, 0.5])  # powers of two: the surround means are exact
        features[1, alike] = features[1, 0, 0].clone()
    if kind == "nan":
        features[0, 0, 0, 0] = torch.nan
        texture[1, 1, 1, 4] = torch.nan
    return texture.to(device), features.to(device), patch_valid.to(device)


def _scorer(side: int, surround: int, kind: str, device: str = "cpu") -> PerspectivalScorer:
    weights = WEIGHTS.get(kind)
    extra = {} if weights is None else {"term_weights": weights}
    return PerspectivalScorer(region_size=side, surround=surround, **extra).to(device)


def _torch_form(
    scorer: PerspectivalScorer, texture: torch.Tensor, features: torch.Tensor, patch_valid: torch.Tensor
) -> torch.Tensor:
    """The scorer's torch form, whatever its kernel switch says (``scorers.USE_KERNEL``, once the scorer has one)."""
    was = getattr(scorers, "USE_KERNEL", False)
    scorers.USE_KERNEL = False
    try:
        b = features.shape[0]
        query = torch.zeros(b, 1, features.shape[-1], device=features.device)
        mask = torch.zeros(b, 1, dtype=torch.bool, device=features.device)
        return scorer(features, texture, patch_valid, query, mask)
    finally:
        scorers.USE_KERNEL = was


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, object]:
    """The largest difference off NaN, and whether the NaNs and the exact zeros are where the torch form has them."""
    return {
        "shape": list(got.shape) == list(want.shape),
        "nan": torch.equal(got.isnan(), want.isnan()),
        "zeros": torch.equal(got == 0, want == 0),
        "diff": (got.nan_to_num() - want.nan_to_num()).abs().max().item() if got.numel() else 0.0,
        "range": bool(((got >= 0) & (got <= 1) | got.isnan()).all()),
    }


def _interpret_all() -> dict[str, object]:
    """Every case through the interpreted kernels; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _perspectival_triton

    out: dict[str, object] = {}
    for name, (images, rows, cols, width, side, surround, kind, blocks) in CASES.items():
        texture, features, patch_valid = _inputs(images, rows, cols, width, kind)
        scorer = _scorer(side, surround, kind)
        patch_block, width_block, region_block = blocks or (None, None, None)
        got = _perspectival_triton.launch(
            texture, features, patch_valid, side, surround, scorer.term_weights,
            patch_block=patch_block, width_block=width_block, region_block=region_block,
        )  # fmt: skip
        out[name] = _compare(got, _torch_form(scorer, texture, features, patch_valid))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_equal_the_torch_form(interpreted: dict[str, dict[str, object]], name: str) -> None:
    result = interpreted[name]
    assert result["shape"] and result["nan"] and result["zeros"] and result["range"], result
    assert result["diff"] <= TOLERANCE, result


def test_one_call_is_three_launches_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels it starts (counted, not run) and the aten ops it runs other than allocations and views: none, so
    no copy, fill or host sync."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    from arrcoc.stages import _perspectival_triton

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ not in ("empty", "view", "_unsafe_view"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    launched: list[str] = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
            return lambda *args, **kwargs: launched.append(self.name)

    for name in ("sums_kernel", "terms_kernel", "regions_kernel"):
        monkeypatch.setattr(_perspectival_triton, name, Stub(name))
    texture, features, patch_valid = _inputs(1, 1, 1, 4, "random")
    weights = _scorer(2, 3, "random").term_weights
    with Ops() as mode:
        _perspectival_triton.launch(texture, features, patch_valid, 2, 3, weights)
    assert launched == ["sums_kernel", "terms_kernel", "regions_kernel"] and mode.ops == []


def test_the_cases_hold_what_they_are_named_for() -> None:
    for name, (images, rows, cols, width, side, surround, kind, blocks) in CASES.items():
        texture, features, patch_valid = _inputs(images, rows, cols, width, kind)
        want = _torch_form(_scorer(side, surround, kind), texture, features, patch_valid)
        assert want.shape == (images, math.ceil(rows / side), math.ceil(cols / side)), name
        if kind == "letterbox":
            assert (patch_valid == 0.5).any() and (patch_valid == 0).any(), name
        if blocks is not None:  # every blocked loop runs more than once
            patch_block, width_block, region_block = blocks
            assert rows * cols > patch_block and width > width_block and want[0].numel() > region_block, name
        if kind == "nan":
            assert want[0].isnan().all() and not want[1].isnan().any(), name
        elif kind == "special":  # all padding, then all alike: zeros; then a real map
            assert (want[:2] == 0).all() and want[2].amax() == 1, name
        else:  # a real map, unless the image is one region
            assert not want.isnan().any() and (want.amax((1, 2)) == (want[0].numel() > 1)).all(), name
    assert CASES["letterbox-half-valid-odd-sides"][1] % CASES["letterbox-half-valid-odd-sides"][4] != 0
    assert CASES["letterbox-half-valid-odd-sides"][3] & (CASES["letterbox-half-valid-odd-sides"][3] - 1) != 0


def test_an_even_surround_is_refused() -> None:
    pytest.importorskip("triton")
    from arrcoc.stages import _perspectival_triton

    texture, features, patch_valid = _inputs(1, 3, 3, 4, "random")
    with pytest.raises(ValueError, match="odd"):
        _perspectival_triton.launch(texture, features, patch_valid, 2, 4, _scorer(2, 5, "random").term_weights)


# --- the GPU -----------------------------------------------------------------------------------------------------

#: (images, rows, cols, width, side, surround, kind): the pipeline's shapes (224 px at patch 16 and 14, ViT-Small
#: and ViT-Base widths), the largest grid and width, a full batch of 256, and every CPU case.
CUDA_SHAPES = [
    (64, 14, 14, 256, 4, 5, "letterbox"),
    (64, 14, 14, 768, 4, 5, "random"),
    (64, 24, 24, 256, 4, 5, "random"),
    (64, 24, 24, 768, 4, 5, "letterbox"),
    (64, 24, 24, 768, 3, 3, "special"),
    (64, 14, 14, 384, 2, 7, "weights"),
    (4, 64, 64, 1024, 4, 5, "letterbox"),
    (2, 64, 64, 1000, 1, 5, "random"),
    (256, 7, 7, 64, 4, 5, "random"),
] + [case[:7] for case in CASES.values()]


def _check_on_cuda(got: torch.Tensor, want: torch.Tensor, patch_valid: torch.Tensor, side: int) -> None:
    """To float32 rounding, with the torch form's NaNs and its zeros on regions with no valid patch."""
    from arrcoc.stages.regions import to_regions

    result = _compare(got, want)
    assert result["shape"] and result["nan"] and result["range"], result
    assert result["diff"] <= 1e-5, result
    empty = to_regions(patch_valid[..., None], side)[..., 0].sum(-1) == 0
    assert (got[empty] == 0).all() and (want[empty] == 0).all()
    alike = (want == 0).all(-1).all(-1)  # images whose map is all zeros: no valid patch, or all alike
    assert (got[alike] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("images, rows, cols, width, side, surround, kind", CUDA_SHAPES)
def test_kernels_equal_the_torch_form_on_cuda(
    images: int, rows: int, cols: int, width: int, side: int, surround: int, kind: str
) -> None:
    from arrcoc.stages import _perspectival_triton

    texture, features, patch_valid = _inputs(images, rows, cols, width, kind, device="cuda")
    scorer = _scorer(side, surround, kind, device="cuda")
    got = _perspectival_triton.launch(texture, features, patch_valid, side, surround, scorer.term_weights)
    _check_on_cuda(got, _torch_form(scorer, texture, features, patch_valid), patch_valid, side)


@pytest.mark.cuda
def test_kernels_replay_in_a_cuda_graph_reading_the_inputs_and_weights_from_memory() -> None:
    from arrcoc.stages import _perspectival_triton

    texture, features, patch_valid = _inputs(64, 14, 14, 256, "letterbox", device="cuda")
    scorer = _scorer(4, 5, "random", device="cuda")
    weights = scorer.term_weights
    _perspectival_triton.launch(texture, features, patch_valid, 4, 5, weights)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _perspectival_triton.launch(texture, features, patch_valid, 4, 5, weights)
    new_texture, new_features, new_valid = _inputs(64, 14, 14, 256, "special", device="cuda")
    texture.copy_(new_texture)
    features.copy_(new_features)
    patch_valid.copy_(new_valid)
    weights.copy_(torch.tensor([0.5, 0.0, 2.0], device="cuda").view_as(weights))
    graph.replay()
    torch.cuda.synchronize()
    want = _torch_form(scorer, texture, features, patch_valid)
    _check_on_cuda(out, want, patch_valid, 4)
    assert (out[:2] == 0).all() and (out[2:].amax((1, 2)) == 1).all()  # all padding, all alike, real maps


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
