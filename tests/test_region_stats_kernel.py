"""The regions' feature statistics: the propositional scorer and the balance's region similarity, their Triton
kernels (``_region_stats_triton``) against the torch forms.

On CPU the kernels run in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported). The ``cuda`` tests run the compiled kernels at the pipeline's shapes, in a CUDA graph too, and check that
the switches and ``torch.compile`` keep the torch forms.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import balance, scorers
from arrcoc.stages.balance import Balance
from arrcoc.stages.scorers import PropositionalScorer

#: name -> (images, gh, gw, width, side, kind, block): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, int, int, str, int | None]] = {
    "random": (2, 5, 7, 13, 4, "random", None),
    "blocked-width": (2, 9, 9, 40, 4, "random", 8),
    "edges-and-padding": (3, 7, 7, 12, 3, "letterbox", 4),
    "alike-patches": (2, 4, 4, 6, 2, "constant", None),
    "one-patch": (2, 1, 1, 3, 4, "random", None),
    "one-row": (2, 1, 9, 5, 4, "random", None),
    "width-one": (2, 4, 4, 1, 2, "random", None),
}


def _inputs(
    images: int, gh: int, gw: int, width: int, kind: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(texture (B, gh, gw, 6), features (B, gh, gw, D), patch_valid (B, gh, gw))``; the second image has no content
    where there are two or more."""
    g = torch.Generator().manual_seed(images * 1000 + gh * 31 + gw + width)
    texture = torch.rand(images, gh, gw, 6, generator=g) * torch.tensor([100.0, 60, 60, 1, 1, 1])
    features = torch.randn(images, gh, gw, width, generator=g) * 2
    valid = torch.ones(images, gh, gw)
    if kind == "letterbox":  # image on the top-left, a half-covered edge patch, padding beyond
        valid[:, :, gw - 2] = 0.5
        valid[:, :, gw - 1] = 0
        valid[:, gh - 1] = 0
    if kind == "constant":  # every valid patch alike: every term constant, the map all zeros
        texture[:] = texture[:, :1, :1]
        features[:] = features[:, :1, :1]
    if images > 1:
        valid[1] = 0
    return texture.to(device), features.to(device), valid.to(device)


def _torch_forms(
    texture: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The propositional map and the region similarity, with the kernels switched off."""
    was = scorers.USE_KERNEL, balance.SIMILARITY_KERNEL
    scorers.USE_KERNEL = balance.SIMILARITY_KERNEL = False
    try:
        scorer = PropositionalScorer(side).to(features.device)
        return scorer(features, texture, valid, None, None), Balance(None, side).similarity(features, valid)
    finally:
        scorers.USE_KERNEL, balance.SIMILARITY_KERNEL = was


def _kernels(
    texture: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, side: int, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    from arrcoc.stages import _region_stats_triton

    weights = PropositionalScorer(side).term_weights.to(features.device)
    unit = _region_stats_triton.region_units(features, valid, side, block=block)
    return _region_stats_triton.propositional(texture, features, valid, side, weights, block=block), unit @ unit.mT


def _compare(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """The largest differences, and whether the exact zeros (padding, empty images, constant maps) are the same."""
    return {
        "map": (got[0] - want[0]).abs().max().item(),
        "similarity": (got[1] - want[1]).abs().max().item(),
        "zeros": float(torch.equal(got[0] == 0, want[0] == 0)),
        "finite": float(bool(got[0].isfinite().all() and got[1].isfinite().all())),
    }


def _interpret_all() -> dict[str, dict[str, float]]:
    """Every case through the interpreted kernels; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    out = {}
    for name, (images, gh, gw, width, side, kind, block) in CASES.items():
        texture, features, valid = _inputs(images, gh, gw, width, kind)
        out[name] = _compare(
            _kernels(texture, features, valid, side, block), _torch_forms(texture, features, valid, side)
        )
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_equal_the_torch_forms(interpreted: dict[str, dict[str, float]], name: str) -> None:
    result = interpreted[name]
    assert result["map"] <= 2e-6 and result["similarity"] <= 2e-6, result
    assert result["zeros"] == 1 and result["finite"] == 1, result


def test_the_cases_hold_what_they_are_named_for() -> None:
    texture, features, valid = _inputs(2, 4, 4, 6, "constant")
    score, _ = _torch_forms(texture, features, valid, 2)
    assert (score == 0).all()  # alike patches say nothing; an empty image gets zeros
    texture, features, valid = _inputs(3, 7, 7, 12, "letterbox")
    score, _ = _torch_forms(texture, features, valid, 3)
    assert score[0].amax() == 1 and (score[1] == 0).all() and (score[0, -1] == 0).all() and (score[0, :, -1] == 0).all()


# --- the GPU -----------------------------------------------------------------------------------------------------

#: Largest difference allowed between the kernel's map and the torch form's on CUDA: the variance is one-pass (mean
#: square less squared mean) over Lab values up to 100, so float32 sums in another order than the torch form's move the
#: terms by a few ulps of 1e4 before the min-max scaling (bench/results/cuda-tests-h100-session41-*.log).
CUDA_TOLERANCE = 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize(
    "images, gh, gw, width, side, kind",
    [(64, 14, 14, 256, 4, "random"), (64, 14, 14, 768, 4, "letterbox"), (16, 24, 24, 768, 4, "random"),
     (4, 64, 64, 1024, 4, "random"), (3, 7, 9, 33, 3, "letterbox")] + [case[:6] for case in CASES.values()],
)  # fmt: skip
def test_kernels_equal_the_torch_forms_on_cuda(images: int, gh: int, gw: int, width: int, side: int, kind: str) -> None:
    texture, features, valid = _inputs(images, gh, gw, width, kind, device="cuda")
    want = _torch_forms(texture, features, valid, side)
    got = (PropositionalScorer(side).cuda()(features, texture, valid, None, None), Balance(None, side).similarity(
        features, valid
    ))  # fmt: skip
    result = _compare(got, want)
    assert result["map"] <= CUDA_TOLERANCE and result["similarity"] <= 2e-6 and result["zeros"] == 1, result


@pytest.mark.cuda
def test_kernels_replay_in_a_cuda_graph() -> None:
    texture, features, valid = _inputs(8, 14, 14, 256, "letterbox", device="cuda")
    scorer, similarity = PropositionalScorer(4).cuda(), Balance(None, 4).similarity
    scorer(features, texture, valid, None, None), similarity(features, valid)  # Triton compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = scorer(features, texture, valid, None, None), similarity(features, valid)
    features.copy_(features.flip(1))
    texture.copy_(texture.flip(2))
    graph.replay()
    result = _compare(out, _torch_forms(texture, features, valid, 4))
    assert result["map"] <= CUDA_TOLERANCE and result["similarity"] <= 2e-6 and result["zeros"] == 1, result


@pytest.mark.cuda
def test_compile_keeps_the_torch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.compile`` the scorer is the torch form (inductor fuses it): the kernel is never called."""
    from arrcoc.stages import _region_stats_triton

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernel ran under torch.compile")

    monkeypatch.setattr(_region_stats_triton, "propositional", refuse)
    texture, features, valid = _inputs(8, 14, 14, 256, "letterbox", device="cuda")
    compiled = torch.compile(PropositionalScorer(4).cuda(), fullgraph=True)
    got, want = compiled(features, texture, valid, None, None), _torch_forms(texture, features, valid, 4)[0]
    # inductor sums the one-pass variance (mean square less squared mean, of Lab values up to 100) in its own order
    assert torch.equal(got == 0, want == 0) and (got - want).abs().max().item() <= 1e-3


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
