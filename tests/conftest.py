"""Shared fixtures: a tiny pipeline built once per session, Triton's interpreter in a subprocess, and the `cuda`
marker's skip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def interpret() -> Callable[[str], Any]:
    """``interpret(test_file)``: run ``test_file`` as a script under Triton's interpreter (``TRITON_INTERPRET`` must be
    set before Triton is imported, hence a subprocess) and return the JSON of its last printed line."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parent.parent

    def run(test_file: str) -> Any:
        env = {
            **os.environ,
            "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, test_file], env=env, capture_output=True, text=True, timeout=300, cwd=root, check=False
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
