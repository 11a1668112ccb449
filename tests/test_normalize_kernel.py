"""normalize_per_image: the Triton kernel against the torch form, bit for bit.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported). The ``cuda`` tests run the compiled kernel, in a CUDA graph too, and check that ``torch.compile`` and
gradients keep the torch form.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import regions
from arrcoc.stages.regions import normalize_per_image

#: name -> (images, maps, length, kind, block): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, str, int | None]] = {
    "random": (3, 1, 49, "random", None),
    "stacked": (2, 3, 30, "random", None),
    "blocked": (2, 2, 37, "random", 16),
    "ties-constant-empty": (3, 2, 20, "special", None),
    "nan-inf": (4, 1, 25, "nan", None),
    "nan-inf-blocked": (4, 1, 25, "nan", 8),
    "one-entry": (2, 1, 1, "random", None),
}


def _inputs(images: int, maps: int, length: int, kind: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(score (B, K, R), valid (B, R))``."""
    g = torch.Generator().manual_seed(images * 1000 + length)
    score = torch.randn(images, maps, length, generator=g) * 3
    valid = torch.rand(images, length, generator=g) > 0.3
    valid[:, 0] = True
    if kind == "special":
        score = (score * 2).round() / 2  # ties
        score[1] = 4.0  # a constant map: all zeros
        valid[2] = False  # no valid entry: all zeros
    if kind == "nan":
        score[0, 0, 0] = torch.nan  # on a valid entry: every valid entry NaN
        score[1, 0, ~valid[1]] = torch.nan  # on invalid entries only: ignored
        score[2, 0, 0] = torch.inf
        score[3, 0, 0], score[3, 0, 2] = -torch.inf, torch.inf
        valid[3, 2] = True
    return score.to(device), valid.to(device)


def _torch_form(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    was, regions.USE_KERNEL = regions.USE_KERNEL, False
    try:
        return normalize_per_image(score, valid)
    finally:
        regions.USE_KERNEL = was


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _interpret_all() -> dict[str, bool]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _normalize_triton

    out = {}
    for name, (images, maps, length, kind, block) in CASES.items():
        score, valid = _inputs(images, maps, length, kind)
        out[name] = _same(_normalize_triton.launch(score, valid, block=block), _torch_form(score, valid))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_torch_form(interpreted: dict[str, bool], name: str) -> None:
    assert interpreted[name]


def test_the_cases_hold_what_they_are_named_for() -> None:
    score, valid = _inputs(3, 2, 20, "special")
    out = _torch_form(score, valid)
    assert (out[1] == 0).all() and (out[2] == 0).all() and out[0].amax() == 1
    score, valid = _inputs(4, 1, 25, "nan")
    out = _torch_form(score, valid)
    assert out[0, 0, valid[0]].isnan().all() and not out[1].isnan().any() and out[3, 0, 2].isnan()


def test_a_broadcast_or_non_bool_mask_keeps_the_torch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads one mask entry per map entry: any other mask takes the torch form, whatever the device."""
    score = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 7.0]])
    monkeypatch.setattr(regions, "_uses_kernel", lambda flat: True)  # as on CUDA: only the mask decides here
    out = normalize_per_image(score, torch.tensor([[True], [False]]))
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    with pytest.raises(RuntimeError, match="bool"):  # the torch form's own error for a float mask
        normalize_per_image(score, torch.ones(2, 3))


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "images, maps, length, kind",
    [(64, 3, 196, "random"), (64, 1, 49, "random"), (8, 1, 4096, "random"), (2, 2, 9000, "random")]
    + [case[:4] for case in CASES.values()],
)
def test_kernel_equals_the_torch_form_on_cuda(images: int, maps: int, length: int, kind: str) -> None:
    score, valid = _inputs(images, maps, length, kind, device="cuda")
    assert _same(normalize_per_image(score, valid), _torch_form(score, valid))
    assert _same(normalize_per_image(score[:, 0], valid), _torch_form(score[:, 0], valid))


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph_and_compile_and_grad_keep_the_torch_form() -> None:
    score, valid = _inputs(8, 3, 196, "random", device="cuda")
    want = _torch_form(score, valid)
    normalize_per_image(score, valid)  # Triton's first launch compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = normalize_per_image(score, valid)
    score.copy_(score.flip(-1))
    graph.replay()
    assert _same(out, _torch_form(score, valid))
    compiled = torch.compile(normalize_per_image, fullgraph=True)
    assert torch.allclose(compiled(score, valid), _torch_form(score, valid), atol=1e-6)
    leaf = want.clone().requires_grad_(True)
    normalize_per_image(leaf * 2, valid).sum().backward()
    assert leaf.grad is not None


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
