"""The graph benchmark's compile isolation, without a GPU: it names the stage a compiler fails on and, where that
is the score stage, the scorer."""

from __future__ import annotations

from typing import Any

import torch

import arrcoc
from arrcoc.tools import bench_graphs


def _fails_on_avg_pool(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
    """A compiler backend that, like inductor of torch 2.11 on the GPU, fails on the perspectival scorer's padded
    pooling (the encoder's unpadded patch pooling compiles)."""
    if any("avg_pool2d" in str(node.target) and node.kwargs.get("padding") for node in gm.graph.nodes):
        raise RuntimeError("injected: The argument '-2 + ((0))' is not comparable.")
    return gm.forward


def test_a_failing_score_stage_is_narrowed_to_its_scorer(tiny_config: arrcoc.PipelineConfig) -> None:
    pipe = arrcoc.Pipeline(tiny_config.replace(buckets=(64,)), cuda_graphs=False)
    with torch.inference_mode():
        (group,) = pipe.preprocessor([torch.rand(3, 50, 64)])
        inputs = {
            "pixels": group.pixels,
            "valid": group.valid,
            "query": torch.zeros(1, 1, pipe.width),
            "query_mask": torch.zeros(1, 1, dtype=torch.bool),
            "budget": torch.tensor([8]),
        }
        result: dict[str, Any] = {}
        bench_graphs._isolate(pipe.stages(64, 64), inputs, result, lambda: None, pipe, backend=_fails_on_avg_pool)
    assert (
        list(result["inductor_stage_errors"]) == ["score"]
        and "not comparable" in result["inductor_stage_errors"]["score"]
    )
    assert result["inductor_stages_ok"] == ["balance", "allocate", "compress", "encode"]
    assert list(result["inductor_scorer_errors"]) == ["perspectival"]
    assert result["inductor_scorers_ok"] == ["propositional", "participatory"]
    table = bench_graphs._markdown(
        {
            "device": "cpu",
            "torch": torch.__version__,
            "encoder": "tiny",
            "encoder_dtype": "float32",
            "date": "now",
            "results": [],
        }
    )
    assert "graphed" in table  # the report renders without results
