"""frame_patches: the Triton kernel against the torch form, bit for bit.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported). The ``cuda`` tests run the compiled kernel on photographs' texture and in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import balance
from arrcoc.stages.balance import frame_patches

#: name -> (images, gh, gw, kind): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, str]] = {
    "borders": (4, 9, 11, "border"),
    "letterboxed": (3, 14, 14, "letterbox"),
    "random": (4, 6, 5, "random"),
    "no-colour": (2, 9, 11, "border-no-colour"),
    "one-row": (2, 1, 9, "border"),
    "one-patch": (2, 1, 1, "random"),
}


def _inputs(images: int, gh: int, gw: int, kind: str, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """``(flat, patch_valid, colour or None)``: a flat fill from the edge (a ring, or a band on one side), partly flat
    patches on its edge, patches of colour inside it, letterbox padding, or plain noise."""
    g = torch.Generator().manual_seed(images * 100 + gh * 10 + gw)
    flat = (torch.rand(images, gh, gw, generator=g) * 4).round() / 4  # 0, 0.25, ... 1: solid, touched and picture
    valid = torch.ones(images, gh, gw)
    colour = torch.rand(images, gh, gw, 3, generator=g) * 0.1  # chroma up to 0.14: some patches have colour
    if kind.startswith("border"):
        y, x = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        ring = (y < 2) | (x < 2) | (y >= gh - 2) | (x >= gw - 2)
        colour[:4] *= 0.3  # no colour (chroma below 0.06) but on two patches of the first ring
        colour[0, -1, -1, 1] = colour[0, 0, gw // 2, 2] = 0.1
        flat[0] = torch.where(ring, 1.0, flat[0] * 0.5)  # a framed picture
        flat[1] = torch.where(x < 3, 1.0, 0.0)  # a band on one side, the rest picture
        if images > 2:
            flat[2] = 1.0  # all flat: a drawing's ground, no frame
            flat[3] = torch.where(ring, 0.25, flat[3])  # only partly flat patches on the edge: no fill starts
    if kind == "letterbox":
        valid[:, :, gw - 4 :] = 0
        valid[:, :, gw - 5] = 0.5
        valid[1, gh - 3 :] = 0
        flat[0, :, :3] = 1.0
    return flat.to(device), valid.to(device), None if kind.endswith("no-colour") else colour.to(device)


def _torch_form(*args: torch.Tensor | None) -> torch.Tensor:
    was, balance.FRAME_KERNEL = balance.FRAME_KERNEL, False
    try:
        return frame_patches(*args)
    finally:
        balance.FRAME_KERNEL = was


def _interpret_all() -> dict[str, list]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _frame_triton

    out = {}
    for name, (images, gh, gw, kind) in CASES.items():
        flat, valid, colour = _inputs(images, gh, gw, kind)
        want = _torch_form(flat, valid, colour)
        same = torch.equal(_frame_triton.launch(flat, valid, colour, 0.9, 0.05, 0.06), want)
        if colour is not None:  # read in place from the texture's channels, as the head passes them
            texture = torch.cat((colour, torch.rand(images, gh, gw, 2), flat[..., None]), -1)
            same &= torch.equal(_frame_triton.launch(texture[..., 5], valid, texture[..., :3], 0.9, 0.05, 0.06), want)
        out[name] = [same, want.sum().item()]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_torch_form(interpreted: dict[str, list], name: str) -> None:
    assert interpreted[name][0], interpreted[name]


def test_the_cases_find_borders_and_none() -> None:
    flat, valid, colour = _inputs(4, 9, 11, "border")
    frame = _torch_form(flat, valid, colour)
    assert frame[0, 1].all() and frame[0, 0, 0] and frame[1, :, :3].all() and not frame[1, :, 5:].any()
    assert not frame[2].any() and not frame[3].any()
    flat, valid, colour = _inputs(3, 14, 14, "letterbox")
    frame = _torch_form(flat, valid, colour)
    assert frame[0].any() and not frame[:, :, 10:].any()  # padding is never a border patch


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "images, gh, gw, kind",
    [(64, 14, 14, "border"), (8, 64, 64, "border"), (2, 100, 128, "letterbox"), (2, 130, 130, "border")]
    + list(CASES.values()),
)
def test_kernel_equals_the_torch_form_on_cuda(images: int, gh: int, gw: int, kind: str) -> None:
    flat, valid, colour = _inputs(max(images, 4) if kind.startswith("border") else images, gh, gw, kind, "cuda")
    assert torch.equal(frame_patches(flat, valid, colour), _torch_form(flat, valid, colour))


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph() -> None:
    flat, valid, colour = _inputs(8, 14, 14, "border", "cuda")
    frame_patches(flat, valid, colour)  # Triton's first launch compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = frame_patches(flat, valid, colour)
    flat.copy_(flat.flip(-1))
    graph.replay()
    assert torch.equal(out, _torch_form(flat, valid, colour))


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
