"""The set-up of the query-free pick's greedy loop: its Triton kernel (``_pick_setup_triton``) against the torch form
(``balance._maxmin_inputs``), bit for bit.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported). The ``cuda`` tests run the compiled kernel at the pipeline's shapes, in a CUDA graph too, and the whole
pick with the kernel and without.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arrcoc.stages import balance
from arrcoc.stages.balance import _maxmin_inputs, pick_patches

#: name -> (images, patches, colour, weighted, priority, frame, kind, blocks): inputs from :func:`_inputs`.
CASES: dict[str, tuple[int, int, bool, bool, bool, bool, str, tuple[int, int] | None]] = {
    "plain": (3, 20, False, False, False, False, "random", None),
    "colour": (3, 20, True, False, False, False, "random", None),
    "colour-frame": (3, 30, True, False, False, True, "random", None),
    "every-option-tiled": (3, 37, True, True, True, True, "random", (8, 16)),
    "frame-tiled": (2, 37, True, False, False, True, "random", (4, 8)),
    "padding-and-one-patch": (3, 12, True, False, False, True, "sparse", None),
    "ties": (2, 16, True, False, True, True, "ties", (4, 4)),
    "nan": (3, 10, True, True, False, True, "nan", None),
}


def _inputs(
    images: int, patches: int, colour: bool, weighted: bool, priority: bool, frame: bool, kind: str, device: str = "cpu"
) -> dict[str, torch.Tensor | float | None]:
    """The set-up's arguments: cosines of unit features, validity, Lab, the colour's share, weights, tiers, border."""
    g = torch.Generator().manual_seed(images * 100 + patches)
    features = torch.randn(images, patches, 8, generator=g)
    lab = torch.rand(images, patches, 6, generator=g)[..., :3] * torch.tensor([100.0, 60, 60])  # strided, as texture
    valid = torch.rand(images, patches, generator=g) > 0.2
    valid[:, 0] = True
    if kind == "sparse":  # the second image all padding, the third one patch
        valid[1] = False
        valid[2] = False
        valid[2, -1] = True  # a border patch
    if kind == "ties":  # duplicate patches and colours: equal distances everywhere
        features = features[:, :4].repeat(1, patches // 4, 1)
        lab = lab[:, :4].repeat(1, patches // 4, 1)
    if kind == "nan":
        features[0, 2] = torch.nan  # NaN cosines on a valid patch's row and column
        lab[1, 3, 1] = torch.nan
    unit = F.normalize(features, dim=-1)
    border = torch.zeros(images, patches, dtype=torch.bool)
    border[:, -3:] = True
    args = {
        "gram": unit @ unit.mT,
        "valid": valid,
        "lab": lab if colour else None,
        "colour_share": 0.5,
        "weight": torch.rand(images, patches, generator=g) * 0.8 + 0.2 if weighted else None,
        "priority": (torch.rand(images, patches, generator=g) > 0.7).float() if priority else None,
        "frame": border if frame else None,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _torch_form(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return _maxmin_inputs(
        args["gram"], args["valid"], args["lab"], args["colour_share"], None, args["weight"], args["priority"],
        args["frame"],
    )  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _interpret_all() -> dict[str, bool]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _pick_setup_triton

    out = {}
    for name, (*shape, blocks) in CASES.items():
        args = _inputs(*shape)
        got, want = _pick_setup_triton.launch(**args, blocks=blocks), _torch_form(args)
        out[name] = _same(got[0], want[0]) and _same(got[1], want[1])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_torch_form(interpreted: dict[str, bool], name: str) -> None:
    assert interpreted[name]


def test_the_cases_hold_what_they_are_named_for() -> None:
    weighted, score = _torch_form(_inputs(3, 12, True, False, False, True, "sparse"))
    assert (score[1] == -torch.inf).all() and (weighted[1] == -torch.inf).all()  # all padding: nothing to pick
    # one patch: no neighbour (0), then the border tier's bonus: below every score of a tier 0
    assert -torch.inf < score[2, -1] < -1 and (score[2, :-1] == -torch.inf).all()
    weighted, score = _torch_form(_inputs(3, 10, True, True, False, True, "nan"))
    assert weighted[0].isnan().all() and not weighted[2].isnan().any()  # a NaN sizes no tier: its image is NaN


def test_the_colour_distance_is_the_channels_euclidean_distance() -> None:
    lab = torch.tensor([[[50.0, 10.0, -20.0], [50.0, 10.0, -20.0], [53.0, 14.0, -20.0]]])
    distance = balance._lab_distance(lab)
    assert torch.equal(distance[0], torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 5.0, 0.0]]))
    lab = torch.rand(2, 30, 3, dtype=torch.float64) * 100
    assert torch.allclose(balance._lab_distance(lab), torch.cdist(lab, lab), atol=1e-5)  # cdist: cancellation


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "images, patches, colour, weighted, priority, frame, kind",
    [(64, 196, True, False, False, True, "random"), (16, 576, True, True, True, True, "random"),
     (4, 1024, True, False, False, True, "ties")] + [case[:7] for case in CASES.values()],
)  # fmt: skip
def test_kernel_equals_the_torch_form_on_cuda(
    images: int, patches: int, colour: bool, weighted: bool, priority: bool, frame: bool, kind: str
) -> None:
    from arrcoc.stages import _pick_setup_triton

    args = _inputs(images, patches, colour, weighted, priority, frame, kind, device="cuda")
    got, want = _pick_setup_triton.launch(**args), _torch_form(args)
    assert _same(got[0], want[0]) and _same(got[1], want[1])


@pytest.mark.cuda
def test_the_pick_with_its_set_up_kernel_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pick on CUDA, graphed, kernel against torch form: the same patches, bit for bit."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(32, 14, 14, 64, generator=g).cuda()
    colour = (torch.rand(32, 14, 14, 3, generator=g) * 100).cuda()
    patch_valid = torch.ones(32, 14, 14, device="cuda")
    patch_valid[::3, :, 11:] = 0
    frame = torch.zeros(32, 14, 14, dtype=torch.bool, device="cuda")
    frame[1::2, 0] = True
    budget = torch.randint(1, 60, (32,), generator=g).cuda()

    def pick() -> torch.Tensor:
        return pick_patches("maxmin", features, patch_valid, budget, 64, colour=colour, colour_share=0.5, frame=frame)

    pick()  # Triton compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused = pick()
    graph.replay()
    monkeypatch.setattr(balance, "PICK_SETUP_KERNEL", False)
    assert torch.equal(fused, pick())
    assert torch.equal(fused.sum((1, 2)).long(), budget)


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
