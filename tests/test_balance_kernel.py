"""Balance.forward: the Triton kernel against the torch form, to float32 rounding (bit for bit where the cover is all
of the relevance).

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported). The ``cuda`` tests run the compiled kernel (the whole head's,
against the torch forms: ``test_head_kernels.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arrcoc.config import BalanceConfig
from arrcoc.stages import balance
from arrcoc.stages.balance import Balance

#: name -> (images, gh, gw, config changes, budget, pick): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, dict, bool, bool]] = {
    "defaults-pick": (6, 14, 14, {}, True, True),
    "relevance-only": (4, 14, 14, {}, False, False),
    "diversify-novelty": (4, 9, 13, {"diversify": 0.6, "cover": 0.5, "query_cover": 0.25}, True, False),
    "no-cover-ties": (4, 8, 8, {"cover": 0.0, "weights": (1.0, 0.0, 1.0)}, True, False),
    "one-region": (2, 3, 4, {}, True, True),
}


def _inputs(images: int, gh: int, gw: int, changes: dict, budget: bool, pick: bool, device: str = "cpu"):
    """``(module, args)``: scores in [0, 1] with ties, letterbox padding, half the images with a question."""
    g = torch.Generator().manual_seed(images * 100 + gh * 10 + gw)
    module = Balance(dataclasses.replace(BalanceConfig(), **changes)).to(device)
    rh, rw = -(-gh // 4), -(-gw // 4)
    scores = torch.rand(images, 3, rh, rw, generator=g)
    scores[:, :, 0, :] = scores[:, :, :1, 0]  # equal regions: ties in the combined map
    features = torch.randn(images, gh, gw, 8, generator=g)
    valid = torch.ones(images, gh, gw)
    valid[0, :, gw // 2 :] = 0  # letterboxed
    valid[1, -1] = 0.5  # an edge half image
    query_mask = torch.zeros(images, 3, dtype=torch.bool)
    query_mask[::2, :2] = True
    spend = torch.randint(1, gh * gw // 2, (images,), generator=g) if budget else None
    chosen = (torch.rand(images, gh, gw, generator=g) > 0.7).float() * (valid > 0) if pick else None
    args = (scores, features, valid, query_mask, spend, None, None, chosen)
    return module, tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)


def _run(module: Balance, args: tuple, kernel: bool) -> tuple[torch.Tensor, dict]:
    was = balance._balance_kernel
    balance._balance_kernel = (lambda *inputs: True) if kernel else (lambda *inputs: False)
    try:
        return module(*args)
    finally:
        balance._balance_kernel = was


def _compare(module: Balance, args: tuple) -> dict[str, float]:
    """Largest difference of the relevance and of each report value; and where the cover is all of the relevance and
    counts picked patches (no question, ``cover = 1``, a pick) whether the relevance is the same bits."""
    got, got_report = _run(module, args, True)
    want, want_report = _run(module, args, False)
    out = {"relevance": (got - want).abs().max().item()}
    for key, value in want_report.items():
        out[key] = (got_report[key].float() - value.float()).abs().max().item()
    covered = ~want_report["has_query"] & (module.cover == 1) & (args[7] is not None)
    out["covered_equal"] = float(torch.equal(got[covered], want[covered]))
    return out


def _interpret_all() -> dict[str, dict[str, float]]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    return {name: _compare(*_inputs(*case)) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_agrees_with_the_torch_form(interpreted: dict[str, dict[str, float]], name: str) -> None:
    result = interpreted[name]
    assert result.pop("covered_equal") == 1.0
    assert max(result.values()) < 1e-5, result


def test_the_cases_cover_what_they_are_named_for() -> None:
    module, args = _inputs(*CASES["defaults-pick"])
    relevance, report = _run(module, args, False)
    asked = report["has_query"]
    assert asked.any() and not asked.all() and (report["coverage"][~asked] == 1).all()
    module, args = _inputs(*CASES["diversify-novelty"])
    assert (_run(module, args, False)[1]["redundancy"] > 0).any()


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_agrees_with_the_torch_form_on_cuda(name: str) -> None:
    result = _compare(*_inputs(*CASES[name], device="cuda"))
    assert result.pop("covered_equal") == 1.0
    assert max(result.values()) < 1e-5, result


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
