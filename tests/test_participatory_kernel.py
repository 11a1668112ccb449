"""The participatory scorer's kernels against the torch forms: the coupling (``query_coupling`` with the unit patches
given) to float32 rounding, exact at -2 and 0; the peak map (``ParticipatoryScorer.from_coupling``) bit for bit.

On CPU the kernels run in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported). The ``cuda`` tests run the compiled kernels at realistic shapes and in a CUDA graph, against the torch
forms run on the CPU (where no kernel ever stands in for them) on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages.regions import to_regions
from arrcoc.stages.scorers import ParticipatoryScorer, query_coupling, unit_patches

#: Largest difference allowed between the kernel's cosines and the torch form's at the interpreted cases' widths.
TOLERANCE = 2e-6

#: name -> (images, gh, gw, tokens, width, kind, (n_block, l_block, d_block) or None): inputs from
#: :func:`_coupling_inputs`.
COUPLING_CASES: dict[str, tuple[int, int, int, int, int, str, tuple[int, int, int] | None]] = {
    "random": (2, 7, 7, 4, 32, "random", None),
    "blocked": (3, 9, 9, 20, 40, "random", (16, 16, 16)),
    "no-query-middle-padding-zeros": (3, 6, 5, 6, 24, "special", None),
    "special-blocked": (3, 6, 5, 6, 24, "special", (16, 16, 16)),
    "one-token": (3, 4, 4, 1, 12, "special", None),
    "tokens-past-block": (3, 3, 5, 77, 8, "special", None),
    "one-patch": (2, 1, 1, 3, 17, "random", None),
    "one-row": (2, 1, 9, 5, 33, "random", (16, 16, 16)),
    "width-1": (2, 3, 3, 4, 1, "random", None),
    "nan": (3, 3, 3, 4, 8, "nan", None),
}

#: name -> (images, gh, gw, side, kind, (r_block, p_block, l_block) or None); inputs from :func:`_peak_inputs`.
PEAK_CASES: dict[str, tuple[int, int, int, int, str, tuple[int, int, int] | None]] = {
    "random": (3, 8, 8, 4, "random", None),
    "ragged-letterbox": (3, 9, 7, 4, "letterbox", None),
    "ragged-letterbox-blocked": (3, 9, 7, 4, "letterbox", (2, 4, 2)),
    "ties-constant-empty-no-query": (4, 8, 8, 2, "special", None),
    "special-blocked": (4, 8, 8, 2, "special", (4, 2, 2)),
    "one-patch": (2, 1, 1, 4, "letterbox", None),
    "one-row": (2, 1, 9, 2, "letterbox", None),
    "side-1": (2, 5, 6, 1, "letterbox", (8, 1, 4)),
    "side-3-blocked": (2, 8, 7, 3, "letterbox", (2, 4, 4)),
    "raw-values": (4, 6, 6, 4, "raw", None),
    "raw-values-blocked": (4, 6, 6, 4, "raw", (1, 4, 1)),
}


def _coupling_inputs(images: int, gh: int, gw: int, tokens: int, width: int, kind: str, device: str = "cpu"):
    """``(features (B, gh, gw, D), unit (B, N, D), query (B, L, D), query_mask (B, L))``."""
    g = torch.Generator().manual_seed(images * 1000 + gh * 100 + gw * 10 + tokens + width)
    features = torch.randn(images, gh, gw, width, generator=g)
    query = torch.randn(images, tokens, width, generator=g) * 3
    mask = torch.rand(images, tokens, generator=g) > 0.3
    mask[:, 0] = True
    if kind == "special":
        mask[0] = False  # no query: -2 everywhere
        if tokens > 2:
            mask[1] = True
            mask[1, 1 : tokens - 1] = False  # padding in the middle (the first and the last token real)
        query[2] = 0.0  # every token of all zeros: cosine 0 everywhere
        features[1, 0, 0] = 0.0  # a patch of all zeros: cosine 0 with every token
        mask[2, 0] = True
    if kind == "nan":
        features[0, 0, 0, 0] = torch.nan  # a NaN patch: NaN where there is a query
        query[1, 0, 0] = torch.nan  # a NaN token: NaN everywhere if real, ignored if padding
        mask[1, 0] = False
        query[2, 0, 0] = torch.nan  # ... real here: NaN everywhere
    unit = unit_patches(features)
    return tuple(t.to(device) for t in (features, unit, query, mask))


def _peak_inputs(images: int, gh: int, gw: int, side: int, kind: str, device: str = "cpu"):
    """``(coupling (B, gh, gw), patch_valid (B, gh, gw), query_mask (B, 3))``."""
    g = torch.Generator().manual_seed(images * 1000 + gh * 100 + gw * 10 + side)
    coupling = torch.rand(images, gh, gw, generator=g) * 2 - 1
    valid = torch.ones(images, gh, gw)
    mask = torch.ones(images, 3, dtype=torch.bool)
    mask[:, 2] = False
    if kind == "letterbox":
        valid[0, :, gw // 2 :] = 0  # letterboxed: half the image is padding
        valid[0, :, gw // 2 - 1] = 0.5  # the content's last column half covered
        valid[-1, gh // 2 :] = 0
        valid[-1, gh // 2 - 1] = 0.25
        coupling[valid == 0] = 3.0  # above every cosine: it would win if padding patches counted
    if kind == "special":
        coupling = (coupling * 2).round() / 2  # ties inside regions and between them
        valid[0, :, 5:] = 0  # padding regions: 0
        coupling[1] = 0.25  # a constant map: all zeros
        coupling[1, 0, 0] = 0.9  # ... on its valid patches only: this one is padding
        valid[1, 0, 0] = 0
        valid[2] = 0  # all padding: all zeros
        mask[3] = False  # no query: all zeros (on a spread map here; the head's is all -2)
    if kind == "raw":  # any float: values below the -2 of padding slots, inf, NaN
        coupling = torch.randn(images, gh, gw, generator=g) * 3 - 2
        valid[:, :, 4:] = 0.5
        valid[:, 5:] = 0  # the last row of regions partly padding: its -2 beats values below it
        coupling[0, 0, 0] = torch.nan  # on a valid patch: every valid region NaN
        coupling[1, 5, 5] = torch.nan  # on a padding patch: ignored
        coupling[2, 0, 0] = torch.inf
        coupling[3, 0, 0], coupling[3, 2, 5] = -torch.inf, torch.inf
    return tuple(t.to(device) for t in (coupling, valid, mask))


def _coupling_torch(features, unit, query, mask) -> torch.Tensor:
    return query_coupling(features, query, mask, unit).flatten(1)


def _peak_torch(coupling, valid, mask, side: int) -> torch.Tensor:
    return ParticipatoryScorer(side).from_coupling(coupling, valid, mask)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _coupling_check(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Largest difference off NaN; whether NaN, -2 and 0 are where the torch form has them, exactly."""
    nan = want.isnan()
    exact = (want == -2) | (want == 0)
    return {
        "err": (got - want)[~nan].abs().max().item() if (~nan).any() else 0.0,
        "nan_same": float(torch.equal(got.isnan(), nan)),
        "exact_same": float(torch.equal(got[exact], want[exact])),
    }


def _interpret_all() -> dict[str, dict[str, float]]:
    """Every case through the interpreted kernels; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _participatory_triton as kernel

    out = {}
    for name, (*shape, kind, blocks) in COUPLING_CASES.items():
        features, unit, query, mask = _coupling_inputs(*shape, kind)
        got = kernel.coupling(unit, query, mask, *(blocks or ()))
        out[f"coupling/{name}"] = _coupling_check(got, _coupling_torch(features, unit, query, mask))
    for name, (images, gh, gw, side, kind, blocks) in PEAK_CASES.items():
        coupling, valid, mask = _peak_inputs(images, gh, gw, side, kind)
        got = kernel.peak(coupling, valid, mask, side, *(blocks or ()))
        out[f"peak/{name}"] = {"same": float(_same(got, _peak_torch(coupling, valid, mask, side)))}
    # the two chained, as the head runs them: the coupling's (B, N) straight into the peak
    features, unit, query, mask = _coupling_inputs(3, 9, 7, 6, 24, "special")
    valid = _peak_inputs(3, 9, 7, 4, "letterbox")[1]
    chained = kernel.peak(kernel.coupling(unit, query, mask), valid, mask, 4)
    want = _peak_torch(query_coupling(features, query, mask, unit), valid, mask, 4)
    out["chained"] = {
        "err": (chained - want).abs().max().item(),
        "zeros_same": float(torch.equal(chained == 0, want == 0)),
    }
    return out


@pytest.mark.parametrize("name", list(COUPLING_CASES))
def test_interpreted_coupling_agrees_with_the_torch_form(interpreted: dict, name: str) -> None:
    result = interpreted[f"coupling/{name}"]
    assert result["nan_same"] == 1.0 and result["exact_same"] == 1.0, result
    assert result["err"] <= TOLERANCE, result


@pytest.mark.parametrize("name", list(PEAK_CASES))
def test_interpreted_peak_equals_the_torch_form(interpreted: dict, name: str) -> None:
    assert interpreted[f"peak/{name}"]["same"] == 1.0


def test_interpreted_kernels_chain_as_the_head_runs_them(interpreted: dict) -> None:
    result = interpreted["chained"]
    assert result["zeros_same"] == 1.0 and result["err"] <= TOLERANCE, result


def test_the_cases_hold_what_they_are_named_for() -> None:
    features, unit, query, mask = _coupling_inputs(3, 6, 5, 6, 24, "special")
    want = _coupling_torch(features, unit, query, mask)
    assert (want[0] == -2).all() and (want[2] == 0).all() and want[1, 0] == 0
    assert mask[1].tolist() == [True, False, False, False, False, True]
    assert (_coupling_torch(*_coupling_inputs(3, 3, 5, 77, 8, "special"))[0] == -2).all()
    want = _coupling_torch(*_coupling_inputs(3, 3, 3, 4, 8, "nan"))
    assert want[0, 0].isnan() and not want[0, 1:].isnan().any() and not want[1].isnan().any()
    assert want[2].isnan().all()

    coupling, valid, mask = _peak_inputs(4, 8, 8, 2, "special")
    want = _peak_torch(coupling, valid, mask, 2)
    assert (want[0, :, 3:] == 0).all() and want[0].amax() == 1  # padding regions; a spread map
    assert (want[1] == 0).all() and (want[2] == 0).all() and (want[3] == 0).all()
    regions = coupling[0, :, :4].reshape(4, 2, 2, 2).transpose(1, 2).reshape(4, 2, 4)
    assert (regions == regions.amax(-1, keepdim=True)).sum(-1).gt(1).any()  # ties inside a region
    coupling, valid, mask = _peak_inputs(4, 6, 6, 4, "raw")
    want = _peak_torch(coupling, valid, mask, 4)
    assert want[0].isnan().all() and not want[1].isnan().any() and want[2].isnan().any()
    weights, values = to_regions(valid[..., None], 4)[..., 0], to_regions(coupling[..., None], 4)[..., 0]
    below = torch.where(weights > 0, values, -9.0).amax(-1) < -2  # all its valid patches below the padding's -2
    assert (below & (weights > 0).any(-1) & (weights == 0).any(-1)).any()
    coupling, valid, mask = _peak_inputs(3, 9, 7, 4, "letterbox")
    assert ((valid > 0) & (valid < 1)).any() and _peak_torch(coupling, valid, mask, 4).shape == (3, 3, 2)


# --- the GPU -----------------------------------------------------------------------------------------------------

#: (images, gh, gw, tokens, width): the head's shapes (a trained query has 4 tokens; a text encoder's, 77).
CUDA_COUPLING = [(64, 14, 14, 4, 256), (64, 24, 24, 4, 768), (64, 24, 24, 77, 768), (64, 14, 14, 77, 256)]
CUDA_COUPLING += [(256, 14, 14, 4, 256), (2, 64, 64, 300, 1024), (3, 37, 29, 5, 100), (1, 1, 1, 1, 1)]


def _on(device: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


@pytest.mark.cuda
@pytest.mark.parametrize("images, gh, gw, tokens, width", CUDA_COUPLING)
@pytest.mark.parametrize("kind", ["random", "special"])
def test_coupling_agrees_with_the_torch_form_on_cuda(
    images: int, gh: int, gw: int, tokens: int, width: int, kind: str
) -> None:
    from arrcoc.stages import _participatory_triton as kernel

    if kind == "special" and images < 3:
        pytest.skip("the special inputs need three images")
    features, unit, query, mask = _coupling_inputs(images, gh, gw, tokens, width, kind)
    got = kernel.coupling(*_on("cuda", unit, query, mask)).cpu()
    result = _coupling_check(got, _coupling_torch(features, unit, query, mask))
    assert result["nan_same"] == 1.0 and result["exact_same"] == 1.0, result
    assert result["err"] <= 1e-5, result  # sums of up to 1024 products, in another order than the CPU's
    # against the caller's form on CUDA (cuBLAS) too, while no switch routes it to the kernel
    cuda_form = query_coupling(*_on("cuda", features, query, mask, unit)).flatten(1).cpu()
    assert (got - cuda_form).abs().max().item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("images, gh, gw, side", [(64, 14, 14, 4), (64, 24, 24, 4), (256, 24, 24, 3), (4, 64, 64, 4)])
@pytest.mark.parametrize("kind", ["random", "letterbox", "special", "raw"])
def test_peak_equals_the_torch_form_on_cuda(images: int, gh: int, gw: int, side: int, kind: str) -> None:
    from arrcoc.stages import _participatory_triton as kernel

    coupling, valid, mask = _peak_inputs(images, gh, gw, side, kind)
    want = _peak_torch(coupling, valid, mask, side)
    assert _same(kernel.peak(*_on("cuda", coupling, valid, mask), side).cpu(), want)
    for case in PEAK_CASES.values():  # the small cases, blocked loops included, compiled
        coupling, valid, mask = _peak_inputs(*case[:5])
        got = kernel.peak(*_on("cuda", coupling, valid, mask), case[3], *(case[5] or ()))
        assert _same(got.cpu(), _peak_torch(coupling, valid, mask, case[3]))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(COUPLING_CASES))
def test_small_coupling_cases_on_cuda(name: str) -> None:
    from arrcoc.stages import _participatory_triton as kernel

    *shape, kind, blocks = COUPLING_CASES[name]
    features, unit, query, mask = _coupling_inputs(*shape, kind)
    got = kernel.coupling(*_on("cuda", unit, query, mask), *(blocks or ())).cpu()
    result = _coupling_check(got, _coupling_torch(features, unit, query, mask))
    assert result["nan_same"] == 1.0 and result["exact_same"] == 1.0 and result["err"] <= TOLERANCE, result


@pytest.mark.cuda
def test_kernels_replay_in_a_cuda_graph() -> None:
    from arrcoc.stages import _participatory_triton as kernel

    features, unit, query, mask = _coupling_inputs(8, 24, 24, 6, 256, "special")
    valid = _peak_inputs(8, 24, 24, 4, "letterbox")[1]
    d_unit, d_query, d_mask, d_valid = _on("cuda", unit, query, mask, valid)
    kernel.peak(kernel.coupling(d_unit, d_query, d_mask), d_valid, d_mask, 4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        coupled = kernel.coupling(d_unit, d_query, d_mask)
        scores = kernel.peak(coupled, d_valid, d_mask, 4)
    unit, query, mask = unit.flip(0), query.flip(0) * 0.5, mask.flip(0)  # new inputs, in place
    d_unit.copy_(unit)
    d_query.copy_(query)
    d_mask.copy_(mask)
    graph.replay()
    torch.cuda.synchronize()
    want = _coupling_torch(features.flip(0), unit, query, mask)
    result = _coupling_check(coupled.cpu(), want)
    assert result["exact_same"] == 1.0 and result["err"] <= 1e-5, result
    assert _same(scores.cpu(), kernel.peak(coupled, d_valid, d_mask, 4).cpu())
    assert _same(scores.cpu(), _peak_torch(coupled.cpu().view(8, 24, 24), valid, mask, 4))


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
