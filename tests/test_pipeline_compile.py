"""The stages under ``torch.compile``: the score stage compiles with inductor and matches eager, and the
perspectival scorer's surround mean (written without ``count_include_pad=False``, which inductor's Triton code
generator of torch 2.11 failed on) equals the pooling it replaces bit for bit."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc.stages.scorers import _surround_mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("size", [3, 5, 7])
def test_surround_mean_equals_avg_pool_without_padding_counted(dtype: torch.dtype, size: int) -> None:
    g = torch.Generator().manual_seed(size)
    for gh, gw in [(1, 1), (2, 9), (14, 14), (23, 17)]:
        values = (torch.randn(2, 3, gh, gw, generator=g) * 40).to(dtype)
        weights = torch.rand(2, 1, gh, gw, generator=g) * (torch.rand(2, 1, gh, gw, generator=g) > 0.3)
        for scale in (1.0, 1e-7):  # 1e-7: below the clamp, where the window size matters
            w = (weights * scale).to(dtype)
            pool = dict(kernel_size=size, stride=1, padding=size // 2, count_include_pad=False)
            expected = F.avg_pool2d(values * w, **pool) / F.avg_pool2d(w, **pool).clamp_min(1e-6)
            got = _surround_mean(values * w, w, size)
            assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.slow
def test_score_stage_compiles_with_inductor_and_matches_eager(tiny_config: arrcoc.PipelineConfig) -> None:
    """About 15 s on 2 CPU cores (inductor generates and builds C++). The compiled stage must hold no ``Max``/``Min``
    index arithmetic: that is what failed in Triton (``'-2 + ((0))' is not comparable``)."""
    from torch._inductor.utils import run_and_get_code

    pipe = arrcoc.Pipeline(tiny_config.replace(buckets=(64, 224)), cuda_graphs=False)
    stages = dict(pipe.stages(224, 64))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        (group,) = pipe.preprocessor([torch.rand(3, 200, 224, generator=g)])
        state = {
            "pixels": group.pixels,
            "valid": group.valid,
            "query": torch.randn(1, 4, pipe.width, generator=g),
            "query_mask": torch.tensor([[True, True, False, False]]),
            "budget": torch.tensor([40]),
        }
        state.update(stages["encode"](state))
        eager = stages["score"](state)["scores"]
        torch._dynamo.reset()
        try:
            compiled, code = run_and_get_code(torch.compile(stages["score"], backend="inductor", dynamic=False), state)
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled["scores"], eager, rtol=1e-5, atol=1e-5)
    index_minmax = re.findall(r"std::(?:max|min)\(static_cast<int64_t>", "\n".join(code))
    assert not index_minmax, "the score stage compiles to Max/Min index expressions again"
