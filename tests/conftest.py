"""Shared fixtures: a tiny pipeline built once per session, and the `cuda` marker's skip."""

from __future__ import annotations

import pytest
import torch

import arrcoc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config() -> arrcoc.PipelineConfig:
    return arrcoc.PipelineConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_config: arrcoc.PipelineConfig) -> arrcoc.Pipeline:
    """Two ViT-Tiny blocks, random weights: every code path of the default at a fraction of its cost."""
    return arrcoc.Pipeline(tiny_config)
